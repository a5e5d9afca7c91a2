"""The segmentor: `SegViT` backbone + UperNet decode head + auxiliary FCN head, and its loss.

`forward(images, labels)` is the training step's loss (what DDP wraps); `predict(images)` gives logits at
the input resolution for inference (mmseg's `encode_decode`). Weights come from any checkpoint
`core.weights.read_backbone` reads; the position embedding is resized to the segmentation grid once, at
load. What the checkpoint cannot provide (relative position tables, layer scale, adapters, heads) keeps its
initial value and is listed in the load report.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from core import checkpoint as ckpt
from core.vit import preset
from core.weights import read_backbone, shape_adapters
from segmentation.backbone import SegViT
from segmentation.upernet import FCNHead, UPerHead, resize

IGNORE = 255
# parameters a pretraining checkpoint does not have: they start from their initial values
NEW_PARAMS = ("relative_position_bias_table", ".ls1.", ".ls2.", "fpn1.", "fpn2.", "fpn3.", "fpn4.")


class Segmentor(nn.Module):
    """images `[N, 3, H, W]` -> logits `[N, classes, H, W]` (predict) or a dict of losses (forward).

    aux_weight: weight of the auxiliary head's loss (0.4). avg_non_ignore: average the cross-entropy over
    labelled pixels only; False is mmseg's default (and the authors'): the sum over labelled pixels divided by
    all pixels, padding and ignored ones included.
    """

    def __init__(
        self,
        backbone: SegViT,
        decode_head: UPerHead,
        auxiliary_head: FCNHead | None = None,
        *,
        aux_index: int = 2,
        aux_weight: float = 0.4,
        avg_non_ignore: bool = False,
    ):
        super().__init__()
        self.backbone = backbone
        self.decode_head = decode_head
        self.auxiliary_head = auxiliary_head
        self.aux_index = aux_index
        self.aux_weight = aux_weight
        self.avg_non_ignore = avg_non_ignore

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        return resize(self.decode_head(self.backbone(images)), images.shape[2:])

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """labels `[N, H, W]` (long, 255 = ignore) -> {'loss', 'loss_decode', 'loss_aux'}."""
        feats = self.backbone(images)
        losses = {"loss_decode": self.cross_entropy(self.decode_head(feats), labels)}
        total = losses["loss_decode"]
        if self.auxiliary_head is not None:
            losses["loss_aux"] = self.cross_entropy(self.auxiliary_head(feats[self.aux_index]), labels)
            total = total + self.aux_weight * losses["loss_aux"]
        losses["loss"] = total
        return losses

    def cross_entropy(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Logits upsampled (bilinear) to the label size, cross-entropy with ignore index 255, in float32."""
        logits = resize(logits.float(), labels.shape[1:])
        loss = F.cross_entropy(logits, labels, ignore_index=IGNORE, reduction="none")  # [N, H, W], 0 at ignored
        if self.avg_non_ignore:
            return loss.sum() / (labels != IGNORE).sum().clamp(min=1)
        return loss.mean()

    # ---------------------------------------------------------------------------------- layer decay
    @property
    def num_layers(self) -> int:
        return self.backbone.num_layers

    def layer_id(self, name: str) -> int:
        """The authors' rule: embeddings 0, backbone block i -> i + 1, everything else (adapters, heads) the
        top layer (lr scale 1)."""
        if name.startswith("backbone."):
            return self.backbone.layer_id(name[len("backbone.") :])
        return self.num_layers


def build_segmentor(m, num_classes: int) -> Segmentor:
    """From the `model` section of the config."""
    arch = preset(m.size, img_size=m.img_size)
    backbone = SegViT(
        **arch,
        out_indices=tuple(m.out_indices),
        layer_scale=m.layer_scale,
        rel_pos_bias=m.rel_pos_bias,
        drop_path_rate=m.drop_path,
        grad_checkpointing=m.grad_checkpointing,
    )
    decode = UPerHead(backbone.out_channels, m.channels, num_classes, tuple(m.pool_scales), m.dropout)
    aux = None
    if m.aux_weight > 0:
        aux = FCNHead(backbone.out_channels[2], m.aux_channels, num_classes, num_convs=1, dropout=m.dropout)
    return Segmentor(backbone, decode, aux, aux_weight=m.aux_weight, avg_non_ignore=m.avg_non_ignore)


def load_pretrained(model: Segmentor, path: str) -> ckpt.LoadReport:
    """Backbone weights from `path`; the position embedding is resized (bicubic) to the backbone's grid.

    A final `norm` is dropped (the recipe has none); relative position tables, layer scale and adapters are
    expected to be missing from a pretraining checkpoint (they are used when present, e.g. layer scale from a
    BEiT-style student). Anything else missing or mis-shaped is an error."""
    backbone = model.backbone
    sd, info = read_backbone(path)
    dropped = [k for k in sd if k.startswith("norm.")]
    sd = {k: v for k, v in sd.items() if not k.startswith("norm.")}

    report = ckpt.load_weights(
        backbone,
        sd,
        source=str(path),
        adapters=shape_adapters(backbone.grid_size, backbone.patch_embed.patch_size[0]),
        allow_missing=lambda k: any(s in k for s in NEW_PARAMS),
    )
    missing_new = [k for k in backbone.state_dict() if k not in report.loaded and any(s in k for s in NEW_PARAMS)]
    report.missing = [f"backbone.{k}" for k in missing_new] + ["decode_head.*", "auxiliary_head.*"]
    report.unexpected += dropped + info.dropped
    return report
