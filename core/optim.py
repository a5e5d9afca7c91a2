"""Parameter groups (weight decay, layer-wise lr decay) and per-step schedules, shared by all tasks.

`param_groups` builds AdamW groups from a model's `layer_id` / `num_layers` (core.vit.Backbone) and a rule for
which tensors skip weight decay. The rules of the codebases each recipe follows live here, once, by name:

- `mae_pretrain_groups`: MAE/dBOT pretraining (`main_pretrain.py`, timm's `add_weight_decay`);
- `mae_finetune_groups`: MAE/dBOT fine-tuning (`util/lr_decay.param_groups_lrd`), layer decay;
- `detectron2_groups`: ViTDet in detectron2 (`get_default_optimizer_params` with `weight_decay_norm=0` and the
  `pos_embed` override, lr factors of `get_vit_lr_decay_rate`);
- `mmseg_groups`: the authors' UperNet recipe (BEiT/mmseg `LayerDecayOptimizerConstructor`).

Schedules are arrays with one value per optimiser step, computed once (DINOv2 style); the training loop
only indexes them, so a resumed run reads exactly the value an uninterrupted run would.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
from timm.layers import LayerNorm2d
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
    """AdamW parameter groups; each group carries `lr_scale` (the training loop multiplies the lr by it).

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


# ------------------------------------------------------------------------------- named weight-decay rules
def mae_pretrain_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """MAE/dBOT pretraining: no weight decay on 1-D tensors and biases; everything else decays, the cls and
    mask tokens included (`main_pretrain.py` passes no skip list to timm's `add_weight_decay`)."""
    return param_groups(model, weight_decay)


def mae_finetune_groups(model, weight_decay: float, layer_decay: float = 1.0, exempt: bool = True) -> list[dict]:
    """MAE/dBOT fine-tuning (`param_groups_lrd`): layer-wise lr decay by `model.layer_id`, no weight decay on
    1-D tensors nor on `model.no_weight_decay()` (cls_token, pos_embed). `exempt=False` decays every tensor
    (the authors' transfer script, its disable_weight_decay flags off)."""
    return param_groups(
        model,
        weight_decay,
        layer_decay=layer_decay,
        layer_id=model.layer_id,
        num_layers=model.num_layers,
        skip_decay=no_weight_decay if exempt else (lambda name, p: False),
        extra_no_decay=tuple(model.no_weight_decay()) if exempt else (),
    )


# detectron2's `norm_module_types` in `solver/build.py`: only torch's own normalisation classes are exempt.
TORCH_NORMS = (
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.SyncBatchNorm,
    nn.GroupNorm,
    nn.InstanceNorm1d,
    nn.InstanceNorm2d,
    nn.InstanceNorm3d,
    nn.LayerNorm,
    nn.LocalResponseNorm,
)


def detectron2_no_decay(model: nn.Module, norms: bool = True, names: Sequence[str] = ("pos_embed",)) -> set[str]:
    """Parameter names detectron2 trains without weight decay: with `norms` (`weight_decay_norm=0`) every
    parameter of a torch normalisation module (`TORCH_NORMS`); and every parameter whose own name (the part
    after the last dot, detectron2's `overrides` key) is in `names`. Biases and relative-position tables decay.

    The channel LayerNorm of the pyramid and the RoI heads is detectron2's own `layers.LayerNorm`, not a torch
    class, so detectron2 decays it; here that module is timm's `LayerNorm2d` (a torch LayerNorm subclass),
    so it is taken out of the exemption to decay as in detectron2."""
    out = set()
    for mod_name, mod in model.named_modules():
        for p_name, _ in mod.named_parameters(recurse=False):
            full = f"{mod_name}.{p_name}" if mod_name else p_name
            if p_name in names or (norms and isinstance(mod, TORCH_NORMS) and not isinstance(mod, LayerNorm2d)):
                out.add(full)
    return out


def detectron2_groups(
    model, weight_decay: float, layer_decay: float = 1.0, norms: bool = True, names: Sequence[str] = ("pos_embed",)
) -> list[dict]:
    """ViTDet's optimiser groups in detectron2: `detectron2_no_decay` for weight decay, the model's layer ids
    for `get_vit_lr_decay_rate` (`layer_decay ** (num_layers - layer_id)`). ViTDet-B and -L use the defaults;
    the H config sets `weight_decay_norm=None` and no overrides (norms=False, names=())."""
    skip = detectron2_no_decay(model, norms, names)
    return param_groups(
        model,
        weight_decay,
        layer_decay=layer_decay,
        layer_id=model.layer_id,
        num_layers=model.num_layers,
        skip_decay=lambda name, p: name in skip,
    )


def mmseg_groups(model, weight_decay: float, layer_decay: float = 1.0) -> list[dict]:
    """The authors' UperNet recipe (BEiT's `mmcv_custom/layer_decay_optimizer_constructor.py`, as mmseg's
    `LayerDecayOptimizerConstructor`): layer decay by `model.layer_id`, no weight decay on 1-D tensors and
    biases. Its `pos_embed` / `cls_token` exemption compares bare names with the model's `backbone.`-prefixed
    ones and so never applies: both decay, as do the relative position tables."""
    return param_groups(
        model, weight_decay, layer_decay=layer_decay, layer_id=model.layer_id, num_layers=model.num_layers
    )


def peak_lr(optim) -> float:
    """The peak lr of an `optim` config section: `optim.lr` if set, else MAE's linear scaling rule
    `optim.blr x optim.global_batch / 256`."""
    return optim.lr if optim.lr is not None else optim.blr * optim.global_batch / 256


def adamw(groups, *, lr: float, betas, device, fused: bool | None = None) -> torch.optim.AdamW:
    """AdamW over parameter groups; by default (`fused=None`) on CUDA the fused implementation (one kernel for
    every parameter instead of a foreach pass per operation), which gives the same update up to floating-point
    rounding (tests/test_gpu_twins.py compares the two with `fused=True` on CPU, where torch has it too)."""
    if fused is None:
        fused = torch.device(device).type == "cuda"
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), fused=fused)


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
