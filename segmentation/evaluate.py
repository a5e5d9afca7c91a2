"""Semantic-segmentation evaluation: sliding-window inference (optionally multi-scale + flip) and mIoU / mAcc /
aAcc accumulated over the whole dataset and over processes (mmsegmentation's slide_inference, aug_test and
intersect_and_union conventions).

Per class c (after reduce_zero_label; pixels labelled 255 are left out): intersection = pixels with
prediction c and label c, union = pred area + label area - intersection, summed over every image first.
IoU_c = I / U (undefined when U = 0: the class is in neither), Acc_c = I / label area (undefined when the
class is absent from the labels); mIoU and mAcc average the defined values; aAcc = sum I / sum label area.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from core import dist
from segmentation.data import IGNORE, normalize, rescale_size, resize_image


# ------------------------------------------------------------------------------------------- metrics
def intersect_and_union(pred: torch.Tensor, label: torch.Tensor, num_classes: int, ignore_index: int = IGNORE):
    """pred, label `[H, W]` (long) -> `[4, K]` float64: intersection, union, prediction area, label area."""
    keep = label != ignore_index
    pred, label = pred[keep], label[keep]
    inter = torch.bincount(pred[pred == label], minlength=num_classes)[:num_classes]
    area_pred = torch.bincount(pred, minlength=num_classes)[:num_classes]
    area_label = torch.bincount(label, minlength=num_classes)[:num_classes]
    return torch.stack([inter, area_pred + area_label - inter, area_pred, area_label]).double()


def metrics_from_areas(areas: torch.Tensor) -> dict:
    """`[4, K]` summed areas -> mIoU, mAcc, aAcc (percent) and per-class IoU / Acc lists (NaN = undefined)."""
    inter, union, _, label = areas.double().cpu()
    iou = torch.where(union > 0, inter / union.clamp(min=1), torch.full_like(inter, math.nan))
    acc = torch.where(label > 0, inter / label.clamp(min=1), torch.full_like(inter, math.nan))
    return {
        "mIoU": 100 * float(iou.nanmean()) if (union > 0).any() else math.nan,
        "mAcc": 100 * float(acc.nanmean()) if (label > 0).any() else math.nan,
        "aAcc": 100 * float(inter.sum() / label.sum()) if label.sum() > 0 else math.nan,
        "iou": [100 * float(v) for v in iou],
        "acc": [100 * float(v) for v in acc],
    }


def class_table(names: Sequence[str], iou: Sequence[float], acc: Sequence[float]) -> str:
    """A per-class text table (n/a where a class is in neither prediction nor label)."""
    width = max(8, *(len(n) for n in names))
    lines = [f"{'class':<{width}}  {'IoU':>6}  {'Acc':>6}", "-" * (width + 16)]
    for n, i, a in zip(names, iou, acc):
        lines.append(f"{n:<{width}}  {_pct(i):>6}  {_pct(a):>6}")
    return "\n".join(lines)


def _pct(v: float) -> str:
    return "n/a" if math.isnan(v) else f"{v:.2f}"


# ------------------------------------------------------------------------------------------ inference
def windows(h: int, w: int, crop: int, stride: int) -> list[tuple[int, int, int, int]]:
    """mmseg's sliding windows `(y1, y2, x1, x2)`: a grid of `stride` steps, the last window in each row and
    column shifted back to end at the border; a side shorter than `crop` gets one window of its length."""
    rows = max(h - crop + stride - 1, 0) // stride + 1
    cols = max(w - crop + stride - 1, 0) // stride + 1
    out = []
    for r in range(rows):
        for c in range(cols):
            y2, x2 = min(r * stride + crop, h), min(c * stride + crop, w)
            out.append((max(y2 - crop, 0), y2, max(x2 - crop, 0), x2))
    return out


def slide_inference(
    predict: Callable[[torch.Tensor], torch.Tensor],
    image: torch.Tensor,
    num_classes: int,
    crop: int,
    stride: int,
    batch: int = 1,
) -> torch.Tensor:
    """image `[1, 3, H, W]` (normalised) -> logits `[1, K, H, W]` averaged over overlapping windows.

    Windows smaller than `crop` (an image side shorter than the crop) are zero-padded at the bottom/right to
    the crop size, as in training, and their logits cut back. `predict` maps `[B, 3, crop, crop]` to logits
    of the same size; up to `batch` windows go through it at once.
    """
    _, _, h, w = image.shape
    logits = image.new_zeros((1, num_classes, h, w), dtype=torch.float32)
    count = image.new_zeros((1, 1, h, w), dtype=torch.float32)
    boxes = windows(h, w, crop, stride)
    for start in range(0, len(boxes), batch):
        chunk = boxes[start : start + batch]
        crops = [
            F.pad(image[0, :, y1:y2, x1:x2], (0, crop - (x2 - x1), 0, crop - (y2 - y1))) for y1, y2, x1, x2 in chunk
        ]
        out = predict(torch.stack(crops)).float()  # [B, K, crop, crop]
        for (y1, y2, x1, x2), o in zip(chunk, out):
            logits[0, :, y1:y2, x1:x2] += o[:, : y2 - y1, : x2 - x1]
            count[0, :, y1:y2, x1:x2] += 1
    return logits / count


@torch.no_grad()
def predict_image(
    predict: Callable[[torch.Tensor], torch.Tensor],
    image: torch.Tensor,
    *,
    num_classes: int,
    scale: Sequence[int],
    crop: int,
    stride: int,
    ratios: Sequence[float] = (1.0,),
    flip: bool = False,
    batch: int = 1,
) -> torch.Tensor:
    """image uint8 `[3, H, W]` at its original size -> class probabilities `[K, H, W]`.

    For each ratio r the image is resized keeping its aspect ratio to fit `scale * r` (e.g. (2048, 512) * r),
    normalised, run through sliding windows (and mirrored, with `flip`); the window-averaged logits are
    resized (bilinear) to the original size, soft-maxed and averaged over all the views (mmseg's aug_test).
    """
    _, h, w = image.shape
    probs = torch.zeros((num_classes, h, w), dtype=torch.float32, device=image.device)
    views = 0
    for r in ratios:
        nw, nh = rescale_size(w, h, (int(scale[0] * r), int(scale[1] * r)))
        x = normalize(resize_image(image, (nh, nw)).round_().clamp_(0, 255))[None]
        for mirrored in (False, True) if flip else (False,):
            xi = x.flip(-1) if mirrored else x
            logits = slide_inference(predict, xi, num_classes, crop, stride, batch)
            if mirrored:
                logits = logits.flip(-1)
            logits = F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False)
            probs += logits[0].softmax(0)
            views += 1
    return probs / views


@torch.no_grad()
def evaluate(model, loader, *, num_classes: int, device, autocast, **inference) -> dict:
    """mIoU / mAcc / aAcc (percent) and per-class IoU / Acc over the loader's shard, summed across ranks.

    model: the unwrapped Segmentor (never the DDP wrapper: ranks see different numbers of images).
    inference: `predict_image` settings (scale, crop, stride, ratios, flip, batch).
    """
    model.eval()
    areas = torch.zeros((4, num_classes), dtype=torch.float64, device=device)
    stats = torch.zeros(2, dtype=torch.float64, device=device)  # images, skipped

    def predict(x):
        with autocast:
            return model.predict(x)

    for item in loader:
        if item is None:
            stats[1] += 1
            continue
        image, label, _ = item
        probs = predict_image(predict, image.to(device), num_classes=num_classes, **inference)
        areas += intersect_and_union(probs.argmax(0), label.to(device).long(), num_classes)
        stats[0] += 1
    areas, stats = dist.all_reduce_sum(areas), dist.all_reduce_sum(stats)
    return {**metrics_from_areas(areas), "images": int(stats[0]), "skipped": int(stats[1])}
