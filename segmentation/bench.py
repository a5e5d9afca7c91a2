"""Segmentation throughput: `python -m segmentation.bench --recipe base --device cuda --amp bf16 --batch 2`.

Times, on synthetic data and with the recipe's model (segmentation/configs/<recipe>.yaml):
- training: full steps (backbone + UperNet + auxiliary head forward, backward, layer-decayed AdamW) at the
  recipe's crop: s/iter, images/s, counted GFLOP per image (torch's FlopCounterMode), peak memory;
- inference: sliding-window prediction of one image of `--image H W` (default: the crop x 4/3 wide, an
  ADE20K validation image after the test resize), windows batched by `--window-batch`: images/s, peak memory.
Prints one JSON line; docs/BENCHMARKS.md holds the figures with the commands that produced them.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from core.config import load_config
from core.engine import Stepper, autocast, resolve_amp
from segmentation.evaluate import predict_image, windows
from segmentation.model import build_segmentor
from segmentation.train import build_optimizer
from tools.bench import device_name, peak_memory, seconds_per_call

CONFIGS = Path(__file__).parent / "configs"


def bench(args) -> dict:
    device = torch.device(args.device)
    amp = resolve_amp(args.amp, device)
    cfg = load_config(CONFIGS, args.recipe)
    classes = args.classes
    torch.manual_seed(0)
    model = build_segmentor(cfg.model, classes).to(device)
    crop = cfg.data.crop
    stepper = Stepper(model, build_optimizer(cfg, model), [1e-4], amp=amp, device=device)
    images = torch.randn(args.batch, 3, crop, crop, device=device)
    labels = torch.randint(0, classes, (args.batch, crop, crop), device=device)
    fwd = model

    def step():
        stepper.start_step()
        with stepper.autocast():
            loss = fwd(images, labels)["loss"]
        stepper.backward(loss)
        stepper.step()

    model.train()
    with FlopCounterMode(display=False) as counter:  # eagerly: the counter's hooks must not be compiled in
        step()
    flops = counter.get_total_flops()
    if args.compile:
        fwd = torch.compile(model)
    s_per_iter = seconds_per_call(step, args.steps, device, warmup=args.warmup)
    train_mem, kind = peak_memory(device)

    model.eval()
    h, w = args.image or (crop, crop * 4 // 3)
    image = torch.randint(0, 256, (3, h, w), dtype=torch.uint8, device=device)

    def predict(x):
        with autocast(amp, device):
            return model.predict(x)

    kw = dict(num_classes=classes, scale=(h * 4, h), crop=crop, stride=cfg.eval.stride, batch=args.window_batch)
    with torch.no_grad():
        infer_s = seconds_per_call(lambda: predict_image(predict, image, **kw), args.images, device, warmup=1)
    infer_mem, _ = peak_memory(device)
    return {
        "bench": "segmentation",
        "recipe": args.recipe,
        "device": device_name(device),
        "amp": amp,
        "compile": args.compile,
        "batch": args.batch,
        "crop": crop,
        "train_s_per_iter": round(s_per_iter, 4),
        "train_images_per_s": round(args.batch / s_per_iter, 2),
        "train_gflop_per_image": round(flops / args.batch / 1e9, 2),
        "train_peak_mem_gib": round(train_mem, 2),
        "infer_image": [h, w],
        "infer_windows": len(windows(h, w, crop, kw["stride"])),
        "infer_images_per_s": round(1 / infer_s, 2),
        "infer_peak_mem_gib": round(infer_mem, 2),
        "mem_kind": kind,
        "torch": torch.__version__,
    }


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m segmentation.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--recipe", default="tiny", help="tiny | base | large (segmentation/configs)")
    p.add_argument("--batch", type=int, default=2, help="images per training step on this device")
    p.add_argument("--classes", type=int, default=150)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--amp", default="auto")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--image", type=int, nargs=2, default=None, metavar=("H", "W"))
    p.add_argument("--window-batch", type=int, default=4)
    p.add_argument("--images", type=int, default=5, help="images timed for inference")
    print(json.dumps(bench(p.parse_args(argv))))


if __name__ == "__main__":
    main()
