"""COCO box and mask AP with pycocotools, or faster-coco-eval (same numbers, several times faster) when installed
and selected. Each process predicts its shard of the validation images; rank 0 evaluates the gathered results.
"""

from __future__ import annotations

import contextlib
import io

import numpy as np
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from core import dist
from detection.model import to_original

STATS = ("AP", "AP50", "AP75", "APs", "APm", "APl")
BACKENDS = ("pycocotools", "faster")


def to_coco_results(det: dict, image_id: int, label_to_cat: dict) -> list[dict]:
    """One image's detections in original coordinates as COCO result records (bbox x, y, w, h; RLE masks)."""
    out = []
    masks = np.asfortranarray(det["masks"].numpy().astype(np.uint8).transpose(1, 2, 0))  # [h, w, K]
    rles = mask_utils.encode(masks) if len(det["scores"]) else []
    for rle, box, score, label in zip(rles, det["boxes"].tolist(), det["scores"].tolist(), det["labels"].tolist()):
        rle["counts"] = rle["counts"].decode("ascii")
        x0, y0, x1, y1 = box
        out.append(
            {
                "image_id": int(image_id),
                "category_id": int(label_to_cat[int(label)]),
                "bbox": [x0, y0, x1 - x0, y1 - y0],
                "score": float(score),
                "segmentation": rle,
            }
        )
    return out


AREA_RANGES = {"APs": (0, 32**2), "APm": (32**2, 96**2), "APl": (96**2, 1e5**2)}  # COCOeval's, in px^2, ends included


def coco_eval(gt: COCO, results: list[dict], iou_type: str, backend: str = "pycocotools", image_ids=None) -> dict:
    """AP, AP50, AP75, APs, APm, APl (x100, as COCO reports them; None for an area range without ground truth) of
    `results` against `gt` for iou_type "bbox" or "segm", over `image_ids` (default: every image of `gt`).

    segm records are evaluated without their `bbox`, as detectron2's COCOEvaluator does, so pycocotools takes a
    detection's area for the small / medium / large ranges from its mask, not its box. No results at all gives
    0.0 for every statistic whose range has ground truth (detectron2 reports NaN: see docs/DETECTION.md)."""
    if backend not in BACKENDS:
        raise ValueError(f"eval.backend must be one of {BACKENDS}, got {backend!r}")
    if not results:
        return no_detections(gt, image_ids)
    if iou_type == "segm":
        results = [{k: v for k, v in r.items() if k != "bbox"} for r in results]
    with contextlib.redirect_stdout(io.StringIO()):
        if backend == "faster":
            from faster_coco_eval import COCO as FasterCOCO
            from faster_coco_eval import COCOeval_faster

            gt = FasterCOCO(gt.dataset)
            evaluator = COCOeval_faster(gt, gt.loadRes(results), iou_type)
        else:
            from pycocotools.cocoeval import COCOeval

            evaluator = COCOeval(gt, gt.loadRes(results), iou_type)
        if image_ids is not None:
            evaluator.params.imgIds = sorted(image_ids)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    # COCO marks an area range without ground truth with -1: reported as None
    return {k: float(100 * v) if v >= 0 else None for k, v in zip(STATS, evaluator.stats[:6])}


def no_detections(gt: COCO, image_ids=None) -> dict:
    """The statistics of an empty result list: 0.0 (nothing recalled) where COCOeval would count ground truth
    (non-crowd annotations of the evaluated images, by their `area` in the size ranges), None elsewhere."""
    ids = set(gt.getImgIds() if image_ids is None else image_ids)
    areas = [a.get("area", 0.0) for a in gt.dataset["annotations"] if a["image_id"] in ids and not a.get("iscrowd", 0)]
    out = dict.fromkeys(("AP", "AP50", "AP75"), 0.0 if areas else None)
    for k, (lo, hi) in AREA_RANGES.items():
        out[k] = 0.0 if any(lo <= a <= hi for a in areas) else None
    return out


@torch.no_grad()
def predict_coco(model, loader, label_to_cat: dict, device, autocast) -> tuple[list[dict], list[int]]:
    """COCO result records and image ids of this process's shard."""
    model.eval()
    results, image_ids = [], []
    for batch in loader:
        if batch is None:  # every image of the batch skipped (data.skip_corrupt)
            continue
        images, _, metas = batch
        with autocast:
            detections = model.predict(images.to(device, non_blocking=True), [m["size"] for m in metas])
        detections = [{k: v.float() if v.is_floating_point() else v for k, v in d.items()} for d in detections]
        for det, meta in zip(to_original(detections, metas), metas):  # masks pasted on the model's device
            det = {k: v.cpu() for k, v in det.items()}
            results.extend(to_coco_results(det, meta["image_id"], label_to_cat))
            image_ids.append(meta["image_id"])
    return results, image_ids


def evaluate(model, loader, dataset, device, autocast, backend: str = "pycocotools") -> dict:
    """{'bbox': {AP, ...}, 'segm': {AP, ...}, 'images': n} over the whole validation set (every process gets it)."""
    results, image_ids = predict_coco(model, loader, dataset.label_to_cat, device, autocast)
    all_results = [r for part in dist.all_gather_object(results) for r in part]
    all_ids = [i for part in dist.all_gather_object(image_ids) for i in part]
    metrics = None
    if dist.is_main():
        with contextlib.redirect_stdout(io.StringIO()):
            gt = COCO(str(dataset.ann_path))
        metrics = {t: coco_eval(gt, all_results, t, backend, all_ids) for t in ("bbox", "segm")}
        metrics["images"] = len(all_ids)
        metrics["detections"] = len(all_results)
    return dist.broadcast_object(metrics)
