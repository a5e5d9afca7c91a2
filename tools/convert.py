"""Checkpoint conversion: read any supported ViT checkpoint; write it for this suite, timm, detectron2 or
OpenMMLab.

    python -m tools.convert runs/pretrain-base/checkpoint-stage1-student.pth vit_b_dbot.pth --to timm --model base

Reading (`core.weights`: every container this suite, the authors, MAE and timm write, size guessing, shape
adapters) is shared with the tasks; this file holds the writers and the command line.

Writers (`--to`), each a plain function of a timm-named state dict:
- `backbone`: this suite's `{'model', 'meta'}` file (what every downstream task reads back);
- `timm`: a flat state dict for `timm.create_model('vit_base_patch16_224', num_classes=0, checkpoint_path=...)`;
- `detectron2`: ViTDet (`detectron2/modeling/backbone/vit.py` inside `SimpleFeaturePyramid`): keys
  `backbone.net.*`, no cls token and no final norm (the position table keeps its cls entry,
  `pretrain_use_cls_token=True`); the decomposed relative-position tables are new and start at zero;
- `mmdet`: mmdetection's `projects/ViTDet` `ViT` backbone, which reads `ckpt['model']` under timm/MAE names;
- `mmseg`: mmsegmentation's `VisionTransformer` (the names of its `tools/model_converters/vit2mmseg.py`);
- `mmpretrain`: mmpretrain's `VisionTransformer` (`layers.N.ln1`, `attn.qkv`, `ffn.layers.0.0`, final `ln1`).

With `--model` (or the size guessed from the weights) the tensors are checked against this suite's ViT of
that size, the position embedding is resized bicubically to `--img-size`, and `--patch-size` resizes the
patch-embedding kernel the way ViTDet made its ViT-H/16 from MAE's ViT-H/14; the report lists what was
dropped, missing, unexpected and reshaped, and a tensor that cannot be adapted is an error naming it.
"""

from __future__ import annotations

import os
from pathlib import Path

from core import checkpoint as ckpt
from core.weights import HEAD_PREFIXES, arch_of, fit_to_model, guess_size, read_backbone

# ------------------------------------------------------------------------------------------------ writers
LAYOUTS = ("backbone", "timm", "detectron2", "mmdet", "mmseg", "mmpretrain")


def _encoder_only(sd: dict) -> dict:
    """Drop what detection backbones do not have: cls token, final norm, classifier."""
    return {k: v for k, v in sd.items() if k != "cls_token" and not k.startswith(("norm.", *HEAD_PREFIXES))}


def to_timm(sd: dict) -> dict:
    """timm's VisionTransformer names are this suite's: a plain state dict (load with num_classes=0, or with
    the fine-tuned head and global_pool='avg' when `head`/`fc_norm` are present)."""
    return dict(sd)


def to_detectron2(sd: dict) -> dict:
    """detectron2 ViTDet (`modeling/backbone/vit.py` under SimpleFeaturePyramid): `backbone.net.` prefix, no
    cls token and no final norm (the position embedding keeps its cls entry: pretrain_use_cls_token)."""
    return {f"backbone.net.{k}": v for k, v in _encoder_only(sd).items()}


def to_mmdet(sd: dict) -> dict:
    """mmdetection's projects/ViTDet `ViT`: timm/MAE block names, no cls token, no final norm (its
    `init_weights` reads `ckpt['model']`)."""
    return _encoder_only(sd)


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
    """mmpretrain / mmcls VisionTransformer: as mmseg but attention keeps `attn.qkv` / `attn.proj`."""
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
        weights = dict(sd)
        container = lambda w: {"model": w, "meta": {"format": "dbot-suite/backbone/v1", **(meta or {})}}  # noqa: E731
    elif layout == "timm":
        weights, container = to_timm(sd), lambda w: w
    elif layout == "detectron2":
        weights = to_detectron2(sd)
        container = lambda w: {"model": w, "__author__": "dbot-suite", "matching_heuristics": False}  # noqa: E731
    elif layout == "mmdet":
        weights, container = to_mmdet(sd), lambda w: {"model": w}
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
    patch_size: int | None = None,
    key: str | None = None,
    keep_head: bool = False,
):
    """Read any supported checkpoint, check/adapt it to a model size (given, or guessed from the weights)
    and resolution, write `layout`. Returns (path, BackboneInfo, LoadReport or None if the size is unknown)."""
    sd, info = read_backbone(src, key=key, keep_head=keep_head)
    size = model or guess_size(sd)
    if size is None and (img_size or patch_size):
        raise ckpt.CheckpointError(
            f"{src}: weights of width {arch_of(sd)['embed_dim']} / depth {arch_of(sd)['depth']} match no preset; "
            "give --model to resize them"
        )
    report = None
    if size is not None:
        head = {k: v for k, v in sd.items() if k.startswith(HEAD_PREFIXES)}
        body = {k: v for k, v in sd.items() if k not in head}
        sd, report = fit_to_model(body, size, img_size, str(src), patch_size=patch_size)
        sd.update(head)
    meta = {"source": str(src), "source_layout": info.layout, "model": size, "img_size": img_size}
    path = write(sd, dst, layout, meta=meta)
    return path, info, report


def main(argv=None) -> None:
    import argparse

    p = argparse.ArgumentParser(prog="python -m tools.convert", description=__doc__.split("\n\n")[0])
    p.add_argument("src", help="checkpoint to read (.pth/.pt/.safetensors): this suite's, the authors', MAE's, timm's")
    p.add_argument("dst", help="file to write (.pth, or .safetensors for a flat file)")
    p.add_argument("--to", default="backbone", choices=LAYOUTS, help="layout to write")
    p.add_argument(
        "--model", default=None, help="check against this size (tiny/small/base/large/huge); default: guessed"
    )
    p.add_argument("--img-size", type=int, default=None, help="resize the position embedding for this resolution")
    p.add_argument("--patch-size", type=int, default=None, help="resize the patch kernel (ViTDet's ViT-H: 16)")
    p.add_argument("--key", default=None, help="entry of the container to read (e.g. teacher)")
    p.add_argument("--keep-head", action="store_true", help="keep head/fc_norm of fine-tuned checkpoints")
    a = p.parse_args(argv)
    try:
        path, info, report = convert(
            a.src,
            a.dst,
            a.to,
            model=a.model,
            img_size=a.img_size,
            patch_size=a.patch_size,
            key=a.key,
            keep_head=a.keep_head,
        )
    except ckpt.CheckpointError as e:
        raise SystemExit(f"error: {e}") from None
    print(
        f"read {a.src} ({info.layout}); dropped {len(info.dropped)} pretraining/head tensors"
        + (f": {', '.join(info.dropped[:6])}{' ...' if len(info.dropped) > 6 else ''}" if info.dropped else "")
    )
    if report is not None:
        print(report.summary())
    else:
        print("size not recognised (no --model): written unchecked")
    print(f"wrote {path} ({a.to} layout)")


if __name__ == "__main__":
    main()
