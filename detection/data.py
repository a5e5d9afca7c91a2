"""COCO 2017 in its standard layout (`train2017/`, `val2017/`, `annotations/instances_{train,val}2017.json`)
for ViTDet: large-scale jitter for training, long-side resize for evaluation, normalise, zero-pad to a
fixed square.

Training (detectron2's ViTDet LSJ): horizontal flip; resize by s ~ U(0.1, 2.0) times the output size
keeping the aspect ratio; a random crop of the output size (no padding inside the crop); boxes recomputed
from the cropped masks; crowd annotations and instances left empty by the crop dropped; images without
instances dropped from the training set. Evaluation: long side resized to the output size.
Degenerate boxes or polygons are dropped and counted; problems with files are errors naming the file and
the field.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from pycocotools import mask as mask_utils
from torch.utils.data import Dataset

from core.data import IMAGENET_MEAN, IMAGENET_STD, DataError, open_rgb, sample_seed, seeded


def load_coco_json(path: Path) -> dict:
    """The annotation file, checked for the fields this pipeline reads (errors name the file and the field)."""
    if not path.is_file():
        raise DataError(f"{path}: annotation file does not exist (expected the COCO 2017 layout)")
    try:
        d = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e})") from None
    for field in ("images", "annotations", "categories"):
        if not isinstance(d.get(field), list):
            raise DataError(f"{path}: field '{field}' is missing or not a list")
    for i, im in enumerate(d["images"]):
        for f in ("id", "file_name", "width", "height"):
            if f not in im:
                raise DataError(f"{path}: images[{i}] has no '{f}'")
    for i, a in enumerate(d["annotations"]):
        for f in ("id", "image_id", "category_id", "bbox"):
            if f not in a:
                raise DataError(f"{path}: annotations[{i}] has no '{f}'")
    for i, c in enumerate(d["categories"]):
        if "id" not in c or "name" not in c:
            raise DataError(f"{path}: categories[{i}] needs 'id' and 'name'")
    return d


def valid_polygon(poly) -> bool:
    return isinstance(poly, list) and len(poly) >= 6 and len(poly) % 2 == 0


class CocoInstances(Dataset):
    """One split of COCO. dataset[(epoch, i)] -> (image `[3, S, S]`, target, meta).

    target: boxes `[K, 4]` (x0, y0, x1, y1 in the resized image), labels `[K]` (1..num_classes), masks
    `[K, h, w]` (training only). meta: image_id, orig_size (h, w), scale, size (h, w) before padding.
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
    ):
        root = Path(root)
        self.img_dir = root / f"{split}2017"
        ann_path = root / "annotations" / f"instances_{split}2017.json"
        self.ann_path = ann_path
        if not self.img_dir.is_dir():
            raise DataError(f"data.root: image folder {self.img_dir} does not exist (expected COCO 2017 layout)")
        d = load_coco_json(ann_path)
        self.train, self.img_size, self.scale_range, self.seed = train, img_size, tuple(scale_range), seed
        self.categories = sorted(d["categories"], key=lambda c: c["id"])
        self.cat_to_label = {c["id"]: i + 1 for i, c in enumerate(self.categories)}
        self.label_to_cat = {v: k for k, v in self.cat_to_label.items()}
        images = {im["id"]: im for im in d["images"]}
        per_image: dict[int, list] = {i: [] for i in images}
        self.dropped = Counter()
        for a in d["annotations"]:
            if a["image_id"] not in images:
                raise DataError(
                    f"{ann_path}: annotation {a['id']} refers to image_id {a['image_id']}, which is not in 'images'"
                )
            if a["category_id"] not in self.cat_to_label:
                raise DataError(
                    f"{ann_path}: annotation {a['id']} has category_id {a['category_id']}, which is not in 'categories'"
                )
            if a.get("iscrowd", 0):
                self.dropped["crowd"] += 1
                continue
            x, y, w, h = a["bbox"]
            if w <= 0 or h <= 0:
                self.dropped["degenerate box"] += 1
                continue
            seg = a.get("segmentation")
            if isinstance(seg, list):
                polys = [p for p in seg if valid_polygon(p)]
                if not polys:
                    self.dropped["degenerate polygon"] += 1
                    continue
                a = {**a, "segmentation": polys}
            elif not isinstance(seg, dict):
                self.dropped["no segmentation"] += 1
                continue
            per_image[a["image_id"]].append(a)
        missing = [im["file_name"] for im in images.values() if not (self.img_dir / im["file_name"]).is_file()]
        if missing:
            raise DataError(
                f"{ann_path}: {len(missing)} images listed in the annotations are missing from "
                f"{self.img_dir}, e.g. {missing[:3]}"
            )
        ids = sorted(images)
        if train:
            self.dropped["images without instances"] = sum(1 for i in ids if not per_image[i])
            ids = [i for i in ids if per_image[i]]
        if not ids:
            raise DataError(f"{ann_path}: no usable images")
        self.images = [images[i] for i in ids]
        self.anns = [per_image[i] for i in ids]
        self.mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.images)

    @property
    def num_classes(self) -> int:
        return len(self.categories)

    def instance_masks(self, i: int, h: int, w: int) -> torch.Tensor:
        masks = []
        for a in self.anns[i]:
            seg = a["segmentation"]
            if isinstance(seg, list):
                rle = mask_utils.merge(mask_utils.frPyObjects(seg, h, w))
            elif isinstance(seg["counts"], list):
                rle = mask_utils.frPyObjects(seg, h, w)
            else:
                rle = seg
            masks.append(torch.from_numpy(mask_utils.decode(rle)))
        return torch.stack(masks) if masks else torch.zeros(0, h, w, dtype=torch.uint8)

    def __getitem__(self, key):
        epoch, i = key if isinstance(key, tuple) else (0, key)
        info = self.images[i]
        img = torch.from_numpy(np.array(open_rgb(self.img_dir / info["file_name"]))).permute(2, 0, 1)
        h, w = img.shape[1:]
        labels = torch.tensor([self.cat_to_label[a["category_id"]] for a in self.anns[i]], dtype=torch.int64)
        s = self.img_size
        if self.train:
            masks = self.instance_masks(i, h, w)
            with seeded(sample_seed(self.seed, epoch, i)):
                img, masks, scale = lsj(img, masks, s, self.scale_range)
            boxes = masks_to_boxes(masks)
            keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
            target = {"boxes": boxes[keep], "labels": labels[keep], "masks": masks[keep]}
        else:
            scale = s / max(h, w)
            img = resize(img, (round(h * scale), round(w * scale)))
            target = {"boxes": torch.zeros(0, 4), "labels": labels[:0]}
        size = img.shape[1:]
        x = (img.float() / 255 - self.mean) / self.std
        x = F.pad(x, (0, s - size[1], 0, s - size[0]))
        meta = {"image_id": info["id"], "orig_size": (h, w), "scale": scale, "size": tuple(size)}
        return x, target, meta


def resize(img: torch.Tensor, size) -> torch.Tensor:
    """uint8 `[3, h, w]` -> bilinear resize (antialiased when shrinking), uint8."""
    out = F.interpolate(
        img[None].float(), size=tuple(size), mode="bilinear", align_corners=False, antialias=size[0] < img.shape[1]
    )
    return out[0].round().clamp(0, 255).to(torch.uint8)


def lsj(img: torch.Tensor, masks: torch.Tensor, size: int, scale_range=(0.1, 2.0)):
    """Large-scale jitter on uint8 image `[3, h, w]` and masks `[K, h, w]` (torch RNG): flip, resize by
    U(scale_range) x size keeping the ratio, random crop of at most size x size. Returns (img, masks, scale)."""
    if torch.rand(()) < 0.5:
        img, masks = img.flip(-1), masks.flip(-1)
    h, w = img.shape[1:]
    s = float(torch.empty(()).uniform_(*scale_range))
    scale = min(size * s / h, size * s / w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    img = resize(img, (nh, nw))
    masks = F.interpolate(masks[None].float(), size=(nh, nw), mode="nearest")[0].to(torch.uint8)
    ch, cw = min(size, nh), min(size, nw)
    top = int(torch.randint(0, nh - ch + 1, ()))
    left = int(torch.randint(0, nw - cw + 1, ()))
    return img[:, top : top + ch, left : left + cw], masks[:, top : top + ch, left : left + cw], scale


def masks_to_boxes(masks: torch.Tensor) -> torch.Tensor:
    """Tight boxes `[K, 4]` (x0, y0, x1, y1; pixel edges, so a one-pixel mask at (x, y) gives (x, y, x+1, y+1));
    an empty mask gives a zero box."""
    k = masks.shape[0]
    boxes = torch.zeros(k, 4)
    for j in range(k):
        ys, xs = torch.where(masks[j] > 0)
        if len(xs):
            boxes[j] = torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=torch.float32)
    return boxes


def collate(batch):
    images = torch.stack([b[0] for b in batch])
    return images, [b[1] for b in batch], [b[2] for b in batch]
