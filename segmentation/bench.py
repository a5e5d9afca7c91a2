"""Segmentation throughput: `python -m segmentation.bench -c base device=cuda amp=bf16 --batch 2`.

Times, on synthetic data and with the recipe's model (segmentation/configs/<recipe>.yaml):
- training: full steps (backbone + UperNet + auxiliary head forward, backward, layer-decayed AdamW) at the
  recipe's crop: s/iter, images/s, counted GFLOP per image (torch's FlopCounterMode), peak memory;
- inference: sliding-window prediction of one image of `--image H W` (default: the crop x 4/3 wide, an
  ADE20K validation image after the test resize), windows batched by the recipe's `eval.window_batch`:
  images/s, peak memory.
`-c RECIPE [key=value ...]` is the recipe as `python -m segmentation` reads it (device, amp, compile, model.*).
Prints one JSON line; docs/BENCHMARKS.md holds the figures with the commands that produced them.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from core import speed
from core.engine import Stepper, autocast, resolve_amp
from core.speed import count_flops, device_name, peak_memory, seconds_per_call
from segmentation.evaluate import predict_image, windows
from segmentation.model import build_segmentor
from segmentation.train import build_optimizer

CONFIGS = Path(__file__).parent / "configs"


def bench(args) -> dict:
    cfg = speed.bench_config(CONFIGS, args, ("data.batch_per_gpu",))
    device = speed.resolve_device(cfg.device)
    amp = resolve_amp(cfg.amp, device)
    batch = int(cfg.data.batch_per_gpu)
    classes = args.classes
    torch.manual_seed(0)
    model = build_segmentor(cfg.model, classes).to(device)
    crop = cfg.data.crop
    stepper = Stepper(model, build_optimizer(cfg, model), [1e-4], amp=amp, device=device)
    images = torch.randn(batch, 3, crop, crop, device=device)
    labels = torch.randint(0, classes, (batch, crop, crop), device=device)
    fwd = model

    def step():
        stepper.start_step()
        with stepper.autocast():
            loss = fwd(images, labels)["loss"]
        stepper.backward(loss)
        stepper.step()

    model.train()
    flops = count_flops(step)  # eagerly: the counter's hooks must not be compiled in
    if cfg.compile:
        fwd = torch.compile(model)
    s_per_iter = seconds_per_call(step, args.steps, device, warmup=args.warmup)
    train_mem, kind = peak_memory(device)

    model.eval()
    h, w = args.image or (crop, crop * 4 // 3)
    image = torch.randint(0, 256, (3, h, w), dtype=torch.uint8, device=device)

    def predict(x):
        with autocast(amp, device):
            return model.predict(x)

    kw = dict(num_classes=classes, scale=(h * 4, h), crop=crop, stride=cfg.eval.stride, batch=cfg.eval.window_batch)
    with torch.no_grad():
        infer_s = seconds_per_call(lambda: predict_image(predict, image, **kw), args.images, device, warmup=1)
    infer_mem, _ = peak_memory(device)
    return {
        "bench": "segmentation",
        "recipe": args.config,
        "overrides": list(args.overrides),
        "device": device_name(device),
        "amp": amp,
        "compile": bool(cfg.compile),
        "batch": batch,
        "crop": crop,
        "train_s_per_iter": round(s_per_iter, 4),
        "train_images_per_s": round(batch / s_per_iter, 2),
        "train_gflop_per_image": round(flops / batch / 1e9, 2),
        "train_peak_mem_gib": round(train_mem, 2),
        "infer_image": [h, w],
        "infer_windows": len(windows(h, w, crop, kw["stride"])),
        "infer_images_per_s": round(1 / infer_s, 2),
        "infer_peak_mem_gib": round(infer_mem, 2),
        "mem_kind": kind,
        "torch": torch.__version__,
    }


def main(argv=None) -> None:
    p = speed.parser("python -m segmentation.bench", __doc__)
    p.add_argument("--classes", type=int, default=150)
    p.add_argument("--image", type=int, nargs=2, default=None, metavar=("H", "W"), help="inference image size")
    p.add_argument("--images", type=int, default=5, help="images timed for inference")
    print(json.dumps(bench(p.parse_intermixed_args(argv))))


if __name__ == "__main__":
    main()
