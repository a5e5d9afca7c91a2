"""Optimizer steps from micro-batch losses, and the per-process state a resumed run needs.

`Stepper` holds what turns gradients into an optimizer step: mixed precision (a loss scaler for fp16),
DDP `no_sync` on all but the last micro-batch of an accumulation group, gradient clipping, the per-step lr
schedule (applied explicitly with `start_step`), and the step counter. The training loop that drives it is
`core.trainer`; a bench or a test drives it directly:

    stepper = Stepper(model, optimizer, schedule, amp="bf16", clip_grad=3.0)
    stepper.start_step()                                   # lr of this step into every param group
    for j, batch in enumerate(micro_batches):
        with stepper.autocast():
            loss = ...
        stepper.backward(loss, size=len(micro_batches), last=j == len(micro_batches) - 1)
    stepper.step()

Non-finite losses (`nonfinite`): `backward` notes whether the micro-batch's loss is finite (on the device, no
sync); `step` agrees on it across processes (one all-reduce, the one host sync of the step, which also carries
the stop request of a SIGTERM / SIGINT, `core.interrupt`) before anything is updated. `stop` raises
`NonFiniteStep`; `skip` drops the step: no optimizer or scaler update (weights, moments and the optimizer's own
step count unchanged), gradients zeroed, `skipped` counted; the lr schedule is indexed by the updates applied
(`applied`), so the lrs the applied updates see are those of a run that never drew the batch. More than
`max_skips` consecutive skips raise `NonFiniteStep` as `stop` does.
"""

from __future__ import annotations

import math
import random
from contextlib import nullcontext

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel

from core import dist


def resolve_amp(amp: str, device: torch.device) -> str:
    """auto -> bf16 on CUDA, none on CPU; validates the value (the error names the option)."""
    if amp == "auto":
        return "bf16" if device.type == "cuda" else "none"
    if amp not in ("bf16", "fp16", "none"):
        raise ValueError(f"amp must be auto, bf16, fp16 or none; got {amp!r}")
    if amp == "fp16" and device.type != "cuda":
        raise ValueError("amp=fp16 needs a CUDA device (use amp=bf16 or amp=none)")
    return amp


def autocast(amp: str, device: torch.device):
    if amp == "none":
        return nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


def steps_per_epoch(batches: int, accum: int) -> int:
    return math.ceil(batches / accum)


NONFINITE = ("stop", "skip")


class NonFiniteStep(Exception):
    """Step `step` (1-based) had a non-finite loss and was not applied; `in_a_row` consecutive such steps."""

    def __init__(self, step: int, in_a_row: int):
        super().__init__(f"non-finite loss at step {step} ({in_a_row} in a row)")
        self.step, self.in_a_row = step, in_a_row


class Stepper:
    """Optimizer steps from micro-batch losses.

    model: the module that runs forward/backward (DDP-wrapped under torch.distributed). schedule: lr per
    optimizer step (indexed by `step_count`), applied through each param group's `lr_scale`; None keeps the
    lr. clip_grad: max global gradient norm (None: no clipping, and no norm pass unless asked for).
    nonfinite / max_skips: the policy for a step whose loss is not finite (module doc).
    """

    def __init__(
        self,
        model,
        optimizer,
        schedule=None,
        *,
        amp: str = "none",
        clip_grad: float | None = None,
        device: torch.device | None = None,
        nonfinite: str = "stop",
        max_skips: int = 0,
    ):
        if nonfinite not in NONFINITE:
            raise ValueError(f"nonfinite must be one of {NONFINITE}; got {nonfinite!r}")
        self.model = model
        self.optimizer = optimizer
        self.schedule = None if schedule is None else np.asarray(schedule, dtype=np.float64)
        self.amp = amp
        self.clip_grad = clip_grad
        self.device = device or next(model.parameters()).device
        self.scaler = self._new_scaler()
        self.step_count = 0  # steps taken, applied or skipped: the position in the data stream
        self.nonfinite, self.max_skips = nonfinite, max_skips
        self.skipped = 0  # steps skipped for a non-finite loss, over the run
        self.in_a_row = 0  # consecutive skipped steps up to the last one
        self.last_skipped = False  # the last `step` was skipped
        self.stop_requested = 0  # a signal some process received, agreed by the last `step` (0: none)
        self._finite: torch.Tensor | None = None  # every loss of the coming step finite so far (on the device)

    @property
    def applied(self) -> int:
        """Updates applied: the index into the lr schedule."""
        return self.step_count - self.skipped

    def _new_scaler(self) -> torch.amp.GradScaler:
        """The fp16 loss scaler, built for this Stepper's device type (`torch.amp.GradScaler("cpu")` runs the
        same unscale / inf check / skip / back-off code as CUDA's, which is how the tests exercise it)."""
        return torch.amp.GradScaler(self.device.type, enabled=self.amp == "fp16")

    def lr(self, step: int | None = None) -> float | None:
        """The scheduled lr of update `step` (0-based count of applied updates; default: the coming one)."""
        if self.schedule is None:
            return None
        s = self.applied if step is None else step
        return float(self.schedule[min(s, len(self.schedule) - 1)])

    def start_step(self) -> None:
        """Set the coming step's lr (times each group's `lr_scale`); call before its first micro-batch."""
        lr = self.lr()
        if lr is not None:
            for g in self.optimizer.param_groups:
                g["lr"] = lr * g.get("lr_scale", 1.0)

    def autocast(self):
        return autocast(self.amp, self.device)

    def backward(self, loss: torch.Tensor, size: int = 1, last: bool = True) -> None:
        """Backward of loss / size (`size` micro-batches in this step); gradients are all-reduced only on the
        step's last micro-batch."""
        sync = last or not isinstance(self.model, DistributedDataParallel)
        finite = torch.isfinite(loss.detach()).all()
        self._finite = finite if self._finite is None else self._finite & finite
        with nullcontext() if sync else self.model.no_sync():
            self.scaler.scale(loss / size).backward()

    def step(self, norm: bool = False, stop: int = 0) -> torch.Tensor | None:
        """Unscale, clip (if set), step, zero the gradients. Returns the global gradient norm before clipping
        when clipping is on or `norm` is asked for, else None (the norm pass is skipped, and for a skipped step).
        `stop`: this process was asked to stop; `stop_requested` is then the agreement of all processes.
        A non-finite loss: see the module doc (`NonFiniteStep`, or a skipped step: `last_skipped`)."""
        if self._agree_nonfinite(stop):
            self.in_a_row += 1
            if self.nonfinite == "stop" or self.in_a_row > self.max_skips:
                raise NonFiniteStep(self.step_count + 1, self.in_a_row)
            self.optimizer.zero_grad(set_to_none=True)
            self.step_count += 1
            self.skipped += 1
            self.last_skipped = True
            return None
        self.in_a_row, self.last_skipped = 0, False
        self.scaler.unscale_(self.optimizer)
        grad_norm = None
        if self.clip_grad or norm:
            params = [p for g in self.optimizer.param_groups for p in g["params"]]
            if self.clip_grad:
                grad_norm = torch.nn.utils.clip_grad_norm_(params, self.clip_grad)
            else:
                grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.step_count += 1
        return grad_norm

    def _agree_nonfinite(self, stop) -> bool:
        """Whether any process saw a non-finite loss in this step (one all-reduce with the stop request)."""
        finite = self._finite if self._finite is not None else torch.ones((), dtype=torch.bool, device=self.device)
        self._finite = None
        flags = torch.stack([(~finite).to(torch.int64), torch.as_tensor(int(stop or 0), device=finite.device)])
        bad, self.stop_requested = dist.all_reduce_max(flags).tolist()
        return bool(bad)

    def swap(self, model, optimizer=None) -> None:
        """Continue with another model (a stage switch rebuilt or re-wrapped it). A new optimizer (new parameter
        shapes) starts with a fresh loss scaler; the step counter and the schedule carry on."""
        self.model = model
        if optimizer is not None and optimizer is not self.optimizer:
            self.optimizer = optimizer
            self.scaler = self._new_scaler()

    # ------------------------------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        return {
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "step": self.step_count,
            "skipped": self.skipped,
            "in_a_row": self.in_a_row,
        }

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.step_count = int(state["step"])
        self.skipped, self.in_a_row = int(state.get("skipped", 0)), int(state.get("in_a_row", 0))


def ddp(model: torch.nn.Module, env) -> torch.nn.Module:
    """The model wrapped for DistributedDataParallel when several processes run, else the model itself."""
    if not env.distributed:
        return model
    return DistributedDataParallel(model, device_ids=[env.device.index] if env.device.type == "cuda" else None)


def rng_state() -> dict:
    """This process's RNG state (torch CPU, CUDA if present, python), storable with weights_only."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        # one state per device the saving process saw; a process that sees fewer (CUDA_VISIBLE_DEVICES set per
        # rank on the resuming cluster) restores the ones it has instead of failing on an index
        for index, generator_state in enumerate(state["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(generator_state, index)


def gather_rng_states() -> list[dict]:
    """Every rank's RNG state, in rank order (collective: call on all ranks)."""
    return dist.all_gather_object(rng_state())


def restore_rng_states(states: list[dict], rank: int, world_size: int, fallback_seed: int) -> None:
    """Continue each rank's RNG stream exactly if the process count is unchanged; otherwise reseed."""
    if len(states) == world_size:
        set_rng_state(states[rank])
    else:
        torch.manual_seed(fallback_seed + rank)
        random.seed(fallback_seed + rank)


def seed_everything(seed: int, rank: int = 0) -> None:
    """Seed the global RNGs (drop path, dropout); rank-offset so replicas draw different masks."""
    torch.manual_seed(seed + rank)
    random.seed(seed + rank)


def accumulation_steps(global_batch: int, batch_per_gpu: int, world_size: int) -> int:
    """Micro-batches per optimizer step so that batch_per_gpu x processes x steps = global_batch."""
    per_step = batch_per_gpu * world_size
    if global_batch % per_step:
        raise ValueError(
            f"optim.global_batch={global_batch} is not a multiple of data.batch_per_gpu x processes "
            f"= {batch_per_gpu} x {world_size}"
        )
    return global_batch // per_step
