"""Classification datasets in their standard layouts, and the MAE/dBOT transforms.

`data.kind`:
- `imagenet` / `folder`: `<root>/train/<class>/*` and `<root>/val/<class>/*` (the class lists must agree);
- `cifar10` / `cifar100`: the python-pickle release (`cifar-10-batches-py/`, `cifar-100-python/` under root);
- `flowers102`: `flowers-102/` (jpg/, imagelabels.mat, setid.mat), train+val for training, test for evaluation;
- `cars`: `stanford_cars/` as torchvision reads it (devkit/, cars_train/, cars_test/, annotations);
- `inat2018` / `inat2019`: the competition release, `train{YEAR}.json` / `val{YEAR}.json` (COCO-style
  `images`, `annotations`, `categories`) next to the image folders they reference.
Nothing is downloaded; a missing or malformed layout is an error naming what was expected. The releases are
read by torchvision's own dataset classes, with the files checked for presence instead of the official MD5
sums (tests/test_transfer_formats.py reads tiny files written in each release's layout).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from timm.data import create_transform
from torchvision import datasets as tvd
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


# torchvision's readers of the transfer releases, checking that each file is there instead of its MD5 sum:
# torchvision compares every CIFAR / Flowers-102 file with the MD5 of the official download, so a repacked copy
# (or the tiny files the tests write in the release's layout) reads as "not found or corrupted". The reading
# itself (pickled batches, .mat labels and splits, jpg folders) is torchvision's, unchanged.
def _presence_only(entries):
    return [[name, None] for name, _ in entries]


class CIFAR10(tvd.CIFAR10):
    train_list, test_list = _presence_only(tvd.CIFAR10.train_list), _presence_only(tvd.CIFAR10.test_list)
    meta = {**tvd.CIFAR10.meta, "md5": None}


class CIFAR100(tvd.CIFAR100):
    train_list, test_list = _presence_only(tvd.CIFAR100.train_list), _presence_only(tvd.CIFAR100.test_list)
    meta = {**tvd.CIFAR100.meta, "md5": None}


class Flowers102(tvd.Flowers102):
    _file_dict = {k: (name, None) for k, (name, _) in tvd.Flowers102._file_dict.items()}


READERS = {"cifar10": CIFAR10, "cifar100": CIFAR100, "flowers102": Flowers102, "cars": tvd.StanfordCars}


# the files each release must hold, relative to data.root, named when missing
RELEASE_FILES = {
    "cifar10": [f"cifar-10-batches-py/{n}" for n in ("batches.meta", *[f"data_batch_{i}" for i in range(1, 6)])]
    + ["cifar-10-batches-py/test_batch"],
    "cifar100": ["cifar-100-python/meta", "cifar-100-python/train", "cifar-100-python/test"],
    "flowers102": ["flowers-102/jpg/", "flowers-102/imagelabels.mat", "flowers-102/setid.mat"],
    "cars": [
        "stanford_cars/devkit/cars_meta.mat",
        "stanford_cars/devkit/cars_train_annos.mat",
        "stanford_cars/cars_train/",
        "stanford_cars/cars_test_annos_withlabels.mat",
        "stanford_cars/cars_test/",
    ],
}


def _missing(kind: str, root: Path) -> list[str]:
    return [f for f in RELEASE_FILES[kind] if not (root / f).exists()]


def _torchvision(kind: str, root: Path, what: str, **kw):
    if kind in ("flowers102", "cars"):
        try:
            import scipy.io  # noqa: F401 - torchvision reads their .mat annotations with it
        except ImportError:
            msg = f"data.kind: the {what} annotations are MATLAB files, read with scipy: pip install -e '.[transfer]'"
            raise DataError(msg) from None
    missing = _missing(kind, root)
    if missing:
        raise DataError(
            f"data.root: {root} does not hold the {what} release: missing {', '.join(missing[:3])}"
            + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        )
    try:
        return READERS[kind](str(root), download=False, **kw)
    except Exception as e:  # noqa: BLE001 - pickle, scipy's MatReadError, KeyError ...: a file not in the release's format
        raise DataError(
            f"data.root: {root} does not hold a readable {what} release ({type(e).__name__}: {e})"
        ) from None


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
    if kind in ("cifar10", "cifar100"):
        train = _torchvision(kind, root, kind, train=True)
        return train, _torchvision(kind, root, kind, train=False), list(train.classes)
    if kind == "flowers102":
        from torch.utils.data import ConcatDataset

        parts = [_torchvision(kind, root, "Flowers-102", split=s) for s in ("train", "val")]
        test = _torchvision(kind, root, "Flowers-102", split="test")
        return ConcatDataset(parts), test, [str(i) for i in range(102)]
    if kind == "cars":
        train = _torchvision(kind, root, "Stanford Cars", split="train")
        return train, _torchvision(kind, root, "Stanford Cars", split="test"), list(train.classes)
    year = kind[-4:]
    train = JsonImages(root, root / f"train{year}.json")
    val = JsonImages(root, root / f"val{year}.json")
    return train, val, [str(i) for i in range(train.num_classes)]
