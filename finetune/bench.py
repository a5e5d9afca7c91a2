"""Fine-tuning and evaluation throughput of the classifier, on synthetic images (compute only).

    python -m finetune.bench --model tiny --batch 64 --steps 20
    python -m finetune.bench --model base --batch 128 --device cuda --amp bf16 [--compile]

One training step = Mixup/CutMix, forward of the recipe's classifier (average pool + fc_norm, drop path),
soft-target cross-entropy, backward, AdamW over the layer-decayed groups (the real recipe's optimiser
and step code, `core.engine.Stepper`). Evaluation = forward under no_grad. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import torch
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy

from core.config import load_config
from core.engine import Stepper, autocast, resolve_amp
from finetune.model import build_classifier
from finetune.train import build_optimizer
from tools.bench import device_name, peak_memory, seconds_per_call

CONFIGS = Path(__file__).parent / "configs"


def bench(args) -> dict:
    device = torch.device(args.device)
    amp = resolve_amp(args.amp, device)
    recipe = args.recipe or (args.model if (CONFIGS / f"{args.model}.yaml").is_file() else None)
    cfg = load_config(CONFIGS, recipe, [f"model.size={args.model}"])
    model = build_classifier(cfg, args.classes).to(device)
    stepper = Stepper(model, build_optimizer(cfg, model), amp=amp, device=device, clip_grad=cfg.optim.clip_grad)
    fwd = torch.compile(model) if args.compile else model
    size = model.patch_embed.img_size[0]
    g = torch.Generator(device="cpu").manual_seed(0)
    images = torch.randn(args.batch, 3, size, size, generator=g).to(device)
    labels = torch.randint(0, args.classes, (args.batch,), generator=g).to(device)
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
        "model": args.model,
        "img_size": size,
        "device": device_name(device),
        "host": platform.node(),
        "batch": args.batch,
        "amp": amp,
        "compile": args.compile,
        "train_images_per_s": round(args.batch / t_train, 1),
        "eval_images_per_s": round(args.batch / t_eval, 1),
        "peak_mem_gib": round(memory, 2),
        "mem_kind": memory_kind,
    }


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m finetune.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny", help="tiny small base large huge")
    p.add_argument("--recipe", default=None, help="recipe for the optimiser/augmentation settings (default: --model)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--amp", default="auto")
    p.add_argument("--compile", action="store_true")
    args = p.parse_args(argv)
    print(json.dumps(bench(args)))


if __name__ == "__main__":
    main()
