"""Classification datasets in their standard layouts, and the MAE/dBOT transforms.

`data.kind`:
- `imagenet` / `folder`: `<root>/train/<class>/*` and `<root>/val/<class>/*` (the class lists must agree);
- `cifar10` / `cifar100`: the python-pickle release (`cifar-10-batches-py/`, `cifar-100-python/` under root);
- `flowers102`: `flowers-102/` (jpg/, imagelabels.mat, setid.mat), train+val for training, test for evaluation;
- `cars`: `stanford_cars/` as torchvision reads it (devkit/, cars_train/, cars_test/, annotations);
- `inat2018` / `inat2019`: the competition release, `train{YEAR}.json` / `val{YEAR}.json` (COCO-style
  `images`, `annotations`, `categories`) next to the image folders they reference.
Nothing is downloaded; a missing or malformed layout is an error naming what was expected.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from timm.data import create_transform
from torchvision import transforms
from torchvision.transforms import functional as TF

from core.data import IMAGENET_MEAN, IMAGENET_STD, DataError, ImageFolder, open_rgb

KINDS = ("imagenet", "folder", "cifar10", "cifar100", "flowers102", "cars", "inat2018", "inat2019")


class SingleDrawResizedCrop(transforms.RandomResizedCrop):
    """The random-resized crop of MAE's linear probe (its util/crop.py): area fraction and log aspect ratio
    drawn once, the box clamped to the image; no retry loop and no centre-crop fallback (torchvision's
    version tries ten times)."""

    @staticmethod
    def get_params(img, scale, ratio):
        width, height = TF.get_image_size(img)
        area = width * height * torch.empty(1).uniform_(scale[0], scale[1]).item()
        log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
        aspect = math.exp(torch.empty(1).uniform_(*log_ratio).item())
        w = min(int(round(math.sqrt(area * aspect))), width)
        h = min(int(round(math.sqrt(area / aspect))), height)
        top = int(torch.randint(0, height - h + 1, size=(1,)).item())
        left = int(torch.randint(0, width - w + 1, size=(1,)).item())
        return top, left, h, w


def train_transform(cfg, img_size: int):
    """MAE's fine-tuning augmentation through timm: RandomResizedCrop (bicubic), flip, RandAugment, random
    erasing; the linear probe uses MAE's single-draw resized crop + flip only."""
    a = cfg.aug
    scale = tuple(a.crop_scale)
    if cfg.task == "linprobe":
        return transforms.Compose(
            [
                SingleDrawResizedCrop(img_size, scale=scale, interpolation=transforms.InterpolationMode.BICUBIC),
                transforms.RandomHorizontalFlip(),
                transforms.ToTensor(),
                transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
            ]
        )
    return create_transform(
        input_size=img_size,
        is_training=True,
        scale=scale,
        color_jitter=None,
        auto_augment=a.auto_augment or None,
        interpolation="bicubic",
        re_prob=a.reprob,
        re_mode="pixel",
        re_count=1,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
    )


def eval_transform(cfg, img_size: int):
    """Resize to img_size / crop_pct (224/256 up to 224 px, 1.0 above, as MAE) then centre crop."""
    crop_pct = cfg.aug.eval_crop_pct or (224 / 256 if img_size <= 224 else 1.0)
    return transforms.Compose(
        [
            transforms.Resize(int(img_size / crop_pct), interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.CenterCrop(img_size),
            transforms.ToTensor(),
            transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


class JsonImages:
    """COCO-style classification json (iNaturalist): image i -> (PIL image, category id)."""

    def __init__(self, root: Path, json_path: Path):
        try:
            d = json.loads(json_path.read_text())
            labels = {a["image_id"]: a["category_id"] for a in d["annotations"]}
            self.samples = [(root / im["file_name"], labels[im["id"]]) for im in d["images"]]
            self.num_classes = len(d["categories"])
        except FileNotFoundError:
            raise DataError(f"data.root: {json_path} does not exist (iNaturalist layout)") from None
        except (KeyError, TypeError, json.JSONDecodeError) as e:
            raise DataError(f"{json_path}: not an iNaturalist annotation file ({type(e).__name__}: {e})") from None
        bad = [c for _, c in self.samples if not 0 <= c < self.num_classes]
        if bad:
            raise DataError(
                f"{json_path}: category ids must be 0..{self.num_classes - 1} (the number of categories); "
                f"found e.g. {bad[:5]}"
            )

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i):
        path, label = self.samples[i]
        return open_rgb(path), label


def _torchvision(cls, root: Path, what: str, **kw):
    if cls.__name__ in ("Flowers102", "StanfordCars"):
        try:
            import scipy.io  # noqa: F401 - torchvision reads their .mat annotations with it
        except ImportError:
            msg = f"data.kind: the {what} annotations are MATLAB files, read with scipy: pip install -e '.[transfer]'"
            raise DataError(msg) from None
    try:
        return cls(str(root), download=False, **kw)
    except (RuntimeError, FileNotFoundError, OSError) as e:
        raise DataError(f"data.root: {root} does not hold the {what} release ({e})") from None


def base_datasets(kind: str, root: str | Path):
    """(train, val, classes): datasets returning (PIL image, label), before augmentation (an undecodable file
    raises; `core.data.Augmented` skips it under data.skip_corrupt)."""
    root = Path(root)
    if kind not in KINDS:
        raise DataError(f"data.kind: unknown dataset {kind!r}; expected one of {', '.join(KINDS)}")
    if not root.is_dir():
        raise DataError(f"data.root: folder {root} does not exist")
    if kind in ("imagenet", "folder"):
        train = ImageFolder(root / "train", what="data.root (train split)")
        val = ImageFolder(root / "val", what="data.root (val split)")
        if train.classes != val.classes:
            only_t = sorted(set(train.classes) - set(val.classes))[:5]
            only_v = sorted(set(val.classes) - set(train.classes))[:5]
            raise DataError(
                f"{root}: train and val class folders differ ({len(train.classes)} vs {len(val.classes)}); "
                f"only in train: {only_t}, only in val: {only_v}"
            )
        return train, val, train.classes
    from torchvision import datasets as tvd

    if kind in ("cifar10", "cifar100"):
        cls = tvd.CIFAR10 if kind == "cifar10" else tvd.CIFAR100
        train = _torchvision(cls, root, kind, train=True)
        return train, _torchvision(cls, root, kind, train=False), list(train.classes)
    if kind == "flowers102":
        from torch.utils.data import ConcatDataset

        parts = [_torchvision(tvd.Flowers102, root, "Flowers-102", split=s) for s in ("train", "val")]
        test = _torchvision(tvd.Flowers102, root, "Flowers-102", split="test")
        return ConcatDataset(parts), test, [str(i) for i in range(102)]
    if kind == "cars":
        train = _torchvision(tvd.StanfordCars, root, "Stanford Cars", split="train")
        return train, _torchvision(tvd.StanfordCars, root, "Stanford Cars", split="test"), list(train.classes)
    year = kind[-4:]
    train = JsonImages(root, root / f"train{year}.json")
    val = JsonImages(root, root / f"val{year}.json")
    return train, val, [str(i) for i in range(train.num_classes)]
