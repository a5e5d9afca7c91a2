"""The one ViT backbone every task uses.

`ViT` is timm's `VisionTransformer` (so parameter names are timm's and MAE's: `patch_embed.proj`,
`cls_token`, `pos_embed`, `blocks.N.attn.qkv`, `norm`, `fc_norm`, `head`) plus the small interface the
tasks share:

- `forward_tokens(x, keep_ids=None)`: token features `[N, 1 + L', D]` of the whole image or of a subset
  of patches (the masked-autoencoder encoder), before or after the final norm;
- `layer_id(name)` / `num_layers`: the layer index behind layer-wise lr decay
  (cls/pos/patch-embed 0, block i -> i + 1, everything after the blocks -> depth + 1);
- `initialize_weights(generator)`: MAE's initialisation, reproducible from a seed.

Size presets (`PRESETS`) hold only architecture; training settings live in each task's recipe files.
"""

from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import nn

# Architecture presets. `tiny` is the CPU demo size (32 px images, 4 px patches).
PRESETS: dict[str, dict] = {
    "tiny": dict(img_size=32, patch_size=4, embed_dim=96, depth=4, num_heads=3),
    # the study (tools/study.py): claim (d)'s wider teacher at the CPU scale; the GPU scale's student and teacher
    "tiny_wide": dict(img_size=32, patch_size=4, embed_dim=192, depth=4, num_heads=6),
    "small64": dict(img_size=64, patch_size=8, embed_dim=384, depth=12, num_heads=6),
    "base64": dict(img_size=64, patch_size=8, embed_dim=768, depth=12, num_heads=12),
    "small": dict(img_size=224, patch_size=16, embed_dim=384, depth=12, num_heads=6),
    "base": dict(img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12),
    "large": dict(img_size=224, patch_size=16, embed_dim=1024, depth=24, num_heads=16),
    "huge": dict(img_size=224, patch_size=14, embed_dim=1280, depth=32, num_heads=16),
}

# Names the timm registry uses for the same architectures (for converters and external teachers).
TIMM_NAMES = {
    "small": "vit_small_patch16_224",
    "base": "vit_base_patch16_224",
    "large": "vit_large_patch16_224",
    "huge": "vit_huge_patch14_224",
}


def preset(name: str, **overrides) -> dict:
    """Architecture kwargs of a preset, with overrides (e.g. depth=0, img_size=448)."""
    if name not in PRESETS:
        raise ValueError(f"unknown model size {name!r}; expected one of {sorted(PRESETS)}")
    return {**PRESETS[name], **overrides}


def sincos_pos_embed_2d(embed_dim: int, grid: int | tuple[int, int], cls_token: bool = True) -> torch.Tensor:
    """Fixed 2-D sine-cosine position embedding `[1 (+1), H*W, D]`, exactly as MAE builds it.

    Half the channels encode one grid axis and half the other, each as `[sin, cos]` of the position times
    `1 / 10000 ** (2i / (D/2))`. MAE's quirk is kept: the first half encodes the column (w) index. The cls
    position is all zeros. Computed in float64 like MAE's numpy code, returned in float32.
    """
    gh, gw = (grid, grid) if isinstance(grid, int) else grid
    if embed_dim % 4:
        raise ValueError(f"sin-cos position embedding needs embed_dim divisible by 4, got {embed_dim}")
    ys, xs = torch.meshgrid(torch.arange(gh, dtype=torch.float64), torch.arange(gw, dtype=torch.float64), indexing="ij")
    omega = 1.0 / 10000 ** (torch.arange(embed_dim // 4, dtype=torch.float64) / (embed_dim / 4))

    def encode(pos):  # [M] -> [M, D/2]
        out = pos.reshape(-1, 1) * omega.reshape(1, -1)
        return torch.cat([out.sin(), out.cos()], dim=1)

    emb = torch.cat([encode(xs), encode(ys)], dim=1)  # [H*W, D]
    if cls_token:
        emb = torch.cat([torch.zeros(1, embed_dim, dtype=torch.float64), emb], dim=0)
    return emb.float().unsqueeze(0)


def resize_pos_embed(pos_embed: torch.Tensor, new_grid: tuple[int, int], num_prefix: int = 1) -> torch.Tensor:
    """Bicubically resize the patch part of `[1, P + H*W, D]` to `new_grid`; prefix tokens kept as they are.

    `align_corners=False`, as MAE, BEiT and timm do. The old grid must be square (all published
    checkpoints are).
    """
    prefix, patches = pos_embed[:, :num_prefix], pos_embed[:, num_prefix:]
    n = patches.shape[1]
    old = int(math.isqrt(n))
    if old * old != n:
        raise ValueError(f"position embedding with {n} patch positions is not a square grid")
    if (old, old) == tuple(new_grid):
        return pos_embed
    dim = patches.shape[-1]
    grid = patches.reshape(1, old, old, dim).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=tuple(new_grid), mode="bicubic", align_corners=False)
    patches = grid.permute(0, 2, 3, 1).reshape(1, -1, dim).to(pos_embed.dtype)
    return torch.cat([prefix, patches], dim=1)


class ViT(VisionTransformer):
    """timm VisionTransformer with the shared backbone interface.

    Args beyond timm's: `fixed_pos_embed` makes `pos_embed` a frozen sin-cos table (MAE/dBOT pretraining);
    otherwise it is a learnable parameter (fine-tuning loads it from the checkpoint).
    """

    def __init__(self, *, fixed_pos_embed: bool = False, num_classes: int = 0, **kwargs):
        kwargs.setdefault("norm_layer", partial(nn.LayerNorm, eps=1e-6))
        kwargs.setdefault("qkv_bias", True)
        super().__init__(num_classes=num_classes, weight_init="skip", **kwargs)
        self.num_heads = kwargs.get("num_heads", 12)
        self.fixed_pos_embed = fixed_pos_embed
        if fixed_pos_embed:
            self.pos_embed.requires_grad_(False)
        self.initialize_weights()

    # ----------------------------------------------------------------------------------------- shapes
    @property
    def patch_size(self) -> int:
        return self.patch_embed.patch_size[0]

    @property
    def grid_size(self) -> tuple[int, int]:
        return tuple(self.patch_embed.grid_size)

    @property
    def num_patches(self) -> int:
        return self.patch_embed.num_patches

    @property
    def arch(self) -> dict:
        """The preset-style architecture kwargs that rebuild this encoder (`ViT(**vit.arch)`)."""
        return dict(
            img_size=self.patch_embed.img_size[0],
            patch_size=self.patch_size,
            embed_dim=self.embed_dim,
            depth=len(self.blocks),
            num_heads=self.num_heads,
        )

    @property
    def num_layers(self) -> int:
        """Layer count for layer decay: the embedding (0), one per block, and everything after (depth+1)."""
        return len(self.blocks) + 1

    # ------------------------------------------------------------------------------------------ init
    @torch.no_grad()
    def initialize_weights(self, generator: torch.Generator | None = None) -> None:
        """MAE's initialisation: sin-cos (or N(0, .02)) position embedding, xavier-uniform linear layers and
        patch projection (as a linear map), N(0, .02) cls token, LayerNorm 1/0. Reproducible with `generator`.
        """
        g = generator
        if self.fixed_pos_embed:
            self.pos_embed.copy_(sincos_pos_embed_2d(self.embed_dim, self.grid_size))
        else:
            nn.init.trunc_normal_(self.pos_embed, std=0.02, generator=g)
        w = self.patch_embed.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1), generator=g)
        nn.init.zeros_(self.patch_embed.proj.bias)
        nn.init.normal_(self.cls_token, std=0.02, generator=g)
        for name, m in self.named_modules():
            if name == "patch_embed.proj":
                continue
            init_module(m, g)

    # --------------------------------------------------------------------------------------- forward
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Patch embedding plus the patch part of the position embedding: `[N, L, D]`."""
        return self.patch_embed(x) + self.pos_embed[:, 1:]

    def forward_tokens(
        self, x: torch.Tensor, keep_ids: torch.Tensor | None = None, final_norm: bool = True
    ) -> torch.Tensor:
        """Token features `[N, 1 + K, D]` (cls first).

        x: images `[N, 3, H, W]`. keep_ids: `[N, K]` indices of the patches the encoder sees (all if None).
        final_norm: apply `norm` (False gives the raw last-block output, dBOT's teacher target).
        """
        tokens = self.embed(x)  # [N, L, D]
        if keep_ids is not None:
            tokens = torch.gather(tokens, 1, keep_ids.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(tokens.shape[0], -1, -1)
        tokens = torch.cat([cls, tokens], dim=1)
        tokens = self.blocks(tokens)
        return self.norm(tokens) if final_norm else tokens

    # ------------------------------------------------------------------------------------ interface
    def layer_id(self, name: str) -> int:
        """Layer index of a parameter name (the rule of BEiT/MAE layer decay)."""
        if name in ("cls_token", "pos_embed", "mask_token") or name.startswith("patch_embed"):
            return 0
        if name.startswith("blocks."):
            return int(name.split(".")[1]) + 1
        return self.num_layers


def init_module(m: nn.Module, generator: torch.Generator | None = None) -> None:
    """MAE's per-module init: xavier-uniform Linear weights, zero biases, LayerNorm weight 1 bias 0."""
    if isinstance(m, nn.Linear):
        nn.init.xavier_uniform_(m.weight, generator=generator)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm) and m.elementwise_affine:
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


def build_vit(size: str, **overrides) -> ViT:
    """A `ViT` of a preset size; overrides go to the constructor (depth, img_size, drop_path_rate, ...)."""
    return ViT(**preset(size, **overrides))
