"""MAE's target: the pixels of each patch (of the normalised input), optionally standardised per patch
(`norm_pix_loss`), MSE over the masked patches."""

from __future__ import annotations

import torch

from pretrain.targets.base import Target


def patchify(images: torch.Tensor, p: int) -> torch.Tensor:
    """`[N, 3, H, W]` -> `[N, L, p*p*3]`, patches in row-major order, pixels (row, col, channel) inside."""
    n, c, h, w = images.shape
    x = images.reshape(n, c, h // p, p, w // p, p)
    return torch.einsum("nchpwq->nhwpqc", x).reshape(n, (h // p) * (w // p), p * p * c)


class PixelTarget(Target):
    name = "pixels"
    has_cls = False
    default_loss = "mse"

    def __init__(self, patch_size: int, norm_pix: bool = True, **kw):
        kw.setdefault("norm", "standardize" if norm_pix else "none")
        super().__init__(patch_size * patch_size * 3, **kw)
        self.patch_size = patch_size

    def compute(self, images: torch.Tensor, mask) -> torch.Tensor:
        patches = patchify(images.float(), self.patch_size)
        return torch.cat([patches.new_zeros(patches.shape[0], 1, patches.shape[2]), patches], dim=1)

    def describe(self) -> str:
        return f"pixels ({self.norm})"
