"""The COCO detection options: types, ranges and the rules between options (values and comments:
configs/default.yaml).

`core.config` merges default.yaml <- recipe <- key=value into `DetectionConfig` and checks everything here
before any compute; what needs the environment (the number of processes, the device, files on disk, an
optional package) is checked by `detection.train.check`.
"""

from __future__ import annotations

from dataclasses import dataclass

from core.config import ConfigError, IterRunOptions, option, section
from core.vit import PRESETS, preset
from detection.evaluate import BACKENDS

SIZES = tuple(PRESETS)
NO_DECAY_KINDS = ("norm", "pos_embed")
LEVELS = 5  # the simple feature pyramid's maps p2..p6


@dataclass
class Model:
    size: str = option(choices=SIZES)
    patch_size: int | None = option(ge=1)
    drop_path: float = option(ge=0, lt=1)
    window_size: int = option(ge=1)
    global_blocks: list[int] | None = option(ge=0, order="increasing")
    grad_checkpointing: bool = option()


@dataclass
class Det:
    channels: int = option(ge=1)
    fc_dim: int = option(ge=1)
    anchor_sizes: list[int] = option(length=LEVELS, ge=1, order="increasing")
    rpn_batch_per_image: int = option(ge=1)
    rpn_pre_nms_top_n: list[int] = option(length=2, ge=1)
    rpn_post_nms_top_n: list[int] = option(length=2, ge=1)
    rois_per_image: int = option(ge=1)
    score_thresh: float = option(ge=0, lt=1)
    nms_thresh: float = option(gt=0, le=1)
    detections_per_image: int = option(ge=1)


@dataclass
class Data:
    root: str = option()
    img_size: int = option(ge=1)
    scale_range: list[float] = option(length=2, gt=0, order="sorted")
    batch_per_gpu: int = option(ge=1)
    eval_batch_per_gpu: int = option(ge=1)
    workers: int = option(ge=0)
    skip_corrupt: bool = option()


@dataclass
class Optim:
    global_batch: int = option(ge=1)
    lr: float = option(gt=0)
    betas: list[float] = option(length=2, ge=0, lt=1)
    weight_decay: float = option(ge=0)
    no_decay: list[str] = option(choices=NO_DECAY_KINDS)
    layer_decay: float = option(gt=0, le=1)
    iters: int = option(ge=1)
    steps: list[int] = option(ge=1, order="sorted")
    warmup_iters: float = option(ge=0)
    warmup_factor: float = option(gt=0, le=1)
    clip_grad: float | None = option(gt=0)


@dataclass
class Eval:
    every: int | None = option(ge=1)
    backend: str = option(choices=BACKENDS)


@dataclass
class DetectionConfig(IterRunOptions):
    checkpoint: str | None = option()
    model: Model = section(Model)
    det: Det = section(Det)
    data: Data = section(Data)
    optim: Optim = section(Optim)
    eval: Eval = section(Eval)

    @staticmethod
    def check(cfg) -> None:
        """The rules between options (each error names every option involved)."""
        o, m = cfg.optim, cfg.model
        steps = list(o.steps)
        if any(k >= o.iters for k in steps):
            raise ConfigError(f"optim.steps {steps} must lie within (0, optim.iters={o.iters})")
        arch = preset(m.size)
        patch = m.patch_size or arch["patch_size"]
        if patch < 4 or patch & (patch - 1):
            raise ConfigError(
                f"model.patch_size={patch} (model.size={m.size}): the simple feature pyramid needs a power of two "
                ">= 4; a /14 checkpoint runs at model.patch_size=16"
            )
        if cfg.data.img_size % patch:
            raise ConfigError(f"data.img_size={cfg.data.img_size} must be a multiple of the patch size {patch}")
        if m.global_blocks is not None and any(b >= arch["depth"] for b in m.global_blocks):
            raise ConfigError(
                f"model.global_blocks={list(m.global_blocks)}: block indices must be below the depth {arch['depth']} "
                f"of model.size={m.size}"
            )

    @staticmethod
    def warnings(cfg) -> list[str]:
        """Settings that are legal but probably not meant (printed when the run starts)."""
        o = cfg.optim
        if o.warmup_iters > o.iters:
            return [
                f"optim.warmup_iters={o.warmup_iters:g} is longer than the run (optim.iters={o.iters}): "
                "the lr never reaches its peak"
            ]
        return []
