"""Mask R-CNN with a ViTDet backbone, assembled from torchvision's detection parts (detection/heads.py holds
the ViTDet-specific ones). Inputs are already normalised and zero-padded to a fixed square by the data
pipeline, so there is no resize/pad transform inside the model.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead, FastRCNNPredictor
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.roi_heads import paste_masks_in_image
from torchvision.models.detection.rpn import RPNHead

from core import checkpoint as ckpt
from core.vit import preset
from detection.backbone import GLOBAL_BLOCKS, ViTDetBackbone
from detection.heads import L1RPN, L1RoIHeads, LevelRoIAlign
from detection.pyramid import BackboneWithPyramid, LayerNorm2d
from tools.convert import read_backbone, shape_adapters


class ViTDetMaskRCNN(nn.Module):
    """images `[N, 3, S, S]`, image_sizes [(h, w)] (before padding), targets (training) ->
    dict of losses (training) or a list of detections {boxes, labels, scores, masks (probabilities at 28x28)}."""

    def __init__(self, backbone: BackboneWithPyramid, rpn: L1RPN, roi_heads: L1RoIHeads):
        super().__init__()
        self.backbone, self.rpn, self.roi_heads = backbone, rpn, roi_heads

    def forward(self, images: torch.Tensor, image_sizes, targets=None):
        features = self.backbone(images)
        image_list = ImageList(images, [tuple(s) for s in image_sizes])
        proposals, rpn_losses = self.rpn(image_list, features, targets)
        detections, roi_losses = self.roi_heads(features, proposals, image_list.image_sizes, targets)
        if self.training:
            return {**rpn_losses, **roi_losses}
        return detections

    # layer decay: the ViT's ids inside the backbone, everything else after the last block (scale 1)
    @property
    def num_layers(self) -> int:
        return self.backbone.net.num_layers

    def layer_id(self, name: str) -> int:
        if name.startswith("backbone.net."):
            return self.backbone.net.layer_id(name[len("backbone.net.") :])
        return self.num_layers


def build_detector(cfg, num_classes: int) -> ViTDetMaskRCNN:
    """num_classes excludes the background."""
    m, d = cfg.model, cfg.det
    arch = preset(m.size)
    vit = ViTDetBackbone(
        img_size=cfg.data.img_size,
        pretrain_img_size=m.pretrain_img_size or arch["img_size"],
        patch_size=arch["patch_size"],
        embed_dim=arch["embed_dim"],
        depth=arch["depth"],
        num_heads=arch["num_heads"],
        drop_path_rate=m.drop_path,
        window_size=m.window_size,
        global_blocks=tuple(m.global_blocks) if m.global_blocks is not None else GLOBAL_BLOCKS[m.size],
    )
    backbone = BackboneWithPyramid(vit, d.channels)
    c = d.channels
    anchors = AnchorGenerator(sizes=tuple((s,) for s in d.anchor_sizes), aspect_ratios=((0.5, 1.0, 2.0),) * 5)
    rpn = L1RPN(
        anchors,
        RPNHead(c, 3, conv_depth=2),
        fg_iou_thresh=0.7,
        bg_iou_thresh=0.3,
        batch_size_per_image=256,
        positive_fraction=0.5,
        pre_nms_top_n=dict(training=d.rpn_pre_nms_top_n[0], testing=d.rpn_pre_nms_top_n[1]),
        post_nms_top_n=dict(training=d.rpn_post_nms_top_n[0], testing=d.rpn_post_nms_top_n[1]),
        nms_thresh=0.7,
    )
    roi_heads = L1RoIHeads(
        box_roi_pool=LevelRoIAlign(7),
        box_head=FastRCNNConvFCHead((c, 7, 7), [c] * 4, [d.fc_dim], norm_layer=LayerNorm2d),
        box_predictor=FastRCNNPredictor(d.fc_dim, num_classes + 1),
        fg_iou_thresh=0.5,
        bg_iou_thresh=0.5,
        batch_size_per_image=d.rois_per_image,
        positive_fraction=0.25,
        bbox_reg_weights=None,
        score_thresh=0.05,
        nms_thresh=0.5,
        detections_per_img=100,
        mask_roi_pool=LevelRoIAlign(14),
        mask_head=MaskRCNNHeads(c, [c] * 4, 1, norm_layer=LayerNorm2d),
        mask_predictor=MaskRCNNPredictor(c, c, num_classes + 1),
    )
    return ViTDetMaskRCNN(backbone, rpn, roi_heads)


EXPECTED_NEW = ("attn.rel_pos_h", "attn.rel_pos_w")


def load_pretrained(model: ViTDetMaskRCNN, path: str) -> ckpt.LoadReport:
    """Pretrained ViT weights into the backbone: the relative-position tables, the pyramid and the heads are
    expected to be new (reported); any other missing backbone tensor is an error. The cls token and the final
    norm of the checkpoint are not used by ViTDet (reported as dropped)."""
    sd, info = read_backbone(path)
    vit = model.backbone.net
    unused = [k for k in sd if k == "cls_token" or k.startswith("norm.")]
    sd = {k: v for k, v in sd.items() if k not in unused}
    grid = math.isqrt(vit.pos_embed.shape[1] - 1)  # the pretraining grid the backbone keeps
    report = ckpt.load_weights(
        vit,
        sd,
        source=str(path),
        adapters=shape_adapters((grid, grid), vit.patch_size),
        allow_missing=lambda k: k.endswith(EXPECTED_NEW),
    )
    report.unexpected += info.dropped + unused
    return report


def to_original(detections: list[dict], metas: list[dict]) -> list[dict]:
    """Boxes divided by the resize scale and clipped; masks pasted at the original size, thresholded at 0.5."""
    out = []
    for det, meta in zip(detections, metas):
        h, w = meta["orig_size"]
        boxes = det["boxes"] / meta["scale"]
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, w)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, h)
        masks = (
            paste_masks_in_image(det["masks"], boxes, (h, w))[:, 0] >= 0.5
            if len(boxes)
            else torch.zeros(0, h, w, dtype=torch.bool)
        )
        out.append({"boxes": boxes, "scores": det["scores"], "labels": det["labels"], "masks": masks})
    return out
