"""What pretraining records about the weights it writes, defined here once: the format tag of its checkpoints,
the run setting the results table names a run by, and the key prefixes of the student's pretraining-only parts.

Every checkpoint pretraining writes (the stage files and checkpoint-last.pth) carries in its `meta` (`records`):
- `format`: FORMAT;
- `pretraining`: the setting of the file's own weights (`setting_from_config`): the student of a stage, or for a
  `-teacher.pth` file the teacher that stage learnt from;
- `pretraining_entries`: the setting of other weights in the container by entry (checkpoint-last's `target`,
  the teacher of the current stage), when there are any;
- `not_encoder`: the key prefixes of the student's parts a plain ViT encoder does not have (`dbot.PRETRAIN_ONLY`).
`core.weights` reads these records; it never reads pretraining's config keys.

Checkpoints written by older versions of the suite lack the records; `core.weights.pretraining_setting` calls
them unknown rather than guess. `read_setting` (what `tools.table` uses) reconstructs their setting here, from the
config the run saved, by the same rules the records are written with.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from core import checkpoint as ckpt
from core.vit import PRESETS
from core.weights import is_unknown, pretraining_setting, size_of_arch
from pretrain.dbot import PRETRAIN_ONLY

FORMAT = "dbot-suite/pretrain/v1"


def _get(d, dotted: str, default=None):
    for part in dotted.split("."):
        if not isinstance(d, Mapping) or part not in d:
            return default
        d = d[part]
    return d


def setting_from_config(config: Mapping, stage: int, weights: str = "student", meta: Mapping | None = None) -> dict:
    """The pretraining setting of the encoder of a pretraining run configured by `config` (its resolved
    config.yaml as a mapping).

    stage: the stage whose student the weights are (for `weights="teacher"`: 0, the first target itself).
    weights: "student" (a dBOT student after `stage + 1` stages) or "teacher" (the stage-0 ViT teacher).
    meta: a stage checkpoint's `meta` (student_arch, teacher: {kind, args}), which is more precise than the
    config where both are present.

    Returns a JSON-ready dict:
    `{"weights", "stage", "student": {"size", "kind", "patch_size", "embed_dim", "depth"},
      "first_target": {"kind", "random", "timm_name", "norm_pix"}, "teacher": {"size", "kind"} or None,
      "bootstrap"}`. `first_target.random` is True for dBOT's start (a randomly initialised ViT teacher);
    `teacher` is the first stage's teacher network (None for pixels/HOG); kind "vit", "beit", "timm", "ema".
    """
    if weights not in ("student", "teacher"):
        raise ValueError(f"weights must be 'student' or 'teacher', got {weights!r}")
    meta = meta or {}
    size = _get(config, "model.size")
    kind = _get(config, "model.kind") or "mae"
    arch = dict(PRESETS.get(size, {}))
    arch.update({k: v for k in ("embed_dim", "num_heads", "img_size") if (v := _get(config, f"model.{k}"))})
    if isinstance(meta.get("student_arch"), Mapping):
        arch.update(meta["student_arch"])
    target = _get(config, "target.kind") or "teacher"
    ckpt_teacher = _get(config, "teacher.checkpoint")
    tsize = _get(config, "teacher.size") or size
    if target == "teacher":
        tkind = "vit" if ckpt_teacher or kind != "beit" else "beit"
        teacher = {"size": tsize, "kind": tkind}
    elif target == "ema":
        teacher = {"size": size, "kind": "ema"}
    elif target == "timm":
        teacher = {"size": None, "kind": "timm"}
    else:
        teacher = None
    spec = meta.get("teacher")  # pretrain.dbot.teacher_spec: {"kind", "args": architecture}
    if stage == 0 and teacher is not None and isinstance(spec, Mapping) and isinstance(spec.get("args"), Mapping):
        teacher["size"] = size_of_arch(spec["args"]) or teacher["size"]
    norm_pix = _get(config, "target.pixels.norm_pix")
    return {
        "weights": weights,
        "stage": int(stage),
        "student": {
            "size": size,
            "kind": kind,
            "patch_size": arch.get("patch_size"),
            "embed_dim": arch.get("embed_dim"),
            "depth": arch.get("depth"),
        },
        "first_target": {
            "kind": target,
            "random": target == "teacher" and not ckpt_teacher,
            "timm_name": _get(config, "target.timm.name") if target == "timm" else None,
            "norm_pix": (norm_pix is not False) if target == "pixels" else None,
        },
        "teacher": teacher,
        "bootstrap": _get(config, "teacher.bootstrap", True) is not False,
    }


def stage_setting(config: Mapping, stage: int, meta: Mapping, teacher: bool = False) -> dict:
    """The setting of a pretraining run's stage-`stage` student, or (teacher=True) of the teacher it learnt
    from: the stage-(k-1) student when the run bootstraps (k >= 1), else the first target itself."""
    if not teacher:
        return setting_from_config(config, stage, "student", meta)
    if stage >= 1 and _get(config, "teacher.bootstrap", True) is not False:
        return setting_from_config(config, stage - 1, "student", meta={})
    return setting_from_config(config, 0, "teacher", meta if stage == 0 else {})


def records(config: Mapping, stage: int, meta: Mapping, *, teacher_file: bool, has_teacher: bool) -> dict:
    """The `meta` fields `core.weights` reads (see the module docstring) of a checkpoint of stage `stage`:
    a student container (a stage file, or checkpoint-last, whose `target` entry holds the teacher:
    `has_teacher`), or a `-teacher.pth` file (`teacher_file`)."""
    out = {
        "pretraining": stage_setting(config, stage, meta, teacher=teacher_file),
        "not_encoder": list(PRETRAIN_ONLY),
    }
    if has_teacher and not teacher_file:
        out["pretraining_entries"] = {"target": stage_setting(config, stage, meta, teacher=True)}
    return out


# ------------------------------------------------------------------------------------- older checkpoints
def _config_beside(path: Path) -> dict | None:
    """The run folder's resolved config.yaml (teacher files carry no config of their own)."""
    import yaml

    try:
        doc = yaml.safe_load((path.parent / "config.yaml").read_text())
    except (OSError, yaml.YAMLError, UnicodeDecodeError):
        return None
    return doc if isinstance(doc, dict) else None


def read_setting(path: str | os.PathLike, key: str | None = None, _depth: int = 0) -> dict | None:
    """`core.weights.pretraining_setting`, and for a checkpoint it calls unknown (written before checkpoints
    recorded their setting) the setting reconstructed from the run's saved config: a pretraining stage file
    by its stage and name (`-teacher.pth`: the teacher of that stage), checkpoint-last by its stage (`key`
    "target": its teacher), a downstream file by the `checkpoint` its saved config started from. Still unknown
    (no saved config) stays unknown."""
    path = Path(path)
    found = pretraining_setting(path, key)
    if not is_unknown(found):
        return found
    obj = ckpt.load(path)
    meta = obj.get("meta") if isinstance(obj, Mapping) else {}
    config = obj.get("config") if isinstance(obj.get("config"), Mapping) else _config_beside(path)
    if meta.get("format") != FORMAT:
        start = _get(config, "checkpoint")
        if not start or _depth >= 8:
            return found
        start = Path(start)
        if not start.is_file() and (path.parent / start.name).is_file():
            start = path.parent / start.name
        return read_setting(start, _depth=_depth + 1) if start.is_file() else found
    if config is None:
        return found
    is_teacher = key in ("target", "teacher") or path.name.endswith("-teacher.pth")
    return stage_setting(config, int(meta.get("stage", 0)), meta, teacher=is_teacher)
