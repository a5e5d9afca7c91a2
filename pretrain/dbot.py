"""dBOT in one file: masking, the teacher's target, the loss, and the stage switch.

Masked knowledge distillation with bootstrapped teachers (Liu et al., 2022). A student encoder sees 25% of
the patches; its decoder predicts, at every position, the features a frozen teacher computes from the
whole image. Training runs in stages: the first teacher is a randomly initialised network, and at each
stage boundary the teacher is replaced by the current student encoder and the student starts again from
a fresh initialisation.

Everything here follows the authors' released code (see docs/PRETRAIN.md for the choices and the flaws
not repeated): per-sample random masking by argsort of uniform noise; target = raw output of the
teacher's last block, cls token included; each target token standardised over channels; SmoothL1 with
beta 2, averaged over channels, then over the masked tokens plus the cls token.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from core.vit import ViT


# ----------------------------------------------------------------------------------------------- masking
@dataclass
class Mask:
    """mask `[N, L]` (1 = masked). From random masking also keep_ids `[N, K]` (the visible patches the
    asymmetric encoder sees), restore_ids `[N, L]` (the inverse shuffle) and masked_ids `[N, L - K]`."""

    mask: torch.Tensor
    keep_ids: torch.Tensor | None = None
    restore_ids: torch.Tensor | None = None
    masked_ids: torch.Tensor | None = None


def random_masking(noise: torch.Tensor, mask_ratio: float) -> Mask:
    """Per-sample random masking defined by `noise` `[N, L]` (uniform; the smallest values are kept):
    K = int(L * (1 - mask_ratio)) patches stay visible. Gathering `[kept, masked]` tokens with
    `restore_ids` puts them back in the original patch order."""
    n, length = noise.shape
    keep = int(length * (1 - mask_ratio))
    shuffle = torch.argsort(noise, dim=1)
    restore = torch.argsort(shuffle, dim=1)
    mask = torch.ones(n, length, device=noise.device)
    mask[:, :keep] = 0
    mask = torch.gather(mask, 1, restore)
    return Mask(mask=mask, keep_ids=shuffle[:, :keep], restore_ids=restore, masked_ids=shuffle[:, keep:])


# ------------------------------------------------------------------------------------------------ target
def make_teacher(arch: dict, state_dict: dict | None = None) -> ViT:
    """A frozen teacher encoder of architecture `arch` (a core.vit preset dict), optionally loaded from
    `state_dict` (extra keys such as the student's decoder are ignored). No decoder, no drop path."""
    teacher = ViT(**{**arch, "drop_path_rate": 0.0}, fixed_pos_embed=True)
    if state_dict is not None:
        own = teacher.state_dict()
        teacher.load_state_dict({k: v for k, v in state_dict.items() if k in own}, strict=True)
    teacher.requires_grad_(False)
    return teacher.eval()


@torch.no_grad()
def teacher_target(teacher: ViT, images: torch.Tensor, final_norm: bool = False) -> torch.Tensor:
    """The teacher's tokens for the whole image `[N, 1 + L, C]` (cls first), as float32."""
    teacher.eval()
    return teacher.forward_tokens(images, final_norm=final_norm).float()


def standardize(target: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Each token standardised over channels: (t - mean) / sqrt(var + eps), var unbiased as in the
    released code (`Tensor.var` default)."""
    mean = target.mean(dim=-1, keepdim=True)
    var = target.var(dim=-1, keepdim=True)
    return (target - mean) / (var + eps).sqrt()


# -------------------------------------------------------------------------------------------------- loss
def distill_loss(
    pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, *, beta: float = 2.0, include_cls: bool = True
) -> torch.Tensor:
    """SmoothL1(beta) between prediction and target `[N, 1 + L, C]`, mean over channels, averaged over the
    masked positions of `mask` `[N, L]` (1 = masked) and, with include_cls, the cls token."""
    per_token = F.smooth_l1_loss(pred.float(), target, beta=beta, reduction="none").mean(dim=-1)
    cls_weight = torch.full_like(mask[:, :1], 1.0 if include_cls else 0.0)
    weight = torch.cat([cls_weight, mask], dim=1)
    return (per_token * weight).sum() / weight.sum()


# ------------------------------------------------------------------------------------------------ stages
class Stages:
    """Stage boundaries in epochs, e.g. [0, 800, 1600] = two stages of 800 epochs."""

    def __init__(self, boundaries):
        b = [int(x) for x in boundaries]
        if len(b) < 2 or b[0] != 0 or any(y <= x for x, y in zip(b, b[1:])):
            raise ValueError(f"stages.epochs must start at 0 and strictly increase, got {b}")
        self.boundaries = b

    def __len__(self) -> int:
        return len(self.boundaries) - 1

    @property
    def total_epochs(self) -> int:
        return self.boundaries[-1]

    def stage_of(self, epoch: int) -> int:
        for s in range(len(self)):
            if epoch < self.boundaries[s + 1]:
                return s
        raise ValueError(f"epoch {epoch} is past the last stage ({self.total_epochs} epochs)")

    def start(self, stage: int) -> int:
        return self.boundaries[stage]

    def length(self, stage: int) -> int:
        return self.boundaries[stage + 1] - self.boundaries[stage]

    def is_last_epoch_of_stage(self, epoch: int) -> bool:
        return epoch + 1 in self.boundaries[1:]


def encoder_state(student: nn.Module, clone: bool = True) -> dict:
    """The student's encoder weights (decoder, mask token and other pretraining-only parts dropped),
    detached copies unless clone=False."""
    drop = ("decoder_", "mask_token", "rel_pos_bias")
    return {
        k: v.detach().clone() if clone else v.detach()
        for k, v in student.state_dict().items()
        if not k.startswith(drop)
    }


def bootstrap(student: ViT, arch: dict, stage_seed: int) -> ViT:
    """The stage switch: a new teacher from the current student encoder, then the student re-initialised
    in place from `stage_seed` (identical on every rank, so DDP replicas stay equal)."""
    teacher = make_teacher(arch, encoder_state(student))
    reinitialize(student, stage_seed)
    return teacher


def reinitialize(model: nn.Module, seed: int) -> None:
    """Re-run the model's initialisation from a seed, on CPU (so the values do not depend on the device or
    on the caller's RNG), and copy the result into the existing parameters (optimizers keep their refs)."""
    fresh = copy.deepcopy(model).to("cpu")
    fresh.initialize_weights(torch.Generator().manual_seed(seed))
    with torch.no_grad():
        for p, q in zip(model.state_dict().values(), fresh.state_dict().values()):
            p.copy_(q)
