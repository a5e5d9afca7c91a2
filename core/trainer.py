"""The training engine every task runs on: one loop, and one explicit contract with the task.

A task (pretraining, fine-tuning, COCO, ADE20K) subclasses `Task` and supplies what is its own; `fit(task)`
owns the rest, the same way for every task:

- seeding, resume (refused when the config or the dataset changed), every rank's RNG stream;
- the micro-batch stream: optimizer step k reads a fixed span of micro-batches, derived from k alone, so a
  run resumed at any saved step sees exactly what an uninterrupted one would;
- the `Stepper` (amp, accumulation with DDP no_sync, clipping, lr schedule);
- cadence: metrics every `log.every` steps, evaluation, checkpoint-last every `log.save_every` units, the
  `max_epochs` / `max_iters` stop of time-limited jobs;
- the non-finite policy (`nonfinite`: stop, or skip the step's update) and clean stops on SIGTERM / SIGINT
  (checkpoint-last, then `core.interrupt.Interrupted`): `StepGuard`;
- the run folder: config.yaml, metrics.jsonl, TensorBoard, progress bar, results.json.

The engine reads only `RunOptions` of the config (`core.config`: out, seed, device, amp, compile, resume,
log.every / log.save_every / log.tensorboard, max_epochs or max_iters) and what `build` returns, a `Run`:
the model, optimizer, schedule, loaders, sampler, accumulation, amp, clipping, evaluation cadence. Nothing
else the task sets is read by the loop. At an epoch end the task may return a `Switch` (pretraining's stage
switch: a rebuilt model, a new optimizer); the loop takes it explicitly.

Two units of length: `unit="epoch"` (pretraining, fine-tuning; MAE's loops): a step's micro-batches never
cross an epoch, whose last step may take fewer; epoch ends are events (evaluation, a stage switch,
checkpoints). `unit="iter"` (detectron2 / mmseg style): every step takes `accum` micro-batches, across
epochs, and cadences count steps.

A task's hooks, in the order `fit` calls them (docs/ENGINE.md):

    build(state) -> Run                   data, model (weights from `state` when resuming), optimizer, schedule
    load_state_dict(state)                the task's own resume state (after the Stepper's)
    train_mode(model)                     at the start and after every evaluation
    prepare(batch, epoch, index)          eager: to the device, CPU-side randomness (Mixup); None: nothing usable
    forward(model, *inputs) -> losses     {'loss': backpropagated, ...: logged}; compiled with compile=true
    after_step(step, epoch)               e.g. an EMA teacher update
    evaluate(step) -> metrics             every `Run.eval_every` units, and at the end
    end_of_epoch(epoch, losses, stepper)  epoch unit; -> Switch | None (a stage end: the loop switches, saves)
    state_dict() / meta()                 what checkpoint-last.pth stores for the task
    results(last_eval) -> dict            results.json fields of the task
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from core import checkpoint as ckpt
from core import dist, engine, interrupt, weights
from core.config import ConfigError, check_output_folder, save_config, to_dict, validate
from core.data import DataError, Loader, ShardedSampler
from core.errors import NonFiniteError
from core.monitor import RunLogger, write_results


@dataclass(frozen=True)
class Run:
    """What `Task.build` returns: everything the loop trains with, and all it reads of the task's setup.

    model: the module DDP wraps, the optimizer trains and `forward` receives. optimizer, schedule (lr per
    optimizer step; its length is the run's length in steps), train_loader and train_sampler (a
    `core.data.ShardedSampler`): None only for a task built for evaluation alone (`run_evaluation`).
    accum: micro-batches per optimizer step; amp: "none" | "bf16" | "fp16" (`batching` gives both);
    clip_grad: max gradient norm or None. eval_every: evaluation every this many units (None: at the end
    only). val_loader: the evaluation loader, whose skipped corrupt files the engine reports."""

    model: nn.Module
    optimizer: torch.optim.Optimizer | None = None
    schedule: Sequence[float] | None = None
    train_loader: Loader | None = None
    train_sampler: ShardedSampler | None = None
    accum: int = 1
    amp: str = "none"
    clip_grad: float | None = None
    eval_every: int | None = None
    val_loader: Loader | None = None

    def loaders(self) -> dict[str, Loader]:
        """The loaders by split (whose skipped corrupt files the engine logs and reports)."""
        found = {"train": self.train_loader, "val": self.val_loader}
        return {k: v for k, v in found.items() if isinstance(v, Loader)}


@dataclass(frozen=True)
class Switch:
    """What a stage end changes (`Task.end_of_epoch` returns it; the loop applies it and writes
    checkpoint-last). model: a rebuilt model (the loop wraps it for DDP), None: the same one (re-initialised in
    place). optimizer: a new optimizer (a fresh loss scaler with it), None: the same one (moments carry over).
    The step counter and the schedule carry on."""

    model: nn.Module | None = None
    optimizer: torch.optim.Optimizer | None = None


def batching(cfg, env: dist.DistEnv, train: bool = True) -> tuple[int, str]:
    """(accum, amp) of a run: micro-batches per optimizer step so that data.batch_per_gpu x processes x accum
    = optim.global_batch (1 when not training), and `amp` resolved for the device; a ConfigError naming the
    options otherwise."""
    try:
        accum = (
            engine.accumulation_steps(cfg.optim.global_batch, cfg.data.batch_per_gpu, env.world_size) if train else 1
        )
        return accum, engine.resolve_amp(cfg.amp, env.device)
    except ValueError as e:
        raise ConfigError(str(e)) from None


class Task:
    """Base of a task: set the class attributes, implement `build`, `forward`, `results` (and `evaluate`,
    `state_dict` where the task has them); the other hooks have defaults. See the module doc."""

    name = "task"  # results.json "task"
    format = "dbot-suite/task/v1"  # checkpoint meta format
    unit = "epoch"  # "epoch" | "iter"
    schema: type | None = None  # the config schema (`core.config`): `run` checks the config against it

    def __init__(self, cfg, env: dist.DistEnv):
        self.cfg, self.env, self.device = cfg, env, env.device
        self.out = Path(cfg.out)
        self.amp = "none"  # the task's own evaluation autocast (`autocast()`); set it from `batching`
        self.trainer: Trainer | None = None  # set by fit (logging helpers below)

    # ---- hooks
    def build(self, state: dict | None) -> Run:  # pragma: no cover - interface
        raise NotImplementedError

    def load_state_dict(self, state: dict) -> None:
        pass

    def train_mode(self, model: nn.Module) -> None:
        model.train()

    def prepare(self, batch, epoch: int, index: int) -> tuple | None:
        """Inputs of `forward`, on the device (default: every tensor of the batch tuple)."""
        return tuple(x.to(self.device, non_blocking=True) if torch.is_tensor(x) else x for x in batch)

    def forward(self, model: nn.Module, *inputs) -> dict[str, torch.Tensor]:  # pragma: no cover - interface
        raise NotImplementedError

    def after_step(self, step: int, epoch: int) -> None:
        """After optimizer step `step` (1-based count), taken in epoch `epoch`."""

    def evaluate(self, step: int) -> dict | None:
        return None

    def end_of_epoch(self, epoch: int, losses: dict, stepper: engine.Stepper) -> Switch | None:
        """Epoch unit, after evaluation: `losses` are the epoch's mean losses; `stepper` the engine's optimizer
        state (read it, e.g. for a stage checkpoint; do not step it). A `Switch` ends a stage."""
        return None

    def log_fields(self) -> dict:
        """Extra fields of every metrics line (e.g. the pretraining stage)."""
        return {}

    def state_dict(self) -> dict:
        return {}

    def meta(self) -> dict:
        return {}

    def compile(self, mode) -> callable:
        """The forward the loop calls with `compile` set: by default `forward` under torch.compile (teacher,
        student and loss in one graph for pretraining; `compile=true` or a torch.compile mode name)."""
        return torch.compile(self.forward) if mode is True else torch.compile(self.forward, mode=str(mode))

    def check_resume(self, path: Path, state: dict) -> None:
        """Task-specific checks of a checkpoint to resume from (after format and config are checked)."""

    def describe(self) -> str:
        return self.name

    def results(self, last_eval: dict | None) -> dict:
        return {}

    # ---- helpers for tasks
    def autocast(self):
        return engine.autocast(self.amp, self.device)

    def check_batches(self, sampler, what: str = "data") -> int:
        """Batches per epoch of the training sampler; none is a ConfigError naming the sizes."""
        if sampler.batches_per_epoch == 0:
            raise ConfigError(
                f"{what}: {sampler.n} training images give no full batch of data.batch_per_gpu="
                f"{sampler.batch_size} on {self.env.world_size} process(es)"
            )
        return sampler.batches_per_epoch

    def write(self, msg: str) -> None:
        """A line of output (main process, without breaking the progress bar)."""
        if self.trainer is not None:
            self.trainer.log.write(msg)
        elif self.env.is_main:
            print(msg, flush=True)

    def log(self, step: int, prefix: str = "", **scalars) -> None:
        if self.trainer is not None:
            self.trainer.log.log(step, prefix=prefix, **scalars)

    def saved(self, name: str, path: Path) -> None:
        """Record a checkpoint the task wrote (listed in results.json)."""
        if self.trainer is not None:
            self.trainer.checkpoints[name] = str(path)


def pretraining_of(cfg) -> dict | None:
    """How the weights a run starts from (`checkpoint`) were pretrained (`core.weights.pretraining_setting`;
    None for random init or a file not made by this suite). Recorded in checkpoint-last's meta and
    results.json, so that a table places the run without reconstructing anything."""
    path = cfg.get("checkpoint")
    return weights.pretraining_setting(path) if path and Path(path).is_file() else None


# ---------------------------------------------------------------------------------------------- layout
@dataclass(frozen=True)
class Layout:
    """Which micro-batches optimizer step k reads. batches: micro-batches per epoch (per process)."""

    batches: int
    accum: int
    unit: str

    @property
    def steps_per_epoch(self) -> int:
        return engine.steps_per_epoch(self.batches, self.accum)

    def first_micro(self, step: int) -> int:
        """Global micro-batch index (epoch * batches + index) of the step's first micro-batch."""
        if self.unit == "iter":
            return step * self.accum
        epoch, j = divmod(step, self.steps_per_epoch)
        return epoch * self.batches + j * self.accum

    def size(self, step: int) -> int:
        if self.unit == "iter":
            return self.accum
        j = step % self.steps_per_epoch
        return min(self.accum, self.batches - j * self.accum)

    def epoch_of(self, step: int) -> int:
        return self.first_micro(step) // self.batches

    def ends_epoch(self, step: int) -> bool:
        """Step `step` (0-based) is the last of its epoch (epoch unit)."""
        return self.unit == "epoch" and (step + 1) % self.steps_per_epoch == 0


def micro_batches(loader, sampler, batches: int, start: int):
    """`(epoch, index, batch)` from global micro-batch `start` on, across epochs. The sampler's order is a
    function of (seed, epoch) and the loader has its own generator, so starting an iterator neither depends
    on nor moves the global RNG: a resumed run continues exactly."""
    epoch, i = divmod(start, batches)
    while True:
        sampler.set_epoch(epoch, start_batch=i)
        for batch in loader:
            yield epoch, i, batch
            i += 1
        epoch, i = epoch + 1, 0


@dataclass
class Meter:
    """Sums of the logged losses over micro-batches, with their image counts and wall time."""

    sums: dict = field(default_factory=dict)
    micro: int = 0
    images: int = 0
    since: float = field(default_factory=time.time)

    def add(self, losses: dict, images: int) -> None:
        for k, v in losses.items():
            # a copy, never a reference: `.float()` of a float32 tensor is the tensor itself, and under CUDA
            # graphs (compile=reduce-overhead) the next replay overwrites a graph output in place
            v = v.detach().float()
            self.sums[k] = self.sums[k] + v if k in self.sums else v.clone()
        self.micro += 1
        self.images += images

    def means(self) -> dict[str, float]:
        """Means over the micro-batches, averaged over processes (collective)."""
        if not self.sums:
            return {}
        keys = sorted(self.sums)
        values = dist.all_reduce_mean(torch.stack([self.sums[k] for k in keys]) / max(self.micro, 1)).tolist()
        return dict(zip(keys, values))

    def reset(self) -> None:
        self.sums, self.micro, self.images, self.since = {}, 0, 0, time.time()


# ------------------------------------------------------------------------------------------ step guard
class StepGuard:
    """What the loop does around `Stepper.step` for the non-finite policy and for clean stops.

    `losses` collects the step's `(losses, images)` per micro-batch; `step` takes the optimizer step (the
    Stepper agrees on a non-finite loss and on a stop request across processes in one all-reduce) and adds
    the losses to the meters only when the update was applied. A non-finite step under `nonfinite=stop` (or
    one skip too many) is a `NonFiniteError` naming the step, the epoch and the last good checkpoint; nothing
    is applied or saved from it. `stop_if_requested` ends the step of a SIGTERM / SIGINT: checkpoint-last
    (unless the step's events just wrote it), then `core.interrupt.Interrupted`."""

    def __init__(self, trainer: Trainer, path: Path | None, state: dict | None):
        self.trainer, self.stepper = trainer, trainer.stepper
        self.losses: list[tuple[dict, int]] = []
        self.window_skipped = 0
        # the last good checkpoint: the one resumed from, then every checkpoint-last this run writes
        self.last_good = (str(path), int(state.get("step", self.stepper.step_count))) if state is not None else None

    def add(self, losses: dict, images: int) -> None:
        self.losses.append(
            ({k: v.detach().clone() for k, v in losses.items()}, images)
        )  # copies: a CUDA graph replay reuses its outputs

    def step(self, epoch: int, logging: bool, *meters: Meter):
        try:
            grad_norm = self.stepper.step(norm=logging, stop=interrupt.requested() or 0)
        except engine.NonFiniteStep as e:
            raise NonFiniteError(self.message(e, epoch)) from None
        if self.stepper.last_skipped:
            self.window_skipped += 1
            self.trainer.log.write(
                f"nonfinite=skip: step {self.stepper.step_count} (epoch {epoch}) skipped, its loss is not finite "
                f"({self.stepper.in_a_row} in a row, {self.stepper.skipped} in the run)"
            )
        else:
            for losses, n in self.losses:
                for meter in meters:
                    meter.add(losses, n)
        self.losses = []
        return grad_norm

    def message(self, e: engine.NonFiniteStep, epoch: int) -> str:
        amp = self.trainer.run.amp
        if self.stepper.nonfinite == "skip":
            why = f"{e.in_a_row} in a row, more than nonfinite_max_skips={self.stepper.max_skips}"
        else:
            why = "nonfinite=stop (nonfinite=skip drops such steps)"
        good = f"{self.last_good[0]} (step {self.last_good[1]})" if self.last_good else "none written yet"
        hint = "; fp16: try amp=bf16" if amp == "fp16" else ""
        return (
            f"loss is not finite at step {e.step} (epoch {epoch}), {why}; the update was not applied and nothing "
            f"was saved from it; last good checkpoint: {good}{hint}"
        )

    def saved(self, path: Path, step: int) -> None:
        self.last_good = (str(path), step)

    def log_fields(self) -> dict:
        """Skipped steps in this log line's window and in the run (under nonfinite=skip)."""
        if self.stepper.nonfinite != "skip" and not self.stepper.skipped:
            return {}
        fields = {"skipped_steps": self.window_skipped, "skipped_steps_total": self.stepper.skipped}
        self.window_skipped = 0
        return fields

    def stop_if_requested(self, layout: Layout, step: int, saved: bool) -> None:
        signum = self.stepper.stop_requested
        if not signum:
            return
        trainer = self.trainer
        if not saved:
            trainer.save_last(layout, step)
        total = len(trainer.run.schedule)
        raise interrupt.Interrupted(
            signum,
            f"stopped by {interrupt.name(signum)} at step {step} of {total} (epoch {layout.epoch_of(step)}): "
            f"{trainer.task.out / 'checkpoint-last.pth'} written; run the same command again to resume",
        )


# ---------------------------------------------------------------------------------------------- engine
class Trainer:
    """Runs one task; see the module docstring. Use `fit(task)`."""

    def __init__(self, task: Task):
        self.task, self.cfg, self.env = task, task.cfg, task.env
        self.checkpoints: dict[str, str] = {}
        self.pretraining: dict | None = None
        self.last_eval: dict | None = None  # {"step": k, "metrics": {...}}
        self.log: RunLogger | None = None
        self.corrupt: dict[str, dict[str, str]] = {}  # split -> {path: reason}: corrupt files skipped in the run
        self.run: Run | None = None  # what the task built (replaced by a stage switch)
        self.stepper: engine.Stepper | None = None
        self.guard: StepGuard | None = None
        task.trainer = self
        problem = None
        if self.env.is_main:  # one process tries the folder (several would race); every one gets the verdict
            try:
                check_output_folder("out", self.cfg.out)
            except ConfigError as e:
                problem = str(e)
        problem = dist.broadcast_object(problem)
        if problem is not None:
            raise ConfigError(problem)

    # ------------------------------------------------------------------------------------------ setup
    def _resume_state(self):
        """(path, state) of the checkpoint to continue from, checked: this task's format, the task's own checks,
        then the same computation-relevant settings."""
        path, state = ckpt.load_resume(self.task.out, self.cfg.resume, self.task.format)
        if state is not None:
            self.task.check_resume(path, state)
            ckpt.check_same_config(path, state.get("config"), to_dict(self.cfg))
        return path, state

    def _check_same_data(self, path, state, layout: Layout) -> None:
        saved = state.get("engine", {}).get("data")
        now = {"images": self.run.train_sampler.n, "batches_per_epoch": layout.batches}
        if saved is not None and saved != now:
            diff = "; ".join(f"{k}: {saved.get(k)} -> {v}" for k, v in now.items() if saved.get(k) != v)
            was = ((state.get("config") or {}).get("data") or {}).get("root")
            root = f"data.root={(self.cfg.get('data') or {}).get('root')} now" + (
                f", the run used {was}" if was is not None else ""
            )
            raise ckpt.CheckpointError(
                f"{path}: saved by a run on other training data ({diff}): {root}; a resumed run must see the same "
                "data (its step counter, schedule and sampler order depend on it): set data.root to the run's "
                "data, or use another out folder, or resume=none"
            )

    def fit(self) -> dict:
        try:
            return self._fit()
        except BaseException:
            interrupt.release(check=False)
            if self.log is not None:  # the progress bar ends its line before the error is printed
                self.log.close()
            loaders = self.run.loaders().values() if self.run is not None else ()
            for loader in loaders:  # no loader worker outlives the run
                shutdown = getattr(getattr(loader.loader, "_iterator", None), "_shutdown_workers", None)
                if shutdown is not None:
                    shutdown()
            raise

    def _fit(self) -> dict:
        task, cfg, env = self.task, self.cfg, self.env
        engine.seed_everything(cfg.seed, env.rank)
        if env.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed input shapes: pick the fastest convolution once
        path, state = self._resume_state()
        if env.is_main:
            ckpt.remove_stale_temporaries(task.out)
        self.run = run = built(task, state)
        self._watch_corrupt(state)
        self.pretraining = pretraining_of(cfg)
        layout = Layout(task.check_batches(run.train_sampler), run.accum, task.unit)
        total = len(run.schedule)
        model = engine.ddp(run.model, env)
        self.stepper = stepper = engine.Stepper(
            model,
            run.optimizer,
            run.schedule,
            amp=run.amp,
            clip_grad=run.clip_grad,
            device=env.device,
            nonfinite=cfg.nonfinite,
            max_skips=cfg.nonfinite_max_skips,
        )
        if state is not None:
            self._check_same_data(path, state, layout)
            stepper.load_state_dict(state["stepper"])
            task.load_state_dict(state)
            saved = state.get("engine", {})
            self.checkpoints = dict(saved.get("checkpoints", {}))
            self.last_eval = saved.get("last_eval")
            engine.restore_rng_states(state["rng"], env.rank, env.world_size, cfg.seed + 7919 * stepper.step_count)
        self.guard = guard = StepGuard(self, path, state)
        del state
        start = stepper.step_count

        self.log = log = RunLogger(
            task.out, enabled=env.is_main, tensorboard=cfg.log.tensorboard, resume_step=start if path else None
        )
        if env.is_main:
            save_config(cfg, task.out / "config.yaml")
        log.write(task.describe())
        for warning in getattr(task.schema, "warnings", lambda cfg: [])(cfg):
            log.write(f"warning: {warning}")
        if path is not None:
            log.write(f"resuming at step {start} of {total} (epoch {layout.epoch_of(start)}) from {path}")
        forward = task.compile(cfg.compile) if cfg.get("compile") else task.forward
        stream = micro_batches(run.train_loader, run.train_sampler, layout.batches, layout.first_micro(start))
        log.progress(total, initial=start, desc=task.name)
        window, epoch_meter = Meter(), Meter()
        train_time, images, t_step = 0.0, 0, time.time()
        unit_start = layout.epoch_of(start) if task.unit == "epoch" else start
        limit = cfg.max_epochs if task.unit == "epoch" else cfg.max_iters
        task.train_mode(run.model)

        step = start
        interrupt.hold()  # a SIGTERM / SIGINT from here is a request, acted on at the end of a step (StepGuard)
        while step < total:
            size = layout.size(step)
            stepper.start_step()
            for j in range(size):
                epoch, index, batch = next(stream)
                losses, n = micro_step(task, stepper, forward, epoch, index, batch, size=size, last=j == size - 1)
                guard.add(losses, n)
                images += n
            logging = (step + 1) % cfg.log.every == 0 or layout.ends_epoch(step) or step + 1 == total
            grad_norm = guard.step(epoch, logging, window, epoch_meter)
            step = stepper.step_count
            if not stepper.last_skipped:
                task.after_step(step, epoch)
            log.update(1)
            if logging:
                self._log_line(step, epoch, window, grad_norm, guard.log_fields())
            train_time += time.time() - t_step

            # events: evaluation, end of epoch (epoch unit), checkpoint, stop
            done = step == total
            if task.unit == "epoch":
                at_end = layout.ends_epoch(step - 1)
                units_done = epoch + 1
            else:
                at_end, units_done = True, step
            switched = saving = False
            if at_end:
                every = self.run.eval_every
                if done or (every and units_done % every == 0):
                    window.since += self._evaluate(step)  # evaluation time is not training time
                if task.unit == "epoch":
                    summary = epoch_meter.means() or {"loss": math.nan}  # every step of the epoch skipped
                    switch = task.end_of_epoch(epoch, summary, stepper)
                    epoch_meter.reset()
                    if switch is not None:
                        self._switch(switch)
                        switched = True
                stopping = limit is not None and units_done - unit_start >= limit and not done
                every = cfg.log.save_every
                saving = switched or done or stopping or (every and units_done % every == 0)
                if saving:
                    self.save_last(layout, step)
                if stopping:
                    what = "epoch(s) (max_epochs)" if task.unit == "epoch" else "iteration(s) (max_iters)"
                    log.write(f"stopping after {limit} {what} at step {step}; run the same command again to resume")
                    log.close()
                    key = "stopped_at_epoch" if task.unit == "epoch" else "stopped_at_iteration"
                    interrupt.release(check=not env.distributed)  # a SIGTERM / SIGINT meanwhile: stop as asked
                    return {key: units_done}
            guard.stop_if_requested(layout, step, saved=bool(saving))
            t_step = time.time()
        # a request that came after the last step's check stops here (checkpoint-last is saved); with several
        # processes only the loop's agreed check stops (one rank alone leaving would hang the others)
        interrupt.release(check=not env.distributed)

        if self.last_eval is None or self.last_eval["step"] != total:
            self._evaluate(total)  # a finished run started again, or a task that evaluated nothing
        log.close()
        steps_done = total - start
        speed = {
            "train_s_per_step": train_time / steps_done if steps_done else None,
            "train_images_per_s": images * env.world_size / train_time if train_time else None,
        }
        return self._results(speed)

    # --------------------------------------------------------------------------------------- pieces
    def _watch_corrupt(self, state: dict | None) -> None:
        """Skipped corrupt files (data.skip_corrupt): each named once in the log when first met (the ones a
        resumed run already met are known), all listed in results.json."""
        self.corrupt = {k: dict(v) for k, v in ((state or {}).get("engine", {}).get("corrupt") or {}).items()}
        for split, loader in self.run.loaders().items():
            known = self.corrupt.setdefault(split, {})
            loader.corrupt.update(known)
            loader.on_skip = self._skipped

    def _skipped(self, split: str, path: str, reason: str) -> None:
        files = self.corrupt.setdefault(split, {})
        if path in files:
            return
        files[path] = reason
        msg = f"data.skip_corrupt: skipping {reason} ({split}; {len(files)} skipped in this split so far)"
        if self.log is not None and self.env.is_main:
            self.log.write(msg)
        elif not self.env.is_main:
            print(f"[rank {self.env.rank}] {msg}", file=sys.stderr, flush=True)

    def _gathered_corrupt(self) -> dict[str, dict[str, str]]:
        """The corrupt files every process skipped (collective)."""
        merged: dict[str, dict[str, str]] = {}
        for part in dist.all_gather_object(self.corrupt):
            for split, files in part.items():
                merged.setdefault(split, {}).update(files)
        return merged

    def _log_line(self, step: int, epoch: int, window: Meter, grad_norm, skipped: dict) -> None:
        """A metrics line: the means over the window's applied steps (the losses of steps skipped for a
        non-finite loss are not in them: `skipped_steps`, `skipped_steps_total` count those)."""
        means = window.means()
        loss = means.get("loss", math.nan)
        dt = max(time.time() - window.since, 1e-9)
        steps = window.micro / max(self.run.accum, 1) + skipped.get("skipped_steps", 0)
        fields = {
            "epoch": epoch,
            **self.task.log_fields(),
            **means,
            "lr": self.stepper.lr(max(self.stepper.applied - 1, 0)),
            "images_per_s": window.images * self.env.world_size / dt,
            "s_per_step": dt / max(steps, 1e-9),
            **skipped,
        }
        if grad_norm is not None:
            fields["grad_norm"] = float(grad_norm)
        self.log.log(step, **fields)
        self.log.update(0, loss=loss, lr=fields["lr"], img_s=fields["images_per_s"])
        window.reset()

    def _evaluate(self, step: int) -> float:
        """Evaluate, log the scalar metrics, keep them for results.json; returns the seconds it took."""
        t0 = time.time()
        metrics = self.task.evaluate(step)
        seconds = time.time() - t0
        if metrics is not None:
            scalars = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
            self.log.log(step, prefix="val/", **scalars, eval_s=seconds)
            self.last_eval = {"step": step, "metrics": metrics}
        self.task.train_mode(self.run.model)
        return seconds

    def _switch(self, switch: Switch) -> None:
        self.run = apply_switch(self.run, self.stepper, switch, self.env)

    def save_last(self, layout: Layout, step: int) -> None:
        """checkpoint-last.pth: the task's state, the Stepper, every rank's RNG, the engine's bookkeeping
        (collective: every rank calls it)."""
        task = self.task
        rngs = engine.gather_rng_states()
        task_state = task.state_dict()  # on every rank: it may reduce counts across processes
        corrupt = self._gathered_corrupt()
        if self.env.is_main:
            path = task.out / "checkpoint-last.pth"
            self.checkpoints["last"] = str(path)
            state = {
                **task_state,
                "stepper": self.stepper.state_dict(),
                "rng": rngs,
                "epoch": layout.epoch_of(step),
                "step": step,
                "engine": {
                    "data": {"images": self.run.train_sampler.n, "batches_per_epoch": layout.batches},
                    "checkpoints": self.checkpoints,
                    "last_eval": self.last_eval,
                    "corrupt": corrupt,
                },
                "meta": {"format": task.format, "pretraining": self.pretraining, **task.meta()},
                "config": to_dict(self.cfg),
            }
            ckpt.save(state, path)
        if self.guard is not None:
            self.guard.saved(task.out / "checkpoint-last.pth", step)
        dist.barrier()

    def _results(self, speed: dict) -> dict:
        task = self.task
        record = task.results(self.last_eval["metrics"] if self.last_eval else None)
        record.setdefault("pretraining", self.pretraining)
        record.setdefault("checkpoints", dict(self.checkpoints))
        record["speed"] = speed
        if self.guard is not None:
            record["skipped_steps"] = self.stepper.skipped  # steps skipped for a non-finite loss (nonfinite=skip)
        record.setdefault("config", str(task.out / "config.yaml"))
        corrupt = self._gathered_corrupt()
        record["corrupt_images"] = {
            split: {"count": len(files), "files": sorted(files)[:1000]} for split, files in sorted(corrupt.items())
        }
        counts = ", ".join(f"{len(files)} {split}" for split, files in sorted(corrupt.items()) if files)
        if counts:
            self.log.write(f"data.skip_corrupt: {counts} corrupt image(s) skipped; named in results.json")
        if self.env.is_main:
            write_results(task.out, task.name, **record)
        return record

    def evaluate_only(self) -> dict:
        """No training: build the task for evaluation (`build(None)` with the task's own evaluation settings),
        evaluate once, write results.json."""
        task, env = self.task, self.env
        engine.seed_everything(self.cfg.seed, env.rank)
        self.run = built(task, None, train=False)
        self._watch_corrupt(None)
        self.pretraining = pretraining_of(self.cfg)
        self.log = RunLogger(task.out, enabled=env.is_main, tensorboard=self.cfg.log.tensorboard)
        if env.is_main:
            save_config(self.cfg, task.out / "config.yaml")
        self._evaluate(0)
        self.log.close()
        return self._results({})


def micro_step(task: Task, stepper: engine.Stepper, forward, epoch: int, index: int, batch, size: int, last: bool):
    """One micro-batch of an optimizer step of `size` micro-batches: the task's `prepare`, `forward` under the
    Stepper's autocast, backward (gradients all-reduced on the `last` one). Returns (losses, images). The
    loop and the benchmark driver (`core.bench`) both run a step through this."""
    inputs = None if batch is None else task.prepare(batch, epoch, index)
    if inputs is None:
        raise DataError(f"epoch {epoch}: every image of training micro-batch {index} is corrupt")
    with stepper.autocast():
        losses = forward(stepper.model, *inputs)
    stepper.backward(losses["loss"], size=size, last=last)
    return losses, len(inputs[0])


def apply_switch(run: Run, stepper: engine.Stepper, switch: Switch, env: dist.DistEnv) -> Run:
    """The run after a stage end's `Switch`: a rebuilt model (wrapped for DDP) and a new optimizer taken into
    the Stepper (whose step counter and schedule carry on)."""
    changes = {k: v for k, v in (("model", switch.model), ("optimizer", switch.optimizer)) if v is not None}
    model = engine.ddp(switch.model, env) if switch.model is not None else stepper.model
    stepper.swap(model, switch.optimizer)
    return replace(run, **changes)


def built(task: Task, state: dict | None, train: bool = True) -> Run:
    """`task.build(state)`, checked to be a `Run` with what training needs (a task's programming error,
    named here rather than as an AttributeError deep in the loop)."""
    run = task.build(state)
    if not isinstance(run, Run):
        raise TypeError(f"{type(task).__name__}.build must return a core.trainer.Run, not {type(run).__name__}")
    missing = [k for k in ("optimizer", "schedule", "train_loader", "train_sampler") if getattr(run, k) is None]
    if train and missing:
        raise TypeError(f"{type(task).__name__}.build returned a Run without {', '.join(missing)}")
    return run


def fit(task: Task) -> dict:
    """Train `task` to its end (or to its `max_*` stop) and return its results record."""
    return Trainer(task).fit()


def checked(task_cls, cfg):
    """`cfg` typed and checked against the task's schema (`core.config.validate`), before any compute."""
    return validate(cfg, task_cls.schema) if task_cls.schema is not None else cfg


def run(task_cls, cfg) -> dict:
    """Check the config, set up this process (torchrun / SLURM / single), train `task_cls(cfg, env)`, always
    tear down."""
    cfg = checked(task_cls, cfg)
    env = dist.init(cfg.device)
    try:
        return fit(task_cls(cfg, env))
    finally:
        dist.shutdown()


def run_evaluation(task_cls, cfg) -> dict:
    """As `run`, evaluating the task's weights without training."""
    cfg = checked(task_cls, cfg)
    env = dist.init(cfg.device)
    try:
        return Trainer(task_cls(cfg, env)).evaluate_only()
    finally:
        dist.shutdown()
