"""The ADE20K segmentation options: types, ranges and the rules between options (values and comments:
configs/default.yaml).

`core.config` merges default.yaml <- recipe <- key=value into `SegmentationConfig` and checks everything here
before any compute; what needs the environment (the number of processes, the device, files on disk) is
checked by `segmentation.train.check`.
"""

from __future__ import annotations

from dataclasses import dataclass

from core.config import ConfigError, IterRunOptions, option, section
from core.vit import PRESETS, preset

SIZES = tuple(PRESETS)


@dataclass
class Model:
    size: str = option(choices=SIZES)
    img_size: int = option(ge=1)
    out_indices: list[int] = option(length=4, ge=0, order="sorted")
    drop_path: float = option(ge=0, lt=1)
    layer_scale: float | None = option(gt=0)
    rel_pos_bias: bool = option()
    grad_checkpointing: bool = option()
    channels: int = option(ge=1)
    pool_scales: list[int] = option(ge=1, min_length=1)
    dropout: float = option(ge=0, lt=1)
    aux_channels: int = option(ge=1)
    aux_weight: float = option(ge=0)
    avg_non_ignore: bool = option()


@dataclass
class Data:
    root: str = option()
    num_classes: int | None = option(ge=1, le=254)
    batch_per_gpu: int = option(ge=1)
    workers: int = option(ge=0)
    skip_corrupt: bool = option()
    check_labels: bool = option()
    scale: list[int] = option(length=2, ge=1)
    ratio_range: list[float] = option(length=2, gt=0, order="sorted")
    crop: int = option(ge=1)
    cat_max_ratio: float = option(gt=0, le=1)
    flip: float = option(ge=0, le=1)
    photometric: bool = option()


@dataclass
class Optim:
    global_batch: int = option(ge=1)
    lr: float = option(gt=0)
    weight_decay: float = option(ge=0)
    layer_decay: float = option(gt=0, le=1)
    betas: list[float] = option(length=2, ge=0, lt=1)
    warmup_iters: int = option(ge=0)
    warmup_ratio: float = option(gt=0, le=1)
    power: float = option(gt=0)
    min_lr: float = option(ge=0)
    clip_grad: float | None = option(gt=0)


@dataclass
class Eval:
    every: int | None = option(ge=1)
    stride: int = option(ge=1)
    ratios: list[float] = option(gt=0, min_length=1)
    flip: bool = option()
    window_batch: int = option(ge=1)
    workers: int = option(ge=0)


@dataclass
class SegmentationConfig(IterRunOptions):
    checkpoint: str | None = option()
    iters: int = option(ge=1)
    eval_only: bool = option()
    weights: str | None = option()
    model: Model = section(Model)
    data: Data = section(Data)
    optim: Optim = section(Optim)
    eval: Eval = section(Eval)

    @staticmethod
    def check(cfg) -> None:
        """The rules between options (each error names every option involved)."""
        m, d, o = cfg.model, cfg.data, cfg.optim
        if m.img_size != d.crop:
            raise ConfigError(f"model.img_size={m.img_size} must equal data.crop={d.crop}")
        arch = preset(m.size)
        patch = arch["patch_size"]
        if d.crop % patch or d.crop // patch % 2:
            raise ConfigError(
                f"data.crop={d.crop} must be an even multiple of the patch size {patch} (model.size={m.size})"
            )
        if any(i >= arch["depth"] for i in m.out_indices):
            raise ConfigError(
                f"model.out_indices={list(m.out_indices)}: block indices must be below the depth {arch['depth']} "
                f"of model.size={m.size}"
            )
        if cfg.eval.stride > d.crop:
            raise ConfigError(f"eval.stride={cfg.eval.stride} must be in (0, data.crop={d.crop}]")
        smallest = min(cfg.eval.ratios) * min(d.scale)
        if smallest < patch:
            raise ConfigError(
                f"eval.ratios={list(cfg.eval.ratios)} x data.scale={list(d.scale)}: the smallest evaluation scale "
                f"({smallest:g} px) is below the patch size {patch}"
            )
        if cfg.eval_only and cfg.weights is None:
            raise ConfigError("eval_only=true needs weights=<a checkpoint of this task>")
        if o.min_lr > o.lr:
            raise ConfigError(f"optim.min_lr={o.min_lr:g} is above optim.lr={o.lr:g}")

    @staticmethod
    def warnings(cfg) -> list[str]:
        """Settings that are legal but probably not meant (printed when the run starts)."""
        o = cfg.optim
        if not cfg.eval_only and o.warmup_iters > cfg.iters:
            return [
                f"optim.warmup_iters={o.warmup_iters} is longer than the run (iters={cfg.iters}): "
                "the lr never reaches its peak"
            ]
        return []
