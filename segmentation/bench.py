"""Segmentation throughput: what the UperNet benchmark adds to the driver.

    python -m tools.bench ade20k -c base device=cuda amp=bf16 --batch 2

Training is timed by `core.bench.StepBench`: the recipe's task as `python -m segmentation` builds it
(backbone + UperNet + auxiliary head, layer-decayed AdamW, the poly schedule, clipping, accumulation, amp,
compile) on the recipe's crops of a synthetic ADE20K-layout set (or `data.root`). Added here: sliding-window
inference of one image of `--image H W` (default: the crop x 4/3 wide, an ADE20K validation image after the
test resize), windows batched by the recipe's `eval.window_batch`: images/s, peak memory.
"""

from __future__ import annotations

import torch

from core import speed
from core.bench import StepBench
from segmentation.evaluate import predict_image, windows

DATA = "ade20k"  # the layout of the synthetic set tools.bench writes when no data.root is given


def add_flags(p) -> None:
    p.add_argument("--classes", type=int, default=150, help="classes (data.num_classes of the synthetic set)")
    p.add_argument("--image", type=int, nargs=2, default=None, metavar=("H", "W"), help="inference image size")
    p.add_argument("--images", type=int, default=5, help="images timed for inference")


def measure(bench: StepBench, args) -> dict:
    task, model, cfg, device = bench.task, bench.run.model, bench.cfg, bench.device
    crop = cfg.data.crop
    model.eval()
    h, w = args.image or (crop, crop * 4 // 3)
    image = torch.randint(0, 256, (3, h, w), dtype=torch.uint8, device=device)

    def predict(x):
        with task.autocast():
            return model.predict(x)

    kw = dict(
        num_classes=len(task.names), scale=(h * 4, h), crop=crop, stride=cfg.eval.stride, batch=cfg.eval.window_batch
    )
    with torch.no_grad():
        infer_s = speed.seconds_per_call(lambda: predict_image(predict, image, **kw), args.images, device, warmup=1)
    infer_mem, _ = speed.peak_memory(device)
    task.train_mode(model)
    return {
        "crop": crop,
        "classes": len(task.names),
        "infer_image": [h, w],
        "infer_windows": len(windows(h, w, crop, kw["stride"])),
        "infer_images_per_s": round(1 / infer_s, 2),
        "infer_peak_mem_gib": round(infer_mem, 2),
    }
