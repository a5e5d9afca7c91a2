"""UperNet decode head and the auxiliary FCN head, in plain PyTorch (mmsegmentation's UPerHead / FCNHead).

Every convolution is conv (no bias) + BatchNorm + ReLU (`ConvBNReLU`); upsampling is bilinear with
align_corners=False; both heads end with Dropout2d(0.1) and a 1 x 1 classifier initialised N(0, 0.01).
Module names follow mmsegmentation's (`psp_modules`, `bottleneck`, `lateral_convs`, `fpn_convs`,
`fpn_bottleneck`, `conv_seg`, `convs`; `.conv` / `.bn` inside a ConvModule).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def resize(x: torch.Tensor, size) -> torch.Tensor:
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


class ConvBNReLU(nn.Module):
    """mmcv's ConvModule with a norm: conv without bias, BN, ReLU; kaiming-normal (fan_out, relu) init."""

    def __init__(self, cin: int, cout: int, kernel: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.activate = nn.ReLU(inplace=True)
        nn.init.kaiming_normal_(self.conv.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activate(self.bn(self.conv(x)))


class PPM(nn.ModuleList):
    """Pyramid pooling: for each scale s, adaptive average pool to s x s, 1 x 1 ConvBNReLU, upsample back.
    `[N, C, H, W]` -> list of `len(scales)` maps `[N, channels, H, W]`."""

    def __init__(self, scales: Sequence[int], cin: int, channels: int):
        super().__init__(nn.Sequential(nn.AdaptiveAvgPool2d(s), ConvBNReLU(cin, channels, 1)) for s in scales)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [resize(branch(x), x.shape[2:]) for branch in self]


class SegHead(nn.Module):
    """Shared tail: Dropout2d then a 1 x 1 conv to the classes (mmseg's `cls_seg`)."""

    def __init__(self, channels: int, num_classes: int, dropout: float):
        super().__init__()
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)
        nn.init.normal_(self.conv_seg.weight, std=0.01)
        nn.init.zeros_(self.conv_seg.bias)

    def cls_seg(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_seg(self.dropout(x))


class UPerHead(SegHead):
    """Four maps (fine to coarse) `[N, C_i, H_i, W_i]` -> logits `[N, classes, H_0, W_0]`.

    The coarsest map goes through pyramid pooling (PPM + 3 x 3 bottleneck); the others through 1 x 1 lateral
    convs; a top-down pass adds each upsampled coarser lateral to the finer one; 3 x 3 convs smooth all but
    the PPM level; all levels are upsampled to the finest, concatenated and fused by a 3 x 3 conv.
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        channels: int,
        num_classes: int,
        pool_scales: Sequence[int] = (1, 2, 3, 6),
        dropout: float = 0.1,
    ):
        super().__init__(channels, num_classes, dropout)
        self.psp_modules = PPM(pool_scales, in_channels[-1], channels)
        self.bottleneck = ConvBNReLU(in_channels[-1] + len(pool_scales) * channels, channels, 3)
        self.lateral_convs = nn.ModuleList(ConvBNReLU(c, channels, 1) for c in in_channels[:-1])
        self.fpn_convs = nn.ModuleList(ConvBNReLU(channels, channels, 3) for _ in in_channels[:-1])
        self.fpn_bottleneck = ConvBNReLU(len(in_channels) * channels, channels, 3)

    def forward(self, inputs: Sequence[torch.Tensor]) -> torch.Tensor:
        top = inputs[-1]
        laterals = [conv(x) for conv, x in zip(self.lateral_convs, inputs)]
        laterals.append(self.bottleneck(torch.cat([top, *self.psp_modules(top)], dim=1)))
        for i in range(len(laterals) - 1, 0, -1):  # top-down
            laterals[i - 1] = laterals[i - 1] + resize(laterals[i], laterals[i - 1].shape[2:])
        outs = [conv(x) for conv, x in zip(self.fpn_convs, laterals)] + [laterals[-1]]
        size = outs[0].shape[2:]
        fused = self.fpn_bottleneck(torch.cat([outs[0]] + [resize(o, size) for o in outs[1:]], dim=1))
        return self.cls_seg(fused)


class FCNHead(SegHead):
    """One map `[N, C, H, W]` -> logits `[N, classes, H, W]`: `num_convs` 3 x 3 ConvBNReLU (no concat of the
    input, as in the recipe's auxiliary head), then the classifier."""

    def __init__(self, in_channels: int, channels: int, num_classes: int, num_convs: int = 1, dropout: float = 0.1):
        super().__init__(channels, num_classes, dropout)
        self.convs = nn.Sequential(
            *(ConvBNReLU(in_channels if i == 0 else channels, channels, 3) for i in range(num_convs))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cls_seg(self.convs(x))
