"""COCO 2017 in its standard layout (`train2017/`, `val2017/`, `annotations/instances_{train,val}2017.json`) for
ViTDet: large-scale jitter for training, long-side resize for evaluation, normalise, zero-pad to a fixed square.

Training (detectron2's ViTDet LSJ mapper): horizontal flip (p 0.5); resize by s ~ U(0.1, 2.0) times the output
size keeping the aspect ratio (bilinear); a crop of at most the output size (no padding inside the crop) whose
offset is one uniform draw times the free range on both axes, as detectron2's `FixedSizeCrop`; instance masks
rasterised in the crop (polygons transformed then rasterised, RLE resampled nearest), boxes recomputed from the
cropped masks, instances left empty dropped. Crowd annotations are not trained on; images without any other
annotation are dropped from the training set. Evaluation: long side resized to the output size.

Bad input: a missing or malformed annotation file, a missing field, an annotation pointing at an image or
category that is not listed, or listed images missing on disk raise DataError naming the file and the field
before any compute; degenerate boxes, polygons and RLEs are dropped and counted (`dataset.dropped`); an image
that cannot be decoded raises CorruptImageError naming it, or with `skip_corrupt` is skipped as every task skips
it (`core.data`: replaced by the next decodable image in training, left out of evaluation).
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from pycocotools import mask as mask_utils
from torch.utils.data import Dataset

from core.data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    DataError,
    Skipped,
    decode_skipping,
    open_rgb,
    sample_seed,
    seeded,
    with_skipped,
)

REQUIRED = {
    "images": ("id", "file_name", "width", "height"),
    "annotations": ("id", "image_id", "category_id", "bbox"),
    "categories": ("id", "name"),
}


def load_coco_json(path: str | os.PathLike) -> dict:
    """The annotation file, checked for every field this pipeline reads (errors name the file and the field)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: annotation file does not exist (expected the COCO 2017 layout)")
    try:
        d = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise DataError(f"{path}: expected a JSON object with 'images', 'annotations' and 'categories'")
    for section, fields in REQUIRED.items():
        if not isinstance(d.get(section), list):
            raise DataError(f"{path}: field '{section}' is missing or not a list")
        for i, entry in enumerate(d[section]):
            missing = [f for f in fields if not isinstance(entry, dict) or f not in entry]
            if missing:
                raise DataError(f"{path}: {section}[{i}] has no '{missing[0]}'")
    for i, a in enumerate(d["annotations"]):
        box = a["bbox"]
        if not (isinstance(box, list) and len(box) == 4 and all(isinstance(v, (int, float)) for v in box)):
            raise DataError(f"{path}: annotations[{i}] (id {a['id']}) has 'bbox' {box!r}; expected [x, y, w, h]")
    return d


class CocoInstances(Dataset):
    """One split of COCO. `dataset[(epoch, i)]` (or `dataset[i]`) -> (image `[3, S, S]`, target, meta).

    target: boxes `[K, 4]` (x0, y0, x1, y1 in the resized image), labels `[K]` (1..num_classes), masks
    `[K, h, w]` uint8 (training; evaluation targets are empty: COCOeval reads the json). meta: image_id,
    orig_size (h, w), size (h, w) of the resized image before padding. Training randomness is drawn from the
    sample's seeded RNG `(seed, epoch, index)`, so it does not depend on workers, processes or resuming.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        split: str,
        *,
        train: bool,
        img_size: int = 1024,
        scale_range=(0.1, 2.0),
        seed: int = 0,
        skip_corrupt: bool = False,
    ):
        root = Path(root)
        self.img_dir = root / f"{split}2017"
        self.ann_path = root / "annotations" / f"instances_{split}2017.json"
        if not self.img_dir.is_dir():
            raise DataError(f"data.root: image folder {self.img_dir} does not exist (expected the COCO 2017 layout)")
        d = load_coco_json(self.ann_path)
        self.train, self.img_size, self.scale_range = train, img_size, tuple(scale_range)
        self.seed, self.skip_corrupt = seed, skip_corrupt
        self.categories = sorted(d["categories"], key=lambda c: c["id"])
        self.cat_to_label = {c["id"]: i + 1 for i, c in enumerate(self.categories)}
        self.label_to_cat = {v: k for k, v in self.cat_to_label.items()}
        images = {}
        for i, im in enumerate(d["images"]):
            if im["id"] in images:
                raise DataError(f"{self.ann_path}: images[{i}] repeats image id {im['id']}")
            images[im["id"]] = im
        self.dropped: Counter = Counter()
        per_image: dict[int, list] = {k: [] for k in images}
        for i, a in enumerate(d["annotations"]):
            if a["image_id"] not in images:
                raise DataError(
                    f"{self.ann_path}: annotations[{i}] (id {a['id']}) has 'image_id' {a['image_id']}, "
                    "which is not in 'images'"
                )
            if a["category_id"] not in self.cat_to_label:
                raise DataError(
                    f"{self.ann_path}: annotations[{i}] (id {a['id']}) has 'category_id' {a['category_id']}, "
                    "which is not in 'categories'"
                )
            if train:
                a = self._usable(a, images[a["image_id"]])
                if a is not None:
                    per_image[a["image_id"]].append(a)
        missing = [im["file_name"] for im in images.values() if not (self.img_dir / im["file_name"]).is_file()]
        if missing:
            raise DataError(
                f"{self.ann_path}: {len(missing)} image(s) listed in 'images' are missing from {self.img_dir}, "
                f"e.g. {missing[:3]}"
            )
        ids = sorted(images)
        if train:
            self.dropped["images without instances"] = sum(1 for k in ids if not per_image[k])
            ids = [k for k in ids if per_image[k]]
        if not ids and train:
            reasons = ", ".join(
                f"{v} {k}" for k, v in self.dropped.most_common() if v and k != "images without instances"
            )
            raise DataError(
                f"{self.ann_path}: no usable images with instances: "
                + (
                    f"all {len(d['annotations'])} annotations were dropped ({reasons}); training needs non-crowd "
                    "instances with a box of positive size and a mask (polygons of at least 3 points, or an RLE "
                    "of the image's size)"
                    if d["annotations"]
                    else "the file lists no annotations"
                )
            )
        if not ids:
            raise DataError(f"{self.ann_path}: no usable images: 'images' is empty")
        self.images = [images[k] for k in ids]
        self.anns = [per_image[k] for k in ids]
        self.mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1) * 255
        self.std = torch.tensor(IMAGENET_STD).view(3, 1, 1) * 255

    def _usable(self, a: dict, image: dict) -> dict | None:
        """The annotation with its valid polygons, or None (counted in `self.dropped`) if it cannot be trained on."""
        if a.get("iscrowd", 0):
            self.dropped["crowd"] += 1
            return None
        if a["bbox"][2] <= 0 or a["bbox"][3] <= 0:
            self.dropped["degenerate box"] += 1
            return None
        seg = a.get("segmentation")
        if isinstance(seg, list):
            polys = [p for p in seg if isinstance(p, list) and len(p) >= 6 and len(p) % 2 == 0]
            if not polys:
                self.dropped["degenerate polygon"] += 1
                return None
            return {**a, "segmentation": polys}
        if isinstance(seg, dict) and "counts" in seg and list(seg.get("size", ())) == [image["height"], image["width"]]:
            return a
        self.dropped["missing or malformed segmentation"] += 1
        return None

    def __len__(self) -> int:
        return len(self.images)

    @property
    def num_classes(self) -> int:
        return len(self.categories)

    def _open(self, i: int) -> tuple[int, Image.Image]:
        # EXIF orientation applied, as detectron2's read_image: COCO's sizes and annotations are of the upright image
        return i, open_rgb(self.img_dir / self.images[i]["file_name"], exif_orientation=True)

    def __getitem__(self, key):
        epoch, i = key if isinstance(key, tuple) else (0, key)
        opened, files = decode_skipping(self._open, i, len(self), skip=self.skip_corrupt, replace=self.train)
        if opened is None:
            return Skipped(files)
        return with_skipped(self._sample(epoch, *opened), files)

    def _sample(self, epoch: int, i: int, img: Image.Image):
        info, s = self.images[i], self.img_size
        w, h = img.size
        if self.train and (w, h) != (info["width"], info["height"]):
            raise DataError(
                f"{self.img_dir / info['file_name']}: decoded size {w}x{h} differs from the annotation file's "
                f"{info['width']}x{info['height']} ({self.ann_path}), so its masks would not line up"
            )
        if self.train:
            with seeded(sample_seed(self.seed, epoch, i)):
                img, masks = lsj(img, self.anns[i], s, self.scale_range)
            boxes = masks_to_boxes(masks)
            keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
            labels = torch.tensor([self.cat_to_label[a["category_id"]] for a in self.anns[i]], dtype=torch.int64)
            target = {"boxes": boxes[keep], "labels": labels[keep], "masks": masks[keep]}
        else:
            scale = s / max(h, w)
            img = img.resize((round(w * scale), round(h * scale)), Image.BILINEAR)
            target = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}
        x = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)
        size = tuple(x.shape[1:])
        x = F.pad((x.float() - self.mean) / self.std, (0, s - size[1], 0, s - size[0]))
        return x, target, {"image_id": info["id"], "orig_size": (h, w), "size": size}


def lsj(img: Image.Image, anns: list[dict], size: int, scale_range=(0.1, 2.0)):
    """Large-scale jitter of a PIL image and its annotations, drawing from the torch RNG: flip, resize by
    U(scale_range) x size keeping the ratio, crop of at most size x size. Returns (PIL image, masks `[K, h', w']`
    uint8 rasterised in the crop)."""
    w, h = img.size
    flip = bool(torch.rand(()) < 0.5)
    s = float(torch.empty((), dtype=torch.float64).uniform_(*scale_range))
    scale = min(size * s / h, size * s / w)
    nh, nw = int(round(h * scale)), int(round(w * scale))
    u = float(torch.rand((), dtype=torch.float64))
    top, left = int(round(max(nh - size, 0) * u)), int(round(max(nw - size, 0) * u))
    ch, cw = min(size, nh), min(size, nw)
    if flip:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    img = img.resize((nw, nh), Image.BILINEAR).crop((left, top, left + cw, top + ch))
    masks = torch.zeros(len(anns), ch, cw, dtype=torch.uint8)
    sx, sy = nw / w, nh / h
    for k, a in enumerate(anns):
        seg = a["segmentation"]
        if isinstance(seg, list):  # polygons: transform the vertices, rasterise in the crop
            polys = []
            for p in seg:
                xy = np.asarray(p, dtype=np.float64).reshape(-1, 2)
                x = (w - xy[:, 0]) if flip else xy[:, 0]
                polys.append(np.stack([x * sx - left, xy[:, 1] * sy - top], 1).ravel().tolist())
            rle = mask_utils.merge(mask_utils.frPyObjects(polys, ch, cw))
            masks[k] = torch.from_numpy(mask_utils.decode(rle))
        else:  # RLE: decode, flip, nearest-neighbour resample of the crop window
            rle = mask_utils.frPyObjects(seg, h, w) if isinstance(seg["counts"], list) else seg
            m = mask_utils.decode(rle)
            m = m[:, ::-1] if flip else m
            rows = np.minimum(((np.arange(ch) + top + 0.5) / sy).astype(np.int64), h - 1)
            cols = np.minimum(((np.arange(cw) + left + 0.5) / sx).astype(np.int64), w - 1)
            masks[k] = torch.from_numpy(np.ascontiguousarray(m[rows][:, cols]))
    return img, masks


def masks_to_boxes(masks: torch.Tensor) -> torch.Tensor:
    """Tight boxes `[K, 4]` (x0, y0, x1, y1) in pixel-edge coordinates, as detectron2's `BitMasks` computes them:
    a one-pixel mask at (x, y) gives (x, y, x + 1, y + 1); an empty mask gives zeros."""
    boxes = torch.zeros(masks.shape[0], 4)
    cols, rows = masks.any(dim=1), masks.any(dim=2)  # [K, W], [K, H]
    for k in range(masks.shape[0]):
        xs, ys = torch.where(cols[k])[0], torch.where(rows[k])[0]
        if len(xs):
            boxes[k] = torch.tensor([xs[0], ys[0], xs[-1] + 1, ys[-1] + 1], dtype=torch.float32)
    return boxes


def collate(batch):
    """(images `[N, 3, S, S]`, [target], [meta])."""
    return torch.stack([b[0] for b in batch]), [b[1] for b in batch], [b[2] for b in batch]
