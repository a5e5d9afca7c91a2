"""The symmetric BEiT-style student the authors pair with CLIP teachers (and MaskDistill uses): mask tokens
replace the masked patch embeddings at the input, all tokens go through the encoder, which has layer scale
(0.1) and a relative position bias shared by all blocks; a linear head on the final norm predicts the
target at every position. Block-wise masking (`pretrain.masking.BlockMasking`) is its usual partner.

Parameter names stay timm's (`blocks.N.ls1.gamma` for layer scale); the shared bias is
`rel_pos_bias.table` and the head `decoder_pred`, both dropped by `core.weights.read_backbone`, so the
encoder loads into every downstream task like any other checkpoint.
"""

from __future__ import annotations

import torch
from torch import nn

from core.vit import ViT


class RelativePositionBias(nn.Module):
    """BEiT's relative position bias for a `grid` of patches plus a cls token: one learnable value per head
    for each relative offset (dy, dx), and three extra entries for cls->patch, patch->cls and cls->cls.
    Returns `[1, heads, 1 + L, 1 + L]`, added to the attention logits. Zero-initialised."""

    def __init__(self, grid: tuple[int, int], num_heads: int):
        super().__init__()
        gh, gw = grid
        n_rel = (2 * gh - 1) * (2 * gw - 1)
        self.table = nn.Parameter(torch.zeros(n_rel + 3, num_heads))
        ys, xs = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")
        coords = torch.stack([ys.flatten(), xs.flatten()])  # [2, L]
        rel = coords[:, :, None] - coords[:, None, :]  # [2, L, L]
        idx = (rel[0] + gh - 1) * (2 * gw - 1) + (rel[1] + gw - 1)
        length = gh * gw
        index = torch.zeros(length + 1, length + 1, dtype=torch.long)
        index[1:, 1:] = idx
        index[0, 1:] = n_rel  # cls -> patch
        index[1:, 0] = n_rel + 1  # patch -> cls
        index[0, 0] = n_rel + 2
        self.register_buffer("index", index, persistent=False)

    def forward(self) -> torch.Tensor:
        t = self.index.shape[0]
        return self.table[self.index.flatten()].reshape(t, t, -1).permute(2, 0, 1).unsqueeze(0)


class SymmetricStudent(ViT):
    """mask `[N, L]` (1 = masked) -> prediction `[N, 1 + L, target_dim]` (cls first)."""

    def __init__(
        self,
        *,
        target_dim: int,
        layer_scale: float = 0.1,
        rel_pos_bias: bool = True,
        drop_path_rate: float = 0.0,
        **arch,
    ):
        super().__init__(fixed_pos_embed=True, init_values=layer_scale, drop_path_rate=drop_path_rate, **arch)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, self.embed_dim))
        self.rel_pos_bias = RelativePositionBias(self.grid_size, self.num_heads) if rel_pos_bias else None
        self.decoder_pred = nn.Linear(self.embed_dim, target_dim)
        self.layer_scale = layer_scale
        self.initialize_weights()

    @torch.no_grad()
    def initialize_weights(self, generator: torch.Generator | None = None) -> None:
        super().initialize_weights(generator)
        if hasattr(self, "decoder_pred"):
            nn.init.trunc_normal_(self.mask_token, std=0.02, generator=generator)
            for blk in self.blocks:
                blk.ls1.gamma.fill_(self.layer_scale)
                blk.ls2.gamma.fill_(self.layer_scale)
            if self.rel_pos_bias is not None:
                self.rel_pos_bias.table.zero_()

    def forward(self, images: torch.Tensor, mask) -> torch.Tensor:
        return self.decoder_pred(self.encode(images, mask.mask))

    def encode(self, images: torch.Tensor, mask: torch.Tensor | None = None, final_norm: bool = True):
        """Tokens `[N, 1 + L, D]`; patches where `mask` `[N, L]` is 1 are replaced by the mask token."""
        x = self.patch_embed(images)
        if mask is not None:
            w = mask.unsqueeze(-1).to(x.dtype)
            x = x * (1 - w) + self.mask_token.to(x.dtype) * w
        x = x + self.pos_embed[:, 1:]
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)
        bias = self.rel_pos_bias().to(x.dtype) if self.rel_pos_bias is not None else None
        for blk in self.blocks:
            x = blk(x, attn_mask=bias)
        return self.norm(x) if final_norm else x

    def forward_tokens(self, x: torch.Tensor, keep_ids=None, final_norm: bool = True) -> torch.Tensor:
        """Unmasked encoder tokens (this student used as a bootstrapped teacher)."""
        if keep_ids is not None:
            raise ValueError("the symmetric student encodes all patches; keep_ids is not supported")
        return self.encode(x, None, final_norm)
