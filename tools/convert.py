"""Checkpoint conversion: read any supported ViT checkpoint; write it for this suite, timm, detectron2 or
OpenMMLab.

    python -m tools.convert runs/pretrain-base/checkpoint-stage1-student.pth vit_b_dbot.pth --to timm --model base

`read_backbone(path)` is the one entry point every downstream task uses to start from pretrained weights.
It understands
- this suite's pretraining files (student of any stage, teacher, checkpoint-last),
- the authors' released dBOT files and MAE's (`{'model': ..., 'optimizer', 'epoch', 'scaler', 'args'}`,
  with decoder and mask-token keys in pretraining files, `head`/`fc_norm` in fine-tuned ones),
- plain timm ViT state dicts, `.pth` or `.safetensors`,
and returns the encoder weights under timm names with a note of what was dropped. Loading never executes
pickled code (see core.checkpoint.load).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from core import checkpoint as ckpt

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


# ------------------------------------------------------------------------------------------------ writers
LAYOUTS = ("backbone", "timm", "detectron2", "mmseg", "mmpretrain")


def fit_to_model(sd: dict, model_size: str, img_size: int | None = None, source: str = "<state dict>"):
    """Check `sd` against this suite's ViT of `model_size` (at `img_size`), resizing the position embedding to
    its grid. Returns (state dict, LoadReport); a shape that cannot be adapted is a CheckpointError."""
    from core.vit import build_vit, resize_pos_embed

    with torch.device("meta"):
        model = build_vit(model_size, **({"img_size": img_size} if img_size else {}))

    def pos(name, t, target):
        return resize_pos_embed(t, model.grid_size) if name == "pos_embed" else None

    report = ckpt.LoadReport()
    own = model.state_dict()
    out, problems = {}, []
    for k, v in sd.items():
        if k not in own:
            report.unexpected.append(k)
            continue
        if v.shape != own[k].shape:
            fixed = pos(k, v, own[k])
            if fixed is None or fixed.shape != own[k].shape:
                problems.append(f"{k}: checkpoint {tuple(v.shape)} vs {model_size} {tuple(own[k].shape)}")
                continue
            report.adapted[k] = f"{tuple(v.shape)} -> {tuple(fixed.shape)}"
            v = fixed
        out[k] = v
        report.loaded.append(k)
    if problems:
        raise ckpt.CheckpointError(f"{source}: does not fit a ViT-{model_size}: " + "; ".join(problems[:4]))
    report.missing = [k for k in own if k not in out]
    return out, report


def to_timm(sd: dict) -> dict:
    """timm's VisionTransformer names are this suite's: a plain state dict (load with num_classes=0, or with
    the fine-tuned head and global_pool='avg' when `head`/`fc_norm` are present)."""
    return dict(sd)


def to_detectron2(sd: dict) -> dict:
    """detectron2 ViTDet (`modeling/backbone/vit.py` under SimpleFeaturePyramid): `backbone.net.` prefix, no
    cls token and no final norm (the position embedding keeps its cls entry: pretrain_use_cls_token)."""
    return {
        f"backbone.net.{k}": v
        for k, v in sd.items()
        if k != "cls_token" and not k.startswith(("norm.", *HEAD_PREFIXES))
    }


def to_mmseg(sd: dict) -> dict:
    """mmsegmentation's VisionTransformer (the mapping of its tools/model_converters/vit2mmseg.py):
    blocks -> layers, norm1/2 -> ln1/2, attn.qkv -> attn.attn.in_proj_, attn.proj -> attn.attn.out_proj,
    mlp.fc1/fc2 -> ffn.layers.0.0 / ffn.layers.1, patch_embed.proj -> patch_embed.projection, norm -> ln1."""
    out = {}
    for k, v in sd.items():
        if k.startswith(HEAD_PREFIXES):
            continue
        if k.startswith("norm."):
            k = "ln1." + k[len("norm.") :]
        elif k.startswith("patch_embed.proj"):
            k = k.replace("patch_embed.proj", "patch_embed.projection")
        elif k.startswith("blocks."):
            k = (
                k.replace("norm1", "ln1")
                .replace("norm2", "ln2")
                .replace("mlp.fc1", "ffn.layers.0.0")
                .replace("mlp.fc2", "ffn.layers.1")
                .replace("attn.qkv.", "attn.attn.in_proj_")
                .replace("attn.proj", "attn.attn.out_proj")
                .replace("blocks.", "layers.", 1)
            )
        out[k] = v
    return out


def to_mmpretrain(sd: dict) -> dict:
    """mmpretrain / mmcls VisionTransformer (the backbone of mmdet's ViTDet project): as mmseg but attention
    keeps `attn.qkv` / `attn.proj`."""
    out = {}
    for k, v in to_mmseg(sd).items():
        out[k.replace("attn.attn.in_proj_", "attn.qkv.").replace("attn.attn.out_proj", "attn.proj")] = v
    return out


def write(sd: dict, path: str | os.PathLike, layout: str, meta: dict | None = None) -> Path:
    """Save `sd` (timm names) in `layout`; `.safetensors` paths get a flat safetensors file."""
    if layout not in LAYOUTS:
        raise ValueError(f"--to must be one of {LAYOUTS}, got {layout!r}")
    path = Path(path)
    if layout == "backbone":
        weights, container = (
            dict(sd),
            lambda w: {"model": w, "meta": {"format": "dbot-suite/backbone/v1", **(meta or {})}},
        )
    elif layout == "timm":
        weights, container = to_timm(sd), lambda w: w
    elif layout == "detectron2":
        weights, container = (
            to_detectron2(sd),
            lambda w: {"model": w, "__author__": "dbot-suite", "matching_heuristics": False},
        )
    else:
        weights = to_mmseg(sd) if layout == "mmseg" else to_mmpretrain(sd)
        container = lambda w: {"state_dict": w, "meta": {"converted_by": "dbot-suite", **(meta or {})}}  # noqa: E731
    weights = {k: v.contiguous() for k, v in weights.items()}
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(weights, str(path))
        return path
    return ckpt.save(container(weights), path)


def convert(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    layout: str,
    *,
    model: str | None = None,
    img_size: int | None = None,
    key: str | None = None,
    keep_head: bool = False,
):
    """Read any supported checkpoint, optionally check/adapt it to a model size and resolution, write `layout`.
    Returns (path, BackboneInfo, LoadReport or None)."""
    sd, info = read_backbone(src, key=key, keep_head=keep_head)
    report = None
    if model is not None:
        head = {k: v for k, v in sd.items() if k.startswith(HEAD_PREFIXES)}
        sd, report = fit_to_model({k: v for k, v in sd.items() if k not in head}, model, img_size, str(src))
        sd.update(head)
    path = write(sd, dst, layout, meta={"source": str(src), "source_layout": info.layout, "model": model})
    return path, info, report


def main(argv=None) -> None:
    import argparse

    p = argparse.ArgumentParser(prog="python -m tools.convert", description=__doc__.split("\n\n")[0])
    p.add_argument("src", help="checkpoint to read (.pth/.pt/.safetensors): this suite's, the authors', MAE's, timm's")
    p.add_argument("dst", help="file to write (.pth, or .safetensors for a flat file)")
    p.add_argument("--to", default="backbone", choices=LAYOUTS, help="layout to write")
    p.add_argument("--model", default=None, help="check against this size (tiny/small/base/large/huge)")
    p.add_argument("--img-size", type=int, default=None, help="resize the position embedding for this resolution")
    p.add_argument("--key", default=None, help="entry of the container to read (e.g. teacher)")
    p.add_argument("--keep-head", action="store_true", help="keep head/fc_norm of fine-tuned checkpoints")
    a = p.parse_args(argv)
    path, info, report = convert(
        a.src, a.dst, a.to, model=a.model, img_size=a.img_size, key=a.key, keep_head=a.keep_head
    )
    print(
        f"read {a.src} ({info.layout}); dropped {len(info.dropped)} pretraining/head tensors"
        + (f": {', '.join(info.dropped[:6])}{' ...' if len(info.dropped) > 6 else ''}" if info.dropped else "")
    )
    if report is not None:
        print(report.summary())
    print(f"wrote {path} ({a.to} layout)")


if __name__ == "__main__":
    main()
