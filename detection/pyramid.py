"""ViTDet's simple feature pyramid: P2-P6 from the last backbone map alone (detectron2 SimpleFeaturePyramid).

scale 4 = ConvT(C -> C/2, 2, 2), LN, GELU, ConvT(C/2 -> C/4, 2, 2); scale 2 = ConvT(C -> C/2, 2, 2);
scale 1 = identity; scale 1/2 = max-pool 2. Each then a 1x1 conv to `out_channels` + LN and a 3x3 conv + LN
(no conv biases; channels-first LayerNorm, eps 1e-6). P6 = max-pool(kernel 1, stride 2) of P5.
Strides 4, 8, 16, 32, 64 for a /16 backbone.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn


class LayerNorm2d(nn.Module):
    """LayerNorm over the channels of `[N, C, H, W]` (detectron2's channels-first LayerNorm)."""

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.layer_norm(x.permute(0, 2, 3, 1), x.shape[1:2], self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


def conv_ln(cin: int, cout: int, k: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2, bias=False), LayerNorm2d(cout))


class SimpleFeaturePyramid(nn.Module):
    """backbone map `[N, C, H, W]` (stride s) -> OrderedDict p2..p6 of `[N, out_channels, ...]`, strides
    s/4, s/2, s, 2s, 4s. `out_channels` is read by torchvision's detection heads."""

    def __init__(self, in_channels: int, out_channels: int = 256):
        super().__init__()
        c = in_channels
        self.out_channels = out_channels
        self.up4 = nn.Sequential(
            nn.ConvTranspose2d(c, c // 2, 2, 2),
            LayerNorm2d(c // 2),
            nn.GELU(),
            nn.ConvTranspose2d(c // 2, c // 4, 2, 2),
        )
        self.up2 = nn.ConvTranspose2d(c, c // 2, 2, 2)
        self.down2 = nn.MaxPool2d(2, 2)
        self.lateral = nn.ModuleList(conv_ln(cin, out_channels, 1) for cin in (c // 4, c // 2, c, c))
        self.output = nn.ModuleList(conv_ln(out_channels, out_channels, 3) for _ in range(4))

    def forward(self, x: torch.Tensor) -> OrderedDict:
        maps = (self.up4(x), self.up2(x), x, self.down2(x))
        out = OrderedDict()
        for name, m, lat, conv in zip(("p2", "p3", "p4", "p5"), maps, self.lateral, self.output):
            out[name] = conv(lat(m))
        out["p6"] = F.max_pool2d(out["p5"], kernel_size=1, stride=2)
        return out


class BackboneWithPyramid(nn.Module):
    """The `backbone` torchvision's detectors expect: images -> OrderedDict of maps, with `out_channels`."""

    def __init__(self, vit: nn.Module, out_channels: int = 256):
        super().__init__()
        self.net = vit
        self.pyramid = SimpleFeaturePyramid(vit.embed_dim, out_channels)
        self.out_channels = out_channels

    def forward(self, images: torch.Tensor) -> OrderedDict:
        return self.pyramid(self.net(images))
