"""MaskFeat's target: histograms of oriented gradients per patch.

For each RGB channel of the (normalised) input: gradients with the centred [-1, 0, 1] filters (replicate
padding, so flat borders give no gradient), magnitude sqrt(gx^2 + gy^2), unsigned orientation
atan2(gy, gx) mod pi hard-assigned to `bins` equal bins, magnitudes summed over `cell` x `cell` cells, each
cell's histogram L2-normalised over its bins. A patch's target concatenates its cells' histograms:
dim = 3 * bins * (patch / cell)^2 (108 for 16 px patches with 8 px cells). MSE over masked patches.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from pretrain.targets.base import Target


def hog_cells(images: torch.Tensor, bins: int = 9, cell: int = 8, eps: float = 1e-6) -> torch.Tensor:
    """`[N, C, H, W]` -> per-cell histograms `[N, C, bins, H/cell, W/cell]`, L2-normalised over bins."""
    n, c, h, w = images.shape
    x = images.float().reshape(n * c, 1, h, w)
    padded = F.pad(x, (1, 1, 1, 1), mode="replicate")
    gx = padded[:, :, 1:-1, 2:] - padded[:, :, 1:-1, :-2]
    gy = padded[:, :, 2:, 1:-1] - padded[:, :, :-2, 1:-1]
    mag = torch.sqrt(gx**2 + gy**2)
    ang = torch.remainder(torch.atan2(gy, gx), math.pi)
    idx = torch.clamp((ang / (math.pi / bins)).floor().long(), max=bins - 1)
    hist = torch.zeros(n * c, bins, h, w, device=images.device)
    hist.scatter_(1, idx, mag)
    hist = F.avg_pool2d(hist, cell) * cell * cell
    hist = hist / (hist.norm(dim=1, keepdim=True) + eps)
    return hist.reshape(n, c, bins, h // cell, w // cell)


class HOGTarget(Target):
    name = "hog"
    has_cls = False
    default_norm = "none"
    default_loss = "mse"

    def __init__(self, patch_size: int, bins: int = 9, cell: int = 8, **kw):
        if patch_size % cell:
            raise ValueError(f"target.hog.cell={cell} must divide the patch size {patch_size}")
        self.per_side = patch_size // cell
        super().__init__(3 * bins * self.per_side**2, **kw)
        self.bins, self.cell = bins, cell

    def compute(self, images: torch.Tensor, mask) -> torch.Tensor:
        hist = hog_cells(images, self.bins, self.cell)  # [N, 3, B, H/c, W/c]
        n, c, b, hc, wc = hist.shape
        k = self.per_side
        x = hist.reshape(n, c, b, hc // k, k, wc // k, k)
        x = x.permute(0, 3, 5, 4, 6, 1, 2).reshape(n, (hc // k) * (wc // k), k * k * c * b)
        return torch.cat([x.new_zeros(n, 1, x.shape[-1]), x], dim=1)

    def describe(self) -> str:
        return f"HOG ({self.bins} bins, {self.cell} px cells)"
