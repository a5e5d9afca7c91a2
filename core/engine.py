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


class Stepper:
    """Optimizer steps from micro-batch losses.

    model: the module that runs forward/backward (DDP-wrapped under torch.distributed). schedule: lr per
    optimizer step (indexed by `step_count`), applied through each param group's `lr_scale`; None keeps the
    lr. clip_grad: max global gradient norm (None: no clipping, and no norm pass unless asked for).
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
    ):
        self.model = model
        self.optimizer = optimizer
        self.schedule = None if schedule is None else np.asarray(schedule, dtype=np.float64)
        self.amp = amp
        self.clip_grad = clip_grad
        self.device = device or next(model.parameters()).device
        self.scaler = self._new_scaler()
        self.step_count = 0

    def _new_scaler(self) -> torch.amp.GradScaler:
        """The fp16 loss scaler, built for this Stepper's device type (`torch.amp.GradScaler("cpu")` runs the
        same unscale / inf check / skip / back-off code as CUDA's, which is how the tests exercise it)."""
        return torch.amp.GradScaler(self.device.type, enabled=self.amp == "fp16")

    def lr(self, step: int | None = None) -> float | None:
        """The scheduled lr of optimizer step `step` (default: the coming one)."""
        if self.schedule is None:
            return None
        s = self.step_count if step is None else step
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
        with nullcontext() if sync else self.model.no_sync():
            self.scaler.scale(loss / size).backward()

    def step(self, norm: bool = False) -> torch.Tensor | None:
        """Unscale, clip (if set), step, zero the gradients. Returns the global gradient norm before clipping
        when clipping is on or `norm` is asked for, else None (the norm pass is skipped)."""
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

    def swap(self, model, optimizer=None) -> None:
        """Continue with another model (a stage switch rebuilt or re-wrapped it). A new optimizer (new parameter
        shapes) starts with a fresh loss scaler; the step counter and the schedule carry on."""
        self.model = model
        if optimizer is not None and optimizer is not self.optimizer:
            self.optimizer = optimizer
            self.scaler = self._new_scaler()

    # ------------------------------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict(), "step": self.step_count}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.step_count = int(state["step"])


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
