"""Pretraining targets behind one interface (`pretrain.dbot.Target`), selected by `target.kind`:

| kind | what the student predicts | default norm / loss |
|---|---|---|
| `teacher` | a frozen ViT (`dbot.TeacherTarget`): random, bootstrapped, a checkpoint | standardize / SmoothL1 + cls |
| `timm` | a fixed pretrained timm ViT (CLIP, DINO, ...) from `target.timm.*` | layernorm / SmoothL1 (MaskDistill) |
| `pixels` | patch pixels (MAE), per-patch normalised | standardize / MSE |
| `hog` | HOG histograms per patch (MaskFeat) | none / MSE |
| `ema` | an EMA of the student, multi-fold (SdAE) | standardize / 1 - cosine |

With `teacher.bootstrap=true` every stage after the first distils from the previous stage's student
(`dbot.TeacherTarget`), whatever the first target was: the paper's study of target representations.
The `loss.*` options override every target's defaults (None keeps them).
"""

from __future__ import annotations

from pretrain.dbot import Target, TeacherTarget, normalize, token_loss
from pretrain.targets.ema import EMATarget
from pretrain.targets.hog import HOGTarget
from pretrain.targets.pixels import PixelTarget
from pretrain.targets.timm_teacher import TimmTeacherTarget

KINDS = ("teacher", "timm", "pixels", "hog", "ema")
NEEDS_STUDENT = ("teacher", "ema")  # built from the student's initial weights


def check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"target.kind: unknown target {kind!r}; valid targets: {', '.join(KINDS)}")


def build_independent(t, options: dict, patch_size: int, grid: tuple[int, int]) -> Target:
    """Targets that do not depend on the student: timm teachers, pixels, HOG. t: the `target` config
    section; options: the loss overrides (norm, loss, beta, include_cls; None = the target's default)."""
    check_kind(t.kind)
    if t.kind == "timm":
        if not t.timm.name or not t.timm.checkpoint:
            raise ValueError("target.kind=timm needs target.timm.name (a timm architecture) and target.timm.checkpoint")
        return TimmTeacherTarget(
            t.timm.name, t.timm.checkpoint, grid, tokens=t.timm.tokens, img_size=t.timm.img_size, **options
        )
    if t.kind == "pixels":
        return PixelTarget(patch_size, norm_pix=t.pixels.norm_pix, **options)
    if t.kind == "hog":
        return HOGTarget(patch_size, bins=t.hog.bins, cell=t.hog.cell, **options)
    raise ValueError(f"target.kind={t.kind} depends on the student")


def build_ema(t, options: dict, student) -> Target:
    return EMATarget(student, momentum=tuple(t.ema.momentum), every=t.ema.every, folds=t.ema.folds, **options)


__all__ = [
    "KINDS",
    "NEEDS_STUDENT",
    "Target",
    "TeacherTarget",
    "EMATarget",
    "HOGTarget",
    "PixelTarget",
    "TimmTeacherTarget",
    "build_independent",
    "build_ema",
    "check_kind",
    "normalize",
    "token_loss",
]
