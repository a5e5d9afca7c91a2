"""MaskFeat's target: histograms of oriented gradients per patch, as the MaskFeat authors define them
(facebookresearch/SlowFast `slowfast/models/operators.py: HOGLayerC`, built with nbins 9 and pool 8 in
`slowfast/models/masked.py`).

For each RGB channel of the (normalised) input, reflect-padded by one pixel:
- gradients by the Sobel-like kernels kx = [[1, 0, -1], [2, 0, -2], [1, 0, -1]] and ky = kx transposed, applied
  as cross-correlations (so gx = left - right, gy = top - bottom), magnitude sqrt(gx^2 + gy^2);
- orientation atan2(gx, gy) (the references' argument order with this filter layout), unsigned: the bin is
  floor(atan2(gx, gy) / pi * bins) mod bins, hard assignment;
- optionally (`gaussian_window` = g > 0, mmpretrain's `HOGGenerator` with g = 16 in its MaskFeat recipe) the
  magnitudes are weighted by a g x g Gaussian (std g / 2, normalised to sum 1) tiled over the image;
- magnitudes summed over `cell` x `cell` cells, each cell's histogram L2-normalised over its bins
  (`F.normalize`, eps 1e-12).
A patch's target is its cells' histograms in the references' order (channel, bin, cell row, cell column):
dim = 3 * bins * (patch / cell)^2 (108 for 16 px patches with 8 px cells). MSE over the masked patches.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from pretrain.targets.base import Target

SOBEL_X = ((1.0, 0.0, -1.0), (2.0, 0.0, -2.0), (1.0, 0.0, -1.0))


def gaussian_window(size: int) -> torch.Tensor:
    """`[size, size]` Gaussian with std size // 2 centred on the window, normalised to sum 1 (SlowFast's
    `get_gkern(size, size // 2)`, mmpretrain's `get_gaussian_kernel`)."""
    n = torch.arange(size, dtype=torch.float32)
    g = torch.exp(-0.5 * ((n - n.mean()) / (size // 2)) ** 2)
    w = torch.outer(g, g)
    return w / w.sum()


def hog_cells(images: torch.Tensor, bins: int = 9, cell: int = 8, window: int = 0) -> torch.Tensor:
    """`[N, C, H, W]` -> per-cell histograms `[N, C, bins, H/cell, W/cell]`, L2-normalised over bins."""
    n, c, h, w = images.shape
    if h % cell or w % cell:
        raise ValueError(f"HOG: image {h}x{w} is not a whole number of {cell} px cells")
    x = F.pad(images.float(), (1, 1, 1, 1), mode="reflect")
    kx = torch.tensor(SOBEL_X, device=x.device).expand(c, 1, 3, 3).contiguous()
    gx = F.conv2d(x, kx, groups=c)
    gy = F.conv2d(x, kx.transpose(2, 3).contiguous(), groups=c)
    mag = torch.sqrt(gx * gx + gy * gy)
    if window:
        if h % window or w % window:
            raise ValueError(f"target.hog.gaussian_window={window} must divide the image size {h}x{w}")
        mag = mag * gaussian_window(window).to(mag.device).repeat(h // window, w // window)
    index = torch.floor(torch.atan2(gx, gy) / math.pi * bins).long().remainder(bins)
    hist = mag.new_zeros(n, c, bins, h, w).scatter_add_(2, index.unsqueeze(2), mag.unsqueeze(2))
    hist = hist.reshape(n, c, bins, h // cell, cell, w // cell, cell).sum(dim=(4, 6))
    return F.normalize(hist, p=2, dim=2)


class HOGTarget(Target):
    name = "hog"
    has_cls = False
    default_norm = "none"
    default_loss = "mse"

    def __init__(self, patch_size: int, bins: int = 9, cell: int = 8, gaussian_window: int = 0, **kw):
        if patch_size % cell:
            raise ValueError(f"target.hog.cell={cell} must divide the patch size {patch_size}")
        if gaussian_window < 0:
            raise ValueError(f"target.hog.gaussian_window must be 0 (none) or a size in px, got {gaussian_window}")
        self.per_side = patch_size // cell
        super().__init__(3 * bins * self.per_side**2, **kw)
        self.bins, self.cell, self.window = bins, cell, gaussian_window

    def compute(self, images: torch.Tensor, mask) -> torch.Tensor:
        hist = hog_cells(images, self.bins, self.cell, self.window)  # [N, 3, B, H/c, W/c]
        n, c, b, hc, wc = hist.shape
        k = self.per_side
        x = hist.reshape(n, c, b, hc // k, k, wc // k, k)
        x = x.permute(0, 3, 5, 1, 2, 4, 6).reshape(n, (hc // k) * (wc // k), c * b * k * k)
        return torch.cat([x.new_zeros(n, 1, x.shape[-1]), x], dim=1)

    def describe(self) -> str:
        window = f", {self.window} px Gaussian window" if self.window else ""
        return f"HOG ({self.bins} bins, {self.cell} px cells{window})"
