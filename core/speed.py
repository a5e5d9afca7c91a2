"""What every task's benchmark shares: one timing rule, peak memory, counted FLOPs, the device peak for MFU,
and one command line (`python -m <task>.bench -c RECIPE [key=value ...] [bench flags]`).

FLOPs are counted by torch's FlopCounterMode (matrix products, convolutions, attention; norms and
activations are not counted). Its registry lacks the CPU flash-attention kernels that
`scaled_dot_product_attention` dispatches to on CPU, so `count_flops` adds them with the formulas torch uses
for the CUDA kernels (forward: Q K^T and P V; backward: the five products including the recomputed scores):
the same model then counts the same on CPU and GPU.
"""

from __future__ import annotations

import argparse
import platform
import resource
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch.utils import flop_counter
from torch.utils.flop_counter import FlopCounterMode

from core.config import load_config

# dense bf16 peak, TFLOP/s (docs/RECIPES.md section 8)
PEAKS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def peak_tflops(device: torch.device, given: float | None = None) -> float | None:
    """The dense bf16 peak for MFU: `given`, else looked up from the CUDA device name, else None."""
    if given is not None or device.type != "cuda":
        return given
    return next((v for k, v in PEAKS.items() if k in torch.cuda.get_device_name(device)), None)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds_per_call(fn, calls: int, device: torch.device, warmup: int = 0) -> float:
    """Mean wall time of `fn()` over `calls` calls after `warmup` untimed ones (GPU work waited for).
    The benchmarks of every task time with this; peak memory is counted from the first timed call."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    synchronize(device)
    return (time.perf_counter() - t0) / max(calls, 1)


def interleaved(fns: dict[str, Callable[[], object]], calls: int, rounds: int, device: torch.device) -> dict:
    """Seconds per call of each function, timed in turns (`rounds` x `calls` calls each, in rotating order)
    so that drifting machine load affects all of them alike; the median round counts. Returns
    {name: [seconds of each round]}."""
    names = list(fns)
    out = {n: [] for n in names}
    for r in range(rounds):
        for n in names[r % len(names) :] + names[: r % len(names)]:
            out[n].append(seconds_per_call(fns[n], calls, device))
    return out


def median(xs: Sequence[float]) -> float:
    s = sorted(xs)
    return s[len(s) // 2] if len(s) % 2 else 0.5 * (s[len(s) // 2 - 1] + s[len(s) // 2])


def peak_memory(device: torch.device) -> tuple[float, str]:
    """(GiB, what was measured): the CUDA allocator's peak since the last reset, or the process's peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30, "cuda max allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "process max RSS"


# ------------------------------------------------------------------------------------------------ FLOPs
def _sdpa_cpu_forward(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return flop_counter.sdpa_flop_count(query, key, value)


def _sdpa_cpu_backward(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    return flop_counter.sdpa_backward_flop_count(grad_out, query, key, value)


def attention_formulas() -> dict:
    """FlopCounterMode `custom_mapping` for the CPU attention kernels this torch has (none if it has none)."""
    aten = torch.ops.aten
    mapping = {}
    for name, formula in (
        ("_scaled_dot_product_flash_attention_for_cpu", _sdpa_cpu_forward),
        ("_scaled_dot_product_flash_attention_for_cpu_backward", _sdpa_cpu_backward),
    ):
        if hasattr(aten, name):
            mapping[getattr(aten, name)] = formula
    return mapping


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of one eager call of `fn()` (run it once), attention included on CPU as on CUDA."""
    with FlopCounterMode(display=False, custom_mapping=attention_formulas()) as counter:
        fn()
    return counter.get_total_flops()


# --------------------------------------------------------------------------------------- command line
def parser(prog: str, doc: str, default_recipe: str = "tiny") -> argparse.ArgumentParser:
    """The benchmarks' one flag style: `-c RECIPE [key=value ...]` (the task's own config: model, device,
    amp, batch...) plus the measurement flags shared by every task. Parse with `parse_intermixed_args`, so
    overrides may stand before and after the flags."""
    p = argparse.ArgumentParser(prog=prog, description=doc.split("\n\n")[0])
    p.add_argument("-c", "--config", default=default_recipe, help="the task's recipe (name or .yaml path)")
    p.add_argument("overrides", nargs="*", help="dotted key=value config overrides, e.g. device=cuda amp=bf16")
    p.add_argument("--batch", type=int, default=None, help="images per step on this device (default: the recipe's)")
    p.add_argument("--steps", type=int, default=10, help="timed calls")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls first")
    p.add_argument("--compile", action="store_true", help="the same as compile=true")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU (H100/H200 bf16: 989)")
    return p


def bench_config(config_dir: str | Path, args: argparse.Namespace, batch_keys: Sequence[str] = ()):
    """The task config a benchmark measures: defaults <- recipe <- overrides, `--compile` as compile=true and
    `--batch` as every key of `batch_keys` (e.g. data.batch_per_gpu). Applies `--threads`."""
    if args.threads:
        torch.set_num_threads(args.threads)
    extra = ["compile=true"] if args.compile else []
    if args.batch is not None:
        extra += [f"{k}={args.batch}" for k in batch_keys]
    return load_config(config_dir, args.config, [*args.overrides, *extra])


def resolve_device(name: str) -> torch.device:
    """A config's `device` value (auto | cuda | cpu) as a torch device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)
