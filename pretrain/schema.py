"""The pretraining options: types, ranges and the rules between options (values and comments: configs/default.yaml).

`core.config` merges default.yaml <- recipe <- key=value into `PretrainConfig` and checks everything here
before any compute; what needs the environment (the number of processes, the device, files on disk) is
checked by `pretrain.train.Plan`. The values derived from the options (the stages, the architecture of the
student and of the first teacher, the peak lr) are computed in one place, `derive`, which both use.
"""

from __future__ import annotations

from dataclasses import dataclass

from core.config import SEED_MAX, ConfigError, EpochRunOptions, option, section
from core.optim import peak_lr
from core.vit import PRESETS, preset
from pretrain.datapath import BACKENDS
from pretrain.dbot import Stages
from pretrain.targets import KINDS
from pretrain.targets.ema import COSINE_OVER, EVERY
from pretrain.targets.timm_teacher import TOKENS

SIZES = tuple(PRESETS)


@dataclass
class Decoder:
    dim: int = option(ge=1)
    depth: int = option(ge=1)
    heads: int = option(ge=1)


@dataclass
class Model:
    kind: str = option(choices=("mae", "beit"))
    size: str = option(choices=SIZES)
    img_size: int | None = option(ge=1)
    embed_dim: int | None = option(ge=1)
    num_heads: int | None = option(ge=1)
    depth_per_stage: list[int] | None = option(ge=1, min_length=1)
    drop_path: float = option(ge=0, lt=1)
    grad_checkpointing: bool = option()
    mask_ratio: float = option(gt=0, lt=1)
    masking: str = option(choices=("random", "block"))
    decoder: Decoder = section(Decoder)
    layer_scale: float | None = option(gt=0)
    rel_pos_bias: bool = option()


@dataclass
class Timm:
    name: str | None = option()
    checkpoint: str | None = option()
    tokens: str = option(choices=TOKENS)
    img_size: int | None = option(ge=1)


@dataclass
class Pixels:
    norm_pix: bool = option()


@dataclass
class Hog:
    bins: int = option(ge=1)
    cell: int = option(ge=1)
    gaussian_window: int = option(ge=0)


@dataclass
class Ema:
    momentum: list[float] = option(length=2, ge=0, le=1)
    every: str = option(choices=EVERY)
    every_epochs: int = option(ge=1)
    folds: int = option(ge=1)
    drop_remainder: bool = option()
    cosine_over: str = option(choices=COSINE_OVER)


@dataclass
class Target:
    kind: str = option(choices=KINDS)
    timm: Timm = section(Timm)
    pixels: Pixels = section(Pixels)
    hog: Hog = section(Hog)
    ema: Ema = section(Ema)


@dataclass
class Teacher:
    init_depth: int | None = option(ge=0)
    seed: int | None = option(ge=0, le=SEED_MAX)
    checkpoint: str | None = option()
    size: str | None = option(choices=SIZES)
    bootstrap: bool = option()
    final_norm: bool = option()


@dataclass
class Loss:
    norm: str | None = option(choices=("standardize", "layernorm", "none"))
    kind: str | None = option(choices=("smooth_l1", "mse", "cosine"))
    beta: float | None = option(gt=0)
    include_cls: bool | None = option()


@dataclass
class StagesSection:
    epochs: list[int] = option(ge=0, min_length=2, order="increasing")
    reset_optimizer: bool = option()


@dataclass
class Optim:
    global_batch: int = option(ge=1)
    blr: float = option(gt=0)
    lr: float | None = option(gt=0)
    min_lr: float = option(ge=0)
    warmup_epochs: float = option(ge=0)
    weight_decay: float = option(ge=0)
    betas: list[float] = option(length=2, ge=0, lt=1)
    clip_grad: float | None = option(gt=0)


@dataclass
class Data:
    root: str = option()
    batch_per_gpu: int = option(ge=1)
    workers: int = option(ge=0)
    crop_scale: list[float] = option(length=2, gt=0, le=1, order="sorted")
    color_jitter: float | None = option(ge=0)
    skip_corrupt: bool = option()
    backend: str = option(choices=BACKENDS)
    jpeg_draft: bool = option()


@dataclass
class Probe:
    every: int | None = option(ge=1)
    root: str | None = option()
    train_images: int | None = option(ge=1)
    val_images: int | None = option(ge=1)
    epochs: int = option(ge=1)
    pool: str = option(choices=("avg", "token"))


@dataclass(frozen=True)
class Derived:
    """What the options imply: the stages, the student's architecture (`core.vit.preset` of model.size with
    model.img_size / embed_dim / num_heads), its depth per stage, the first teacher's architecture (the
    student's at stage 0, or teacher.size's preset, at the student's image size; teacher.init_depth for a
    random first teacher) and the peak lr."""

    stages: Stages
    arch: dict
    depths: list[int]
    teacher0_arch: dict
    lr: float


def derive(cfg) -> Derived:
    """The derived values of a pretraining config (a ConfigError for stages that do not make a run)."""
    m, t = cfg.model, cfg.teacher
    try:
        stages = Stages(cfg.stages.epochs)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    arch = preset(m.size, **{k: m[k] for k in ("img_size", "embed_dim", "num_heads") if m[k] is not None})
    depths = [arch["depth"]] * len(stages) if m.depth_per_stage is None else [int(d) for d in m.depth_per_stage]
    teacher0 = {**arch, "depth": depths[0]} if t.size is None else preset(t.size)
    teacher0["img_size"] = arch["img_size"]
    if t.checkpoint is None and t.init_depth is not None:
        teacher0["depth"] = int(t.init_depth)
    return Derived(stages=stages, arch=arch, depths=depths, teacher0_arch=teacher0, lr=peak_lr(cfg.optim))


@dataclass
class PretrainConfig(EpochRunOptions):
    model: Model = section(Model)
    target: Target = section(Target)
    teacher: Teacher = section(Teacher)
    loss: Loss = section(Loss)
    stages: StagesSection = section(StagesSection)
    optim: Optim = section(Optim)
    data: Data = section(Data)
    probe: Probe = section(Probe)

    @staticmethod
    def check(cfg) -> None:
        """The rules between options (each error names every option involved)."""
        m, t, teacher, o = cfg.model, cfg.target, cfg.teacher, cfg.optim
        derived = derive(cfg)
        stages, arch = derived.stages, derived.arch
        if arch["img_size"] % arch["patch_size"]:
            raise ConfigError(
                f"model.img_size={arch['img_size']} must be a multiple of the patch size {arch['patch_size']}"
            )
        if arch["embed_dim"] % arch["num_heads"]:
            raise ConfigError(
                f"model.embed_dim={arch['embed_dim']} must be a multiple of model.num_heads={arch['num_heads']}"
            )
        if m.kind == "mae" and m.decoder.dim % m.decoder.heads:
            raise ConfigError(
                f"model.decoder.dim={m.decoder.dim} must be a multiple of model.decoder.heads={m.decoder.heads}"
            )
        if m.depth_per_stage is not None and len(m.depth_per_stage) != len(stages):
            raise ConfigError(
                f"model.depth_per_stage has {len(m.depth_per_stage)} entries but stages.epochs "
                f"{list(cfg.stages.epochs)} defines {len(stages)} stages; give one depth per stage"
            )
        if m.masking == "block" and m.kind == "mae":
            raise ConfigError("model.masking=block needs model.kind=beit (the asymmetric encoder needs equal counts)")
        if cfg.data.jpeg_draft and cfg.data.backend != "uint8":
            raise ConfigError(f"data.jpeg_draft=true needs data.backend=uint8 (got data.backend={cfg.data.backend})")
        if t.kind == "ema" and (m.kind != "mae" or m.masking != "random"):
            raise ConfigError("target.kind=ema (multi-fold teacher) needs model.kind=mae with random masking")
        if t.kind == "timm" and (not t.timm.name or not t.timm.checkpoint):
            raise ConfigError(
                "target.kind=timm needs target.timm.name (a timm architecture) and target.timm.checkpoint (its weights)"
            )
        patches = (arch["img_size"] // arch["patch_size"]) ** 2
        if t.kind == "hog":
            if arch["patch_size"] % t.hog.cell:
                raise ConfigError(f"target.hog.cell={t.hog.cell} must divide the patch size {arch['patch_size']}")
            if t.hog.gaussian_window and arch["img_size"] % t.hog.gaussian_window:
                raise ConfigError(
                    f"target.hog.gaussian_window={t.hog.gaussian_window} must divide the image size {arch['img_size']}"
                )
        if t.kind == "ema":
            masked = patches - int(patches * (1 - m.mask_ratio))
            if t.ema.folds > masked:
                raise ConfigError(
                    f"target.ema.folds={t.ema.folds} exceeds the {masked} masked patches of an image "
                    f"({patches} patches, model.mask_ratio={m.mask_ratio})"
                )
            if t.ema.every == "step" and t.ema.every_epochs != 1:
                raise ConfigError(f"target.ema.every_epochs={t.ema.every_epochs} must be 1 with target.ema.every=step")
            if t.ema.cosine_over == "fold" and cfg.loss.kind not in (None, "cosine"):
                raise ConfigError(f"target.ema.cosine_over=fold needs loss.kind=cosine, not {cfg.loss.kind}")
        if t.kind == "pixels" and cfg.loss.norm is not None and (cfg.loss.norm == "none") == t.pixels.norm_pix:
            raise ConfigError(
                f"loss.norm={cfg.loss.norm} contradicts target.pixels.norm_pix={str(t.pixels.norm_pix).lower()}; "
                "leave loss.norm null and set norm_pix"
            )
        depth0 = derived.depths[0]
        if teacher.checkpoint is None:
            if teacher.size not in (None, m.size) and teacher.seed is None:
                raise ConfigError("teacher.size differs from model.size: give teacher.checkpoint or teacher.seed")
            own = teacher.size in (None, m.size) and teacher.seed is None
            if own and teacher.init_depth is not None and teacher.init_depth > depth0:
                raise ConfigError(
                    f"teacher.init_depth={teacher.init_depth} exceeds the student's {depth0} blocks (the first teacher "
                    "is the student's initial encoder truncated to init_depth; give teacher.seed for a deeper one)"
                )
        elif teacher.init_depth is not None:
            raise ConfigError("teacher.init_depth applies to a random first teacher, not with teacher.checkpoint")
        if teacher.size is not None and preset(teacher.size)["patch_size"] != arch["patch_size"]:
            raise ConfigError(
                f"teacher.size={teacher.size} has patch size {preset(teacher.size)['patch_size']}, the student "
                f"{arch['patch_size']}; the teacher must give one token per student patch"
            )
        lr = derived.lr
        if o.min_lr > lr:
            raise ConfigError(
                f"optim.min_lr={o.min_lr:g} is above the peak lr {lr:g} (optim.lr, or optim.blr x global_batch / 256)"
            )

    @staticmethod
    def warnings(cfg) -> list[str]:
        """Settings that are legal but probably not meant (printed when the run starts)."""
        stages = derive(cfg).stages
        shortest = min(stages.length(s) for s in range(len(stages)))
        if cfg.optim.warmup_epochs > shortest:
            return [
                f"optim.warmup_epochs={cfg.optim.warmup_epochs:g} is longer than the shortest stage ({shortest} "
                f"epochs in stages.epochs {list(cfg.stages.epochs)}): the lr never reaches its peak"
            ]
        return []
