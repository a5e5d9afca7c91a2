"""What a study is made of: its two scales, the first targets and protocols, the data layout it reads."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PROTOCOLS = ("linprobe", "finetune", "knn")
TARGETS = ("teacher", "pixels", "hog", "ema")

# The two sizes of the study. `data`: the tools.datasets study preset; `model` / `wide`: core.vit presets of
# the student and of claim (d)'s wider teacher; recipes: pretrain/configs/<pretrain>.yaml and
# finetune/configs/<finetune>.yaml.
SCALES = {
    "cpu": dict(
        data="cpu",
        model="tiny",
        wide="tiny_wide",
        pretrain="study",
        finetune="tiny",
        stages=2,
        epochs=3,
        workers=1,
        jobs=2,  # the two seeds side by side, one core each
    ),
    "gpu": dict(
        data="gpu",
        model="small64",
        wide="base64",
        pretrain="study_gpu",
        finetune="study_gpu",
        stages=2,
        epochs=4,
        workers=12,
        jobs=1,
    ),
}


def slug(spec: str) -> str:
    """A folder-safe name of a target spec (`timm:vit_b=/w.pth` -> `timm-vit_b`)."""
    return spec.split("=")[0].replace(":", "-").replace("/", "-")


def pool_root(data: Path) -> Path:
    """Pretraining data: the study layout's unlabeled pool, or an ImageNet-layout root itself."""
    return data / "pool" if (data / "pool" / "train").is_dir() else data


def labelled_root(data: Path) -> Path:
    """Evaluation data (train/ and val/): the study layout's labelled split, or an ImageNet-layout root."""
    return data / "labelled" if (data / "labelled" / "train").is_dir() else data


def protocols(args) -> tuple[str, ...]:
    return PROTOCOLS if args.finetune else tuple(p for p in PROTOCOLS if p != "finetune")
