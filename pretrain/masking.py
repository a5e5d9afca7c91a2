"""Masks for masked image modelling. A masking strategy has two halves:

- `sample(rng_seeded)`: runs in the data loader for one sample, inside the per-sample seeded RNG context, and
  returns a tensor `[L]` (so masks are reproducible and independent of workers/processes);
- `__call__(specs)`: turns the batched specs `[N, L]` into a `pretrain.dbot.Mask`.

`RandomMasking` is MAE's/dBOT's (the spec is uniform noise; the smallest values are kept).
`BlockMasking` is BEiT's block-wise masking (the spec is the 0/1 mask itself).
"""

from __future__ import annotations

import math
import random

import torch

from pretrain.dbot import Mask, random_masking


class RandomMasking:
    kind = "random"

    def __init__(self, num_patches: int, ratio: float):
        self.num_patches, self.ratio = num_patches, ratio

    def sample(self) -> torch.Tensor:
        return torch.rand(self.num_patches)

    def __call__(self, noise: torch.Tensor) -> Mask:
        return random_masking(noise, self.ratio)


class BlockMasking:
    """BEiT's block-wise masking on a `grid` of patches: rectangles of at least `min_patches` patches and
    aspect ratio in [min_aspect, 1/min_aspect] are added until about `ratio` of the patches are masked."""

    kind = "block"

    def __init__(self, grid: tuple[int, int], ratio: float, min_patches: int = 16, min_aspect: float = 0.3):
        self.h, self.w = grid
        self.target = int(round(ratio * self.h * self.w))
        self.min_patches = min(min_patches, self.target) if self.target else 0
        self.log_aspect = (math.log(min_aspect), math.log(1 / min_aspect))

    def sample(self) -> torch.Tensor:
        rng = random.Random(int(torch.randint(0, 2**31 - 1, ()).item()))  # seeded by the sample context
        mask = torch.zeros(self.h, self.w)
        count = 0
        for _ in range(100):
            if count >= self.target:
                break
            added = self._add_block(mask, self.target - count, rng)
            if added == 0:
                break
            count += added
        return mask.flatten()

    def _add_block(self, mask: torch.Tensor, budget: int, rng: random.Random) -> int:
        for _ in range(10):
            area = rng.uniform(self.min_patches, max(self.min_patches, budget))
            aspect = math.exp(rng.uniform(*self.log_aspect))
            h = int(round(math.sqrt(area * aspect)))
            w = int(round(math.sqrt(area / aspect)))
            if 0 < h < self.h and 0 < w < self.w:
                top, left = rng.randint(0, self.h - h), rng.randint(0, self.w - w)
                block = mask[top : top + h, left : left + w]
                new = int((block == 0).sum())
                if 0 < new <= budget:
                    block.fill_(1)
                    return new
        return 0

    def __call__(self, spec: torch.Tensor) -> Mask:
        return Mask(mask=spec.float())
