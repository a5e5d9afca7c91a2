"""COCO box and mask AP with pycocotools (or faster-coco-eval, which gives the same numbers, when installed
and asked for). Detections are gathered from every process; rank 0 evaluates."""

from __future__ import annotations

import contextlib
import io

import numpy as np
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from core import dist
from detection.model import to_original

STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def to_coco_results(det: dict, image_id: int, label_to_cat: dict) -> list[dict]:
    """One image's detections (original coordinates) as COCO result records (bbox xywh, RLE masks)."""
    out = []
    masks = det["masks"].cpu().numpy().astype(np.uint8)
    for j, (box, score, label) in enumerate(zip(det["boxes"].tolist(), det["scores"].tolist(), det["labels"].tolist())):
        x0, y0, x1, y1 = box
        rle = mask_utils.encode(np.asfortranarray(masks[j]))
        rle["counts"] = rle["counts"].decode()
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


def coco_eval(gt: COCO, results: list[dict], iou_type: str, backend: str = "pycocotools", image_ids=None) -> dict:
    """AP, AP50, AP75, APs, APm, APl (x100) of `results` against `gt`; all zero without results."""
    if not results:
        return dict.fromkeys(STAT_NAMES, 0.0)
    if backend == "faster":
        from faster_coco_eval import COCO as FCOCO
        from faster_coco_eval import COCOeval_faster as Eval

        gt = FCOCO(gt.dataset)
    else:
        from pycocotools.cocoeval import COCOeval as Eval
    with contextlib.redirect_stdout(io.StringIO()):
        dt = gt.loadRes(results)
        ev = Eval(gt, dt, iou_type)
        if image_ids is not None:
            ev.params.imgIds = list(image_ids)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return {k: float(100 * v) for k, v in zip(STAT_NAMES, ev.stats[:6])}


@torch.no_grad()
def evaluate(model, loader, dataset, device, autocast, backend: str = "pycocotools") -> dict:
    """{'bbox': {...}, 'segm': {...}, 'images': n} on the loader's shard, gathered across processes."""
    model.eval()
    results, image_ids = [], []
    for batch in loader:
        images, _, metas = batch
        with autocast:
            detections = model(images.to(device, non_blocking=True), [m["size"] for m in metas])
        detections = [
            {k: v.float().cpu() if v.is_floating_point() else v.cpu() for k, v in d.items()} for d in detections
        ]
        for det, meta in zip(to_original(detections, metas), metas):
            results.extend(to_coco_results(det, meta["image_id"], dataset.label_to_cat))
            image_ids.append(meta["image_id"])
    all_results = [r for part in dist.all_gather_object(results) for r in part]
    all_ids = [i for part in dist.all_gather_object(image_ids) for i in part]
    metrics = None
    if dist.is_main():
        with contextlib.redirect_stdout(io.StringIO()):
            gt = COCO(str(dataset.ann_path))
        metrics = {t: coco_eval(gt, all_results, t, backend, all_ids) for t in ("bbox", "segm")}
        metrics["images"] = len(all_ids)
    return dist.broadcast_object(metrics)
