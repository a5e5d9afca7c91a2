"""The parts of torchvision's Mask R-CNN that ViTDet (detectron2) sets differently (docs/RECIPES.md 4):

- `Anchors`: detectron2's `DefaultAnchorGenerator` (offset 0) does not round the cell anchors and uses the
  configured strides; torchvision rounds them and infers the strides as padded size // grid;
- `LevelRoIAlign`: RoIAlign with aligned=True, adaptive sampling (ratio 0) and fixed level scales (torchvision's
  `MultiScaleRoIAlign` has aligned=False, ratio 2, and infers the scales from unpadded image sizes), with the
  canonical FPN level rule k = floor(k0 + log2(sqrt(area) / s0 + 1e-8)) clamped to the pooled levels;
- `L1RPN`: L1 box loss (torchvision: smooth-L1 with beta 1/9), both terms summed and divided by
  256 x images as detectron2 does; proposals ranked by logits in NMS (torchvision: sigmoids, which tie at 1.0)
  and every box of positive size kept (torchvision: >= 1e-3 px);
- `L1RoIHeads.postprocess_detections`: boxes of any size go through NMS and the top-k cut (torchvision drops
  boxes under 0.01 px first; detectron2 removes empty boxes only after scaling to the original image);
- `L1RoIHeads`: L1 box loss divided by the sampled RoIs, mask targets cropped with aligned RoIAlign and
  thresholded at 0.5 (torchvision: aligned=False, soft targets);
- predictor initialisation: N(0, 0.01) class scores, N(0, 0.001) box deltas and mask logits, zero biases;
- RPN and box-predictor outputs in float32, so box arithmetic never runs in bf16 under autocast.

Everything else (anchor matching, sampling, box coding, NMS) is torchvision's; mask pasting is
`detection.model.paste_masks` (detectron2's pixel-centre paste).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor
from torchvision.models.detection.roi_heads import RoIHeads, maskrcnn_inference
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead
from torchvision.ops import batched_nms, roi_align


class Anchors(AnchorGenerator):
    """torchvision's generator with detectron2's `DefaultAnchorGenerator`: cell anchors of size s, ratio r (h / w)
    -> w = s / sqrt(r), h = s * sqrt(r), centred on the cell's top-left corner (offset 0), not rounded; and the
    configured stride of each level (torchvision infers padded size // grid, which is wrong wherever the size is
    not a multiple of the level's stride: 96 px at stride 64 gives a 2x2 grid and stride 48)."""

    def __init__(self, sizes, aspect_ratios, strides):
        super().__init__(sizes, aspect_ratios)
        if len(strides) != len(sizes):
            raise ValueError(f"one anchor stride per level: {len(sizes)} sizes, {len(strides)} strides")
        self.strides = tuple(int(s) for s in strides)

    def generate_anchors(self, scales, aspect_ratios, dtype=torch.float32, device=None):
        scales = torch.as_tensor(scales, dtype=torch.float64)
        ratios = torch.as_tensor(aspect_ratios, dtype=torch.float64)
        ws = (scales[None, :] / ratios.sqrt()[:, None]).reshape(-1)
        hs = (scales[None, :] * ratios.sqrt()[:, None]).reshape(-1)
        anchors = torch.stack([-ws, -hs, ws, hs], dim=1) / 2
        return anchors.to(dtype=dtype) if device is None else anchors.to(dtype=dtype, device=device)

    def forward(self, image_list, feature_maps):
        grid_sizes = [f.shape[-2:] for f in feature_maps]
        dtype, device = feature_maps[0].dtype, feature_maps[0].device
        strides = [[torch.tensor(s, device=device), torch.tensor(s, device=device)] for s in self.strides]
        self.set_cell_anchors(dtype, device)
        anchors = torch.cat(self.grid_anchors(grid_sizes, strides))
        return [anchors] * len(image_list.image_sizes)


def assign_levels(
    boxes: torch.Tensor, min_level: int, max_level: int, canonical_size: float, canonical_level: int
) -> torch.Tensor:
    """Pyramid level of each box `[R, 4]` (x0, y0, x1, y1) as an offset from `min_level` (detectron2's
    `assign_boxes_to_levels`, Eqn. 1 of the FPN paper)."""
    sizes = ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])).clamp(min=0).sqrt()
    levels = torch.floor(canonical_level + torch.log2(sizes / canonical_size + 1e-8))
    return levels.clamp(min_level, max_level).to(torch.int64) - min_level


class LevelRoIAlign(nn.Module):
    """features (dict) + boxes per image -> `[R, C, output_size, output_size]` pooled from the map of each box's
    level. `names`/`strides`: the pooled maps (ViTDet: p2-p5, strides 4-32). The canonical box size scales with
    the backbone stride: 224 px at the stride-16 level for a /16 ViT (`canonical_stride` = patch size)."""

    def __init__(self, output_size: int, names, strides, canonical_stride: int = 16):
        super().__init__()
        self.output_size = output_size
        self.names = list(names)
        self.scales = [1.0 / s for s in strides]
        self.min_level, self.max_level = int(math.log2(strides[0])), int(math.log2(strides[-1]))
        self.canonical_level = int(math.log2(canonical_stride))
        self.canonical_size = 224.0 * canonical_stride / 16

    def levels(self, boxes: list[torch.Tensor]) -> torch.Tensor:
        return assign_levels(
            torch.cat(boxes), self.min_level, self.max_level, self.canonical_size, self.canonical_level
        )

    def forward(self, features: dict, boxes: list[torch.Tensor], image_shapes=None) -> torch.Tensor:
        maps = [features[n] for n in self.names]
        rois = torch.cat([torch.cat([torch.full_like(b[:, :1], i), b], dim=1) for i, b in enumerate(boxes)])
        out = maps[0].new_zeros(rois.shape[0], maps[0].shape[1], self.output_size, self.output_size)
        if rois.shape[0] == 0:
            return out
        levels = self.levels(boxes)
        for k, (fmap, scale) in enumerate(zip(maps, self.scales)):
            idx = torch.where(levels == k)[0]
            if idx.numel():
                # boxes stay float32 (bf16 would round coordinates to several pixels at 1024)
                pooled = roi_align(
                    fmap.to(rois.dtype), rois[idx], self.output_size, scale, sampling_ratio=0, aligned=True
                )
                out[idx] = pooled.to(out.dtype)
        return out


class RPNHeadFP32(RPNHead):
    """torchvision's RPN head with float32 outputs, so box decoding, matching and NMS stay in float32 under
    bf16/fp16 autocast (the convs still run in low precision)."""

    def forward(self, x):
        logits, deltas = super().forward(x)
        return [t.float() for t in logits], [t.float() for t in deltas]


class BoxPredictorFP32(FastRCNNPredictor):
    """torchvision's class-score and box-delta layers with float32 outputs (see RPNHeadFP32)."""

    def forward(self, x):
        scores, deltas = super().forward(x)
        return scores.float(), deltas.float()


class L1RPN(RegionProposalNetwork):
    """RPN losses as detectron2 computes them: BCE over the sampled anchors and L1 over the sampled positives,
    each summed and divided by batch_size_per_image x images. Proposals as detectron2's `find_top_rpn_proposals`:
    top-k logits per level, non-finite boxes or scores dropped, clipped, boxes of positive width and height
    kept, NMS per level ranked by the logits (torchvision ranks float32 sigmoids, which tie at 1.0 for logits
    above about 16.6), then the post-NMS top-k."""

    def compute_loss(self, objectness, pred_bbox_deltas, labels, regression_targets):
        pos_masks, neg_masks = self.fg_bg_sampler(labels)
        pos = torch.where(torch.cat(pos_masks))[0]
        sampled = torch.cat([pos, torch.where(torch.cat(neg_masks))[0]])
        normalizer = self.fg_bg_sampler.batch_size_per_image * len(labels)
        labels, targets = torch.cat(labels), torch.cat(regression_targets)
        cls = F.binary_cross_entropy_with_logits(objectness.flatten()[sampled], labels[sampled], reduction="sum")
        box = F.l1_loss(pred_bbox_deltas[pos], targets[pos], reduction="sum")
        return cls / normalizer, box / normalizer

    def filter_proposals(self, proposals, objectness, image_shapes, num_anchors_per_level):
        num_images = proposals.shape[0]
        logits = objectness.detach().reshape(num_images, -1)
        levels = torch.cat(
            [torch.full((n,), k, dtype=torch.int64, device=logits.device) for k, n in enumerate(num_anchors_per_level)]
        )
        top = self._get_top_n_idx(logits, num_anchors_per_level)  # top-k logits of each level
        rows = torch.arange(num_images, device=logits.device)[:, None]
        logits, boxes_all, levels = logits[rows, top], proposals[rows, top], levels[top]
        final_boxes, final_scores = [], []
        for boxes, scores, lvl, (h, w) in zip(boxes_all, logits, levels, image_shapes):
            # dropped (detectron2 raises in training; here a diverged run stops at its non-finite loss, named by
            # the trainer with the step)
            valid = torch.isfinite(boxes).all(dim=1) & torch.isfinite(scores)
            boxes, scores, lvl = boxes[valid], scores[valid], lvl[valid]
            boxes = torch.stack(
                [boxes[:, 0].clamp(0, w), boxes[:, 1].clamp(0, h), boxes[:, 2].clamp(0, w), boxes[:, 3].clamp(0, h)],
                dim=1,
            )
            keep = (boxes[:, 2] - boxes[:, 0] > 0) & (boxes[:, 3] - boxes[:, 1] > 0)
            boxes, scores, lvl = boxes[keep], scores[keep], lvl[keep]
            keep = batched_nms(boxes, scores, lvl, self.nms_thresh)[: self.post_nms_top_n()]
            final_boxes.append(boxes[keep])
            final_scores.append(scores[keep])
        return final_boxes, final_scores


class L1RoIHeads(RoIHeads):
    """Box and mask heads (no keypoints) with ViTDet's losses. Training returns ([], losses); inference
    returns ([{boxes, labels, scores, masks (probabilities `[K, 1, M, M]`)}], {})."""

    def forward(self, features, proposals, image_shapes, targets=None):
        if self.training:
            proposals, matched_idxs, labels, regression_targets = self.select_training_samples(proposals, targets)
        box_features = self.box_head(self.box_roi_pool(features, proposals, image_shapes))
        class_logits, box_regression = self.box_predictor(box_features)
        if self.training:
            loss_cls, loss_box = fastrcnn_l1_loss(class_logits, box_regression, labels, regression_targets)
            pos = [torch.where(lab > 0)[0] for lab in labels]
            mask_boxes = [p[i] for p, i in zip(proposals, pos)]
            mask_logits = self.mask_predictor(self.mask_head(self.mask_roi_pool(features, mask_boxes, image_shapes)))
            loss_mask = mask_loss(
                mask_logits,
                mask_boxes,
                [t["masks"] for t in targets],
                [lab[i] for lab, i in zip(labels, pos)],
                [m[i] for m, i in zip(matched_idxs, pos)],
            )
            return [], {"loss_classifier": loss_cls, "loss_box_reg": loss_box, "loss_mask": loss_mask}
        boxes, scores, labels = self.postprocess_detections(class_logits, box_regression, proposals, image_shapes)
        mask_logits = self.mask_predictor(self.mask_head(self.mask_roi_pool(features, boxes, image_shapes)))
        masks = maskrcnn_inference(mask_logits, labels)
        return [
            {"boxes": b, "labels": lab, "scores": s, "masks": m} for b, lab, s, m in zip(boxes, labels, scores, masks)
        ], {}

    def postprocess_detections(self, class_logits, box_regression, proposals, image_shapes):
        """detectron2's `fast_rcnn_inference_single_image`: non-finite rows dropped, boxes clipped, class scores
        above score_thresh, NMS per class, top detections_per_img. Boxes left empty by the clipping stay here
        (torchvision drops boxes under 0.01 px before NMS); `detection.model.to_original` removes empty boxes
        afterwards, as detectron2's `detector_postprocess` does."""
        num_classes = class_logits.shape[-1]
        counts = [len(p) for p in proposals]
        pred_boxes = self.box_coder.decode(box_regression, proposals).split(counts)
        pred_scores = F.softmax(class_logits, -1).split(counts)
        all_boxes, all_scores, all_labels = [], [], []
        for boxes, scores, (h, w) in zip(pred_boxes, pred_scores, image_shapes):
            valid = torch.isfinite(boxes).all(dim=(1, 2)) & torch.isfinite(scores).all(dim=1)
            boxes, scores = boxes[valid], scores[valid]
            boxes = torch.stack(
                [
                    boxes[..., 0].clamp(0, w),
                    boxes[..., 1].clamp(0, h),
                    boxes[..., 2].clamp(0, w),
                    boxes[..., 3].clamp(0, h),
                ],
                dim=-1,
            )
            labels = torch.arange(num_classes, device=scores.device).expand_as(scores)
            boxes, scores, labels = boxes[:, 1:].reshape(-1, 4), scores[:, 1:].reshape(-1), labels[:, 1:].reshape(-1)
            keep = torch.where(scores > self.score_thresh)[0]
            boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
            keep = batched_nms(boxes, scores, labels, self.nms_thresh)[: self.detections_per_img]
            all_boxes.append(boxes[keep])
            all_scores.append(scores[keep])
            all_labels.append(labels[keep])
        return all_boxes, all_scores, all_labels


def fastrcnn_l1_loss(class_logits, box_regression, labels, regression_targets):
    """Cross-entropy over the sampled RoIs; class-specific L1 box loss over the foreground ones, divided by the
    number of sampled RoIs (detectron2's FastRCNNOutputLayers with smooth_l1_beta 0)."""
    labels, regression_targets = torch.cat(labels), torch.cat(regression_targets)
    loss_cls = F.cross_entropy(class_logits, labels)
    pos = torch.where(labels > 0)[0]
    deltas = box_regression.reshape(class_logits.shape[0], -1, 4)[pos, labels[pos]]
    loss_box = F.l1_loss(deltas, regression_targets[pos], reduction="sum") / max(labels.numel(), 1)
    return loss_cls, loss_box


def mask_loss(mask_logits, boxes, gt_masks, labels, matched_idxs):
    """Mean per-pixel BCE on each foreground RoI's logits of its ground-truth class. Targets: the matched instance
    mask cropped to the RoI with aligned RoIAlign (adaptive sampling) at the logits' size, >= 0.5."""
    size = mask_logits.shape[-1]
    targets = []
    for b, masks, idx in zip(boxes, gt_masks, matched_idxs):
        if b.numel():
            rois = torch.cat([idx[:, None].to(b), b], dim=1)
            crops = roi_align(masks[:, None].to(b), rois, (size, size), 1.0, sampling_ratio=0, aligned=True)
            targets.append(crops[:, 0] >= 0.5)
    if not targets:
        return mask_logits.sum() * 0
    labels = torch.cat(labels)
    logits = mask_logits[torch.arange(len(labels), device=labels.device), labels]
    return F.binary_cross_entropy_with_logits(logits, torch.cat(targets).to(logits.dtype))


@torch.no_grad()
def init_predictors(box_predictor: nn.Module, mask_predictor: nn.Module) -> None:
    """detectron2's initialisation of the last layers (torchvision's default init differs)."""
    nn.init.normal_(box_predictor.cls_score.weight, std=0.01)
    nn.init.normal_(box_predictor.bbox_pred.weight, std=0.001)
    nn.init.normal_(mask_predictor.mask_fcn_logits.weight, std=0.001)
    for m in (box_predictor.cls_score, box_predictor.bbox_pred, mask_predictor.mask_fcn_logits):
        nn.init.zeros_(m.bias)
