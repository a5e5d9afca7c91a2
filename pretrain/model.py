"""The dBOT student: MAE's asymmetric encoder-decoder with a head that predicts the teacher's features.

Parameter names are MAE's (`patch_embed`, `cls_token`, `pos_embed`, `blocks`, `norm`, `decoder_embed`,
`mask_token`, `decoder_pos_embed`, `decoder_blocks`, `decoder_norm`, `decoder_pred`), so the encoder part
is a timm ViT state dict as it stands.
"""

from __future__ import annotations

from functools import partial

import torch
from timm.layers import calculate_drop_path_rates
from timm.models.vision_transformer import Block
from torch import nn

from core.vit import ViT, sincos_pos_embed_2d


class MaskedStudent(ViT):
    """Encoder on the visible patches + cls; decoder on all positions with mask tokens.

    arch: core.vit preset kwargs of the encoder. target_dim: width of the teacher's tokens (the decoder's
    output), which may differ from the encoder width (a ViT-L teacher for a ViT-B student).
    Drop path `drop_path_rate` applies to encoder and decoder blocks (linearly increasing in each).
    """

    def __init__(
        self,
        *,
        target_dim: int,
        decoder_dim: int = 512,
        decoder_depth: int = 8,
        decoder_heads: int = 16,
        drop_path_rate: float = 0.0,
        **arch,
    ):
        super().__init__(fixed_pos_embed=True, drop_path_rate=drop_path_rate, **arch)
        norm = partial(nn.LayerNorm, eps=1e-6)
        self.decoder_embed = nn.Linear(self.embed_dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, self.num_patches + 1, decoder_dim), requires_grad=False)
        dpr = calculate_drop_path_rates(drop_path_rate, decoder_depth)
        self.decoder_blocks = nn.ModuleList(
            Block(decoder_dim, decoder_heads, mlp_ratio=4.0, qkv_bias=True, drop_path=dpr[i], norm_layer=norm)
            for i in range(decoder_depth)
        )
        self.decoder_norm = norm(decoder_dim)
        self.decoder_pred = nn.Linear(decoder_dim, target_dim)
        self.initialize_weights()

    @torch.no_grad()
    def initialize_weights(self, generator: torch.Generator | None = None) -> None:
        super().initialize_weights(generator)  # encoder, and xavier/LayerNorm init of every submodule
        if hasattr(self, "decoder_pos_embed"):
            self.decoder_pos_embed.copy_(sincos_pos_embed_2d(self.decoder_pos_embed.shape[-1], self.grid_size))
            nn.init.normal_(self.mask_token, std=0.02, generator=generator)

    def forward_decoder(self, latent: torch.Tensor, restore_ids: torch.Tensor) -> torch.Tensor:
        """latent `[N, 1 + K, D]` -> prediction `[N, 1 + L, target_dim]` in the original patch order."""
        x = self.decoder_embed(latent)
        n, length = restore_ids.shape
        mask_tokens = self.mask_token.expand(n, length - (x.shape[1] - 1), -1)
        seq = torch.cat([x[:, 1:], mask_tokens], dim=1)
        seq = torch.gather(seq, 1, restore_ids.unsqueeze(-1).expand(-1, -1, seq.shape[-1]))
        x = torch.cat([x[:, :1], seq], dim=1) + self.decoder_pos_embed
        for blk in self.decoder_blocks:
            x = blk(x)
        return self.decoder_pred(self.decoder_norm(x))

    def forward(self, images: torch.Tensor, mask) -> torch.Tensor:
        """images `[N, 3, H, W]` and a random-masking `Mask` -> prediction `[N, 1 + L, C]`."""
        latent = self.forward_tokens(images, keep_ids=mask.keep_ids, final_norm=True)
        return self.forward_decoder(latent, mask.restore_ids)
