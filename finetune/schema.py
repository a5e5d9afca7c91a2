"""The fine-tuning / linear-probe / transfer options: types, ranges and the rules between options (values and
comments: configs/default.yaml).

`core.config` merges default.yaml <- recipe <- key=value into `FinetuneConfig` and checks everything here
before any compute; what needs the environment (the number of processes, the device, files on disk) is
checked by `finetune.train.check`.
"""

from __future__ import annotations

from dataclasses import dataclass

from core.config import ConfigError, EpochRunOptions, option, section
from core.optim import peak_lr
from core.vit import PRESETS, preset
from finetune.data import KINDS

TASKS = ("finetune", "linprobe", "transfer")
SIZES = tuple(PRESETS)


@dataclass
class Model:
    size: str = option(choices=SIZES)
    img_size: int | None = option(ge=1)
    global_pool: str = option(choices=("avg", "token"))
    drop_path: float = option(ge=0, lt=1)
    head_init_std: float = option(gt=0)
    grad_checkpointing: bool = option()


@dataclass
class Data:
    kind: str = option(choices=KINDS)
    root: str = option()
    num_classes: int | None = option(ge=2)
    batch_per_gpu: int = option(ge=1)
    eval_batch_per_gpu: int = option(ge=1)
    workers: int = option(ge=0)
    skip_corrupt: bool = option()


@dataclass
class Aug:
    crop_scale: list[float] = option(length=2, gt=0, le=1, order="sorted")
    auto_augment: str | None = option()
    reprob: float = option(ge=0, le=1)
    mixup: float = option(ge=0)
    cutmix: float = option(ge=0)
    mixup_prob: float = option(ge=0, le=1)
    mixup_switch_prob: float = option(ge=0, le=1)
    smoothing: float = option(ge=0, lt=1)
    eval_crop_pct: float | None = option(gt=0, le=1)


@dataclass
class Optim:
    name: str = option(choices=("adamw", "lars"))
    global_batch: int = option(ge=1)
    blr: float = option(gt=0)
    lr: float | None = option(gt=0)
    min_lr: float = option(ge=0)
    warmup_epochs: float = option(ge=0)
    weight_decay: float = option(ge=0)
    skip_decay: str = option(choices=("standard", "none"))
    layer_decay: float = option(gt=0, le=1)
    betas: list[float] = option(length=2, ge=0, lt=1)
    clip_grad: float | None = option(gt=0)


@dataclass
class FinetuneConfig(EpochRunOptions):
    task: str = option(choices=TASKS)
    checkpoint: str | None = option()
    epochs: int = option(ge=1)
    model: Model = section(Model)
    data: Data = section(Data)
    aug: Aug = section(Aug)
    optim: Optim = section(Optim)

    @staticmethod
    def check(cfg) -> None:
        """The rules between options (each error names every option involved)."""
        o, m = cfg.optim, cfg.model
        arch = preset(m.size, **({"img_size": m.img_size} if m.img_size else {}))
        if arch["img_size"] % arch["patch_size"]:
            raise ConfigError(
                f"model.img_size={arch['img_size']} must be a multiple of the patch size {arch['patch_size']}"
            )
        if o.name == "lars" and o.weight_decay:
            raise ConfigError(
                f"optim.weight_decay={o.weight_decay} with optim.name=lars: timm's LARS folds weight decay "
                "into the trust ratio differently from MAE's; the MAE linear probe uses 0"
            )
        lr = peak_lr(o)
        if o.min_lr > lr:
            raise ConfigError(
                f"optim.min_lr={o.min_lr:g} is above the peak lr {lr:g} (optim.lr, or optim.blr x global_batch / 256)"
            )
        if cfg.aug.auto_augment and cfg.task != "linprobe":
            from timm.data import create_transform

            try:
                create_transform(input_size=arch["img_size"], is_training=True, auto_augment=cfg.aug.auto_augment)
            except (AssertionError, ValueError, KeyError, IndexError) as e:
                raise ConfigError(
                    f"aug.auto_augment={cfg.aug.auto_augment!r}: not a timm augmentation policy ({e}); "
                    "e.g. rand-m9-mstd0.5-inc1, augmix-m5-w4-d2, original, or null for none"
                ) from None

    @staticmethod
    def warnings(cfg) -> list[str]:
        """Settings that are legal but probably not meant (printed when the run starts)."""
        o = cfg.optim
        if o.warmup_epochs > cfg.epochs:
            return [
                f"optim.warmup_epochs={o.warmup_epochs:g} is longer than the run (epochs={cfg.epochs}): "
                "the lr never reaches its peak"
            ]
        return []
