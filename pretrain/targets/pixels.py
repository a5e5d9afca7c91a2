"""MAE's target (facebookresearch/mae `models_mae.py`): the pixels of each patch of the normalised input in
`patchify` order, standardised per patch when `norm_pix` (`norm_pix_loss`: mean and unbiased variance over the
patch's p*p*3 values, eps 1e-6 inside the square root), MSE averaged over a patch's values, then over the
masked patches (`forward_loss`)."""

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
        # norm_pix chooses the normalisation; an explicit `norm` (loss.norm) may name another per-patch
        # normalisation (layernorm), but not contradict norm_pix
        norm = kw.get("norm")
        if norm is None:
            kw["norm"] = "standardize" if norm_pix else "none"
        elif (norm == "none") == bool(norm_pix):
            raise ValueError(
                f"loss.norm={norm} contradicts target.pixels.norm_pix={str(bool(norm_pix)).lower()}; "
                "leave loss.norm null and set norm_pix"
            )
        super().__init__(patch_size * patch_size * 3, **kw)
        self.patch_size = patch_size

    def compute(self, images: torch.Tensor, mask) -> torch.Tensor:
        patches = patchify(images.float(), self.patch_size)
        return torch.cat([patches.new_zeros(patches.shape[0], 1, patches.shape[2]), patches], dim=1)

    def describe(self) -> str:
        return f"pixels ({self.norm})"
