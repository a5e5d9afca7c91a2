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

`pretraining_setting(path)` is what a checkpoint made by this suite records in its `meta` about how its weights
were pretrained (student, first target, teacher, bootstrapping, stage; the fields are pretraining's, written by
`pretrain.setting`); every downstream task writes it into results.json under `pretraining`, and `tools.table`
places the run's row by it. Files made elsewhere give None; a suite file that records nothing is "unknown".

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

SUITE_PREFIX = "dbot-suite/"  # the `meta.format` of every checkpoint this suite writes starts with it
# Keys of pretraining files made elsewhere that are not the encoder: the decoder (MAE: decoder_pred; the released
# dBOT: decoder_predp), the mask token, the BEiT-style student's shared relative position bias. A checkpoint of
# this suite's pretraining records its own (`meta["not_encoder"]`); these apply to files that record none.
RELEASED_NOT_ENCODER = ("decoder_", "mask_token", "rel_pos_bias.")
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
        if isinstance(meta, dict) and str(meta.get("format", "")).startswith(SUITE_PREFIX):
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


def not_encoder(obj) -> tuple[str, ...]:
    """Key prefixes of a loaded checkpoint's pretraining-only parts: those its `meta` records (this suite's
    pretraining), else `RELEASED_NOT_ENCODER`."""
    meta = obj.get("meta") if isinstance(obj, Mapping) else None
    recorded = meta.get("not_encoder") if isinstance(meta, Mapping) else None
    if isinstance(recorded, list | tuple) and all(isinstance(k, str) for k in recorded):
        return tuple(recorded)
    return RELEASED_NOT_ENCODER


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
    drop = not_encoder(obj) + (() if keep_head else HEAD_PREFIXES)
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


def unknown_setting(fmt: str) -> dict:
    """The setting of a suite checkpoint that records none: written by an older version of the suite. Said
    so, never guessed (`pretrain.setting.read_setting` reconstructs such files from their saved config)."""
    return {"unknown": f"a {fmt} checkpoint that records no pretraining setting (written by an older version)"}


def is_unknown(setting) -> bool:
    """Whether `setting` is `unknown_setting`'s answer."""
    return isinstance(setting, Mapping) and "unknown" in setting


def size_of_arch(arch: Mapping | None) -> str | None:
    """The preset whose width, depth and patch size `arch` (ViT kwargs) has; None if none does."""
    if not arch:
        return None
    for name, p in PRESETS.items():
        if all(arch.get(k) == p[k] for k in ("embed_dim", "depth", "patch_size")):
            return name
    return None


def _config_of(obj: Mapping, path: Path) -> Mapping | None:
    """The run's resolved config: saved in the checkpoint, else the run folder's config.yaml."""
    if isinstance(obj.get("config"), Mapping):
        return obj["config"]
    import yaml

    try:
        doc = yaml.safe_load((path.parent / "config.yaml").read_text())
    except (OSError, yaml.YAMLError, UnicodeDecodeError):
        return None
    return doc if isinstance(doc, Mapping) else None


def pretraining_setting(path: str | os.PathLike, key: str | None = None, _depth: int = 0) -> dict | None:
    """How the weights of a checkpoint made by this suite were pretrained, as the checkpoint's `meta` records
    it; None for files made elsewhere (the authors', MAE's, timm's) and for weights not pretrained here.

    - `meta["pretraining"]` is the setting of the file's own weights (pretraining's stage files and
      checkpoint-last: the student, or the teacher of a `-teacher.pth` file, `pretrain.setting`; a downstream
      task's files: the setting of the checkpoint it started from, None from random init).
    - `key` (an entry of the container, as for `read_backbone`): `meta["pretraining_entries"][key]`
      (checkpoint-last's `target`: its teacher); None if the file records the entries and not this one.
    - A suite file that records nothing (written by an older version): a downstream file whose saved config
      names the `checkpoint` it started from leads to that file; otherwise `unknown_setting`.
    """
    path = Path(path)
    obj = ckpt.load(path)
    meta = obj.get("meta") if isinstance(obj, Mapping) else None
    if not isinstance(meta, Mapping) or not str(meta.get("format", "")).startswith(SUITE_PREFIX):
        return None
    if "pretraining" in meta:
        recorded = meta["pretraining"] if key is None else (meta.get("pretraining_entries") or {}).get(key)
        return dict(recorded) if isinstance(recorded, Mapping) else None
    config = _config_of(obj, path)
    if key is None and isinstance(config, Mapping) and "checkpoint" in config:
        start = config["checkpoint"]
        if not start:
            return None
        start = Path(start)
        if not start.is_file() and (path.parent / start.name).is_file():
            start = path.parent / start.name
        if start.is_file() and _depth < 8:
            return pretraining_setting(start, _depth=_depth + 1)
    return unknown_setting(str(meta["format"]))
