"""dBOT in one file: mask -> teacher -> target -> loss -> stage switch. This is the code training runs.

Masked knowledge distillation with bootstrapped teachers (Liu et al., 2022). A student encoder sees 25% of
the patches; its decoder predicts, at every position, the features a frozen teacher computes from the
whole image. Training runs in stages: the first teacher is a randomly initialised network, and at each
stage boundary the teacher is replaced by the current student encoder and the student starts again from
a fresh initialisation.

Everything here follows the authors' released code (docs/PRETRAIN.md lists the choices and the flaws not
repeated): per-sample random masking by argsort of uniform noise; target = raw output of the teacher's last
block, cls token included; each target token standardised over channels; SmoothL1 with beta 2, averaged
over channels, then over the masked tokens plus the cls token. Other first-stage targets (pixels, HOG, an
EMA teacher, a pretrained timm network) implement the same `Target` interface in `pretrain/targets/`.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from core import checkpoint as ckpt
from core.vit import ViT
from core.weights import read_backbone
from pretrain.beit import SymmetricStudent


# ----------------------------------------------------------------------------------------------- 1. mask
@dataclass
class Mask:
    """mask `[N, L]` (1 = masked). From random masking also keep_ids `[N, K]` (the visible patches the
    asymmetric encoder sees), restore_ids `[N, L]` (the inverse shuffle) and masked_ids `[N, L - K]`."""

    mask: torch.Tensor
    keep_ids: torch.Tensor | None = None
    restore_ids: torch.Tensor | None = None
    masked_ids: torch.Tensor | None = None


def random_masking(noise: torch.Tensor, mask_ratio: float) -> Mask:
    """Per-sample random masking defined by `noise` `[N, L]` (uniform; the smallest values are kept):
    K = int(L * (1 - mask_ratio)) patches stay visible. Gathering `[kept, masked]` tokens with
    `restore_ids` puts them back in the original patch order."""
    n, length = noise.shape
    keep = int(length * (1 - mask_ratio))
    shuffle = torch.argsort(noise, dim=1)
    restore = torch.argsort(shuffle, dim=1)
    mask = torch.ones(n, length, device=noise.device)
    mask[:, :keep] = 0
    mask = torch.gather(mask, 1, restore)
    return Mask(mask=mask, keep_ids=shuffle[:, :keep], restore_ids=restore, masked_ids=shuffle[:, keep:])


# -------------------------------------------------------------------------------------------- 2. teacher
PRETRAIN_ONLY = ("decoder_", "mask_token", "rel_pos_bias")  # student parts a plain ViT encoder does not have


def encoder_state(student: nn.Module, clone: bool = True) -> dict:
    """The student's encoder weights (decoder, mask token and other pretraining-only parts dropped),
    detached copies unless clone=False."""
    return {
        k: v.detach().clone() if clone else v.detach()
        for k, v in student.state_dict().items()
        if not k.startswith(PRETRAIN_ONLY)
    }


def make_teacher(arch: dict, state_dict: dict | None = None) -> ViT:
    """A frozen ViT teacher of architecture `arch` (core.vit preset kwargs; no decoder, no drop path),
    optionally loaded from `state_dict`. Every teacher tensor must come from the state dict; of its other
    entries only the pretraining-only parts and blocks deeper than the teacher may be left out (a truncated
    copy), so nothing the teacher should have is silently dropped."""
    teacher = ViT(**{**arch, "drop_path_rate": 0.0}, fixed_pos_embed=True)
    if state_dict is not None:
        own = teacher.state_dict()
        missing = [k for k in own if k not in state_dict]
        depth = len(teacher.blocks)
        extra = [
            k
            for k in state_dict
            if k not in own
            and not k.startswith(PRETRAIN_ONLY)
            and not (k.startswith("blocks.") and int(k.split(".")[1]) >= depth)
        ]
        if missing or extra:
            raise ValueError(
                f"teacher weights do not fit a ViT {arch}: missing {missing[:6]}, not used {extra[:6]}"
                + (
                    " (layer scale: a BEiT-style student's copy is a SymmetricStudent)"
                    if any(".ls" in k for k in extra)
                    else ""
                )
            )
        teacher.load_state_dict({k: state_dict[k] for k in own})
    teacher.requires_grad_(False)
    return teacher.eval()


def frozen_copy(student: nn.Module, depth: int | None = None) -> nn.Module:
    """The student's encoder as a frozen teacher, optionally truncated to its first `depth` blocks: a plain
    ViT for the asymmetric student; for the BEiT-style student the same symmetric network (layer scale and
    shared relative position bias included), whose encoder tokens are its `forward_tokens`."""
    depth = len(student.blocks) if depth is None else depth
    if isinstance(student, SymmetricStudent):
        teacher = SymmetricStudent(**{**student.init_args, "depth": depth, "drop_path_rate": 0.0})
        own = teacher.state_dict()
        teacher.load_state_dict({k: v.detach().clone() for k, v in student.state_dict().items() if k in own})
        return teacher.requires_grad_(False).eval()
    return make_teacher({**student.arch, "depth": depth}, encoder_state(student))


def first_teacher(student: nn.Module, arch: dict, *, checkpoint=None, seed=None, final_norm: bool = False):
    """The stage-0 teacher of architecture `arch` and a description: a checkpoint any converter reads, an
    independently seeded random ViT, or (released dBOT) the student's own initial encoder, frozen and
    truncated to `arch["depth"]` blocks (ViT-L/H use depth 0: random patch embedding + sin-cos positions)."""
    if checkpoint is not None:
        teacher = make_teacher(arch)
        sd, info = read_backbone(checkpoint)
        report = ckpt.load_weights(
            teacher, sd, source=str(checkpoint), allow_missing=lambda k: k.startswith("norm.") and not final_norm
        )
        return teacher, f"checkpoint {checkpoint} ({info.layout}; {report.summary().splitlines()[0]})"
    if seed is not None:
        teacher = make_teacher(arch)
        teacher.initialize_weights(torch.Generator().manual_seed(int(seed)))
        return teacher, f"random, seed {seed}"
    teacher = frozen_copy(student, arch["depth"])
    return teacher, f"random = the student's initial encoder, depth {len(teacher.blocks)}"


def teacher_spec(teacher: nn.Module) -> dict:
    """What rebuilds a teacher's architecture (stored in checkpoints; `build_teacher` reads it back)."""
    if isinstance(teacher, SymmetricStudent):
        return {"kind": "beit", "args": dict(teacher.init_args)}
    return {"kind": "vit", "args": dict(teacher.arch)}


def build_teacher(spec: dict) -> nn.Module:
    """An (untrained, frozen) teacher of the architecture `teacher_spec` recorded; load its weights next."""
    if spec["kind"] == "beit":
        teacher = SymmetricStudent(**{**spec["args"], "drop_path_rate": 0.0})
        return teacher.requires_grad_(False).eval()
    return make_teacher(spec["args"])


# --------------------------------------------------------------------------------------------- 3. target
def standardize(target: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Each token standardised over channels: (t - mean) / sqrt(var + eps), var unbiased as in the
    released code (`Tensor.var` default)."""
    mean = target.mean(dim=-1, keepdim=True)
    var = target.var(dim=-1, keepdim=True)
    return (target - mean) / (var + eps).sqrt()


def normalize(t: torch.Tensor, how: str, eps: float = 1e-6) -> torch.Tensor:
    """Per-token target normalisation over channels: `standardize` (mean / unbiased var: released dBOT and
    MAE's norm_pix_loss), `layernorm` (biased var, no affine: MaskDistill), or `none`."""
    if how == "standardize":
        return standardize(t, eps)
    if how == "layernorm":
        return F.layer_norm(t, t.shape[-1:], eps=eps)
    if how == "none":
        return t
    raise ValueError(f"loss.norm must be standardize, layernorm or none; got {how!r}")


class Target(nn.Module):
    """What the student predicts: target tokens `[N, 1 + L, dim]` for a batch of images and its `Mask`
    (cls row first; zeros where a target has no cls token), and the loss of a prediction of them.
    Subclasses set `name`, `dim`, `has_cls` and the loss defaults and implement `compute`; norm / loss /
    beta / include_cls given as None take the subclass defaults. Hooks let a target change after optimizer
    steps or epochs (an EMA teacher)."""

    name = "target"
    has_cls = True
    default_norm = "standardize"
    default_loss = "smooth_l1"
    default_beta = 2.0
    default_include_cls = True

    def __init__(self, dim: int, *, norm=None, loss=None, beta=None, include_cls=None):
        super().__init__()
        self.dim = dim
        self.norm = norm or self.default_norm
        self.loss_kind = loss or self.default_loss
        self.beta = self.default_beta if beta is None else float(beta)
        self.include_cls = (self.default_include_cls if include_cls is None else include_cls) and self.has_cls

    def compute(self, images: torch.Tensor, mask: Mask) -> torch.Tensor:  # pragma: no cover - interface
        """Raw target tokens `[N, 1 + L, dim]` for images `[N, 3, H, W]` (no gradient)."""
        raise NotImplementedError

    def forward(self, images: torch.Tensor, mask: Mask) -> torch.Tensor:
        """Normalised target tokens, no gradient. Eagerly the teacher runs under inference_mode (no autograd
        bookkeeping at all) and the result is cloned into a normal tensor, which the loss's backward may save;
        inside torch.compile plain no_grad, which the compiler treats the same way."""
        if torch.compiler.is_compiling():
            with torch.no_grad():
                return normalize(self.compute(images, mask).float(), self.norm)
        with torch.inference_mode():
            out = normalize(self.compute(images, mask).float(), self.norm)
        return out.clone()

    def loss(self, pred: torch.Tensor, target: torch.Tensor, mask: Mask) -> torch.Tensor:
        """`distill_loss` over the masked tokens (and the cls token if the target has one and include_cls)."""
        return distill_loss(pred, target, mask.mask, kind=self.loss_kind, beta=self.beta, include_cls=self.include_cls)

    def options(self) -> dict:
        return dict(norm=self.norm, loss=self.loss_kind, beta=self.beta, include_cls=self.include_cls)

    # hooks: `epoch` is the 0-based epoch within the current stage, `epochs` the stage's length (schedules
    # restart every stage, as the learning rate does)
    def after_step(self, student: nn.Module, epoch: int, epochs: int) -> None:
        """Called after every optimizer step of epoch `epoch` (EMA teachers updated per iteration)."""

    def after_epoch(self, student: nn.Module, epoch: int, epochs: int) -> None:
        """Called at the end of epoch `epoch`, before the stage switch."""

    def resume_state(self) -> dict:
        """What checkpoint-last.pth stores to restore this target (its weights by default)."""
        return self.state_dict()

    def describe(self) -> str:
        return self.name


class TeacherTarget(Target):
    """dBOT's target: a frozen network's tokens for the whole image (raw last block by default), cls
    included. The random first teacher, every bootstrapped teacher, a teacher checkpoint."""

    name = "teacher"

    def __init__(self, teacher: nn.Module, *, final_norm: bool = False, description: str = "teacher", **loss):
        super().__init__(teacher.embed_dim, **loss)
        self.teacher, self.final_norm, self.description = teacher, final_norm, description

    def compute(self, images: torch.Tensor, mask: Mask) -> torch.Tensor:
        return teacher_target(self.teacher, images, final_norm=self.final_norm)

    def describe(self) -> str:
        return self.description


@torch.no_grad()
def teacher_target(teacher: nn.Module, images: torch.Tensor, final_norm: bool = False) -> torch.Tensor:
    """The teacher's tokens for the whole image `[N, 1 + L, C]` (cls first), as float32."""
    teacher.eval()
    return teacher.forward_tokens(images, final_norm=final_norm).float()


# ----------------------------------------------------------------------------------------------- 4. loss
def token_loss(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor, kind: str, beta: float = 2.0):
    """Mean of a per-token loss over the tokens with weight 1 (`weight` `[N, T]`). kind: `smooth_l1`
    (beta, mean over channels), `mse` (mean over channels), `cosine` (1 - cosine similarity)."""
    pred = pred.float()
    if kind == "smooth_l1":
        per_token = F.smooth_l1_loss(pred, target, beta=beta, reduction="none").mean(-1)
    elif kind == "mse":
        per_token = ((pred - target) ** 2).mean(-1)
    elif kind == "cosine":
        per_token = 1 - F.cosine_similarity(pred, target, dim=-1)
    else:
        raise ValueError(f"loss.kind must be smooth_l1, mse or cosine; got {kind!r}")
    return (per_token * weight).sum() / weight.sum().clamp_min(1)


def distill_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    mask: torch.Tensor,
    *,
    kind: str = "smooth_l1",
    beta: float = 2.0,
    include_cls: bool = True,
) -> torch.Tensor:
    """The loss between prediction and target `[N, 1 + L, C]` (dBOT: SmoothL1 beta 2, mean over channels)
    averaged over the masked positions of `mask` `[N, L]` (1 = masked) and, with include_cls, the cls
    token."""
    cls_weight = torch.full_like(mask[:, :1], 1.0 if include_cls else 0.0)
    return token_loss(pred, target, torch.cat([cls_weight, mask], dim=1), kind, beta)


def distill(student: nn.Module, target: Target, images: torch.Tensor, mask: Mask) -> torch.Tensor:
    """One micro-batch: the target of the whole image, the student's prediction from the visible patches,
    their loss."""
    goal = target(images, mask)  # [N, 1 + L, C], no gradient
    pred = student(images, mask)  # [N, 1 + L, C]
    return target.loss(pred, goal, mask)


# --------------------------------------------------------------------------------------------- 5. stages
class Stages:
    """Stage boundaries in epochs, e.g. [0, 800, 1600] = two stages of 800 epochs."""

    def __init__(self, boundaries):
        b = [int(x) for x in boundaries]
        if len(b) < 2 or b[0] != 0 or any(y <= x for x, y in zip(b, b[1:])):
            raise ValueError(f"stages.epochs must start at 0 and strictly increase, got {b}")
        self.boundaries = b

    def __len__(self) -> int:
        return len(self.boundaries) - 1

    @property
    def total_epochs(self) -> int:
        return self.boundaries[-1]

    def stage_of(self, epoch: int) -> int:
        for s in range(len(self)):
            if epoch < self.boundaries[s + 1]:
                return s
        raise ValueError(f"epoch {epoch} is past the last stage ({self.total_epochs} epochs)")

    def start(self, stage: int) -> int:
        return self.boundaries[stage]

    def length(self, stage: int) -> int:
        return self.boundaries[stage + 1] - self.boundaries[stage]

    def is_last_epoch_of_stage(self, epoch: int) -> bool:
        return epoch + 1 in self.boundaries[1:]


def reinitialize(model: nn.Module, seed: int) -> None:
    """Re-run the model's initialisation from a seed, on CPU (so the values do not depend on the device or
    on the caller's RNG), and copy the result into the existing parameters (optimizers keep their refs)."""
    fresh = copy.deepcopy(model).to("cpu")
    fresh.initialize_weights(torch.Generator().manual_seed(seed))
    with torch.no_grad():
        for p, q in zip(model.state_dict().values(), fresh.state_dict().values()):
            p.copy_(q)


def next_stage(
    student: nn.Module,
    target: Target,
    stage: int,
    *,
    seed: int,
    depth: int,
    bootstrap: bool,
    build_student,
    **teacher_options,
) -> tuple[nn.Module, Target, bool]:
    """The switch to `stage`. With `bootstrap` the target becomes the current student's encoder, frozen
    (`teacher_options`: final_norm and the loss options); otherwise it stays. The student starts again: re-
    initialised in place from the stage seed when its shape stays (optimizer moments and loss scaler then
    carry over, as released), else rebuilt as `build_student(depth, target_dim)` (another depth or teacher
    width). Returns (student, target, rebuilt)."""
    if bootstrap:
        description = f"bootstrapped: stage-{stage - 1} student"
        target = TeacherTarget(frozen_copy(student), description=description, **teacher_options)
    if depth == len(student.blocks) and target.dim == student.decoder_pred.out_features:
        reinitialize(student, seed)
        return student, target, False
    return build_student(depth, target.dim), target, True
