"""Speed of the ViTDet Mask R-CNN recipes: what detection's benchmark adds to the driver.

    python -m tools.bench coco -c tiny --batch 8 --steps 10 --classes 4
    python -m tools.bench coco -c base device=cuda amp=bf16 --batch 1 --steps 20

Training is timed by `core.bench.StepBench`: the recipe's task as `python -m detection` builds it (its
parameter groups, gradient clipping, accumulation, amp, the backbone compiled with compile=true), on LSJ
batches of a synthetic COCO-layout set (or `data.root`). Added here: inference, `predict` on the same images.
"""

from __future__ import annotations

import torch

from core import speed
from core.bench import StepBench

DATA = "coco"  # the layout of the synthetic set tools.bench writes when no data.root is given


def add_flags(p) -> None:
    p.add_argument("--classes", type=int, default=80, help="object categories of the synthetic set")


def measure(bench: StepBench, args) -> dict:
    """Inference images/s and peak memory."""
    task, model = bench.task, bench.run.model
    images, sizes, _ = task.prepare(bench.batches[0][2], 0, 0)
    model.eval()

    def infer():
        with torch.no_grad(), task.autocast():
            model.predict(images, sizes)

    infer_s = speed.seconds_per_call(infer, args.steps, bench.device, warmup=args.warmup)
    infer_peak, _ = speed.peak_memory(bench.device)
    task.train_mode(model)
    return {
        "img_size": bench.cfg.data.img_size,
        "classes": task.train_set.num_classes,
        "inference_images_per_s": round(len(images) / infer_s, 2),
        "infer_peak_mem_gib": round(infer_peak, 2),
    }
