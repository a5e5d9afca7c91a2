"""Fine-tuning and evaluation throughput of the classifier, on synthetic images (compute only).

    python -m finetune.bench -c tiny --batch 64 --steps 20 --classes 10
    python -m finetune.bench -c base device=cuda amp=bf16 --batch 128 [--compile]

One training step = Mixup/CutMix, forward of the recipe's classifier (average pool + fc_norm, drop path),
soft-target cross-entropy, backward, AdamW over the layer-decayed groups (the real recipe's optimiser
and step code, `core.engine.Stepper`). Evaluation = forward under no_grad. `-c RECIPE [key=value ...]` is the
recipe as `python -m finetune` reads it (device, amp, compile, model.size, ...). Prints one JSON line.
"""

from __future__ import annotations

import json
import platform
from pathlib import Path

import torch
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy

from core import speed
from core.engine import Stepper, autocast, resolve_amp
from core.speed import device_name, peak_memory, seconds_per_call
from finetune.model import build_classifier
from finetune.train import build_optimizer

CONFIGS = Path(__file__).parent / "configs"


def bench(args) -> dict:
    cfg = speed.bench_config(CONFIGS, args, ("data.batch_per_gpu",))
    device = speed.resolve_device(cfg.device)
    amp = resolve_amp(cfg.amp, device)
    batch = int(cfg.data.batch_per_gpu)
    model = build_classifier(cfg, args.classes).to(device)
    stepper = Stepper(model, build_optimizer(cfg, model), amp=amp, device=device, clip_grad=cfg.optim.clip_grad)
    fwd = torch.compile(model) if cfg.compile else model
    size = model.patch_embed.img_size[0]
    g = torch.Generator(device="cpu").manual_seed(0)
    images = torch.randn(batch, 3, size, size, generator=g).to(device)
    labels = torch.randint(0, args.classes, (batch,), generator=g).to(device)
    a = cfg.aug
    mixup = Mixup(mixup_alpha=a.mixup, cutmix_alpha=a.cutmix, label_smoothing=a.smoothing, num_classes=args.classes)
    criterion = SoftTargetCrossEntropy()

    def train_step():
        x, y = mixup(images, labels)
        with stepper.autocast():
            loss = criterion(fwd(x), y)
        stepper.start_step()
        stepper.backward(loss)
        stepper.step()

    def eval_step():
        with torch.no_grad(), autocast(amp, device):
            fwd(images)

    model.train()
    t_train = seconds_per_call(train_step, args.steps, device, warmup=args.warmup)
    model.eval()
    t_eval = seconds_per_call(eval_step, args.steps, device, warmup=args.warmup)
    memory, memory_kind = peak_memory(device)
    return {
        "recipe": args.config,
        "overrides": list(args.overrides),
        "model": cfg.model.size,
        "img_size": size,
        "device": device_name(device),
        "host": platform.node(),
        "batch": batch,
        "amp": amp,
        "compile": bool(cfg.compile),
        "train_images_per_s": round(batch / t_train, 1),
        "eval_images_per_s": round(batch / t_eval, 1),
        "peak_mem_gib": round(memory, 2),
        "mem_kind": memory_kind,
    }


def main(argv=None) -> None:
    p = speed.parser("python -m finetune.bench", __doc__)
    p.add_argument("--classes", type=int, default=1000, help="classifier outputs (synthetic labels)")
    print(json.dumps(bench(p.parse_intermixed_args(argv))))


if __name__ == "__main__":
    main()
