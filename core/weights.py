"""Reading pretrained ViT weights, for every task: container formats, the encoder's tensors under timm names,
the architecture the weights imply, shape adapters, and the pretraining setting a suite checkpoint records.

`read_backbone(path)` is the one entry point every downstream task uses to start from pretrained weights.
It understands
- this suite's pretraining files (student of any stage, teacher, checkpoint-last) and fine-tuning files,
- the authors' released dBOT files and MAE's (`{'model': ..., 'optimizer', 'epoch', 'scaler', 'args'}`,
  with decoder and mask-token keys in pretraining files, `head`/`fc_norm` in fine-tuned ones),
- plain timm ViT state dicts, `.pth` or `.safetensors`,
and returns the encoder weights under timm names with a note of what was dropped. Loading never executes
pickled code (see core.checkpoint.load).

`fit_to_model` checks weights against this suite's ViT of a size (position embedding resized bicubically,
patch kernel resized for another patch size) and reports what was dropped, missing, unexpected and reshaped;
a tensor that cannot be adapted is a CheckpointError naming it.

`pretraining_setting(path)` is what a checkpoint made by this suite's pretraining says about how it was made
(student, first target, teacher, bootstrapping, stage); every downstream task writes it into results.json
under `pretraining`, and `tools.table` places the run's row by it. Files made elsewhere give None.

Writers for other codebases live in `tools/convert.py`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from core import checkpoint as ckpt
from core.vit import PRESETS, build_vit, resize_pos_embed

# pretraining-only keys: the decoder (MAE: decoder_pred; released dBOT: decoder_predp), the mask token, the
# symmetric student's shared relative position bias
DECODER_PREFIXES = ("decoder_", "mask_token", "rel_pos_bias.")
HEAD_PREFIXES = ("head.", "head_dist.", "fc_norm.")
WRAPPER_PREFIXES = ("teacher.", "encoder.", "backbone.")


@dataclass
class BackboneInfo:
    source: str
    layout: str
    dropped: list[str] = field(default_factory=list)


def detect_layout(obj) -> str:
    """A name for the container layout of a loaded checkpoint object."""
    if isinstance(obj, dict):
        meta = obj.get("meta")
        if isinstance(meta, dict) and str(meta.get("format", "")).startswith("dbot-suite/"):
            return meta["format"]
        if "model" in obj and isinstance(obj["model"], dict):
            keys = obj["model"].keys()
            if any(k.startswith("decoder_predp") for k in keys):
                return "dbot-released/pretrain"
            if any(k.startswith("decoder_") for k in keys):
                return "mae/pretrain"
            if "head.weight" in keys:
                return "mae/finetune"
            return "model-dict"
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return "state-dict"
    return "unknown"


def read_backbone(path: str | os.PathLike, key: str | None = None, keep_head: bool = False):
    """Encoder weights `{timm name: tensor}` and a BackboneInfo from any supported checkpoint.

    key: pick a specific entry of the container (e.g. "teacher" in checkpoint-last.pth).
    keep_head: keep `head.*`/`fc_norm.*` (fine-tuned classifiers) instead of dropping them.
    """
    obj = ckpt.load(path)
    layout = detect_layout(obj)
    sd = ckpt.state_dict_of(obj, path, key)
    for prefix in WRAPPER_PREFIXES:  # a teacher inside checkpoint-last's target, an encoder wrapper
        if sd and all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix) :]: v for k, v in sd.items()}
    drop = DECODER_PREFIXES + (() if keep_head else HEAD_PREFIXES)
    dropped = [k for k in sd if k.startswith(drop)]
    sd = {k: v for k, v in sd.items() if not k.startswith(drop)}
    if "cls_token" not in sd or "patch_embed.proj.weight" not in sd:
        raise ckpt.CheckpointError(
            f"{path}: not a ViT checkpoint in a known layout (layout {layout!r}); expected keys such as "
            f"cls_token, pos_embed, patch_embed.proj.weight, blocks.N...; found e.g. {sorted(sd)[:8]}"
        )
    return sd, BackboneInfo(source=str(path), layout=layout, dropped=dropped)


# ------------------------------------------------------------------------------------ sizes and adapters
def arch_of(sd: dict) -> dict:
    """What the weights say about the architecture: embed_dim, depth, patch_size, grid side, layer scale."""
    w = sd["patch_embed.proj.weight"]  # [D, 3, p, p]
    blocks = {int(k.split(".")[1]) for k in sd if k.startswith("blocks.")}
    n_pos = sd["pos_embed"].shape[1] - 1 if "pos_embed" in sd else None
    return dict(
        embed_dim=w.shape[0],
        depth=max(blocks) + 1 if blocks else 0,
        patch_size=w.shape[-1],
        grid=int(round(n_pos**0.5)) if n_pos else None,
        layer_scale="blocks.0.ls1.gamma" in sd,
    )


def guess_size(sd: dict) -> str | None:
    """The preset (tiny/small/base/large/huge) whose width, depth and patch size the weights have."""
    a = arch_of(sd)
    for name, p in PRESETS.items():
        if (p["embed_dim"], p["depth"], p["patch_size"]) == (a["embed_dim"], a["depth"], a["patch_size"]):
            return name
    return None


def model_overrides(sd: dict) -> dict:
    """Constructor arguments the weights need beyond the preset: layer scale (`blocks.N.ls1.gamma`, the
    symmetric BEiT-style student) gets a LayerScale module to load into."""
    return {"init_values": 1.0} if "blocks.0.ls1.gamma" in sd else {}


def resize_patch_embed(weight: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Patch-embedding kernel `[D, 3, p, p]` resized bicubically (align_corners False) to `patch_size`, as
    ViTDet turned MAE's ViT-H/14 into its ViT-H/16."""
    return F.interpolate(weight.float(), size=(patch_size, patch_size), mode="bicubic", align_corners=False).to(
        weight.dtype
    )


def shape_adapters(grid: tuple[int, int], patch_size: int):
    """`core.checkpoint.load_weights` adapters: position embedding to `grid`, patch kernel to `patch_size`."""

    def adapt(name, tensor, target):
        if name == "pos_embed" and tensor.ndim == 3 and tensor.shape[-1] == target.shape[-1]:
            return resize_pos_embed(tensor, grid)
        if name == "patch_embed.proj.weight" and tensor.shape[:2] == target.shape[:2]:
            return resize_patch_embed(tensor, patch_size)
        return None

    return [adapt]


def fit_to_model(
    sd: dict,
    model_size: str,
    img_size: int | None = None,
    source: str = "<state dict>",
    patch_size: int | None = None,
):
    """Check `sd` against this suite's ViT of `model_size` (at `img_size`, with `patch_size`), resizing the
    position embedding (and the patch kernel) to fit. Returns (state dict, LoadReport); a shape that cannot
    be adapted is a CheckpointError naming the tensor."""
    overrides = {k: v for k, v in (("img_size", img_size), ("patch_size", patch_size)) if v}
    with torch.device("meta"):
        model = build_vit(model_size, **overrides, **model_overrides(sd))
    adapt = shape_adapters(model.grid_size, model.patch_size)[0]
    report = ckpt.LoadReport()
    own = model.state_dict()
    out, problems = {}, []
    for k, v in sd.items():
        if k not in own:
            report.unexpected.append(k)
            continue
        if v.shape != own[k].shape:
            fixed = adapt(k, v, own[k])
            if fixed is None or fixed.shape != own[k].shape:
                problems.append(f"{k}: checkpoint {tuple(v.shape)} vs {model_size} {tuple(own[k].shape)}")
                continue
            report.adapted[k] = f"{tuple(v.shape)} -> {tuple(fixed.shape)}"
            v = fixed
        out[k] = v
        report.loaded.append(k)
    if problems:
        found = guess_size(sd)
        hint = f" (the weights look like ViT-{found})" if found and found != model_size else ""
        raise ckpt.CheckpointError(
            f"{source}: does not fit a ViT-{model_size}{hint}: "
            + "; ".join(problems[:4])
            + (f" ... (+{len(problems) - 4})" if len(problems) > 4 else "")
        )
    report.missing = [k for k in own if k not in out]
    return out, report


# ------------------------------------------------------------------------------------ pretraining setting
PRETRAIN_FORMAT = "dbot-suite/pretrain/v1"
SUITE_PREFIX = "dbot-suite/"


def _get(d, dotted: str, default=None):
    for part in dotted.split("."):
        if not isinstance(d, Mapping) or part not in d:
            return default
        d = d[part]
    return d


def size_of_arch(arch: Mapping | None) -> str | None:
    """The preset whose width, depth and patch size `arch` (ViT kwargs) has; None if none does."""
    if not arch:
        return None
    for name, p in PRESETS.items():
        if all(arch.get(k) == p[k] for k in ("embed_dim", "depth", "patch_size")):
            return name
    return None


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


def _config_beside(path: Path) -> dict | None:
    """The run folder's resolved config.yaml (teacher files carry no config of their own)."""
    import yaml

    try:
        doc = yaml.safe_load((path.parent / "config.yaml").read_text())
    except (OSError, yaml.YAMLError, UnicodeDecodeError):
        return None
    return doc if isinstance(doc, dict) else None


def pretraining_setting(path: str | os.PathLike, key: str | None = None, _depth: int = 0) -> dict | None:
    """The pretraining setting (`setting_from_config`) of a checkpoint made by this suite; None for files made
    elsewhere (the authors', MAE's, timm's) or a suite file that does not say.

    - A pretraining stage file: `checkpoint-stage{k}-student.pth` is the stage-k student; the matching
      `-teacher.pth` is the stage-(k-1) student when the run bootstraps (k >= 1), else the first target itself.
      `checkpoint-last.pth` is its student (`key="target"`: its teacher, read the same way).
    - Any suite file whose `meta` records `pretraining` (a downstream task's checkpoint) gives that record;
      otherwise a downstream file is followed to the `checkpoint` its saved config started from.
    key: as for `read_backbone`.
    """
    path = Path(path)
    obj = ckpt.load(path)
    meta = obj.get("meta") if isinstance(obj, Mapping) else None
    if not isinstance(meta, Mapping) or not str(meta.get("format", "")).startswith(SUITE_PREFIX):
        return None
    if isinstance(meta.get("pretraining"), Mapping) and key is None:
        return dict(meta["pretraining"])
    config = obj.get("config") if isinstance(obj.get("config"), Mapping) else _config_beside(path)
    if meta.get("format") != PRETRAIN_FORMAT:
        start = _get(config, "checkpoint")
        if not start or _depth >= 8:
            return None
        start = Path(start)
        if not start.is_file() and (path.parent / start.name).is_file():
            start = path.parent / start.name
        return pretraining_setting(start, _depth=_depth + 1) if start.is_file() else None
    if config is None:
        return None
    is_teacher = key in ("target", "teacher") or path.name.endswith("-teacher.pth")
    return stage_setting(config, int(meta.get("stage", 0)), meta, teacher=is_teacher)


def stage_setting(config: Mapping, stage: int, meta: Mapping, teacher: bool = False) -> dict:
    """The setting of a pretraining run's stage-`stage` student, or (teacher=True) of the teacher it learnt
    from: the stage-(k-1) student when the run bootstraps (k >= 1), else the first target itself."""
    if not teacher:
        return setting_from_config(config, stage, "student", meta)
    if stage >= 1 and _get(config, "teacher.bootstrap", True) is not False:
        return setting_from_config(config, stage - 1, "student", meta={})
    return setting_from_config(config, 0, "teacher", meta if stage == 0 else {})
