"""The ViTDet backbone (Li et al. 2022, detectron2 `modeling/backbone/vit.py`): a plain ViT on the detection
resolution with window attention in all blocks but a few global ones, decomposed relative position tables
(zero-initialised, in every block), the absolute position embedding kept at the pretraining grid and
bicubically interpolated to the input grid at every forward, drop path, and no final norm.

The blocks are timm's SAM-style blocks (`timm.models.vision_transformer_sam.Block`), which have exactly this
structure; parameter names stay timm/MAE's (`patch_embed.proj`, `pos_embed`, `blocks.N.attn.qkv`, ...) plus
`blocks.N.attn.rel_pos_h/rel_pos_w`, so pretrained ViT checkpoints load as they are.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from timm.layers import PatchEmbed, calculate_drop_path_rates
from timm.models.vision_transformer_sam import Block
from torch import nn

from core.vit import init_module

# global-attention blocks per size (RECIPES.md 4); tiny: its 2nd and 4th of 4 blocks
GLOBAL_BLOCKS = {
    "tiny": (1, 3),
    "small": (2, 5, 8, 11),
    "base": (2, 5, 8, 11),
    "large": (5, 11, 17, 23),
    "huge": (7, 15, 23, 31),
}


def abs_pos(pos_embed: torch.Tensor, hw: tuple[int, int], has_cls: bool = True) -> torch.Tensor:
    """The pretraining position embedding `[1, (1 +) g*g, C]` at grid `hw`: cls entry dropped, bicubically
    interpolated (align_corners False) when the grid differs. Returns `[1, H, W, C]`."""
    if has_cls:
        pos_embed = pos_embed[:, 1:]
    g = int(round(pos_embed.shape[1] ** 0.5))
    grid = pos_embed.reshape(1, g, g, -1)
    if (g, g) != tuple(hw):
        grid = F.interpolate(grid.permute(0, 3, 1, 2), size=tuple(hw), mode="bicubic", align_corners=False)
        grid = grid.permute(0, 2, 3, 1)
    return grid


class ViTDetBackbone(nn.Module):
    """images `[N, 3, H, W]` -> last-block features `[N, C, H/p, W/p]`.

    pretrain_img_size / patch_size fix the grid of the (pretrained) absolute position embedding;
    img_size is the detection resolution, which sizes the relative position tables of the global blocks.
    """

    def __init__(
        self,
        *,
        img_size: int = 1024,
        pretrain_img_size: int = 224,
        patch_size: int = 16,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        drop_path_rate: float = 0.1,
        window_size: int = 14,
        global_blocks=(2, 5, 8, 11),
    ):
        super().__init__()
        self.patch_size, self.embed_dim = patch_size, embed_dim
        self.patch_embed = PatchEmbed(
            img_size=img_size,
            patch_size=patch_size,
            in_chans=3,
            embed_dim=embed_dim,
            strict_img_size=False,
            output_fmt="NHWC",
        )
        pretrain_grid = pretrain_img_size // patch_size
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + pretrain_grid * pretrain_grid, embed_dim))
        dpr = calculate_drop_path_rates(drop_path_rate, depth)
        grid = img_size // patch_size
        norm = partial(nn.LayerNorm, eps=1e-6)
        self.global_blocks = tuple(global_blocks)
        self.blocks = nn.ModuleList(
            Block(
                embed_dim,
                num_heads,
                mlp_ratio=mlp_ratio,
                qkv_bias=True,
                drop_path=dpr[i],
                norm_layer=norm,
                use_rel_pos=True,
                window_size=0 if i in self.global_blocks else window_size,
                input_size=(grid, grid),
            )
            for i in range(depth)
        )
        self.initialize_weights()

    @torch.no_grad()
    def initialize_weights(self) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        for m in self.modules():
            init_module(m)
        w = self.patch_embed.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))

    @property
    def num_layers(self) -> int:
        return len(self.blocks) + 1

    def layer_id(self, name: str) -> int:
        """detectron2's ViTDet rule: pos/patch embedding 0, block i -> i + 1 (within the backbone)."""
        if name.startswith(("pos_embed", "patch_embed", "cls_token")):
            return 0
        if name.startswith("blocks."):
            return int(name.split(".")[1]) + 1
        return self.num_layers

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(images)  # [N, H, W, C]
        x = x + abs_pos(self.pos_embed, x.shape[1:3]).to(x.dtype)
        for blk in self.blocks:
            x = blk(x)
        return x.permute(0, 3, 1, 2)
