"""The ViTDet backbone (Li et al. 2022; detectron2 `modeling/backbone/vit.py`): a plain ViT run at the detection
resolution, window attention in all blocks but a few global ones (windows zero-padded), decomposed relative
position tables in every block (zero-initialised), the absolute position embedding kept at the pretraining grid
and bicubically interpolated to the token grid at every forward, linearly increasing drop path, and no final norm.

The blocks are timm's SAM-style `Block` (`timm.models.vision_transformer_sam`), which computes exactly ViTDet's
block, run by the shared `core.vit.Backbone` loop (layer ids, no-weight-decay names and gradient checkpointing
are the interface every task's ViT has); what timm's SAM model does differently (a position embedding stored at
the full token grid, LayerNorm eps 1e-5) lives in this file instead. Parameter names are timm/MAE's
(`patch_embed.proj`, `pos_embed`, `blocks.N.attn.qkv`, ...) plus `blocks.N.attn.rel_pos_h/rel_pos_w`, so
pretrained ViT weights load as they are.
"""

from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn.functional as F
from timm.layers import PatchEmbed, calculate_drop_path_rates
from timm.models.vision_transformer_sam import Block
from torch import nn

from core.vit import Backbone, init_module

# Global-attention blocks per size (docs/RECIPES.md 4); tiny (4 blocks) mirrors the pattern with its 2nd and 4th.
GLOBAL_BLOCKS = {
    "tiny": (1, 3),
    "small": (2, 5, 8, 11),
    "base": (2, 5, 8, 11),
    "large": (5, 11, 17, 23),
    "huge": (7, 15, 23, 31),
}


def abs_pos(pos_embed: torch.Tensor, hw: tuple[int, int], has_cls: bool = True) -> torch.Tensor:
    """The position embedding `[1, (1 +) g*g, C]` of the pretraining grid at token grid `hw`: the cls entry
    dropped, bicubic interpolation (align_corners False) when the grids differ. Returns `[1, H, W, C]`."""
    if has_cls:
        pos_embed = pos_embed[:, 1:]
    g = math.isqrt(pos_embed.shape[1])
    grid = pos_embed.reshape(1, g, g, -1)
    if (g, g) == tuple(hw):
        return grid
    grid = F.interpolate(grid.permute(0, 3, 1, 2), size=tuple(hw), mode="bicubic", align_corners=False)
    return grid.permute(0, 2, 3, 1)


class ViTDetBackbone(Backbone, nn.Module):
    """images `[N, 3, H, W]` (H, W multiples of the patch size) -> last-block map `[N, C, H/p, W/p]`.

    img_size: the detection input size; it sizes the relative-position tables of the global blocks (window
    blocks have `2 * window - 1` entries). pos_grid: side of the pretraining position grid (224 / 16 = 14 for
    B and L, 224 / 14 = 16 for H/14, 8 for tiny); the embedding keeps a cls entry, as the checkpoints do.
    """

    def __init__(
        self,
        *,
        img_size: int = 1024,
        patch_size: int = 16,
        pos_grid: int = 14,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        drop_path_rate: float = 0.1,
        window_size: int = 14,
        global_blocks=(2, 5, 8, 11),
        grad_checkpointing: bool = False,
    ):
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"image size {img_size} is not a multiple of the patch size {patch_size}")
        self.patch_size, self.embed_dim, self.img_size = patch_size, embed_dim, img_size
        self.global_blocks = tuple(global_blocks)
        self.set_grad_checkpointing(grad_checkpointing)
        self.patch_embed = PatchEmbed(
            img_size=img_size,
            patch_size=patch_size,
            embed_dim=embed_dim,
            strict_img_size=False,
            output_fmt="NHWC",
        )
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + pos_grid * pos_grid, embed_dim))
        grid = img_size // patch_size
        dpr = calculate_drop_path_rates(drop_path_rate, depth)
        self.blocks = nn.ModuleList(
            Block(
                embed_dim,
                num_heads,
                mlp_ratio=mlp_ratio,
                qkv_bias=True,
                drop_path=dpr[i],
                norm_layer=partial(nn.LayerNorm, eps=1e-6),
                use_rel_pos=True,
                window_size=0 if i in self.global_blocks else window_size,
                input_size=(grid, grid),
            )
            for i in range(depth)
        )
        self.initialize_weights()

    @torch.no_grad()
    def initialize_weights(self) -> None:
        """Random init for runs without pretrained weights (MAE's scheme; rel-pos tables stay zero)."""
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        for m in self.modules():
            init_module(m)
        w = self.patch_embed.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.patch_embed.proj.bias)

    # ------------------------------------------------------------------------------------ interface
    # `core.vit.Backbone`: layer_id / num_layers (detectron2's `get_vit_lr_decay_rate`: pos/patch embedding 0,
    # block i -> i + 1, the rest depth + 1), no_weight_decay() = {"pos_embed"} (the ViTDet configs' override),
    # set_grad_checkpointing, and the block loop (window blocks take no attention bias).

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(images)  # [N, H, W, C]
        x = x + abs_pos(self.pos_embed, x.shape[1:3]).to(x.dtype)
        x, _ = self.forward_blocks(x)
        return x.permute(0, 3, 1, 2)
