"""The parts of torchvision's Mask R-CNN that ViTDet sets differently (RECIPES.md 4):

- `LevelRoIAlign`: RoIAlign with aligned=True, adaptive sampling (ratio 0), fixed level scales 1/4..1/32 (not
  inferred from image sizes), and the canonical FPN level rule k = floor(4 + log2(sqrt(area) / 224)) in [2, 5];
- `L1RPN`: torchvision's RPN with an L1 box loss and detectron2's normaliser (256 x images for both terms);
- `L1RoIHeads`: box and mask heads with an L1 box loss and mask targets cropped with aligned RoIAlign.
Everything else (anchor matching, sampling, box coding, NMS, post-processing) is torchvision's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.detection.roi_heads import RoIHeads, maskrcnn_inference
from torchvision.models.detection.rpn import RegionProposalNetwork
from torchvision.ops import roi_align
from torchvision.ops.poolers import LevelMapper


class LevelRoIAlign(nn.Module):
    """features dict (levels p2..p5 used) + boxes per image -> `[R, C, output, output]`."""

    def __init__(
        self,
        output_size: int,
        featmap_names=("p2", "p3", "p4", "p5"),
        strides=(4, 8, 16, 32),
        canonical_scale: int = 224,
        canonical_level: int = 4,
    ):
        super().__init__()
        self.output_size = output_size
        self.featmap_names = list(featmap_names)
        self.scales = [1.0 / s for s in strides]
        k_min = int(round(torch.log2(torch.tensor(float(strides[0]))).item()))
        k_max = int(round(torch.log2(torch.tensor(float(strides[-1]))).item()))
        self.mapper = LevelMapper(k_min, k_max, canonical_scale=canonical_scale, canonical_level=canonical_level)

    def levels(self, boxes: list[torch.Tensor]) -> torch.Tensor:
        """Pyramid level index (0 = the first feature map) of every box."""
        return self.mapper(boxes)

    def forward(self, features: dict, boxes: list[torch.Tensor], image_shapes=None) -> torch.Tensor:
        rois = torch.cat([torch.cat([torch.full_like(b[:, :1], i), b], dim=1) for i, b in enumerate(boxes)], 0)
        maps = [features[n] for n in self.featmap_names]
        out = maps[0].new_zeros(rois.shape[0], maps[0].shape[1], self.output_size, self.output_size)
        if rois.shape[0] == 0:
            return out
        lvl = self.levels(boxes)
        for k, (fmap, scale) in enumerate(zip(maps, self.scales)):
            idx = torch.where(lvl == k)[0]
            if idx.numel():
                pooled = roi_align(
                    fmap,
                    rois[idx].to(fmap.dtype),
                    self.output_size,
                    spatial_scale=scale,
                    sampling_ratio=0,
                    aligned=True,
                )
                out[idx] = pooled.to(out.dtype)
        return out


class L1RPN(RegionProposalNetwork):
    """RPN losses as detectron2 computes them for ViTDet: BCE over the sampled anchors and L1 over the sampled
    positives, both summed and divided by batch_size_per_image x images."""

    def compute_loss(self, objectness, pred_bbox_deltas, labels, regression_targets):
        pos_masks, neg_masks = self.fg_bg_sampler(labels)
        normalizer = self.fg_bg_sampler.batch_size_per_image * len(labels)
        pos = torch.where(torch.cat(pos_masks, dim=0))[0]
        sampled = torch.cat([pos, torch.where(torch.cat(neg_masks, dim=0))[0]])
        objectness = objectness.flatten()
        labels = torch.cat(labels, dim=0)
        regression_targets = torch.cat(regression_targets, dim=0)
        box_loss = F.l1_loss(pred_bbox_deltas[pos], regression_targets[pos], reduction="sum") / normalizer
        cls_loss = F.binary_cross_entropy_with_logits(objectness[sampled], labels[sampled], reduction="sum")
        return cls_loss / normalizer, box_loss


class L1RoIHeads(RoIHeads):
    """Box head + mask head (no keypoints) with ViTDet's losses."""

    def forward(self, features, proposals, image_shapes, targets=None):
        if self.training:
            proposals, matched_idxs, labels, regression_targets = self.select_training_samples(proposals, targets)
        box_features = self.box_head(self.box_roi_pool(features, proposals, image_shapes))
        class_logits, box_regression = self.box_predictor(box_features)
        result, losses = [], {}
        if self.training:
            losses["loss_classifier"], losses["loss_box_reg"] = l1_fastrcnn_loss(
                class_logits, box_regression, labels, regression_targets
            )
            pos = [torch.where(lab > 0)[0] for lab in labels]
            mask_proposals = [p[i] for p, i in zip(proposals, pos)]
            mask_logits = self.mask_predictor(
                self.mask_head(self.mask_roi_pool(features, mask_proposals, image_shapes))
            )
            gt_masks = [t["masks"] for t in targets]
            gt_labels = [t["labels"] for t in targets]
            matched = [m[i] for m, i in zip(matched_idxs, pos)]
            losses["loss_mask"] = mask_loss(mask_logits, mask_proposals, gt_masks, gt_labels, matched)
            return result, losses
        boxes, scores, labels = self.postprocess_detections(class_logits, box_regression, proposals, image_shapes)
        result = [{"boxes": b, "labels": lab, "scores": s} for b, lab, s in zip(boxes, labels, scores)]
        mask_logits = self.mask_predictor(self.mask_head(self.mask_roi_pool(features, boxes, image_shapes)))
        for probs, r in zip(maskrcnn_inference(mask_logits, labels), result):
            r["masks"] = probs
        return result, losses


def l1_fastrcnn_loss(class_logits, box_regression, labels, regression_targets):
    """Cross-entropy over the sampled RoIs; class-specific L1 box loss over the foreground ones, divided by the
    number of sampled RoIs (detectron2's FastRCNNOutputLayers with smooth_l1_beta 0)."""
    labels = torch.cat(labels, dim=0)
    regression_targets = torch.cat(regression_targets, dim=0)
    cls_loss = F.cross_entropy(class_logits, labels)
    pos = torch.where(labels > 0)[0]
    n = class_logits.shape[0]
    box_regression = box_regression.reshape(n, box_regression.shape[-1] // 4, 4)
    box_loss = F.l1_loss(box_regression[pos, labels[pos]], regression_targets[pos], reduction="sum")
    return cls_loss, box_loss / max(labels.numel(), 1)


def mask_loss(mask_logits, proposals, gt_masks, gt_labels, matched_idxs):
    """Per-pixel BCE on the logits of each RoI's ground-truth class; targets are the matched instance masks
    cropped and resized to the RoI with aligned RoIAlign, thresholded at 0.5."""
    size = mask_logits.shape[-1]
    targets, classes = [], []
    for boxes, masks, labels, idx in zip(proposals, gt_masks, gt_labels, matched_idxs):
        if boxes.numel() == 0:
            continue
        rois = torch.cat([idx[:, None].to(boxes), boxes], dim=1)
        crops = roi_align(
            masks[:, None].to(boxes), rois, (size, size), spatial_scale=1.0, sampling_ratio=0, aligned=True
        )[:, 0]
        targets.append((crops >= 0.5).to(mask_logits.dtype))
        classes.append(labels[idx])
    if not targets:
        return mask_logits.sum() * 0
    targets, classes = torch.cat(targets), torch.cat(classes)
    logits = mask_logits[torch.arange(len(classes), device=classes.device), classes]
    return F.binary_cross_entropy_with_logits(logits, targets)
