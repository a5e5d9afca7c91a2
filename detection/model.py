"""Mask R-CNN with a ViTDet backbone, assembled from torchvision's detection parts with ViTDet's settings
(`detection/heads.py` holds the parts that differ from torchvision's defaults).

The data pipeline already resizes, normalises and zero-pads every image to a fixed square (ViTDet pads to 1024),
so there is no GeneralizedRCNNTransform inside: the model takes the padded batch and each image's size before
padding, which bounds the proposals and detections.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from timm.layers import LayerNorm2d, resample_patch_embed
from torch import nn
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor

from core import checkpoint as ckpt
from core.vit import preset, resize_pos_embed
from core.weights import read_backbone
from detection.backbone import GLOBAL_BLOCKS, ViTDetBackbone
from detection.heads import L1RPN, Anchors, BoxPredictorFP32, L1RoIHeads, LevelRoIAlign, RPNHeadFP32, init_predictors
from detection.pyramid import BackboneWithPyramid


class ViTDetMaskRCNN(nn.Module):
    """`forward(images, image_sizes, targets)` -> dict of losses (training); `predict(images, image_sizes)` ->
    per image {boxes `[K, 4]` (x0, y0, x1, y1 in the padded frame), labels `[K]` (1..num_classes), scores `[K]`,
    masks `[K, 1, M, M]` probabilities in box coordinates}.

    images: `[N, 3, S, S]` normalised and zero-padded; image_sizes: (h, w) of each image before padding;
    targets: per image {boxes `[K, 4]` float, labels `[K]` int64, masks `[K, h, w]` uint8}.
    """

    def __init__(self, backbone: BackboneWithPyramid, rpn: L1RPN, roi_heads: L1RoIHeads):
        super().__init__()
        self.backbone, self.rpn, self.roi_heads = backbone, rpn, roi_heads

    def forward(self, images: torch.Tensor, image_sizes, targets: list[dict]) -> dict[str, torch.Tensor]:
        if not self.training:
            raise RuntimeError("forward computes training losses; call model.train() (or use predict())")
        features = self.backbone(images)
        batch = ImageList(images, [tuple(s) for s in image_sizes])
        proposals, rpn_losses = self.rpn(batch, features, targets)
        _, roi_losses = self.roi_heads(features, proposals, batch.image_sizes, targets)
        return {**rpn_losses, **roi_losses}

    @torch.no_grad()
    def predict(self, images: torch.Tensor, image_sizes) -> list[dict]:
        if self.training:
            raise RuntimeError("predict needs model.eval() (test-time proposal counts, no drop path)")
        features = self.backbone(images)
        batch = ImageList(images, [tuple(s) for s in image_sizes])
        proposals, _ = self.rpn(batch, features)
        detections, _ = self.roi_heads(features, proposals, batch.image_sizes)
        return detections

    # layer decay: the ViT's ids inside the backbone, everything else (pyramid, heads) after the last block
    @property
    def num_layers(self) -> int:
        return self.backbone.net.num_layers

    def layer_id(self, name: str) -> int:
        prefix = "backbone.net."
        return self.backbone.net.layer_id(name[len(prefix) :]) if name.startswith(prefix) else self.num_layers


def backbone_arch(cfg) -> dict:
    """ViTDetBackbone kwargs from the config: the preset's architecture, the pretraining position grid, and the
    detection patch size (ViTDet-H runs its /14 checkpoint at patch 16)."""
    m = cfg.model
    arch = preset(m.size)
    return dict(
        img_size=cfg.data.img_size,
        patch_size=m.patch_size or arch["patch_size"],
        pos_grid=arch["img_size"] // arch["patch_size"],
        embed_dim=arch["embed_dim"],
        depth=arch["depth"],
        num_heads=arch["num_heads"],
        drop_path_rate=m.drop_path,
        window_size=m.window_size,
        global_blocks=tuple(m.global_blocks) if m.global_blocks is not None else GLOBAL_BLOCKS[m.size],
        grad_checkpointing=m.grad_checkpointing,
    )


def build_detector(cfg, num_classes: int) -> ViTDetMaskRCNN:
    """The detector of `cfg` (model.*, det.*, data.img_size); num_classes excludes the background."""
    d = cfg.det
    backbone = BackboneWithPyramid(ViTDetBackbone(**backbone_arch(cfg)), d.channels)
    c, patch = d.channels, backbone.net.patch_size
    if len(d.anchor_sizes) != len(backbone.strides):
        raise ValueError(f"det.anchor_sizes needs one size per pyramid level ({len(backbone.strides)})")
    rpn = L1RPN(
        Anchors(
            sizes=tuple((s,) for s in d.anchor_sizes),
            aspect_ratios=((0.5, 1.0, 2.0),) * len(d.anchor_sizes),
            strides=backbone.strides,
        ),
        RPNHeadFP32(c, 3, conv_depth=2),
        fg_iou_thresh=0.7,
        bg_iou_thresh=0.3,
        batch_size_per_image=d.rpn_batch_per_image,
        positive_fraction=0.5,
        pre_nms_top_n=dict(training=d.rpn_pre_nms_top_n[0], testing=d.rpn_pre_nms_top_n[1]),
        post_nms_top_n=dict(training=d.rpn_post_nms_top_n[0], testing=d.rpn_post_nms_top_n[1]),
        nms_thresh=0.7,
    )
    pooled_names, pooled_strides = backbone.names[:4], backbone.strides[:4]
    box_predictor = BoxPredictorFP32(d.fc_dim, num_classes + 1)
    mask_predictor = MaskRCNNPredictor(c, c, num_classes + 1)
    init_predictors(box_predictor, mask_predictor)
    roi_heads = L1RoIHeads(
        box_roi_pool=LevelRoIAlign(7, pooled_names, pooled_strides, canonical_stride=patch),
        box_head=FastRCNNConvFCHead((c, 7, 7), [c] * 4, [d.fc_dim], norm_layer=LayerNorm2d),
        box_predictor=box_predictor,
        fg_iou_thresh=0.5,
        bg_iou_thresh=0.5,
        batch_size_per_image=d.rois_per_image,
        positive_fraction=0.25,
        bbox_reg_weights=(10.0, 10.0, 5.0, 5.0),
        score_thresh=d.score_thresh,
        nms_thresh=d.nms_thresh,
        detections_per_img=d.detections_per_image,
        mask_roi_pool=LevelRoIAlign(14, pooled_names, pooled_strides, canonical_stride=patch),
        mask_head=MaskRCNNHeads(c, [c] * 4, 1, norm_layer=LayerNorm2d),
        mask_predictor=mask_predictor,
    )
    return ViTDetMaskRCNN(backbone, rpn, roi_heads)


# ------------------------------------------------------------------------------------------- weights
REL_POS = ("attn.rel_pos_h", "attn.rel_pos_w")
UNUSED = ("cls_token", "norm.weight", "norm.bias")  # ViTDet has no cls token and no final norm


@dataclass
class PretrainedLoad:
    """What loading pretrained ViT weights into the detector did."""

    report: ckpt.LoadReport
    dropped: list[str] = field(default_factory=list)  # checkpoint tensors ViTDet does not use
    new: list[str] = field(default_factory=list)  # detector tensors that start from their initialisation

    def summary(self) -> str:
        rel = [k for k in self.new if k.endswith(REL_POS)]
        lines = [self.report.summary()]
        lines.append(
            f"new, as expected: {len(rel)} relative-position tables, "
            f"{len(self.new) - len(rel)} pyramid/RPN/RoI-head tensors"
        )
        if self.dropped:
            more = " ..." if len(self.dropped) > 8 else ""
            lines.append(f"not used by ViTDet ({len(self.dropped)}): " + ", ".join(self.dropped[:8]) + more)
        return "\n".join(lines)


def load_pretrained(model: ViTDetMaskRCNN, path: str) -> PretrainedLoad:
    """Pretrained ViT weights (any file `core.weights.read_backbone` reads) into `model.backbone.net`.

    The relative-position tables, the pyramid and the heads are expected to be new; any other backbone tensor
    missing from the checkpoint, or a checkpoint tensor the backbone does not have, is a CheckpointError. The
    position embedding is resized to the model's pretraining grid if the checkpoint's differs, and a patch
    embedding of another patch size (H/14 run at 16) is resampled with timm's `resample_patch_embed`.
    """
    sd, info = read_backbone(path)
    net = model.backbone.net
    unused = [k for k in sd if k in UNUSED]
    sd = {k: v for k, v in sd.items() if k not in unused}
    grid = math.isqrt(net.pos_embed.shape[1] - 1)

    def adapt(name, tensor, target):
        if name == "pos_embed":
            return resize_pos_embed(tensor, (grid, grid))
        if name == "patch_embed.proj.weight" and tensor.shape[:2] == target.shape[:2]:
            return resample_patch_embed(tensor, list(target.shape[-2:]), interpolation="bicubic", antialias=True)
        return None

    report = ckpt.load_weights(net, sd, source=str(path), adapters=[adapt], allow_missing=lambda k: k.endswith(REL_POS))
    new = [f"backbone.net.{k}" for k in net.state_dict() if k.endswith(REL_POS)]
    new += [k for k in model.state_dict() if not k.startswith("backbone.net.")]
    return PretrainedLoad(report=report, dropped=info.dropped + unused, new=new)


# ------------------------------------------------------------------------------------------- outputs
def paste_masks(
    masks: torch.Tensor, boxes: torch.Tensor, size: tuple[int, int], threshold: float = 0.5
) -> torch.Tensor:
    """Box-relative mask probabilities `[K, M, M]` -> `[K, h, w]` bool masks in the image (detectron2's
    `paste_masks_in_image`): each image pixel centre (x + 0.5, y + 0.5) inside or near its box samples the mask
    bilinearly (cell centres at box fractions (i + 0.5) / M, zero outside the mask), then `>= threshold`.
    Boxes are float (not rounded, no padded mask): a box covering 0.3 of a pixel still places its mask
    exactly. Pixels farther than one pixel from the box's bounds stay False (bilinear sampling there
    weighs the zero border at least half, so a probability of at most 1 cannot reach 0.5)."""
    h, w = size
    out = torch.zeros(len(masks), h, w, dtype=torch.bool, device=masks.device)
    for k, (m, (x0, y0, x1, y1)) in enumerate(zip(masks.float(), boxes.float().tolist())):
        c0, r0 = max(math.floor(x0) - 1, 0), max(math.floor(y0) - 1, 0)
        c1, r1 = min(math.ceil(x1) + 1, w), min(math.ceil(y1) + 1, h)
        if c1 <= c0 or r1 <= r0:
            continue
        xs = torch.arange(c0, c1, device=m.device, dtype=torch.float32) + 0.5
        ys = torch.arange(r0, r1, device=m.device, dtype=torch.float32) + 0.5
        # grid_sample's normalised coordinates: -1 and 1 are the box edges (align_corners=False)
        gx = (xs - x0) / (x1 - x0) * 2 - 1
        gy = (ys - y0) / (y1 - y0) * 2 - 1
        grid = torch.stack([gx[None, :].expand(len(ys), -1), gy[:, None].expand(-1, len(xs))], dim=-1)
        sampled = F.grid_sample(m[None, None], grid[None], mode="bilinear", align_corners=False)[0, 0]
        out[k, r0:r1, c0:c1] = sampled >= threshold
    return out


def to_original(detections: list[dict], metas: list[dict], mask_threshold: float = 0.5) -> list[dict]:
    """Detections in each image's original frame, as detectron2's `detector_postprocess`: boxes scaled by
    original / resized size per axis and clipped to the original image, detections whose clipped box is
    empty (width or height 0) removed, masks pasted at the original size (`paste_masks`) and thresholded."""
    out = []
    for det, meta in zip(detections, metas):
        (h, w), (rh, rw) = meta["orig_size"], meta["size"]
        boxes = det["boxes"] * det["boxes"].new_tensor([w / rw, h / rh, w / rw, h / rh])
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, w)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, h)
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        boxes = boxes[keep]
        masks = paste_masks(det["masks"][keep][:, 0], boxes, (h, w), mask_threshold)
        out.append({"boxes": boxes, "scores": det["scores"][keep], "labels": det["labels"][keep], "masks": masks})
    return out
