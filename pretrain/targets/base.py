"""The interface every pretraining target implements; the training loop knows nothing else about it.

A target turns a batch of images (and the batch's `Mask`) into target tokens `[N, 1 + L, dim]` (cls row
first; zeros where a target has no cls token), and scores the student's prediction of them. Stage hooks
let a target change between stages (dBOT's bootstrapping) or after optimizer steps (an EMA teacher).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pretrain.dbot import standardize


def normalize(t: torch.Tensor, how: str, eps: float = 1e-6) -> torch.Tensor:
    """Per-token target normalisation over channels: `standardize` (mean/unbiased var, the released dBOT
    and MAE norm_pix), `layernorm` (biased var, no affine, MaskDistill), or `none`."""
    if how == "standardize":
        return standardize(t, eps)
    if how == "layernorm":
        return F.layer_norm(t, t.shape[-1:], eps=eps)
    if how == "none":
        return t
    raise ValueError(f"target.norm must be standardize, layernorm or none; got {how!r}")


def token_loss(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor, kind: str, beta: float = 2.0):
    """Mean of a per-token loss over the tokens with weight 1 (`weight` `[N, T]`).

    kind: `smooth_l1` (beta, mean over channels), `mse` (mean over channels), `cosine` (1 - cosine similarity).
    """
    pred = pred.float()
    if kind == "smooth_l1":
        per_token = F.smooth_l1_loss(pred, target, beta=beta, reduction="none").mean(-1)
    elif kind == "mse":
        per_token = ((pred - target) ** 2).mean(-1)
    elif kind == "cosine":
        per_token = 1 - F.cosine_similarity(pred, target, dim=-1)
    else:
        raise ValueError(f"target.loss must be smooth_l1, mse or cosine; got {kind!r}")
    return (per_token * weight).sum() / weight.sum().clamp_min(1)


class Target(nn.Module):
    """Base class. Subclasses set `name`, `dim`, `has_cls` and the loss defaults, and implement `compute`.
    norm / loss / beta / include_cls given as None take the subclass defaults."""

    name = "target"
    has_cls = True
    default_norm = "standardize"
    default_loss = "smooth_l1"
    default_beta = 2.0  # SmoothL1 beta of the released dBOT loss
    default_include_cls = True

    def __init__(
        self,
        dim: int,
        *,
        norm: str | None = None,
        loss: str | None = None,
        beta: float | None = None,
        include_cls: bool | None = None,
    ):
        super().__init__()
        self.dim = dim
        self.norm = norm or self.default_norm
        self.loss_kind = loss or self.default_loss
        self.beta = self.default_beta if beta is None else float(beta)
        self.include_cls = (self.default_include_cls if include_cls is None else include_cls) and self.has_cls

    def compute(self, images: torch.Tensor, mask) -> torch.Tensor:  # pragma: no cover - interface
        """Raw target tokens `[N, 1 + L, dim]` for images `[N, 3, H, W]` (no gradient)."""
        raise NotImplementedError

    @torch.no_grad()
    def forward(self, images: torch.Tensor, mask) -> torch.Tensor:
        return normalize(self.compute(images, mask).float(), self.norm)

    def loss(self, pred: torch.Tensor, target: torch.Tensor, mask) -> torch.Tensor:
        """Loss over the masked tokens (and the cls token if the target has one and include_cls)."""
        m = mask.mask
        cls = torch.full_like(m[:, :1], 1.0 if self.include_cls else 0.0)
        return token_loss(pred, target, torch.cat([cls, m], dim=1), self.loss_kind, self.beta)

    # hooks -------------------------------------------------------------------------------------------
    # `epoch` is the 0-based index of the epoch within the current stage and `epochs` the stage's length in
    # epochs (schedules restart every stage, as the learning rate does).
    def after_step(self, student: nn.Module, epoch: int, epochs: int) -> None:
        """Called after every optimizer step of epoch `epoch` (EMA teachers updated per iteration)."""

    def after_epoch(self, student: nn.Module, epoch: int, epochs: int) -> None:
        """Called at the end of epoch `epoch`, before the stage switch."""

    def resume_state(self) -> dict:
        """What checkpoint-last.pth stores to restore this target (its weights by default)."""
        return self.state_dict()

    def describe(self) -> str:
        return self.name
