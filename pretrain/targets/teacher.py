"""A frozen ViT teacher (dBOT's target): its tokens for the whole image, standardised per token, SmoothL1
beta 2 over the masked tokens and the cls token. Used for dBOT's random first teacher, for every
bootstrapped teacher, and for an external teacher given as a checkpoint of this suite's ViT family."""

from __future__ import annotations

import torch

from core.vit import ViT
from pretrain import dbot
from pretrain.targets.base import Target


class TeacherTarget(Target):
    name = "teacher"

    def __init__(self, teacher: ViT, *, final_norm: bool = False, description: str = "teacher", **kw):
        super().__init__(teacher.embed_dim, **kw)
        self.teacher = teacher
        self.final_norm = final_norm
        self.description = description

    def compute(self, images: torch.Tensor, mask) -> torch.Tensor:
        return dbot.teacher_target(self.teacher, images, final_norm=self.final_norm)

    def describe(self) -> str:
        return self.description
