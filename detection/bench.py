"""Speed of the ViTDet Mask R-CNN recipes on synthetic batches (compute only, no data loading).

    python -m detection.bench -c tiny --batch 8 --steps 10 --classes 4
    python -m detection.bench -c base device=cuda amp=bf16 --batch 1 --steps 20

Training: full steps (forward with losses, backward, AdamW with the recipe's parameter groups) on images with
three random box-shaped instances each -> s/iter, images/s. Inference: `predict` on the same images -> images/s.
Peak memory: CUDA max allocated, or the process's peak RSS on CPU. `-c RECIPE [key=value ...]` is the recipe as
`python -m detection` reads it (device, amp, compile, data.img_size, model.*). Prints one JSON line.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from core import speed
from core.engine import Stepper, resolve_amp
from core.speed import device_name, peak_memory, seconds_per_call
from detection.model import build_detector
from detection.train import build_optimizer


def synthetic_batch(n: int, size: int, num_classes: int, generator: torch.Generator):
    images = torch.randn(n, 3, size, size, generator=generator)
    targets = []
    for _ in range(n):
        xy = torch.rand(3, 2, generator=generator) * size * 0.6
        wh = (0.1 + torch.rand(3, 2, generator=generator) * 0.3) * size
        boxes = torch.cat([xy, xy + wh], 1).round()
        masks = torch.zeros(3, size, size, dtype=torch.uint8)
        for k, (x0, y0, x1, y1) in enumerate(boxes.int().tolist()):
            masks[k, y0:y1, x0:x1] = 1
        labels = torch.randint(1, num_classes + 1, (3,), generator=generator)
        targets.append({"boxes": boxes, "labels": labels, "masks": masks})
    return images, [(size, size)] * n, targets


def bench(args) -> dict:
    cfg = speed.bench_config(Path(__file__).parent / "configs", args, ("data.batch_per_gpu",))
    device = speed.resolve_device(cfg.device)
    amp = resolve_amp(cfg.amp, device)
    size, batch = cfg.data.img_size, int(cfg.data.batch_per_gpu)
    model = build_detector(cfg, args.classes).to(device)
    if cfg.compile:  # as detection/train.py does
        model.backbone.compile()
    stepper = Stepper(model, build_optimizer(cfg, model), amp=amp, device=device)
    images, sizes, targets = synthetic_batch(batch, size, args.classes, torch.Generator().manual_seed(0))
    images = images.to(device)
    targets = [{k: v.to(device) for k, v in t.items()} for t in targets]

    def train_step():
        stepper.start_step()
        with stepper.autocast():
            losses = model(images, sizes, targets)
        stepper.backward(sum(losses.values()))
        stepper.step()

    def infer():
        with stepper.autocast():
            model.predict(images, sizes)

    model.train()
    train_s = seconds_per_call(train_step, args.steps, device, warmup=args.warmup)
    train_peak, kind = peak_memory(device)
    model.eval()
    infer_s = seconds_per_call(infer, args.steps, device, warmup=args.warmup)
    infer_peak, _ = peak_memory(device)
    return {
        "recipe": args.config,
        "overrides": list(args.overrides),
        "img_size": size,
        "device": device_name(device),
        "amp": amp,
        "compile": bool(cfg.compile),
        "batch": batch,
        "train_s_per_iter": round(train_s, 4),
        "train_images_per_s": round(batch / train_s, 2),
        "inference_images_per_s": round(batch / infer_s, 2),
        "train_peak_mem_gib": round(train_peak, 2),
        "infer_peak_mem_gib": round(infer_peak, 2),
        "mem_kind": kind,
    }


def main(argv=None) -> None:
    p = speed.parser("python -m detection.bench", __doc__)
    p.add_argument("--classes", type=int, default=80, help="object categories (synthetic instances)")
    print(json.dumps(bench(p.parse_intermixed_args(argv))))


if __name__ == "__main__":
    main()
