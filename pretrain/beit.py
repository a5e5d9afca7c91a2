"""The symmetric BEiT-style student the authors pair with CLIP teachers (and MaskDistill uses): mask tokens
replace the masked patch embeddings at the input, all tokens go through the encoder, which has layer scale
(0.1) and a relative position bias shared by all blocks; a linear head on the final norm predicts the
target at every position. Block-wise masking (`pretrain.masking.BlockMasking`) is its usual partner.

Parameter names stay timm's (`blocks.N.ls1.gamma` for layer scale); the shared bias is `rel_pos_bias.table`
(`core.vit.RelativePositionBias`) and the head `decoder_pred`, both dropped by `core.weights.read_backbone`, so
the encoder loads into every downstream task like any other checkpoint.
"""

from __future__ import annotations

import torch
from torch import nn

from core.vit import RelativePositionBias, ViT


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
        self.init_args = dict(
            target_dim=target_dim,
            layer_scale=layer_scale,
            rel_pos_bias=rel_pos_bias,
            drop_path_rate=drop_path_rate,
            **arch,
        )
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

    def prepare_tokens(self, x: torch.Tensor, keep_ids=None, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Blocks' input `[N, 1 + L, D]`; patches where `mask` `[N, L]` is 1 are replaced by the mask token.
        keep_ids is refused: the symmetric student encodes all patches."""
        if keep_ids is not None:
            raise ValueError("the symmetric student encodes all patches; keep_ids is not supported")
        x = self.patch_embed(x)
        if mask is not None:
            w = mask.unsqueeze(-1).to(x.dtype)
            x = x * (1 - w) + self.mask_token.to(x.dtype) * w
        return self.add_cls(x + self.pos_embed[:, 1:])

    def block_biases(self, x: torch.Tensor) -> list[torch.Tensor | None]:
        """The shared relative position bias (computed once per forward) for every block."""
        bias = self.rel_pos_bias().to(x.dtype) if self.rel_pos_bias is not None else None
        return [bias] * len(self.blocks)

    def encode(self, images: torch.Tensor, mask: torch.Tensor | None = None, final_norm: bool = True):
        """Tokens `[N, 1 + L, D]` of the images with the masked patches replaced (`forward_tokens` without a
        mask: this student used as a bootstrapped teacher)."""
        tokens, _ = self.forward_blocks(self.prepare_tokens(images, mask=mask))
        return self.norm(tokens) if final_norm else tokens
