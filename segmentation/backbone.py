"""The ViT backbone of the authors' ADE20K recipe (their mae_segmentation code), on the suite's `ViT`.

On top of the pretrained encoder:
- the absolute position embedding, resized once at load to the segmentation grid (32 x 32 at 512 px) and
  fine-tuned;
- a relative position bias per block (BEiT's table: one value per head for every offset between two
  patches plus three cls entries), zero-initialised and trained from scratch;
- layer scale (`blocks.N.ls1.gamma`, `ls2.gamma`), initialised to 1.0;
- no final norm; the outputs of four blocks (B: 3, 5, 7, 11; L: 7, 11, 15, 23), tapped by
  `ViT.forward_intermediates` as maps, are brought to strides 4, 8, 16, 32 of the image by four adapters
  (`fpn1` .. `fpn4`, the authors' names). For patch 16 they are ConvT-BN-GELU-ConvT (x4), ConvT (x2),
  identity, 2 x 2 max pool (/2); the authors' patch-8 variant is ConvT, identity, max pool 2, max pool 4; the
  same rule gives identity and max pools 2, 4, 8 for the tiny model's 4 px patches (patch 14 uses the
  patch-16 adapters: strides 3.5 .. 28).

Parameter names follow timm plus the authors' `blocks.N.attn.relative_position_bias_table` and `fpnK`, so
`layer_id` (block i -> i + 1, adapters -> the top layer) gives the released layer-decay groups.
"""

from __future__ import annotations

import torch
from torch import nn

from core.vit import ViT, relative_position_bias, relative_position_index

# scale factor of each adapter relative to the token grid, by patch size (outputs at strides 4, 8, 16, 32)
ADAPTER_FACTORS = {16: (4, 2, 1, 0.5), 14: (4, 2, 1, 0.5), 8: (2, 1, 0.5, 0.25), 4: (1, 0.5, 0.25, 0.125)}


def adapter(factor: float, dim: int) -> nn.Module:
    """x4: ConvT-BN-GELU-ConvT; x2: ConvT; x1: identity; /k: k x k max pool (the authors' modules)."""
    if factor == 4:
        return nn.Sequential(
            nn.ConvTranspose2d(dim, dim, kernel_size=2, stride=2),
            nn.BatchNorm2d(dim),
            nn.GELU(),
            nn.ConvTranspose2d(dim, dim, kernel_size=2, stride=2),
        )
    if factor == 2:
        return nn.Sequential(nn.ConvTranspose2d(dim, dim, kernel_size=2, stride=2))
    if factor == 1:
        return nn.Identity()
    k = round(1 / factor)
    return nn.MaxPool2d(kernel_size=k, stride=k)


class SegViT(ViT):
    """images `[N, 3, H, W]` (H, W = the model's `img_size`) -> four maps `[N, D, H / s, W / s]`, s in
    `self.strides` (4, 8, 16, 32).

    out_indices: the blocks whose outputs are tapped (0-based). layer_scale: init value of the per-block
    layer scale (None: none). rel_pos_bias: per-block relative position bias (`core.vit.relative_position_bias`).
    grad_checkpointing: recompute block activations in the backward pass (saves memory for ViT-L).
    """

    def __init__(
        self,
        *,
        out_indices: tuple[int, ...] = (3, 5, 7, 11),
        layer_scale: float | None = 1.0,
        rel_pos_bias: bool = True,
        grad_checkpointing: bool = False,
        **arch,
    ):
        super().__init__(init_values=layer_scale, final_norm=False, grad_checkpointing=grad_checkpointing, **arch)
        if len(out_indices) != 4 or not all(0 <= i < len(self.blocks) for i in out_indices):
            raise ValueError(f"out_indices must be 4 block indices in [0, {len(self.blocks)}), got {list(out_indices)}")
        self.out_indices = tuple(int(i) for i in out_indices)
        dim = self.embed_dim
        if rel_pos_bias:
            gh, gw = self.grid_size
            rows = (2 * gh - 1) * (2 * gw - 1) + 3
            for blk in self.blocks:
                blk.attn.relative_position_bias_table = nn.Parameter(torch.zeros(rows, self.num_heads))
            self.register_buffer("relative_position_index", relative_position_index(self.grid_size), persistent=False)
        self.rel_pos_bias = rel_pos_bias
        factors = ADAPTER_FACTORS.get(self.patch_size)
        if factors is None:
            raise ValueError(
                f"no feature adapters for patch size {self.patch_size}; supported: {sorted(ADAPTER_FACTORS)}"
            )
        self.fpn1, self.fpn2, self.fpn3, self.fpn4 = (adapter(f, dim) for f in factors)
        self.strides = [self.patch_size / f for f in factors]  # 4, 8, 16, 32 (3.5 .. 28 for patch 14)

    @property
    def out_channels(self) -> list[int]:
        return [self.embed_dim] * 4

    def block_biases(self, x: torch.Tensor) -> list[torch.Tensor | None]:
        """Each block's relative position bias `[1, heads, 1 + L, 1 + L]`, added to its attention logits."""
        if not self.rel_pos_bias:
            return [None] * len(self.blocks)
        index = self.relative_position_index
        return [relative_position_bias(blk.attn.relative_position_bias_table, index) for blk in self.blocks]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        maps = self.forward_intermediates(x, self.out_indices, intermediates_only=True)  # [N, D, gh, gw] each
        return [adapt(m) for adapt, m in zip((self.fpn1, self.fpn2, self.fpn3, self.fpn4), maps)]
