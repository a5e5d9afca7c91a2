"""SdAE's target (data2vec-style EMA teacher): the teacher is an exponential moving average of the student
encoder, t <- m t + (1 - m) s, with m following a cosine from m0 to m1 over training, updated every
optimizer step or every epoch. With multi-fold masking the teacher sees only the masked patches, split into
`folds` groups (3 folds of 49 for ViT-B at 75% masking), each group in its own forward pass; the target of
a masked patch is the teacher's output for it (last block + the teacher's LayerNorm), standardised per
token; loss 1 - cosine over the masked patches."""

from __future__ import annotations

import math

import torch
from torch import nn

from pretrain.dbot import encoder_state, make_teacher
from pretrain.targets.base import Target


def ema_momentum(progress: float, m0: float, m1: float) -> float:
    """Cosine schedule from m0 (progress 0) to m1 (progress 1)."""
    return m1 - (m1 - m0) * (1 + math.cos(math.pi * min(max(progress, 0.0), 1.0))) / 2


@torch.no_grad()
def ema_update(teacher: nn.Module, student_state: dict, m: float) -> None:
    """t <- m t + (1 - m) s for every teacher tensor (floating point ones)."""
    for name, t in teacher.state_dict().items():
        if t.is_floating_point():
            t.mul_(m).add_(student_state[name].to(t.dtype), alpha=1 - m)


def fold_ids(masked_ids: torch.Tensor, folds: int) -> list[torch.Tensor]:
    """Split each sample's masked patch ids `[N, M]` into `folds` groups of (nearly) equal size."""
    return list(torch.tensor_split(masked_ids, folds, dim=1))


class EMATarget(Target):
    name = "ema"
    has_cls = False
    default_loss = "cosine"

    def __init__(self, student, *, momentum=(0.96, 0.99), every: str = "epoch", folds: int = 3, **kw):
        super().__init__(student.embed_dim, **kw)
        if every not in ("epoch", "step"):
            raise ValueError(f"target.ema.every must be epoch or step, got {every!r}")
        self.teacher = make_teacher(student.arch, encoder_state(student))
        self.m0, self.m1 = momentum
        self.every, self.folds = every, folds

    def compute(self, images: torch.Tensor, mask) -> torch.Tensor:
        if mask.masked_ids is None:
            raise ValueError("the EMA target's multi-fold teacher needs random masking (model.masking=random)")
        n, length = mask.mask.shape
        out = images.new_zeros(n, 1 + length, self.dim, dtype=torch.float32)
        for ids in fold_ids(mask.masked_ids, self.folds):
            tokens = self.teacher.forward_tokens(images, keep_ids=ids, final_norm=True)[:, 1:].float()
            out[:, 1:].scatter_(1, ids.unsqueeze(-1).expand(-1, -1, self.dim), tokens)
        return out

    def _update(self, student, progress: float) -> None:
        ema_update(self.teacher, encoder_state(student, clone=False), ema_momentum(progress, self.m0, self.m1))

    def after_step(self, student, progress: float) -> None:
        if self.every == "step":
            self._update(student, progress)

    def after_epoch(self, student, progress: float) -> None:
        if self.every == "epoch":
            self._update(student, progress)

    def describe(self) -> str:
        return f"EMA of the student (m {self.m0}->{self.m1} per {self.every}, {self.folds} folds)"
