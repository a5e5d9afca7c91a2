"""Distributed setup shared by every task.

Launch with `torchrun` (one node or many: it sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT) or
under SLURM `srun` (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID; MASTER_ADDR/PORT must be exported).
A plain `python -m ...` runs one process. NCCL on GPU, gloo on CPU.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from core.errors import ConfigError


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _env_int(*names: str) -> int | None:
    for n in names:
        if n in os.environ:
            return int(os.environ[n])
    return None


def init(device: str = "auto", timeout_min: int = 30) -> DistEnv:
    """Initialise the process group if launched with several processes and pick this process's device.

    device: "auto" (CUDA if available), "cuda" or "cpu".
    """
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cuda", "cpu"):
        raise ConfigError(f"device={device!r}: expected one of auto, cuda, cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda was asked for but torch sees no CUDA device (device=auto or cpu)")
    rank = _env_int("RANK", "SLURM_PROCID") or 0
    world = _env_int("WORLD_SIZE", "SLURM_NTASKS") or 1
    local = _env_int("LOCAL_RANK", "SLURM_LOCALID") or 0
    if device == "cuda":
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    else:
        dev = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        os.environ.setdefault("RANK", str(rank))
        os.environ.setdefault("WORLD_SIZE", str(world))
        for var in ("MASTER_ADDR", "MASTER_PORT"):
            if var not in os.environ:
                raise ConfigError(f"{world} processes but {var} is not set; launch with torchrun or export it")
        dist.init_process_group(
            backend="nccl" if device == "cuda" else "gloo",
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(minutes=timeout_min),
            device_id=dev if device == "cuda" else None,
        )
    return DistEnv(rank=rank, world_size=world, local_rank=local, device=dev)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean over processes (a copy; `x` is not modified)."""
    if not dist.is_initialized():
        return x.detach().clone()
    y = x.detach().clone()
    dist.all_reduce(y)
    return y / dist.get_world_size()


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    if not dist.is_initialized():
        return x.detach().clone()
    y = x.detach().clone()
    dist.all_reduce(y)
    return y


def all_reduce_max(x: torch.Tensor) -> torch.Tensor:
    """Elementwise maximum over processes (a copy)."""
    y = x.detach().clone()
    if dist.is_initialized():
        dist.all_reduce(y, op=dist.ReduceOp.MAX)
    return y


def all_gather_object(obj) -> list:
    """Every rank's python object, in rank order, on every rank."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj, src: int = 0):
    """Rank `src`'s python object on every rank (for decisions made on one rank only)."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def assert_replicas_equal(model: torch.nn.Module, what: str = "model") -> None:
    """Raise if the processes hold different weights (a cheap per-tensor checksum, compared across ranks)."""
    if not dist.is_initialized():
        return
    sums = torch.stack([p.detach().double().sum() for p in model.state_dict().values()])
    lo, hi = sums.clone(), sums.clone()
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    if not torch.equal(lo, hi):
        names = [n for n, a, b in zip(model.state_dict(), lo, hi) if a != b]
        raise RuntimeError(f"{what} differs across processes in {len(names)} tensors, e.g. {names[:3]}")
