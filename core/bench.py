"""The one benchmark driver: a task built as training builds it, its own training step timed.

`StepBench(task_cls, cfg, device)` makes the task from the config (`task_cls(cfg, env)`), calls its
`build(None)` (the same `Run` training gets: model, optimizer, schedule, loaders, accumulation, amp,
clipping), wraps the model in the same `core.engine.Stepper` and takes the task's `forward` (or its
`compile(mode)` with `compile` set). One optimizer step is then exactly the loop's: `accum` micro-batches,
each through `core.trainer.micro_step` (the task's `prepare` -- Mixup, masks, moving to the device -- its
`forward` under autocast, backward), the Stepper's clipping and optimizer step, the task's `after_step`. So
the linear probe times its frozen encoder and its criterion, detection its gradient clipping, fine-tuning
its Mixup: whatever the recipe trains, nothing written again here.

Micro-batches come from the run's own training loader: by default a few are read once and reused (compute
only), or with `live=True` read as training reads them (the data path timed too). What a task benchmarks
beyond training (inference, evaluation windows) is in its own bench module, which uses `task` and `run`.
The command line is `python -m tools.bench <task> -c RECIPE [key=value ...] [flags]`.
"""

from __future__ import annotations

import itertools

import torch

from core import engine, speed, trainer
from core.dist import DistEnv
from core.trainer import Layout, Run, Task, micro_batches, micro_step


class StepBench:
    """The training step of `task_cls` configured by `cfg`, on `device`, in one process."""

    def __init__(self, task_cls: type[Task], cfg, device: torch.device, cached: int = 2):
        self.task = task = task_cls(cfg, DistEnv(device=device))
        engine.seed_everything(cfg.seed)  # as `fit` does before `build`: the same model, the same first step
        self.run: Run = trainer.built(task, None)
        self.device, self.cfg = device, cfg
        run = self.run
        self.stepper = engine.Stepper(
            run.model, run.optimizer, run.schedule, amp=run.amp, clip_grad=run.clip_grad, device=device
        )
        self.forward, self.compiled = task.forward, False  # `compile()` after counting FLOPs eagerly
        self.layout = Layout(task.check_batches(run.train_sampler), run.accum, task.unit)
        task.train_mode(run.model)
        self._stream = micro_batches(run.train_loader, run.train_sampler, self.layout.batches, 0)
        want = max(1, min(cached, self.layout.batches))
        self.batches = [b for b in itertools.islice(self._usable(), want)]
        self._cycle = itertools.cycle(self.batches)

    def _usable(self):
        for epoch, index, batch in self._stream:
            if batch is not None:
                yield epoch, index, batch

    @property
    def accum(self) -> int:
        return self.run.accum

    def switch(self, switch: trainer.Switch | None) -> None:
        """Continue as the loop does after a stage end that returned `switch` (e.g. pretraining's stage 1)."""
        if switch is not None:
            self.run = trainer.apply_switch(self.run, self.stepper, switch, self.task.env)
            self.task.train_mode(self.run.model)

    def step(self, live: bool = False) -> tuple[torch.Tensor, int]:
        """One optimizer step as training takes it; returns (the last micro-batch's loss, images stepped on).
        `live`: micro-batches read from the loader now (else the cached ones, again)."""
        stepper, task, size = self.stepper, self.task, self.run.accum
        source = self._usable() if live else self._cycle
        stepper.start_step()
        images, epoch = 0, 0
        for j in range(size):
            epoch, index, batch = next(source)
            losses, n = micro_step(task, stepper, self.forward, epoch, index, batch, size=size, last=j == size - 1)
            images += n
        stepper.step()
        task.after_step(stepper.step_count, epoch)
        return losses["loss"].detach(), images

    def images_per_step(self) -> int:
        """Images of one step (after `prepare`, e.g. Mixup's pairing), counted on an untimed step."""
        return self.step()[1]

    def time(self, steps: int, warmup: int, live: bool = False) -> float:
        """Seconds per optimizer step (`core.speed.seconds_per_call`: GPU work waited for)."""
        return speed.seconds_per_call(lambda: self.step(live), steps, self.device, warmup=warmup)

    def compile(self) -> None:
        """The forward training calls with `compile` set (`Task.compile`); nothing without it."""
        if self.cfg.get("compile") and not self.compiled:
            self.forward, self.compiled = self.task.compile(self.cfg.compile), True

    def flops(self) -> int:
        """FLOPs of one eager step (`core.speed.count_flops`), attention included on CPU; count before
        `compile()` (the counter's hooks must not be traced into compiled graphs)."""
        return speed.count_flops(self.step)

    def describe(self) -> dict:
        """What was timed: the run's batching, amp, clipping and compile, as training takes them."""
        run = self.run
        batch = int(self.cfg.data.batch_per_gpu)
        return {
            "task": self.task.name,
            "device": speed.device_name(self.device),
            "amp": run.amp,
            "compile": bool(self.cfg.get("compile")),
            "batch": batch,
            "accum": run.accum,
            "clip_grad": run.clip_grad,
        }

    def report(self, seconds: float, images: int, flops: int | None = None, peak: float | None = None) -> dict:
        """The training figures of a timed step: s/step, images/s, and with `flops` GFLOP per image,
        achieved TFLOP/s and MFU against `peak`."""
        out = {"train_s_per_step": round(seconds, 4), "train_images_per_s": round(images / seconds, 2)}
        if flops is not None:
            tflops = flops / seconds / 1e12
            out.update(
                train_gflop_per_image=round(flops / images / 1e9, 2),
                train_achieved_tflops=round(tflops, 3),
                train_mfu=round(tflops / peak, 4) if peak else None,
            )
        return out
