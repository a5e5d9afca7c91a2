"""Checkpoint conversion: read any supported ViT checkpoint into timm's ViT key layout.

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

import torch

from core import checkpoint as ckpt

# keys of the pretraining decoder (MAE: decoder_pred; released dBOT: decoder_predp) and mask token
DECODER_PREFIXES = ("decoder_", "mask_token")
HEAD_PREFIXES = ("head.", "head_dist.", "fc_norm.")


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
    drop = DECODER_PREFIXES + (() if keep_head else HEAD_PREFIXES)
    dropped = [k for k in sd if k.startswith(drop)]
    sd = {k: v for k, v in sd.items() if not k.startswith(drop)}
    if "cls_token" not in sd or "patch_embed.proj.weight" not in sd:
        raise ckpt.CheckpointError(
            f"{path}: not a ViT checkpoint in a known layout (layout {layout!r}); expected keys such as "
            f"cls_token, pos_embed, patch_embed.proj.weight, blocks.N...; found e.g. {sorted(sd)[:8]}"
        )
    return sd, BackboneInfo(source=str(path), layout=layout, dropped=dropped)
