"""SdAE's target (AbrahamYabo/SdAE, the released code of "SdAE: Self-distillated Masked Autoencoder"): the
teacher is an exponential moving average of the student encoder (final norm included), t <- m t + (1 - m) s.

What follows the released code (`engine_pretrain.py`, `models_teacher.py`, `util/cosine_scheduler.py`):
- momentum: `cosine_scheduler(m0, m1, epochs, niter_per_ep=1)`, i.e. m(e) = m1 + (m0 - m1)(1 + cos(pi e / E)) / 2
  for epoch e = 0 .. E - 1 (E = the stage's epochs); the update at the end of epoch e uses m(e), so the last
  update uses m(E - 1), not m1;
- `every=epoch` (`--ema_op per_epoch`) updates at the end of every `every_epochs`-th epoch (`--ema_frequent`:
  after epoch e when (e + 1) % k == 0); `every=step` (`per_ite`) updates after every optimizer step with the
  value of the current epoch, m(e), held within the epoch (the released code forces `ema_frequent=1` there);
- multi-fold teacher (`--shrink_num M --ncrop_loss folds`): the teacher sees only the masked patches (in mask
  order) with its cls token, split into `folds` groups of equal size, each group in its own forward pass; with
  `drop_remainder` (released) the last M mod folds masked patches get no target and are left out of the loss;
- target: the teacher's tokens after its final norm, standardised per token (unbiased variance, eps 1e-6).

The loss (`cosine`): 1 - cosine similarity per token, averaged over the tokens that have a target, as the
paper and the released no-fold branch compute it. The released multi-fold branch calls `F.cosine_similarity`
with its default dim=1 on `[N * folds, tokens, D]` tensors, i.e. across the tokens of a fold, per channel;
`cosine_over=fold` reproduces that, the default treats it as the bug it appears to be. docs/PRETRAIN.md lists
every deviation.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from pretrain.dbot import encoder_state, make_teacher
from pretrain.targets.base import Target, token_loss

EVERY = ("epoch", "step")
COSINE_OVER = ("token", "fold")


def ema_momentum(epoch: int, epochs: int, m0: float, m1: float) -> float:
    """SdAE's `cosine_scheduler(m0, m1, epochs, niter_per_ep=1)[epoch]`: m0 at epoch 0, towards m1 at `epochs`."""
    return m1 + 0.5 * (m0 - m1) * (1 + math.cos(math.pi * epoch / epochs))


@torch.no_grad()
def ema_update(teacher: nn.Module, student_state: dict, m: float) -> None:
    """t <- m t + (1 - m) s for every teacher tensor (floating point ones)."""
    for name, t in teacher.state_dict().items():
        if t.is_floating_point():
            t.mul_(m).add_(student_state[name].to(t.dtype), alpha=1 - m)


def fold_ids(masked_ids: torch.Tensor, folds: int, drop_remainder: bool = True) -> list[torch.Tensor]:
    """Split each sample's masked patch ids `[N, M]` into `folds` groups: M // folds each, the last M mod folds
    ids dropped (SdAE), or, without drop_remainder, groups of nearly equal size covering all M."""
    m = masked_ids.shape[1]
    if folds < 1 or folds > m:
        raise ValueError(f"target.ema.folds={folds} must be between 1 and the number of masked patches ({m})")
    if drop_remainder:
        return list(masked_ids[:, : m - m % folds].chunk(folds, dim=1))
    return list(torch.tensor_split(masked_ids, folds, dim=1))


class EMATarget(Target):
    name = "ema"
    has_cls = False
    default_loss = "cosine"

    def __init__(
        self,
        student,
        *,
        momentum=(0.96, 0.99),
        every: str = "epoch",
        every_epochs: int = 1,
        folds: int = 3,
        drop_remainder: bool = True,
        cosine_over: str = "token",
        **kw,
    ):
        super().__init__(student.embed_dim, **kw)
        if every not in EVERY:
            raise ValueError(f"target.ema.every must be epoch or step, got {every!r}")
        if int(every_epochs) < 1 or (every == "step" and int(every_epochs) != 1):
            raise ValueError(
                f"target.ema.every_epochs={every_epochs}: must be >= 1, and 1 with every=step (SdAE's per_ite)"
            )
        if cosine_over not in COSINE_OVER:
            raise ValueError(f"target.ema.cosine_over must be token or fold, got {cosine_over!r}")
        if cosine_over == "fold" and self.loss_kind != "cosine":
            raise ValueError(f"target.ema.cosine_over=fold needs loss.kind=cosine, not {self.loss_kind}")
        self.teacher = make_teacher(student.arch, encoder_state(student))
        self.m0, self.m1 = (float(m) for m in momentum)
        self.every, self.every_epochs = every, int(every_epochs)
        self.folds, self.drop_remainder, self.cosine_over = int(folds), bool(drop_remainder), cosine_over

    def folds_of(self, mask) -> list[torch.Tensor]:
        if mask.masked_ids is None:
            raise ValueError("the EMA target's multi-fold teacher needs random masking (model.masking=random)")
        return fold_ids(mask.masked_ids, self.folds, self.drop_remainder)

    def compute(self, images: torch.Tensor, mask) -> torch.Tensor:
        n, length = mask.mask.shape
        out = images.new_zeros(n, 1 + length, self.dim, dtype=torch.float32)
        for ids in self.folds_of(mask):
            tokens = self.teacher.forward_tokens(images, keep_ids=ids, final_norm=True)[:, 1:].float()
            out[:, 1:].scatter_(1, ids.unsqueeze(-1).expand(-1, -1, self.dim), tokens)
        return out

    def loss(self, pred: torch.Tensor, target: torch.Tensor, mask) -> torch.Tensor:
        """Over the masked patches that have a target (the dropped remainder excluded)."""
        groups = self.folds_of(mask)
        if self.cosine_over == "fold":  # the released multi-fold loss: cosine across each fold's tokens
            sims = []
            for ids in groups:
                index = (ids + 1).unsqueeze(-1).expand(-1, -1, pred.shape[-1])
                p, t = pred.float().gather(1, index), target.gather(1, index)
                sims.append(F.cosine_similarity(t, p, dim=1))  # [N, D]
            return 1 - torch.cat(sims).mean()
        weight = torch.zeros_like(mask.mask)
        for ids in groups:
            weight.scatter_(1, ids, 1.0)
        weight = torch.cat([torch.zeros_like(weight[:, :1]), weight], dim=1)
        return token_loss(pred, target, weight, self.loss_kind, self.beta)

    def _update(self, student, epoch: int, epochs: int) -> None:
        m = ema_momentum(epoch, epochs, self.m0, self.m1)
        ema_update(self.teacher, encoder_state(student, clone=False), m)

    def after_step(self, student, epoch: int, epochs: int) -> None:
        if self.every == "step":
            self._update(student, epoch, epochs)

    def after_epoch(self, student, epoch: int, epochs: int) -> None:
        if self.every == "epoch" and (epoch + 1) % self.every_epochs == 0:
            self._update(student, epoch, epochs)

    def describe(self) -> str:
        every = f"every {self.every_epochs} epochs" if self.every_epochs > 1 else f"per {self.every}"
        return f"EMA of the student (m {self.m0}->{self.m1} {every}, {self.folds} folds)"
