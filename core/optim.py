"""Parameter groups (weight decay, layer-wise lr decay) and per-step schedules, shared by all tasks.

Schedules are arrays with one value per optimiser step, computed once (DINOv2 style); the training loop
only indexes them, so a resumed run reads exactly the value an uninterrupted run would.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
from torch import nn


def no_weight_decay(name: str, param) -> bool:
    """The released rule: no decay on 1-D parameters (norms, biases) and on names ending in `.bias`."""
    return param.ndim <= 1 or name.endswith(".bias")


def param_groups(
    model: nn.Module,
    weight_decay: float,
    *,
    layer_decay: float = 1.0,
    layer_id: Callable[[str], int] | None = None,
    num_layers: int | None = None,
    skip_decay: Callable[[str, object], bool] = no_weight_decay,
    extra_no_decay: Sequence[str] = (),
) -> list[dict]:
    """AdamW parameter groups; each group carries `lr_scale` (apply it with `set_lr`).

    With layer decay, parameter `name` gets `lr_scale = layer_decay ** (num_layers - layer_id(name))`, the
    BEiT/MAE rule where the embedding is layer 0, block i is layer i+1 and the head is `num_layers`.
    Parameters with `requires_grad=False` are left out (e.g. the fixed sin-cos position embedding).
    """
    if layer_decay != 1.0 and (layer_id is None or num_layers is None):
        raise ValueError("layer_decay != 1 needs layer_id and num_layers")
    groups: dict[tuple[int, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decay = not (skip_decay(name, p) or name in extra_no_decay)
        lid = layer_id(name) if layer_id is not None else 0
        key = (lid, decay)
        if key not in groups:
            scale = layer_decay ** (num_layers - lid) if layer_decay != 1.0 else 1.0
            groups[key] = {
                "params": [],
                "names": [],
                "weight_decay": weight_decay if decay else 0.0,
                "lr_scale": scale,
                "layer_id": lid,
            }
        groups[key]["params"].append(p)
        groups[key]["names"].append(name)
    return [groups[k] for k in sorted(groups)]


def set_lr(optimizer, lr: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)


def warmup_cosine(base: float, final: float, total: float, warmup: float, positions=None) -> np.ndarray:
    """lr at each position: linear warmup from 0 over `warmup`, then half-cosine from `base` to `final`
    at `total` (MAE's `adjust_learning_rate`). Positions, total and warmup share a unit (steps or
    fractional epochs); by default positions are the steps 0..total-1.
    """
    t = np.arange(int(total), dtype=np.float64) if positions is None else np.asarray(positions, np.float64)
    lr = np.empty_like(t)
    warm = t < warmup
    lr[warm] = base * t[warm] / warmup
    progress = (t[~warm] - warmup) / max(total - warmup, 1e-12)
    lr[~warm] = final + (base - final) * 0.5 * (1.0 + np.cos(math.pi * progress))
    return lr


def warmup_step(
    base: float, total_steps: int, warmup_steps: int, milestones: Sequence[int], gamma=0.1, warmup_factor: float = 0.001
) -> np.ndarray:
    """Per-step lr: linear warmup from `warmup_factor * base`, then x`gamma` at each milestone step
    (detectron2's WarmupMultiStep with a linear warmup)."""
    s = np.arange(total_steps, dtype=np.float64)
    lr = base * gamma ** np.searchsorted(np.asarray(sorted(milestones)), s, side="right")
    warm = s < warmup_steps
    alpha = s[warm] / max(warmup_steps, 1)
    lr[warm] *= warmup_factor * (1 - alpha) + alpha
    return lr


def warmup_poly(
    base: float, total_steps: int, warmup_steps: int, power: float = 1.0, final: float = 0.0, warmup_ratio: float = 1e-6
) -> np.ndarray:
    """Per-step lr: linear warmup from `warmup_ratio * base`, then polynomial decay to `final`
    (mmseg's poly policy with linear warmup: the warmup factor multiplies the poly value)."""
    s = np.arange(total_steps, dtype=np.float64)
    lr = (base - final) * (1 - s / total_steps) ** power + final
    warm = s < warmup_steps
    k = (1 - s[warm] / warmup_steps) * (1 - warmup_ratio)
    lr[warm] *= 1 - k
    return lr
