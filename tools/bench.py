"""Benchmarks of every task, on the one driver `core.bench.StepBench`, plus pretraining's own extras.

    python -m tools.bench pretrain -c base [key=value ...] [--batch 256 --compile --end-to-end --authors PATH]
    python -m tools.bench finetune|coco|ade20k -c RECIPE [key=value ...] [--batch N --steps N ...]
    python -m tools.bench loader -c base data.root=/path/to/imagenet [data.backend=gpu data.workers=16]

Every training bench builds the task exactly as `python -m <task> -c RECIPE [key=value ...]` trains it (the
same config, `build`, `Run` and Stepper) and times its own optimizer step: `prepare` (masks, Mixup, to the
device), `forward`, backward, clipping, accumulation, amp, compile as configured (`core.bench`). Batches
come from the task's own data path: `data.root` when given on the command line, else a small synthetic set
in the task's layout written to a temporary folder (compute only: a few batches are read once and reused).
Each subcommand's `-h` lists its flags. Prints one JSON line per command.

`pretrain` also counts the FLOPs of a step (core.speed.count_flops, attention included on CPU): achieved
TFLOP/s and MFU; `--stage k` times stage k's step (after the task's own stage switches); `--end-to-end` also
times steps reading the loader as training does (`data.backend`, `data.workers`).
`--authors /path/to/dbot/models_mae.py` times the authors' released step (their MaskedAutoencoderViT with the
recipe's sizes, fp16 autocast + GradScaler on CUDA, AdamW, their clipping and per-step `loss.item()`) and
ours on the same device in one process, interleaved, and prints the throughput ratio. The file is imported
from the given path with its checkout on sys.path (it needs `util/pos_embed.py` beside it, timm and
torchvision; nothing else of theirs is imported).

`loader` measures the pretraining input pipeline alone: images/s, CPU seconds per image (main process +
workers) and so images per core-second, on the device the backend decodes on.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from core import errors, speed
from core.bench import StepBench
from core.config import ConfigError
from core.dist import DistEnv
from pretrain import datapath

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "pretrain" / "configs"
BATCH_KEYS = ("data.batch_per_gpu", "optim.global_batch")


# ------------------------------------------------------------------------------------- synthetic data
def synthetic_imagenet(root: Path, classes: int, train_images: int, val_per_class: int = 1) -> Path:
    """An ImageNet-layout folder of `classes` classes with at least `train_images` training images: 32 px
    noise JPEGs (the task's own transform resizes them to the model's input)."""
    rng = np.random.default_rng(0)
    per_class = max(1, -(-train_images // classes))
    for split, n in (("train", per_class), ("val", val_per_class)):
        for c in range(classes):
            d = root / split / f"class{c:04d}"
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(d / f"{i}.jpg")
    return root


def synthetic_coco(root: Path, classes: int, train_images: int) -> Path:
    """The generated COCO-layout set (tools.datasets) with its category list padded to `classes`."""
    from tools.datasets import make_coco

    make_coco(root, seed=0, train_images=max(train_images, 4), val_images=2)
    for path in (root / "annotations").glob("instances_*2017.json"):
        d = json.loads(path.read_text())
        have = len(d["categories"])
        d["categories"] += [{"id": i + 1, "name": f"class{i}", "supercategory": "none"} for i in range(have, classes)]
        path.write_text(json.dumps(d))
    return root


def synthetic_ade20k(root: Path, classes: int, train_images: int) -> Path:
    """The generated ADE20K-layout set (tools.datasets, labels 0..8) named for `classes` classes."""
    from tools.datasets import make_ade20k

    if classes < 8:
        raise ConfigError(f"--classes {classes}: the synthetic ADE20K set has labels up to 8; give 8 or more")
    make_ade20k(root, seed=0, train_images=max(train_images, 2), val_images=1)
    (root / "class_names.txt").write_text("\n".join(f"class{i}" for i in range(classes)) + "\n")
    return root


SYNTHETIC = {"imagenet": synthetic_imagenet, "coco": synthetic_coco, "ade20k": synthetic_ade20k}


def given_data(args) -> bool:
    return any(o.startswith("data.root=") for o in args.overrides)


@contextlib.contextmanager
def bench_data(cfg, args, layout: str, classes: int):
    """`cfg` reading `data.root` when the command line gives it, else a synthetic set in the task's layout
    (enough images for one accumulation group, read without worker processes) in a temporary folder."""
    if given_data(args):
        yield cfg
        return
    with tempfile.TemporaryDirectory(prefix="dbot-bench-") as tmp:
        cfg = cfg.copy()
        images = int(cfg.data.batch_per_gpu) * 2
        cfg.data.root = str(SYNTHETIC[layout](Path(tmp) / layout, classes, images))
        cfg.data.workers = 0
        if "eval" in cfg and "workers" in cfg.eval:
            cfg.eval.workers = 0
        yield cfg


def task_config(task: str, args):
    """The task's config as its command reads it, with the bench's `--batch` / `--compile` (every process
    count is one here: --batch sets data.batch_per_gpu and optim.global_batch alike)."""
    from core.config import validate

    cfg = speed.bench_config(REPO / TASKS[task][0] / "configs", args, BATCH_KEYS)
    return validate(cfg, task_class(task).schema)


# ----------------------------------------------------------------------------- the suite's training step
def pretrain_step(cfg, device: torch.device, stage: int = 0) -> StepBench:
    """The pretraining step of `cfg` in stage `stage` (0: the first target; k: after k of the task's own stage
    switches, e.g. the bootstrapped full-depth teacher where the L/H recipes start from a depth-0 one)."""
    from pretrain.train import Pretrain

    cfg = cfg.copy()
    cfg.probe.every = None  # the step is timed, not the online probe between epochs
    stages = len(cfg.stages.epochs) - 1
    if not 0 <= stage < stages:
        raise ConfigError(f"--stage {stage}: the recipe has stages 0..{stages - 1}")
    bench = StepBench(Pretrain, cfg, device)
    for k in range(1, stage + 1):
        bench.switch(bench.task.switch(k))
    return bench


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
    cfg = task_config("pretrain", args)
    device = speed.resolve_device(cfg.device)
    with bench_data(cfg, args, "imagenet", classes=4) as cfg:
        ours = pretrain_step(cfg, device, args.stage)
        task, n = ours.task, int(cfg.data.batch_per_gpu) * ours.accum
        flops = ours.flops()  # counted eagerly, before any compilation
        peak = speed.peak_tflops(device, args.peak_tflops)
        res = {
            "bench": "pretrain",
            "recipe": args.config,
            "overrides": list(args.overrides),
            **ours.describe(),
            "model": cfg.model.size,
            "arch": task.plan.arch,
            "decoder": dict(cfg.model.decoder) if cfg.model.kind == "mae" else None,
            "stage": task.stage,
            "target": task.target.describe(),
            "data": cfg.data.root if given_data(args) else "synthetic",
            "gflop_per_image": round(flops / n / 1e9, 2),
            "peak_tflops": peak,
        }
        fns = {}
        if args.authors:
            images = task.prepare(ours.batches[0][2], 0, 0)[0]
            authors = AuthorsStep(load_authors_module(args.authors), cfg, task.plan, device)
            res["authors_gflop_per_image"] = round(speed.count_flops(lambda: authors.step(images)) / n / 1e9, 2)
            res["authors_amp"] = "fp16 + GradScaler" if device.type == "cuda" else "none (torch.cuda.amp on CPU)"
            fns["authors"] = lambda: authors.step(images)
            fns["ours"] = ours.step
            if cfg.compile:
                compiled = pretrain_step(cfg, device, args.stage)
                compiled.compile()
                fns["ours_compiled"] = compiled.step
        else:
            ours.compile()
            fns["ours_compiled" if cfg.compile else "ours"] = ours.step
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
            seconds = ours.time(args.steps, args.warmup, live=True)
            res.update(
                e2e_data=res["data"],
                e2e_backend=cfg.data.backend,
                e2e_workers=int(cfg.data.workers),
                e2e_images_per_s=round(n / seconds, 1),
            )
    res["torch"] = torch.__version__
    return res


# ------------------------------------------------------------------------- fine-tuning, COCO, ADE20K
TASKS = {  # subcommand: (package, task class, bench module)
    "pretrain": ("pretrain", "pretrain.train:Pretrain", None),
    "finetune": ("finetune", "finetune.train:Finetune", "finetune.bench"),
    "coco": ("detection", "detection.train:Detection", "detection.bench"),
    "ade20k": ("segmentation", "segmentation.train:Segmentation", "segmentation.bench"),
}


def task_class(task: str):
    module, name = TASKS[task][1].split(":")
    return getattr(importlib.import_module(module), name)


def bench_task(task: str, args) -> dict:
    """The task's training step (`core.bench.StepBench`) and what its own bench module adds (inference)."""
    extra = importlib.import_module(TASKS[task][2])
    cfg = task_config(task, args)
    device = speed.resolve_device(cfg.device)
    with bench_data(cfg, args, extra.DATA, args.classes) as cfg:
        bench = StepBench(task_class(task), cfg, device)
        flops = bench.flops()  # eagerly, before compilation
        images = bench.images_per_step()
        bench.compile()
        seconds = bench.time(args.steps, args.warmup)
        memory, kind = speed.peak_memory(device)
        res = {
            "bench": task,
            "recipe": args.config,
            "overrides": list(args.overrides),
            **bench.describe(),
            "data": cfg.data.root if given_data(args) else "synthetic",
            **bench.report(seconds, images, flops, speed.peak_tflops(device, args.peak_tflops)),
            "train_peak_mem_gib": round(memory, 2),
            "mem_kind": kind,
        }
        res.update(extra.measure(bench, args))
    res["torch"] = torch.__version__
    return res


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


COMMANDS = ("pretrain", "finetune", "coco", "ade20k", "loader")


def command_parser(what: str):
    """The parser of one subcommand: the shared flags (`core.speed.parser`) and the command's own."""
    p = speed.parser(f"python -m tools.bench {what}", __doc__)
    if what == "pretrain":
        p.add_argument("--end-to-end", action="store_true", help="also time steps reading the loader as training does")
        p.add_argument(
            "--authors", default=None, metavar="MODELS_MAE_PY", help="the authors' models_mae.py (side by side)"
        )
        p.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds (the median counts)")
        p.add_argument("--stage", type=int, default=0, help="time the step of this stage (1: bootstrapped teacher)")
    elif what == "loader":
        p.add_argument(
            "--compare", nargs="+", default=None, metavar="BACKEND", help="time these data.backend values interleaved"
        )
        p.add_argument("--rounds", type=int, default=3, help="interleaved rounds for --compare (the median counts)")
    else:
        importlib.import_module(TASKS[what][2]).add_flags(p)
    return p


def main(argv=None) -> dict:
    import argparse

    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:  # -h, or no / an unknown command: the top-level usage
        top = argparse.ArgumentParser(prog="python -m tools.bench", description=__doc__.split("\n\n")[0])
        top.add_argument("what", choices=COMMANDS, help="what to time; `python -m tools.bench WHAT -h`: its flags")
        top.parse_args(argv[:1])
    what = argv[0]
    args = command_parser(what).parse_intermixed_args(argv[1:])
    if what == "pretrain":
        res = bench_pretrain(args)
    elif what == "loader":
        res = compare_loaders(args) if args.compare else bench_loader(args)
    else:
        res = bench_task(what, args)
    print(json.dumps(res))
    return res


if __name__ == "__main__":  # a user error: one line `error: ...`, exit 2 (DBOT_DEBUG=1: the traceback)
    sys.exit(errors.main(main))
