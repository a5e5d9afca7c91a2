"""A fixed pretrained teacher from any timm ViT architecture plus a weights file (CLIP ViT-B/16 or L/14 image
towers, DINO, MAE, ...), MaskDistill-style: tokens after the final norm (or its projection head, or the raw
last block), normalised with a non-affine LayerNorm, Smooth-L1 over the masked patches (Peng et al., "A Unified
View of Masked Image Modeling", 2022: MaskDistill). Its Smooth-L1 has no beta in the paper, i.e. the standard
definition (Fast R-CNN; PyTorch's default) beta = 1, which is this target's default; MaskDistill's code was
never released (microsoft/unilm `unimim/` holds only a README). dBOT's own loss uses beta 2 (`loss.beta=2`).

The teacher sees the image with its own input normalisation (from the timm pretrained config unless given)
at the resolution that gives it the student's patch grid (e.g. 224 for a /16 student -> 196 px for a /14
teacher), so every student patch has one teacher token.
"""

from __future__ import annotations

import timm
import torch
import torch.nn.functional as F

from core import checkpoint as ckpt
from core.data import IMAGENET_MEAN, IMAGENET_STD
from core.vit import resize_pos_embed
from pretrain.targets.base import Target

TOKENS = ("block", "norm", "proj")


class TimmTeacherTarget(Target):
    name = "timm"
    has_cls = True
    default_norm = "layernorm"
    default_beta = 1.0  # MaskDistill's Smooth-L1: the standard beta 1 (see the module docstring)
    default_include_cls = False

    def __init__(
        self,
        timm_name: str,
        checkpoint: str,
        grid: tuple[int, int],
        *,
        tokens: str = "norm",
        img_size: int | None = None,
        mean=None,
        std=None,
        **kw,
    ):
        if tokens not in TOKENS:
            raise ValueError(f"target.timm.tokens must be one of {TOKENS}, got {tokens!r}")
        sd = ckpt.read_state_dict(checkpoint)
        head = sd.get("head.weight")
        if tokens == "proj" and head is None:
            raise ckpt.CheckpointError(f"{checkpoint}: target.timm.tokens=proj but the file has no head.weight")
        try:
            with torch.device("meta"):  # only to read the patch size
                probe = timm.create_model(timm_name, pretrained=False, num_classes=0)
        except RuntimeError as e:
            raise ValueError(f"target.timm.name: {e}") from None
        patch = probe.patch_embed.patch_size[0]
        size = img_size or grid[0] * patch
        if size % patch or size // patch != grid[0]:
            raise ValueError(
                f"target.timm.img_size={size}: {timm_name} (patch {patch}) would see a "
                f"{size // patch}x{size // patch} grid at that resolution, not the student's {grid[0]}x{grid[1]}"
            )
        num_classes = head.shape[0] if (tokens == "proj") else 0
        model = timm.create_model(timm_name, pretrained=False, num_classes=num_classes, img_size=size)

        def pos(name, t, target):
            if name == "pos_embed":
                return resize_pos_embed(t, model.patch_embed.grid_size, num_prefix=model.num_prefix_tokens)
            return None

        ignore = (lambda k: k.startswith("head.")) if tokens != "proj" else (lambda k: False)
        ckpt.load_weights(model, sd, source=str(checkpoint), adapters=[pos], ignore=ignore)
        dim = num_classes if tokens == "proj" else model.embed_dim
        super().__init__(dim, **kw)
        self.model = model.eval().requires_grad_(False)
        self.tokens, self.size, self.timm_name = tokens, size, timm_name
        cfg = getattr(model, "pretrained_cfg", {}) or {}
        mean = mean or cfg.get("mean", IMAGENET_MEAN)
        std = std or cfg.get("std", IMAGENET_STD)
        self.register_buffer(
            "shift",
            (torch.tensor(IMAGENET_MEAN) - torch.tensor(mean)).view(1, 3, 1, 1) / torch.tensor(std).view(1, 3, 1, 1),
            persistent=False,
        )
        self.register_buffer(
            "scale", (torch.tensor(IMAGENET_STD) / torch.tensor(std)).view(1, 3, 1, 1), persistent=False
        )

    def teacher_input(self, images: torch.Tensor) -> torch.Tensor:
        """Student-normalised images -> the teacher's normalisation and resolution."""
        x = images * self.scale + self.shift
        if x.shape[-1] != self.size or x.shape[-2] != self.size:
            x = F.interpolate(x, size=(self.size, self.size), mode="bicubic", align_corners=False, antialias=True)
        return x

    def compute(self, images: torch.Tensor, mask) -> torch.Tensor:
        m = self.model
        x = m.patch_embed(self.teacher_input(images))
        x = m.norm_pre(m._pos_embed(x))
        x = m.blocks(x)
        if self.tokens in ("norm", "proj"):
            x = m.norm(x)
        if self.tokens == "proj":
            x = m.head(x)
        p = m.num_prefix_tokens
        cls = x[:, :1] if m.has_class_token else x[:, p:].mean(1, keepdim=True)
        return torch.cat([cls, x[:, p:]], dim=1)

    def resume_state(self) -> dict:
        return {}  # rebuilt from target.timm.checkpoint

    def describe(self) -> str:
        return f"timm {self.timm_name} ({self.tokens} tokens at {self.size} px)"
