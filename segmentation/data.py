"""ADE20K data: the ADEChallengeData2016 layout, label handling and the UperNet training pipeline.

Layout: `root/images/{training,validation}/<name>.jpg` and `root/annotations/{training,validation}/<name>.png`
(one channel, 0 = other, 1..150 = classes). `reduce_zero_label` maps 0 -> 255 (ignored) and k -> k - 1.

Training pipeline (mmsegmentation's ADE20K config, in its order): random rescale of `scale` (2048, 512) by
U(0.5, 2.0) keeping the aspect ratio; random crop (512 x 512, re-drawn up to 10 times until no class fills
more than 75 % of the labelled pixels); horizontal flip (p 0.5); photometric distortion; normalisation;
padding to the crop size (image 0, label 255). Every random draw for sample i of epoch e happens inside
`core.data.seeded(sample_seed(seed, e, i))`, so a run is reproducible and resumable bit for bit.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset

from core.data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    CorruptImageError,
    DataError,
    Skipped,
    decode_skipping,
    open_rgb,
    sample_seed,
    seeded,
    with_skipped,
)
from segmentation.classes import ADE20K_CLASSES

IGNORE = 255
SPLITS = {"train": "training", "val": "validation"}
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
MEAN = torch.tensor(IMAGENET_MEAN).view(3, 1, 1) * 255  # 123.675, 116.28, 103.53
STD = torch.tensor(IMAGENET_STD).view(3, 1, 1) * 255  # 58.395, 57.12, 57.375


# ------------------------------------------------------------------------------------------- layout
def class_names(root: str | os.PathLike, num_classes: int | None = None) -> list[str]:
    """Names for labels 1..K: `root/class_names.txt` (one a line) if present, else ADE20K's 150."""
    path = Path(root) / "class_names.txt"
    names = [n.strip() for n in path.read_text().splitlines() if n.strip()] if path.is_file() else list(ADE20K_CLASSES)
    if num_classes is not None and num_classes != len(names):
        if path.is_file():
            raise DataError(f"data.num_classes={num_classes} but {path} lists {len(names)} classes")
        names = names[:num_classes] + [f"class_{i}" for i in range(len(names), num_classes)]
    return names


def list_pairs(root: str | os.PathLike, split: str) -> list[tuple[Path, Path]]:
    """`(image, annotation)` paths of a split ("train"/"val" or the folder name), matched by file stem.

    An image without a label file, or a label file without an image, is a DataError naming the files."""
    root = Path(root)
    folder = SPLITS.get(split, split)
    img_dir, ann_dir = root / "images" / folder, root / "annotations" / folder
    for d in (img_dir, ann_dir):
        if not d.is_dir():
            raise DataError(
                f"{d} does not exist; expected the ADEChallengeData2016 layout "
                f"{root}/images/{folder}/*.jpg and {root}/annotations/{folder}/*.png"
            )
    images = {p.stem: p for p in img_dir.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()}
    labels = {p.stem: p for p in ann_dir.iterdir() if p.suffix.lower() == ".png" and p.is_file()}
    no_label = sorted(set(images) - set(labels))
    no_image = sorted(set(labels) - set(images))
    problems = []
    if no_label:
        problems.append(f"{len(no_label)} image(s) without a label file in {ann_dir}: {_names(images, no_label)}")
    if no_image:
        problems.append(f"{len(no_image)} label file(s) without an image in {img_dir}: {_names(labels, no_image)}")
    if problems:
        raise DataError("; ".join(problems))
    if not images:
        raise DataError(f"{img_dir} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    return [(images[k], labels[k]) for k in sorted(images)]


def _names(paths: dict, keys: list[str], n: int = 5) -> str:
    return ", ".join(paths[k].name for k in keys[:n]) + (f", ... (+{len(keys) - n})" if len(keys) > n else "")


def read_label(path: str | os.PathLike, num_classes: int) -> np.ndarray:
    """A label map `[H, W]` uint8 with values 0..num_classes; DataError naming the file and the bad values."""
    try:
        with Image.open(path) as im:
            mode, label = im.mode, np.asarray(im)
    except (OSError, ValueError, SyntaxError) as e:
        raise CorruptImageError(f"{path}: cannot decode label map ({type(e).__name__}: {e})", path) from None
    if label.ndim != 2:
        raise DataError(f"{path}: label maps must have one channel (mode L or P), found mode {mode}")
    bad = np.unique(label[(label < 0) | (label > num_classes)])
    if bad.size:
        shown = ", ".join(str(int(v)) for v in bad[:10]) + (" ..." if bad.size > 10 else "")
        raise DataError(f"{path}: label values outside 0..{num_classes}: {shown}")
    return label.astype(np.uint8)


def reduce_zero_label(label: np.ndarray) -> np.ndarray:
    """0 (other) -> 255 (ignored), k -> k - 1; 255 stays 255 (mmseg's reduce_zero_label)."""
    out = label.astype(np.int64) - 1
    out[(label == 0) | (label == IGNORE)] = IGNORE
    return out.astype(np.uint8)


def check_labels(
    pairs: list[tuple[Path, Path]],
    num_classes: int,
    rank: int = 0,
    world: int = 1,
    workers: int = 8,
    skip_corrupt: bool = False,
):
    """Decode this rank's share of the label maps and return the problems found (one line each); with
    `skip_corrupt` an undecodable one is not a problem here (it is skipped and counted when it is read)."""
    mine = [ann for _, ann in pairs[rank::world]]

    def one(path):
        try:
            read_label(path, num_classes)
        except CorruptImageError as e:
            return None if skip_corrupt else str(e)
        except DataError as e:
            return str(e)
        return None

    with ThreadPoolExecutor(max(1, workers)) as pool:
        return [p for p in pool.map(one, mine) if p]


# ---------------------------------------------------------------------------------------- transforms
def rescale_size(w: int, h: int, scale: tuple[int, int]) -> tuple[int, int]:
    """mmcv's keep-ratio rescale: the largest factor with long side <= max(scale) and short side <= min(scale);
    new sides rounded half up. Returns (new_w, new_h)."""
    factor = min(max(scale) / max(h, w), min(scale) / min(h, w))
    return int(w * factor + 0.5), int(h * factor + 0.5)


def resize_image(img: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """`[3, H, W]` (uint8 or float) -> float `[3, h, w]`, bilinear with half-pixel centres and no antialias
    (as cv2.INTER_LINEAR, mmcv's default)."""
    return F.interpolate(img[None].float(), size=size, mode="bilinear", align_corners=False)[0]


def nearest_index(src: int, dst: int) -> torch.Tensor:
    """Source index of each of `dst` outputs, as cv2.INTER_NEAREST computes it: floor(i * (1 / (dst / src))) in
    float64, capped at src - 1. torch's nearest computes the scale in float32 and picks another source row or
    column wherever i * scale lands within rounding of an integer."""
    return torch.from_numpy(np.minimum(np.floor(np.arange(dst) * (1.0 / (dst / src))).astype(np.int64), src - 1))


def resize_label(label: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """`[H, W]` -> `[h, w]`, nearest exactly as cv2.INTER_NEAREST (mmcv's label resize)."""
    h, w = label.shape
    return label[nearest_index(h, size[0])][:, nearest_index(w, size[1])]


def random_crop_box(shape: tuple[int, int], crop: int) -> tuple[int, int, int, int]:
    h, w = shape
    y = np.random.randint(0, max(h - crop, 0) + 1)
    x = np.random.randint(0, max(w - crop, 0) + 1)
    return y, min(y + crop, h), x, min(x + crop, w)


def photometric_distortion(img: np.ndarray) -> np.ndarray:
    """mmseg's PhotoMetricDistortion on a uint8 `[H, W, 3]` image: each step with probability 1/2 and the
    result clipped to uint8 after each: brightness +U(-32, 32); contrast xU(0.5, 1.5) (before or after the
    colour steps, at random); saturation xU(0.5, 1.5) and hue +randint(-18, 18) in OpenCV's 180-step hue
    (here in PIL's 8-bit HSV: the hue shift is rescaled to 256 steps)."""

    def convert(x, alpha=1.0, beta=0.0):
        return np.clip(x.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)

    if np.random.randint(2):
        img = convert(img, beta=np.random.uniform(-32, 32))
    contrast_first = np.random.randint(2)
    if contrast_first and np.random.randint(2):
        img = convert(img, alpha=np.random.uniform(0.5, 1.5))
    if np.random.randint(2):
        hsv = np.array(Image.fromarray(img).convert("HSV"))
        hsv[..., 1] = convert(hsv[..., 1], alpha=np.random.uniform(0.5, 1.5))
        img = np.array(Image.fromarray(hsv, mode="HSV").convert("RGB"))
    if np.random.randint(2):
        hsv = np.array(Image.fromarray(img).convert("HSV"))
        shift = round(np.random.randint(-18, 18) * 256 / 180)
        hsv[..., 0] = (hsv[..., 0].astype(np.int64) + shift) % 256
        img = np.array(Image.fromarray(hsv, mode="HSV").convert("RGB"))
    if not contrast_first and np.random.randint(2):
        img = convert(img, alpha=np.random.uniform(0.5, 1.5))
    return img


def normalize(img: torch.Tensor) -> torch.Tensor:
    """uint8/float `[3, H, W]` in 0..255 -> ImageNet-normalised float."""
    return (img.float() - MEAN.to(img.device)) / STD.to(img.device)


class TrainPipeline:
    """`(PIL image, label uint8 [H, W] after reduce_zero_label)` -> `(image [3, c, c] float, label [c, c] long)`.

    Draws from numpy's global RNG (seeded per sample by the dataset), in mmseg's order."""

    def __init__(
        self,
        scale=(2048, 512),
        ratio_range=(0.5, 2.0),
        crop: int = 512,
        cat_max_ratio: float = 0.75,
        flip: float = 0.5,
        photometric: bool = True,
    ):
        self.scale, self.ratio_range, self.crop = tuple(scale), tuple(ratio_range), crop
        self.cat_max_ratio, self.flip, self.photometric = cat_max_ratio, flip, photometric

    def __call__(self, img: Image.Image, label: np.ndarray):
        # random rescale, keeping the aspect ratio
        lo, hi = self.ratio_range
        ratio = np.random.random_sample() * (hi - lo) + lo
        scale = (int(self.scale[0] * ratio), int(self.scale[1] * ratio))
        w, h = img.size
        nw, nh = rescale_size(w, h, scale)
        x = torch.from_numpy(np.array(img)).permute(2, 0, 1)
        x = resize_image(x, (nh, nw)).round_().clamp_(0, 255).to(torch.uint8)
        y = resize_label(torch.from_numpy(label), (nh, nw))
        # random crop, re-drawn while one class fills >= cat_max_ratio of the labelled pixels (10 tries)
        box = random_crop_box((nh, nw), self.crop)
        if self.cat_max_ratio < 1.0:
            for _ in range(10):
                ids, counts = torch.unique(y[box[0] : box[1], box[2] : box[3]], return_counts=True)
                counts = counts[ids != IGNORE]
                if len(counts) > 1 and counts.max().item() / counts.sum().item() < self.cat_max_ratio:
                    break
                box = random_crop_box((nh, nw), self.crop)
        x, y = x[:, box[0] : box[1], box[2] : box[3]], y[box[0] : box[1], box[2] : box[3]]
        if np.random.rand() < self.flip:
            x, y = x.flip(-1), y.flip(-1)
        if self.photometric:
            x = torch.from_numpy(photometric_distortion(x.permute(1, 2, 0).contiguous().numpy())).permute(2, 0, 1)
        x = normalize(x)
        # pad to the crop size (bottom / right): image 0 after normalisation, label 255
        ph, pw = self.crop - x.shape[1], self.crop - x.shape[2]
        if ph > 0 or pw > 0:
            x = F.pad(x, (0, pw, 0, ph), value=0.0)
            y = F.pad(y, (0, pw, 0, ph), value=IGNORE)
        return x.contiguous(), y.long().contiguous()


# ------------------------------------------------------------------------------------------- datasets
class ADE20K(Dataset):
    """One split of an ADEChallengeData2016-layout folder.

    Training (`pipeline` given): `dataset[(epoch, i)]` -> `(image [3, c, c], label [c, c])`.
    Evaluation (`pipeline` None): `dataset[i]` -> `(image uint8 [3, H, W], label uint8 [H, W] reduced, i)`
    at the original size. With `skip_corrupt` an undecodable image or label is skipped as every task skips it
    (`core.data.Skipped`: replaced by the next decodable pair in training, left out of evaluation); label
    values out of range are always an error.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        split: str,
        num_classes: int,
        pipeline: TrainPipeline | None = None,
        *,
        seed: int = 0,
        skip_corrupt: bool = False,
    ):
        self.root, self.split, self.num_classes = Path(root), split, num_classes
        self.pairs = list_pairs(root, split)
        self.pipeline, self.seed, self.skip_corrupt = pipeline, seed, skip_corrupt

    def __len__(self) -> int:
        return len(self.pairs)

    def decode(self, index: int):
        img_path, ann_path = self.pairs[index]
        img = open_rgb(img_path, exif_orientation=True)  # as mmseg's cv2 decode (IMREAD_COLOR); labels as stored
        label = read_label(ann_path, self.num_classes)
        if label.shape != (img.height, img.width):
            raise DataError(f"{ann_path}: label map is {label.shape[1]}x{label.shape[0]} but {img_path} is {img.size}")
        return img, reduce_zero_label(label)

    def __getitem__(self, key):
        epoch, index = key if isinstance(key, tuple) else (0, key)
        train = self.pipeline is not None
        item, files = decode_skipping(self.decode, index, len(self), skip=self.skip_corrupt, replace=train)
        if item is None:
            return Skipped(files)
        img, label = item
        if not train:
            sample = torch.from_numpy(np.array(img)).permute(2, 0, 1).contiguous(), torch.from_numpy(label), index
        else:
            with seeded(sample_seed(self.seed, epoch, index)):
                sample = self.pipeline(img, label)
        return with_skipped(sample, files)
