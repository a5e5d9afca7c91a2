"""The classifier: the shared ViT with a head, started from any checkpoint `core.weights` reads.

Fine-tuning (MAE/dBOT): global average pool of the patch tokens + fc_norm (or the cls token + norm), drop
path, a new linear head initialised trunc-normal with std 0.01 (dBOT; MAE uses 2e-5).
Linear probe (MAE): the same encoder frozen, head = BatchNorm1d(affine=False, eps 1e-6) + linear, cls token.
"""

from __future__ import annotations

import torch
from torch import nn

from core import checkpoint as ckpt
from core.vit import ViT, preset
from core.weights import fit_to_model, read_backbone, shape_adapters


def build_classifier(cfg, num_classes: int) -> ViT:
    m = cfg.model
    arch = preset(m.size, **({"img_size": m.img_size} if m.img_size else {}))
    linprobe = cfg.task == "linprobe"
    model = ViT(
        **arch,
        num_classes=num_classes,
        global_pool=m.global_pool,
        drop_path_rate=0.0 if linprobe else m.drop_path,
        grad_checkpointing=m.grad_checkpointing,
    )
    if linprobe:
        model.head = nn.Sequential(nn.BatchNorm1d(model.embed_dim, affine=False, eps=1e-6), model.head)
    return model


def read_pretrained(path: str, model_size: str, img_size: int | None) -> tuple[dict, list[str]]:
    """Encoder weights of any checkpoint `core.weights` reads (an old head dropped, a fine-tuned file's
    fc_norm kept) and the names dropped; checked against a ViT of `model_size` so that a file of another
    size fails here, before any data is read."""
    sd, info = read_backbone(path, keep_head=True)
    head = [k for k in sd if k.startswith("head.")]
    sd = {k: v for k, v in sd.items() if k not in head}
    fit_to_model({k: v for k, v in sd.items() if not k.startswith("fc_norm.")}, model_size, img_size, str(path))
    return sd, info.dropped + head


def load_pretrained(model: ViT, pretrained: tuple[dict, list[str]], source: str, head_init_std: float):
    """Copy the encoder weights of `read_pretrained` into `model` (position embedding resized to its grid,
    patch kernel to its patch size); the head is new.

    fc_norm / norm may be absent (a pretraining file has `norm`, a fine-tuned one `fc_norm`): they keep their
    initial values (LayerNorm 1/0), as in MAE. Anything else missing is an error."""
    sd, dropped = pretrained
    if isinstance(model.norm, nn.Identity):
        sd = {k: v for k, v in sd.items() if not k.startswith("norm.")}
    if isinstance(model.fc_norm, nn.Identity):
        sd = {k: v for k, v in sd.items() if not k.startswith("fc_norm.")}
    report = ckpt.load_weights(
        model,
        sd,
        source=source,
        adapters=shape_adapters(model.grid_size, model.patch_embed.patch_size[0]),
        allow_missing=lambda k: k.startswith(("head.", "fc_norm.", "norm.")),
    )
    report.unexpected += dropped
    init_head(model, head_init_std)
    return report


@torch.no_grad()
def init_head(model: ViT, std: float) -> None:
    linear = model.head[-1] if isinstance(model.head, nn.Sequential) else model.head
    nn.init.trunc_normal_(linear.weight, std=std)
    nn.init.zeros_(linear.bias)


def freeze_for_linprobe(model: ViT) -> None:
    """Only the head (BatchNorm + linear) trains."""
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith("head."))
