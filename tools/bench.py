"""Throughput benchmarks. Results go into docs/BENCHMARKS.md together with the command that produced them.

    python -m tools.bench pretrain --model base --batch 128 --device cuda --amp bf16 [--compile]
    python -m tools.bench loader --data /path/to/imagenet/train --workers 16

`pretrain` times full dBOT training steps (teacher forward on the whole image, student encoder on the
visible patches + decoder on all positions, backward, AdamW) on synthetic images, and counts the FLOPs of
one step with torch's FlopCounterMode (counted, not estimated): images/s, achieved TFLOP/s, MFU against a
given peak, peak memory. `loader` measures decode + augmentation throughput of the pretraining input
pipeline, the usual wall on GPU hosts.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from core.engine import Stepper, resolve_amp
from core.optim import param_groups
from core.vit import preset
from pretrain import dbot
from pretrain.masking import RandomMasking
from pretrain.model import MaskedStudent
from pretrain.targets import TeacherTarget

# dense bf16 peak, TFLOP/s (RECIPES.md section 8)
PEAKS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def seconds_per_call(fn, calls: int, device: torch.device, warmup: int = 0) -> float:
    """Mean wall time of `fn()` over `calls` calls after `warmup` untimed ones (GPU work waited for).
    The benchmarks of every task time with this; peak memory is counted from the first timed call."""
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - t0) / max(calls, 1)


def peak_memory(device: torch.device) -> tuple[float, str]:
    """(GiB, what was measured): the CUDA allocator's peak since the last reset, or the process's peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30, "cuda max allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "process max RSS"


def build(model: str, device: torch.device, decoder=(512, 8, 16)):
    arch = preset(model)
    if model == "tiny":
        decoder = (64, 2, 4)
    student = MaskedStudent(
        target_dim=arch["embed_dim"], decoder_dim=decoder[0], decoder_depth=decoder[1], decoder_heads=decoder[2], **arch
    ).to(device)
    target = TeacherTarget(dbot.make_teacher(arch, dbot.encoder_state(student))).to(device)
    return student, target


def bench_pretrain(args) -> dict:
    device = torch.device(args.device)
    amp = resolve_amp(args.amp, device)
    student, target = build(args.model, device)
    opt = torch.optim.AdamW(param_groups(student, 0.05), lr=1e-4, betas=(0.9, 0.95))
    stepper = Stepper(student, opt, amp=amp, device=device)
    n = args.batch
    images = torch.randn(n, 3, student.patch_embed.img_size[0], student.patch_embed.img_size[1], device=device)
    mask = RandomMasking(student.num_patches, 0.75)(torch.rand(n, student.num_patches, device=device))

    fwd_student, fwd_target = student, target

    def step():
        stepper.start_step()
        with stepper.autocast():
            goal = fwd_target(images, mask)
            pred = fwd_student(images, mask)
        stepper.backward(target.loss(pred, goal, mask))
        stepper.step()

    # FLOPs counted eagerly: the counter's module hooks must not be traced into the compiled graphs
    with FlopCounterMode(display=False) as counter:
        step()
    flops_per_step = counter.get_total_flops()
    if args.compile:
        fwd_student, fwd_target = torch.compile(student), torch.compile(target)
    dt = seconds_per_call(step, args.steps, device, warmup=args.warmup)
    tflops = flops_per_step / dt / 1e12
    peak = args.peak_tflops
    if peak is None and device.type == "cuda":
        peak = next((v for k, v in PEAKS.items() if k in torch.cuda.get_device_name(device)), None)
    mem, mem_kind = peak_memory(device)
    return {
        "bench": "pretrain",
        "model": args.model,
        "device": device_name(device),
        "amp": amp,
        "compile": args.compile,
        "batch": n,
        "s_per_step": round(dt, 4),
        "images_per_s": round(n / dt, 1),
        "gflop_per_image": round(flops_per_step / n / 1e9, 2),
        "achieved_tflops": round(tflops, 3),
        "mfu": round(tflops / peak, 4) if peak else None,
        "peak_mem_gib": round(mem, 2),
        "mem_kind": mem_kind,
        "torch": torch.__version__,
    }


def bench_loader(args) -> dict:
    from torch.utils.data import DataLoader
    from torchvision import transforms

    from core.data import IMAGENET_MEAN, IMAGENET_STD, ImageFolder, ShardedSampler

    tf = transforms.Compose(
        [
            transforms.RandomResizedCrop(
                args.img_size, scale=(0.2, 1.0), interpolation=transforms.InterpolationMode.BICUBIC
            ),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )
    ds = ImageFolder(args.data, tf, extra=lambda: torch.rand((args.img_size // 16) ** 2))
    sampler = ShardedSampler(len(ds), args.batch)
    loader = DataLoader(
        ds, batch_size=args.batch, sampler=sampler, num_workers=args.workers, persistent_workers=args.workers > 0
    )
    it = iter(loader)
    next(it)  # start-up
    t0, count = time.perf_counter(), 0
    for _ in range(args.steps):
        try:
            count += next(it)[0].shape[0]
        except StopIteration:
            break
    dt = time.perf_counter() - t0
    return {
        "bench": "loader",
        "data": str(args.data),
        "workers": args.workers,
        "batch": args.batch,
        "images_per_s": round(count / dt, 1),
        "host": platform.node(),
    }


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m tools.bench", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="what", required=True)
    a = sub.add_parser("pretrain", help="dBOT training-step throughput and FLOPs")
    a.add_argument("--model", default="tiny")
    a.add_argument("--batch", type=int, default=None, help="default: 64 (tiny/small on CPU), 128 otherwise")
    a.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a.add_argument("--amp", default="auto")
    a.add_argument("--compile", action="store_true")
    a.add_argument("--steps", type=int, default=10)
    a.add_argument("--warmup", type=int, default=3)
    a.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU (H100 bf16: 989)")
    b = sub.add_parser("loader", help="input pipeline throughput (decode + augment)")
    b.add_argument("--data", required=True, help="an ImageNet-layout split folder (e.g. .../train)")
    b.add_argument("--workers", type=int, default=8)
    b.add_argument("--batch", type=int, default=128)
    b.add_argument("--img-size", type=int, default=224)
    b.add_argument("--steps", type=int, default=20)
    args = p.parse_args(argv)
    if args.what == "pretrain":
        if args.batch is None:
            args.batch = 64 if args.model in ("tiny", "small") and args.device == "cpu" else 128
        res = bench_pretrain(args)
    else:
        res = bench_loader(args)
    print(json.dumps(res))


if __name__ == "__main__":
    main()
