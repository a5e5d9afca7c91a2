"""The backbone interface every task's ViT shares, and the ViT of pretraining, fine-tuning and segmentation.

`Backbone` is the interface: what layer decay, weight decay, memory saving and feature taps read from a model,
so that no task walks the blocks or matches parameter names itself.

- `forward_blocks(x, taps)`: the one loop over `self.blocks`, with the attention bias of each block
  (`block_biases`, none by default; a relative position bias where a model has one) and gradient
  checkpointing (`set_grad_checkpointing`, timm's switch; config key `grad_checkpointing` in every task);
  returns the last block's output and the outputs of the blocks in `taps`;
- `layer_id(name)` / `num_layers`: the layer index behind layer-wise lr decay (cls/pos/patch-embed and mask
  token 0, block i -> i + 1, everything after the blocks -> depth + 1; the MAE/BEiT rule, and detectron2's
  `get_vit_lr_decay_rate`);
- `no_weight_decay()`: the names the model asks to exempt from weight decay (timm's method; `core.optim`'s
  named rules decide whether a recipe honours it).

`ViT` is timm's `VisionTransformer` with that interface (parameter names are timm's and MAE's:
`patch_embed.proj`, `cls_token`, `pos_embed`, `blocks.N.attn.qkv`, `norm`, `fc_norm`, `head`), plus
- `forward_tokens(x, keep_ids=None)`: token features `[N, 1 + K, D]` of the whole image or of a subset of
  patches (the masked-autoencoder encoder), before or after the final norm;
- `forward_intermediates(x, indices)`: timm's feature-tap method (same arguments and outputs), run through
  `forward_blocks` so the per-block bias and checkpointing apply;
- `initialize_weights(generator)`: MAE's initialisation, reproducible from a seed.
It is the encoder of pretraining (`pretrain.model`, `pretrain.beit`), fine-tuning and segmentation
(`segmentation.backbone.SegViT`). Detection's ViTDet backbone (`detection.backbone`) runs timm's SAM-style
window-attention blocks on a `[N, H, W, C]` map, so it is not a `ViT`, but it is a `Backbone` too.
`RelativePositionBias` / `relative_position_bias` are BEiT's relative position bias, the one implementation
used by the BEiT-style student (one table shared by all blocks) and the segmentation backbone (one per block).

Size presets (`PRESETS`) hold only architecture; training settings live in each task's recipe files.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from functools import partial

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import nn
from torch.utils.checkpoint import checkpoint

# Architecture presets. `tiny` is the CPU demo size (32 px images, 4 px patches).
PRESETS: dict[str, dict] = {
    "tiny": dict(img_size=32, patch_size=4, embed_dim=96, depth=4, num_heads=3),
    # the study (tools/study/): claim (d)'s wider teacher at the CPU scale; the GPU scale's student and teacher
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


def take_indices(depth: int, indices: int | Sequence[int] | None) -> list[int]:
    """Block indices to tap, as timm's `forward_intermediates` reads them: None = every block, an int n = the
    last n blocks, a sequence = those blocks (negative counts from the end)."""
    if indices is None:
        return list(range(depth))
    if isinstance(indices, int):
        if not 0 < indices <= depth:
            raise ValueError(f"cannot take the last {indices} of {depth} blocks")
        return list(range(depth - indices, depth))
    out = [i + depth if i < 0 else int(i) for i in indices]
    if not all(0 <= i < depth for i in out):
        raise ValueError(f"block indices {list(indices)} out of range for {depth} blocks")
    return out


# ---------------------------------------------------------------------------------- relative position bias
def relative_position_index(grid: tuple[int, int]) -> torch.Tensor:
    """`[1 + L, 1 + L]` indices into a table of `(2 gh - 1)(2 gw - 1) + 3` rows (BEiT's layout): patch pairs
    index their offset `(dy + gh - 1) * (2 gw - 1) + (dx + gw - 1)`; the last three rows are cls -> patch,
    patch -> cls and cls -> cls."""
    gh, gw = grid
    n_rel = (2 * gh - 1) * (2 * gw - 1)
    ys, xs = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")
    ys, xs = ys.flatten(), xs.flatten()
    dy = ys[:, None] - ys[None, :] + gh - 1  # [L, L]
    dx = xs[:, None] - xs[None, :] + gw - 1
    index = torch.empty(gh * gw + 1, gh * gw + 1, dtype=torch.long)
    index[1:, 1:] = dy * (2 * gw - 1) + dx
    index[0, 1:] = n_rel
    index[1:, 0] = n_rel + 1
    index[0, 0] = n_rel + 2
    return index


def relative_position_bias(table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """table `[rows, heads]`, index `[T, T]` -> bias `[1, heads, T, T]` added to the attention logits.

    index_select, not `table[index]`: the backward of advanced indexing accumulates in a varying order on CPU,
    which would break bit-exact resume."""
    t = index.shape[0]
    rows = table.index_select(0, index.flatten())  # [T * T, heads]
    return rows.reshape(t, t, -1).permute(2, 0, 1).unsqueeze(0)


class RelativePositionBias(nn.Module):
    """BEiT's relative position bias for a `grid` of patches plus a cls token: one learnable value per head
    for each relative offset (dy, dx) and three for cls -> patch, patch -> cls, cls -> cls (`table`,
    zero-initialised). `forward()` -> `[1, heads, 1 + L, 1 + L]`."""

    def __init__(self, grid: tuple[int, int], num_heads: int):
        super().__init__()
        gh, gw = grid
        self.table = nn.Parameter(torch.zeros((2 * gh - 1) * (2 * gw - 1) + 3, num_heads))
        self.register_buffer("index", relative_position_index(grid), persistent=False)

    def forward(self) -> torch.Tensor:
        return relative_position_bias(self.table, self.index)


# -------------------------------------------------------------------------------------------- interface
class Backbone:
    """The interface the tasks read from a ViT-like module with `self.blocks` (mixed into `nn.Module`s)."""

    grad_checkpointing: bool = False

    @property
    def num_layers(self) -> int:
        """Layer count for layer decay: the embedding (0), one per block, and everything after (depth+1)."""
        return len(self.blocks) + 1

    def layer_id(self, name: str) -> int:
        """Layer index of a parameter name (names relative to this module; the BEiT/MAE layer-decay rule)."""
        if name in ("cls_token", "pos_embed", "mask_token") or name.startswith("patch_embed"):
            return 0
        if name.startswith("blocks."):
            return int(name.split(".")[1]) + 1
        return self.num_layers

    def no_weight_decay(self) -> set[str]:
        """Names of the position embedding and prefix tokens this model has (timm's `no_weight_decay`)."""
        return {n for n in ("pos_embed", "cls_token", "dist_token", "reg_token") if getattr(self, n, None) is not None}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in the backward pass while training (timm's switch)."""
        self.grad_checkpointing = enable

    def block_biases(self, x: torch.Tensor) -> list[torch.Tensor | None]:
        """The attention bias added to each block's logits for input `x` (`[1, heads, T, T]` or None)."""
        return [None] * len(self.blocks)

    def forward_blocks(
        self, x: torch.Tensor, taps: Sequence[int] = (), tap: Callable[[torch.Tensor], object] | None = None
    ) -> tuple[torch.Tensor, list]:
        """x through every block (with its bias; checkpointed when enabled and training) -> (last output,
        outputs of the blocks in `taps`, in block order, each passed through `tap` as soon as it is made)."""
        feats = []
        for i, (blk, bias) in enumerate(zip(self.blocks, self.block_biases(x))):
            args = (x,) if bias is None else (x, bias)
            if self.grad_checkpointing and self.training:
                x = checkpoint(blk, *args, use_reentrant=False)
            else:
                x = blk(*args)
            if i in taps:
                feats.append(x if tap is None else tap(x))
        return x, feats


class ViT(Backbone, VisionTransformer):
    """timm VisionTransformer with the shared backbone interface.

    Args beyond timm's: `fixed_pos_embed` makes `pos_embed` a frozen sin-cos table (MAE/dBOT pretraining);
    otherwise it is a learnable parameter (fine-tuning loads it from the checkpoint). `grad_checkpointing`
    turns on `set_grad_checkpointing`.
    """

    def __init__(
        self, *, fixed_pos_embed: bool = False, num_classes: int = 0, grad_checkpointing: bool = False, **kwargs
    ):
        kwargs.setdefault("norm_layer", partial(nn.LayerNorm, eps=1e-6))
        kwargs.setdefault("qkv_bias", True)
        super().__init__(num_classes=num_classes, weight_init="skip", **kwargs)
        self.num_heads = kwargs.get("num_heads", 12)
        self.fixed_pos_embed = fixed_pos_embed
        if fixed_pos_embed:
            self.pos_embed.requires_grad_(False)
        self.set_grad_checkpointing(grad_checkpointing)
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

    def add_cls(self, tokens: torch.Tensor) -> torch.Tensor:
        """`[N, K, D]` patch tokens -> `[N, 1 + K, D]` with the cls token (plus its position) first."""
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(tokens.shape[0], -1, -1)
        return self.pos_drop(torch.cat([cls, tokens], dim=1))

    def prepare_tokens(self, x: torch.Tensor, keep_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Images `[N, 3, H, W]` -> the blocks' input `[N, 1 + K, D]`; keep_ids `[N, K]`: the patches kept."""
        tokens = self.embed(x)  # [N, L, D]
        if keep_ids is not None:
            tokens = torch.gather(tokens, 1, keep_ids.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))
        return self.add_cls(tokens)

    def forward_tokens(
        self, x: torch.Tensor, keep_ids: torch.Tensor | None = None, final_norm: bool = True
    ) -> torch.Tensor:
        """Token features `[N, 1 + K, D]` (cls first).

        x: images `[N, 3, H, W]`. keep_ids: `[N, K]` indices of the patches the encoder sees (all if None).
        final_norm: apply `norm` (False gives the raw last-block output, dBOT's teacher target).
        """
        tokens, _ = self.forward_blocks(self.prepare_tokens(x, keep_ids))
        return self.norm(tokens) if final_norm else tokens

    def forward_features(self, x: torch.Tensor, attn_mask=None, is_causal: bool = False) -> torch.Tensor:
        """timm's `forward_features` (what `forward` and so the classifier run) through the shared loop: equal
        to timm's own; attention masks come from `block_biases`, not from the caller."""
        if attn_mask is not None or is_causal:
            raise ValueError("ViT.forward_features takes no attn_mask/is_causal; a model's bias is block_biases()")
        return self.forward_tokens(x)

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | Sequence[int] | None = None,
        return_prefix_tokens: bool = False,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ):
        """timm's feature taps: the outputs of blocks `indices` (see `take_indices`), as maps `[N, D, gh, gw]`
        (`NCHW`) or tokens `[N, L, D]` (`NLC`) without the cls token (paired with it if
        `return_prefix_tokens`), after the final norm if `norm`. Returns the list if `intermediates_only`, else
        (final-normed last-block tokens, list). `stop_early` is accepted for timm's signature; every block runs.
        """
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be NCHW or NLC, got {output_fmt!r}")
        n, p = x.shape[0], self.num_prefix_tokens
        gh, gw = self.grid_size

        def tap(f: torch.Tensor):  # [N, P + L, D] -> [N, D, gh, gw] or [N, L, D] (, prefix [N, P, D])
            f = self.norm(f) if norm else f
            patches = f[:, p:]
            if output_fmt == "NCHW":
                patches = patches.transpose(1, 2).reshape(n, -1, gh, gw)
            return (patches, f[:, :p]) if return_prefix_tokens else patches

        last, feats = self.forward_blocks(self.prepare_tokens(x), take_indices(len(self.blocks), indices), tap)
        return feats if intermediates_only else (self.norm(last), feats)


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
