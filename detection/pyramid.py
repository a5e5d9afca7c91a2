"""ViTDet's simple feature pyramid (detectron2 `SimpleFeaturePyramid` with `LastLevelMaxPool`): five maps from
the last backbone map alone.

scale 4 = ConvT(C -> C/2, 2, 2), LN, GELU, ConvT(C/2 -> C/4, 2, 2); scale 2 = ConvT(C -> C/2, 2, 2); scale 1 =
identity; scale 1/2 = max-pool 2. Each is followed by a 1x1 conv to `out_channels` + LN and a 3x3 conv + LN (convs
without bias; LayerNorm over channels, eps 1e-6). The fifth map is max-pool(kernel 1, stride 2) of the fourth.
For a /16 ViT the strides are 4, 8, 16, 32, 64 (levels p2-p6); in general p/4 ... 4p for patch size p, and maps
are named `p<log2 stride>` as in detectron2.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import torch
import torch.nn.functional as F
from timm.layers import LayerNorm2d
from torch import nn


def conv_ln(cin: int, cout: int, k: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, k, padding=k // 2, bias=False), LayerNorm2d(cout, eps=1e-6)]


def pyramid_strides(patch_size: int) -> tuple[int, ...]:
    """Strides of the five maps for a backbone of stride `patch_size` (a power of two, at least 4)."""
    if patch_size < 4 or patch_size & (patch_size - 1):
        raise ValueError(
            f"the simple feature pyramid needs a power-of-two patch size >= 4 (strides p/4 ... 4p), got {patch_size}; "
            "a /14 checkpoint is run at patch 16 (model.patch_size=16 resamples its patch embedding)"
        )
    return tuple(patch_size * f // 4 for f in (1, 2, 4, 8, 16))


class SimpleFeaturePyramid(nn.Module):
    """backbone map `[N, C, H, W]` (stride p) -> OrderedDict of five `[N, out_channels, ...]` maps, strides
    `self.strides`. `out_channels` is what torchvision's detection heads read."""

    def __init__(self, in_channels: int, patch_size: int, out_channels: int = 256):
        super().__init__()
        c = in_channels
        self.out_channels = out_channels
        self.strides = pyramid_strides(patch_size)
        self.names = [f"p{int(math.log2(s))}" for s in self.strides]
        scales = (
            [
                nn.ConvTranspose2d(c, c // 2, 2, 2),
                LayerNorm2d(c // 2, eps=1e-6),
                nn.GELU(),
                nn.ConvTranspose2d(c // 2, c // 4, 2, 2),
            ],
            [nn.ConvTranspose2d(c, c // 2, 2, 2)],
            [],
            [nn.MaxPool2d(2, 2)],
        )
        widths = (c // 4, c // 2, c, c)
        self.stages = nn.ModuleList(
            nn.Sequential(*ops, *conv_ln(w, out_channels, 1), *conv_ln(out_channels, out_channels, 3))
            for ops, w in zip(scales, widths)
        )

    def forward(self, x: torch.Tensor) -> OrderedDict:
        maps = [stage(x) for stage in self.stages]
        maps.append(F.max_pool2d(maps[-1], kernel_size=1, stride=2))
        return OrderedDict(zip(self.names, maps))


class BackboneWithPyramid(nn.Module):
    """The `backbone` torchvision's detection parts expect: images -> OrderedDict of maps, with `out_channels`.
    The ViT is `self.net` (names `backbone.net.*` in the detector, as in detectron2)."""

    def __init__(self, net: nn.Module, out_channels: int = 256):
        super().__init__()
        self.net = net
        self.pyramid = SimpleFeaturePyramid(net.embed_dim, net.patch_size, out_channels)
        self.out_channels = out_channels

    @property
    def strides(self) -> tuple[int, ...]:
        return self.pyramid.strides

    @property
    def names(self) -> list[str]:
        return self.pyramid.names

    def forward(self, images: torch.Tensor) -> OrderedDict:
        return self.pyramid(self.net(images))
