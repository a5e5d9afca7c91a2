"""Speed of the ViTDet Mask R-CNN recipes on synthetic batches (compute only, no data loading).

    python -m detection.bench -c tiny --batch 8 --steps 10
    python -m detection.bench -c base --batch 1 --device cuda --amp bf16 --steps 20

Training: full steps (forward with losses, backward, AdamW with the recipe's parameter groups) on images with
three random box-shaped instances each -> s/iter, images/s. Inference: `predict` on the same images -> images/s.
Peak memory: CUDA max allocated, or the process's peak RSS on CPU. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from core.config import load_config
from core.engine import Stepper, resolve_amp
from detection.model import build_detector
from detection.train import build_optimizer
from tools.bench import device_name, peak_memory, seconds_per_call


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
    device = torch.device(args.device)
    overrides = [f"data.img_size={args.img_size}"] if args.img_size else []
    cfg = load_config(Path(__file__).parent / "configs", args.config, overrides)
    amp = resolve_amp(args.amp, device)
    size = cfg.data.img_size
    model = build_detector(cfg, args.num_classes).to(device)
    stepper = Stepper(model, build_optimizer(cfg, model), amp=amp, device=device)
    images, sizes, targets = synthetic_batch(args.batch, size, args.num_classes, torch.Generator().manual_seed(0))
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
        "img_size": size,
        "device": device_name(device),
        "amp": amp,
        "batch": args.batch,
        "train_s_per_iter": round(train_s, 4),
        "train_images_per_s": round(args.batch / train_s, 2),
        "inference_images_per_s": round(args.batch / infer_s, 2),
        "train_peak_mem_gib": round(train_peak, 2),
        "infer_peak_mem_gib": round(infer_peak, 2),
        "mem_kind": kind,
    }


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m detection.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("-c", "--config", default="tiny", help="detection recipe (tiny, base, large, huge)")
    p.add_argument("--img-size", type=int, default=None, help="override data.img_size")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--amp", default="auto")
    p.add_argument("--num-classes", type=int, default=80)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(json.dumps(bench(args)))


if __name__ == "__main__":
    main()
