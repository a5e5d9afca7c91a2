"""Pretraining benchmarks: the training step of a recipe, its input pipeline, and the authors' step beside ours.

    python -m tools.bench pretrain -c base [key=value ...] [--batch 256 --compile --end-to-end --authors PATH]
    python -m tools.bench loader -c base data.root=/path/to/imagenet [data.backend=gpu data.workers=16]

`pretrain` builds exactly what `python -m pretrain -c RECIPE [key=value ...]` trains (the recipe's student,
decoder, first target, optimiser, clipping, amp, device) and times whole training steps: teacher forward,
student forward/backward, loss, AdamW. Synthetic images always (compute only); with `--end-to-end` also
batches from `data.root` through the configured data path (`data.backend`, `data.workers`). FLOPs of one
step are counted (core.speed.count_flops, attention included on CPU): images/s, achieved TFLOP/s, MFU.
`--authors /path/to/dbot/models_mae.py` times the authors' released step (their MaskedAutoencoderViT with the
recipe's sizes, fp16 autocast + GradScaler on CUDA, AdamW, their clipping and per-step `loss.item()`) and
ours on the same device in one process, interleaved, and prints the throughput ratio. The file is imported
from the given path with its checkout on sys.path (it needs `util/pos_embed.py` beside it, timm and
torchvision; nothing else of theirs is imported).

`loader` measures the input pipeline alone: images/s, CPU seconds per image (main process + workers) and so
images per core-second, on the device the backend decodes on. Prints one JSON line per command.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import sys
import time
from functools import partial
from pathlib import Path

import torch

from core import errors, speed
from core.config import ConfigError
from core.dist import DistEnv
from pretrain import datapath

CONFIGS = Path(__file__).resolve().parents[1] / "pretrain" / "configs"
BATCH_KEYS = ("data.batch_per_gpu", "optim.global_batch")


# ----------------------------------------------------------------------------- the suite's training step
class OursStep:
    """One pretraining step of the suite as training runs it, built from a pretraining config, in stage `stage`
    (0: the first target; k: after k stage switches, e.g. the bootstrapped full-depth teacher where the L/H
    recipes start from a depth-0 one): the recipe's `pretrain.train.Pretrain` task (its student, target,
    masker, optimizer and stage switch) driven through `core.engine.Stepper`, as `core.trainer` drives it.

    `step(images, spec)` = the task's `forward` (mask from the loader's specs, target and student forward, loss)
    under autocast, backward, optimizer step, the target's after-step hook; returns the loss (not synchronised).
    `compile()` switches to the engine's compiled step (`compile=true`: one graph for the whole forward).
    """

    def __init__(self, cfg, device: torch.device, stage: int = 0):
        from core import engine
        from pretrain import train

        cfg = cfg.copy()
        cfg.probe.every = None  # the step is timed, not the online probe between epochs
        if not Path(cfg.data.root).is_dir():  # synthetic data: the plan's data check needs some folder
            cfg.data.root = "."
        self.task = task = train.Pretrain(cfg, DistEnv(device=device))
        self.plan = plan = task.plan
        if not 0 <= stage < len(plan.stages):
            raise ConfigError(f"--stage {stage}: the recipe has stages 0..{len(plan.stages) - 1}")
        task.stage = 0
        task.student, task.target = train.first_target(plan, 0)
        task.student.to(device)
        task.target.to(device)
        task.masker = train.build_masker(plan)
        task.model, task.optimizer = task.student, task.optimizer_for(task.student)
        self.stepper = engine.Stepper(task.model, task.optimizer, amp=task.amp, clip_grad=task.clip_grad, device=device)
        for k in range(1, stage + 1):  # the task's own stage switch (bootstrapped teacher, re-initialised student)
            task.switch(k)
            self.stepper.swap(task.model, task.optimizer)
        self.stage, self.forward, self.compiled = stage, task.forward, False
        self.img_size, self.amp, self.device = plan.arch["img_size"], task.amp, device

    @property
    def student(self):
        return self.task.student

    @property
    def target(self):
        return self.task.target

    @property
    def masker(self):
        return self.task.masker

    def compile(self) -> None:
        """Switch to the compiled step (what `compile=true` gives in training)."""
        self.forward = self.task.compile(True)
        self.compiled = True

    def step(self, images: torch.Tensor, spec: torch.Tensor) -> torch.Tensor:
        stepper = self.stepper
        stepper.start_step()
        with stepper.autocast():
            loss = self.forward(stepper.model, images, spec)["loss"]
        stepper.backward(loss)
        stepper.step()
        self.task.after_step(stepper.step_count, 0)
        return loss.detach()

    def synthetic(self, n: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        images = torch.randn(n, 3, self.img_size, self.img_size, generator=g).to(self.device)
        with datapath.torch_seeded(seed):
            spec = torch.stack([self.masker.sample() for _ in range(n)]).to(self.device)
        return images, spec


# --------------------------------------------------------------------------------- the authors' step
def load_authors_module(path: str | Path):
    """The authors' `models_mae.py` imported from `path` (their checkout's root put on sys.path for
    `util.pos_embed`). ConfigError when the file or its helper is missing."""
    path = Path(path).resolve()
    if not path.is_file():
        raise ConfigError(f"--authors: {path} does not exist (give the models_mae.py of a liuxingbin/dbot checkout)")
    root = path.parent
    if not (root / "util" / "pos_embed.py").is_file():
        raise ConfigError(
            f"--authors: {root}/util/pos_embed.py is missing (models_mae.py imports it; keep the checkout)"
        )
    # their `util` package, not any other one already imported (and not left behind for others)
    theirs = lambda name: name == "util" or name.startswith("util.")  # noqa: E731
    saved = {k: sys.modules.pop(k) for k in [k for k in sys.modules if theirs(k)]}
    sys.path.insert(0, str(root))
    try:
        spec = importlib.util.spec_from_file_location("authors_models_mae", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(root))
        for k in [k for k in sys.modules if theirs(k)]:
            del sys.modules[k]
        sys.modules.update(saved)
    return module


@contextlib.contextmanager
def numpy_float_alias():
    """`np.float` (removed in numpy 1.24; the authors' util/pos_embed.py uses it) as the builtin float while
    their models are built; nothing of the step depends on it."""
    import numpy as np

    had = "float" in np.__dict__
    if not had:
        np.float = float
    try:
        yield
    finally:
        if not had:
            del np.float


class AuthorsStep:
    """The authors' released step (engine_pretrain.train_one_epoch + util.misc's loss scaler) for the recipe's
    sizes: `torch.cuda.amp.autocast()` (fp16 on CUDA, nothing on CPU), GradScaler, `loss.item()` each step,
    unscale + clip_grad_norm_ (or their unclipped grad-norm computation), step, update, zero_grad,
    `torch.cuda.synchronize()`. Their model draws its own masking noise."""

    def __init__(self, module, cfg, plan, device: torch.device):
        from timm.optim import param_groups_weight_decay

        if cfg.model.kind != "mae" or cfg.target.kind != "teacher":
            raise ConfigError(
                "--authors: the released step is the asymmetric student with a ViT teacher "
                "(model.kind=mae, target.kind=teacher)"
            )
        a, d = plan.arch, cfg.model.decoder
        norm = partial(torch.nn.LayerNorm, eps=1e-6)
        common = dict(
            img_size=a["img_size"],
            patch_size=a["patch_size"],
            embed_dim=a["embed_dim"],
            num_heads=a["num_heads"],
            mlp_ratio=4,
            norm_layer=norm,
        )
        with numpy_float_alias():
            self.model, self.teacher = self._build(module, plan, d, cfg, common, device)
        self.teacher.load_state_dict(self.model.state_dict(), strict=False)
        self.teacher.requires_grad_(False)
        self.model.train()
        self.optimizer = torch.optim.AdamW(
            param_groups_weight_decay(self.model, cfg.optim.weight_decay), lr=plan.lr, betas=(0.9, 0.95)
        )
        self.cuda = device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.cuda)
        self.clip, self.ratio, self.lr = cfg.optim.clip_grad, cfg.model.mask_ratio, plan.lr
        self.tlayernorm = int(bool(cfg.teacher.final_norm))
        self.device = device

    @staticmethod
    def _build(module, plan, d, cfg, common, device):
        model = module.MaskedAutoencoderViT(
            depth=plan.depths[0],
            decoder_embed_dim=d.dim,
            decoder_depth=d.depth,
            decoder_num_heads=d.heads,
            norm_feature_loss=cfg.loss.norm == "standardize",
            drop_path_rate=cfg.model.drop_path,
            **common,
        )
        teacher = module.MaskedAutoencoderViT(depth=plan.teacher0_arch["depth"], decoder_depth=0, **common)
        return model.to(device), teacher.to(device)

    def step(self, images: torch.Tensor, spec=None) -> float:
        for g in self.optimizer.param_groups:  # lr_sched.adjust_learning_rate, every iteration
            g["lr"] = self.lr
        autocast = torch.autocast("cuda", dtype=torch.float16) if self.cuda else contextlib.nullcontext()
        with autocast:
            loss, _, _ = self.model(images, teacher=self.teacher, mask_ratio=self.ratio, tlayernorm=self.tlayernorm)
        value = loss.item()
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        params = [p for p in self.model.parameters() if p.grad is not None]
        if self.clip is not None:
            torch.nn.utils.clip_grad_norm_(params, self.clip)
        else:  # their get_grad_norm_: the 2-norm of the per-tensor 2-norms
            torch.norm(torch.stack([torch.norm(p.grad.detach(), 2.0) for p in params]), 2.0)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad()
        speed.synchronize(self.device)
        return value


# ----------------------------------------------------------------------------------------------- pretrain
def step_report(name: str, seconds: float, n: int, flops: int, peak: float | None) -> dict:
    tflops = flops / seconds / 1e12
    return {
        f"{name}_s_per_step": round(seconds, 4),
        f"{name}_images_per_s": round(n / seconds, 1),
        f"{name}_achieved_tflops": round(tflops, 3),
        f"{name}_mfu": round(tflops / peak, 4) if peak else None,
    }


def bench_pretrain(args) -> dict:
    cfg = speed.bench_config(CONFIGS, args, BATCH_KEYS)
    device = speed.resolve_device(cfg.device)
    n = int(cfg.data.batch_per_gpu)
    ours = OursStep(cfg, device, args.stage)
    images, spec = ours.synthetic(n)
    # FLOPs counted eagerly: the counter's hooks must not be traced into compiled graphs
    flops = speed.count_flops(lambda: ours.step(images, spec))
    peak = speed.peak_tflops(device, args.peak_tflops)
    res = {
        "bench": "pretrain",
        "recipe": args.config,
        "overrides": list(args.overrides),
        "model": cfg.model.size,
        "arch": ours.plan.arch,
        "decoder": dict(cfg.model.decoder) if cfg.model.kind == "mae" else None,
        "stage": ours.stage,
        "target": ours.target.describe(),
        "device": speed.device_name(device),
        "amp": ours.amp,
        "compile": bool(cfg.compile),
        "batch": n,
        "gflop_per_image": round(flops / n / 1e9, 2),
        "peak_tflops": peak,
    }
    fns = {}
    if args.authors:
        authors = AuthorsStep(load_authors_module(args.authors), cfg, ours.plan, device)
        res["authors_gflop_per_image"] = round(speed.count_flops(lambda: authors.step(images)) / n / 1e9, 2)
        res["authors_amp"] = "fp16 + GradScaler" if device.type == "cuda" else "none (torch.cuda.amp on CPU)"
        fns["authors"] = lambda: authors.step(images)
        fns["ours"] = lambda: ours.step(images, spec)
        if cfg.compile:
            compiled = OursStep(cfg, device, args.stage)
            compiled.compile()
            fns["ours_compiled"] = lambda: compiled.step(images, spec)
    else:
        if cfg.compile:
            ours.compile()
        fns["ours_compiled" if cfg.compile else "ours"] = lambda: ours.step(images, spec)
    for f in fns.values():  # warm-up (and compilation) before any timing
        for _ in range(max(args.warmup, 1 if cfg.compile else 0)):
            f()
    rounds = speed.interleaved(fns, args.steps, args.rounds, device)
    for name, times in rounds.items():
        res.update(step_report(name, speed.median(times), n, flops, peak))
        res[f"{name}_rounds_s"] = [round(t, 4) for t in times]
    if "authors" in rounds:
        for name in rounds:
            if name != "authors":  # > 1: ours is faster
                ratio = [a / b for a, b in zip(rounds["authors"], rounds[name])]
                res[f"{name}_vs_authors"] = round(speed.median(ratio), 3)
    mem, kind = speed.peak_memory(device)
    res.update(peak_mem_gib=round(mem, 2), mem_kind=kind)
    if args.end_to_end:
        res.update(end_to_end(cfg, ours, device, args))
    res["torch"] = torch.__version__
    return res


def end_to_end(cfg, ours: OursStep, device: torch.device, args) -> dict:
    """Training steps on batches from data.root through the configured data path (loader + to_device +
    step), after `warmup` untimed ones; epochs wrap around when the folder is small."""
    data = build_data(cfg, ours, device)
    batches = cycle(data)
    for _ in range(args.warmup):
        images, _, spec = data.to_device(next(batches), device)
        ours.step(images, spec)
    speed.synchronize(device)
    t0, count = time.perf_counter(), 0
    for _ in range(args.steps):
        images, _, spec = data.to_device(next(batches), device)
        ours.step(images, spec)
        count += images.shape[0]
    speed.synchronize(device)
    dt = time.perf_counter() - t0
    return {
        "e2e_data": str(cfg.data.root),
        "e2e_backend": data.backend,
        "e2e_workers": int(cfg.data.workers),
        "e2e_images_per_s": round(count / dt, 1),
    }


def build_data(cfg, ours: OursStep, device: torch.device) -> datapath.PretrainData:
    root = Path(cfg.data.root) / "train"
    return datapath.pretrain_data(
        cfg.data, root, ours.img_size, seed=int(cfg.seed), env=DistEnv(device=device), extra=ours.masker.sample
    )


def cycle(data: datapath.PretrainData):
    epoch = 0
    while True:
        data.sampler.set_epoch(epoch)
        for batch in data.loader:
            if batch is not None:
                yield batch
        epoch += 1


# -------------------------------------------------------------------------------------------------- loader
def _worker_cpu_seconds(iterator) -> float | None:
    """User + system CPU seconds of the loader's worker processes so far (Linux /proc), None elsewhere."""
    import os

    total = 0.0
    tick = os.sysconf("SC_CLK_TCK")
    for w in getattr(iterator, "_workers", []):
        try:
            fields = Path(f"/proc/{w.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return None
        total += (int(fields[11]) + int(fields[12])) / tick
    return total


def _loader_setup(args):
    """The recipe's config, device, pretraining plan and a `make(data_cfg)` building its data path (masks
    drawn as in training), for the loader benchmarks."""
    from pretrain import train

    cfg = speed.bench_config(CONFIGS, args, BATCH_KEYS)
    cfg.probe.every = None  # a loader benchmark: no labelled split needed
    device = speed.resolve_device(cfg.device)
    plan = train.Plan(cfg, DistEnv(device=device))
    masker = train.build_masker(plan)

    def make(data_cfg):
        return datapath.pretrain_data(
            data_cfg,
            plan.train_root,
            plan.arch["img_size"],
            seed=int(cfg.seed),
            env=DistEnv(device=device),
            extra=masker.sample,
        )

    return cfg, device, plan, make


def bench_loader(args) -> dict:
    """Images/s of the input pipeline alone (loader + to_device), and its CPU cost per image."""
    cfg, device, plan, make = _loader_setup(args)
    data = make(cfg.data)
    it = iter(data.loader)
    batches = _restarting(data, it)
    for _ in range(max(args.warmup, 1)):
        data.to_device(next(batches), device)
    speed.synchronize(device)
    w0, c0, t0, count = _worker_cpu_seconds(it), time.process_time(), time.perf_counter(), 0
    for _ in range(args.steps):
        count += data.to_device(next(batches), device)[0].shape[0]
    speed.synchronize(device)
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    w1 = _worker_cpu_seconds(it)
    if w0 is not None and w1 is not None:
        cpu += w1 - w0
    return {
        "bench": "loader",
        "data": str(plan.train_root),
        "backend": data.backend,
        "jpeg_draft": bool(cfg.data.jpeg_draft),
        "img_size": plan.arch["img_size"],
        "workers": int(cfg.data.workers),
        "batch": int(cfg.data.batch_per_gpu),
        "device": speed.device_name(device),
        "images_per_s": round(count / dt, 1),
        "cpu_ms_per_image": round(1e3 * cpu / max(count, 1), 3),
        "images_per_core_s": round(count / cpu, 1) if cpu > 0 else None,
        "images_per_gpu_s": round(count / dt, 1) if data.backend == "gpu" and device.type == "cuda" else None,
    }


def compare_loaders(args) -> dict:
    """Several data backends in one process, timed in turns (`--rounds` x `--steps` batches each): CPU ms per
    image (this process + workers) and images/s per backend, and each one's speed-up over the first."""
    cfg, device, plan, make = _loader_setup(args)
    runs = {}
    for backend in args.compare:
        c = cfg.data.copy()
        c.backend = backend
        data = make(c)
        it = iter(data.loader)
        runs[backend] = (data, it, _restarting(data, it))
        data.to_device(next(runs[backend][2]), device)  # start-up
    cpu = {b: [] for b in runs}
    wall = {b: [] for b in runs}
    for r in range(args.rounds):
        order = list(runs)[r % len(runs) :] + list(runs)[: r % len(runs)]
        for b in order:
            data, it, batches = runs[b]
            w0, c0, t0, count = _worker_cpu_seconds(it), time.process_time(), time.perf_counter(), 0
            for _ in range(args.steps):
                count += data.to_device(next(batches), device)[0].shape[0]
            speed.synchronize(device)
            w1 = _worker_cpu_seconds(it)
            spent = time.process_time() - c0 + ((w1 - w0) if w0 is not None and w1 is not None else 0.0)
            cpu[b].append(1e3 * spent / count)
            wall[b].append(count / (time.perf_counter() - t0))
    first = args.compare[0]
    return {
        "bench": "loader-compare",
        "data": str(plan.train_root),
        "img_size": plan.arch["img_size"],
        "workers": int(cfg.data.workers),
        "batch": int(cfg.data.batch_per_gpu),
        "device": speed.device_name(device),
        "rounds": args.rounds,
        **{f"{b}_cpu_ms_per_image": round(speed.median(cpu[b]), 3) for b in runs},
        **{f"{b}_images_per_s": round(speed.median(wall[b]), 1) for b in runs},
        **{
            f"{b}_cpu_speedup_vs_{first}": round(speed.median([x / y for x, y in zip(cpu[first], cpu[b])]), 3)
            for b in runs
            if b != first
        },
    }


def _restarting(data, it):
    """Batches from a started iterator, then further epochs."""
    epoch = 0
    while True:
        for batch in it:
            if batch is not None:
                yield batch
        epoch += 1
        data.sampler.set_epoch(epoch)
        it = iter(data.loader)


def main(argv=None) -> None:
    import argparse

    top = argparse.ArgumentParser(prog="python -m tools.bench", description=__doc__.split("\n\n")[0])
    top.add_argument("what", choices=("pretrain", "loader"))
    what, rest = top.parse_known_args(argv)
    p = speed.parser(f"python -m tools.bench {what.what}", __doc__)
    if what.what == "pretrain":
        p.add_argument("--end-to-end", action="store_true", help="also time steps on data.root through the data path")
        p.add_argument(
            "--authors", default=None, metavar="MODELS_MAE_PY", help="the authors' models_mae.py (side by side)"
        )
        p.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds (the median counts)")
        p.add_argument("--stage", type=int, default=0, help="time the step of this stage (1: bootstrapped teacher)")
    else:
        p.add_argument(
            "--compare", nargs="+", default=None, metavar="BACKEND", help="time these data.backend values interleaved"
        )
        p.add_argument("--rounds", type=int, default=3, help="interleaved rounds for --compare (the median counts)")
    args = p.parse_intermixed_args(rest)
    if what.what == "pretrain":
        res = bench_pretrain(args)
    else:
        res = compare_loaders(args) if args.compare else bench_loader(args)
    print(json.dumps(res))


if __name__ == "__main__":  # a user error: one line `error: ...`, exit 2 (DBOT_DEBUG=1: the traceback)
    sys.exit(errors.main(main))
