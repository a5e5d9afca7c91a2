"""Tiny procedural datasets in the standard layouts, for the demo and the tests (never downloaded).

    python -m tools.datasets imagenet --out data/tiny/imagenet [--seed 0 --train-per-class 200 ...]

`imagenet`: `train/<class>/*.jpg` and `val/<class>/*.jpg`, ten visually distinct classes: six solid shapes
(circle, square, triangle, star, cross, hexagon) at random positions, scales, rotations and colours on a
noisy background, and four textures (horizontal stripes, vertical stripes, checkerboard, dots) with
random period, phase and colours. Image sides are 32-64 px. Everything is a function of the seed.

`coco`: `train2017/`, `val2017/`, `annotations/instances_{train,val}2017.json` with four shape categories,
several objects per image, polygon masks (some uncompressed RLE, some crowd regions).

The drawing primitives (`shape_polygon`, `draw_background`, `texture`) are shared by all generators.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "star", "cross", "hexagon")
TEXTURES = ("hstripes", "vstripes", "checker", "dots")
IMAGENET_CLASSES = SHAPES + TEXTURES


def shape_polygon(kind: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    """Vertices of a shape of circumradius r centred at (cx, cy), rotated by `angle` radians."""
    if kind == "circle":
        pts = [(1.0, 2 * math.pi * i / 32) for i in range(32)]
    elif kind == "square":
        pts = [(1.0, math.pi / 4 + math.pi / 2 * i) for i in range(4)]
    elif kind == "triangle":
        pts = [(1.0, -math.pi / 2 + 2 * math.pi / 3 * i) for i in range(3)]
    elif kind == "hexagon":
        pts = [(1.0, math.pi / 3 * i) for i in range(6)]
    elif kind == "star":
        pts = [(1.0 if i % 2 == 0 else 0.42, -math.pi / 2 + math.pi / 5 * i) for i in range(10)]
    elif kind == "cross":
        a = 0.33
        xy = [
            (a, 1),
            (a, a),
            (1, a),
            (1, -a),
            (a, -a),
            (a, -1),
            (-a, -1),
            (-a, -a),
            (-1, -a),
            (-1, a),
            (-a, a),
            (-a, 1),
        ]
        pts = [(math.hypot(x, y) / math.sqrt(2) * 1.35, math.atan2(y, x)) for x, y in xy]
    else:
        raise ValueError(f"unknown shape {kind!r}; expected one of {SHAPES}")
    return [(cx + r * m * math.cos(t + angle), cy + r * m * math.sin(t + angle)) for m, t in pts]


def random_colour(rng: np.random.Generator, lo: int = 0, hi: int = 256) -> tuple[int, int, int]:
    return tuple(int(v) for v in rng.integers(lo, hi, size=3))


def draw_background(rng: np.random.Generator, w: int, h: int) -> Image.Image:
    """A smooth two-colour gradient with pixel noise."""
    c0 = np.array(random_colour(rng), dtype=np.float32)
    c1 = np.array(random_colour(rng), dtype=np.float32)
    t = np.linspace(0, 1, w, dtype=np.float32)[None, :, None]
    if rng.random() < 0.5:
        t = np.linspace(0, 1, h, dtype=np.float32)[:, None, None] * np.ones((1, w, 1), np.float32)
    img = c0 * (1 - t) + c1 * t + rng.normal(0, 12, size=(h, w, 3)).astype(np.float32)
    img = np.broadcast_to(img, (h, w, 3))
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def texture(kind: str, rng: np.random.Generator, w: int, h: int) -> Image.Image:
    """A full-frame texture with random period, phase and two random colours."""
    period = int(rng.integers(4, 11))
    phase = int(rng.integers(0, period))
    ys, xs = np.mgrid[0:h, 0:w]
    if kind == "hstripes":
        on = ((ys + phase) // (period / 2)).astype(int) % 2 == 0
    elif kind == "vstripes":
        on = ((xs + phase) // (period / 2)).astype(int) % 2 == 0
    elif kind == "checker":
        on = (((xs + phase) // period) + ((ys + phase) // period)) % 2 == 0
    elif kind == "dots":
        cy = (ys + phase) % period - period / 2
        cx = (xs + phase) % period - period / 2
        on = cx**2 + cy**2 < (period / 3.2) ** 2
    else:
        raise ValueError(f"unknown texture {kind!r}; expected one of {TEXTURES}")
    c0, c1 = _contrasting_pair(rng)
    img = np.where(on[..., None], c0, c1).astype(np.float32) + rng.normal(0, 8, size=(h, w, 3))
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def _contrasting_pair(rng: np.random.Generator):
    while True:
        c0 = np.array(random_colour(rng)), np.array(random_colour(rng))
        if np.abs(c0[0] - c0[1]).sum() > 180:
            return c0


def classification_image(kind: str, rng: np.random.Generator) -> Image.Image:
    w, h = (int(v) for v in rng.integers(32, 65, size=2))
    if kind in TEXTURES:
        return texture(kind, rng, w, h)
    img = draw_background(rng, w, h)
    side = min(w, h)
    r = side * rng.uniform(0.22, 0.45)
    cx = rng.uniform(r * 0.8, w - r * 0.8)
    cy = rng.uniform(r * 0.8, h - r * 0.8)
    colour = random_colour(rng)
    ImageDraw.Draw(img).polygon(shape_polygon(kind, cx, cy, r, rng.uniform(0, 2 * math.pi)), fill=colour)
    return img


def make_imagenet(
    out: str | Path, seed: int = 0, train_per_class: int = 200, val_per_class: int = 50, classes=IMAGENET_CLASSES
) -> Path:
    """Write the tiny ImageNet-layout set; returns its root. Deterministic in `seed`."""
    out = Path(out)
    for split, n, split_id in (("train", train_per_class, 0), ("val", val_per_class, 1)):
        for ci, name in enumerate(classes):
            d = out / split / name
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                rng = np.random.default_rng([seed, split_id, ci, i])
                classification_image(name, rng).save(d / f"{name}_{i:05d}.jpg", quality=92)
    return out


COCO_CLASSES = ("circle", "square", "triangle", "star")


def polygon_area(poly) -> float:
    xs, ys = np.array(poly[0::2]), np.array(poly[1::2])
    return float(0.5 * abs(np.dot(xs, np.roll(ys, 1)) - np.dot(ys, np.roll(xs, 1))))


def coco_image(rng: np.random.Generator, size_range=(56, 73), max_objects: int = 3):
    """An image with 1-`max_objects` non-overlapping shapes on a noisy flat background; returns
    (image, [(class index, polygon [x0, y0, x1, y1, ...])])."""
    w, h = (int(v) for v in rng.integers(*size_range, size=2))
    background = np.array(random_colour(rng), dtype=np.float32)
    pixels = background + rng.normal(0, 10, size=(h, w, 3))
    img = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    objects, placed = [], []
    for _ in range(int(rng.integers(1, max_objects + 1))):
        ci = int(rng.integers(len(COCO_CLASSES)))
        for _try in range(20):
            r = float(rng.uniform(8, 0.3 * min(w, h)))
            cx, cy = float(rng.uniform(r, w - r)), float(rng.uniform(r, h - r))
            if all((cx - x) ** 2 + (cy - y) ** 2 > (r + q) ** 2 for x, y, q in placed):
                break
        else:
            continue
        placed.append((cx, cy, r))
        pts = shape_polygon(COCO_CLASSES[ci], cx, cy, r, float(rng.uniform(0, 2 * math.pi)))
        while True:  # a colour that stands out from the background
            colour = random_colour(rng)
            if np.abs(np.array(colour) - background).sum() > 150:
                break
        draw.polygon(pts, fill=colour)
        objects.append((ci, [round(c, 2) for xy in pts for c in xy]))
    return img, objects


def make_coco(out: str | Path, seed: int = 0, train_images: int = 400, val_images: int = 100) -> Path:
    """Tiny COCO-2017-layout set: `train2017/`, `val2017/`, `annotations/instances_{train,val}2017.json`.

    Four shape categories (ids 1-4), several objects per image with polygon masks. For realism a few
    annotations use the other encodings COCO has: uncompressed RLE for some objects and an `iscrowd=1`
    annotation (RLE) in some training images."""
    from pycocotools import mask as mask_utils

    out = Path(out)
    categories = [{"id": i + 1, "name": n, "supercategory": "shape"} for i, n in enumerate(COCO_CLASSES)]
    for split, n, split_id in (("train", train_images, 0), ("val", val_images, 1)):
        (out / f"{split}2017").mkdir(parents=True, exist_ok=True)
        images, annotations = [], []
        for i in range(n):
            rng = np.random.default_rng([seed, 7, split_id, i])
            img, objects = coco_image(rng)
            name = f"{split_id:02d}{i:010d}.jpg"
            img.save(out / f"{split}2017" / name, quality=92)
            image_id = split_id * 10**7 + i + 1
            images.append({"id": image_id, "file_name": name, "width": img.width, "height": img.height})
            for ci, poly in objects:
                rles = mask_utils.frPyObjects([poly], img.height, img.width)
                rle = mask_utils.merge(rles)
                x, y, bw, bh = (float(v) for v in mask_utils.toBbox(rle))
                ann = {
                    "id": len(annotations) + 1 + split_id * 10**7,
                    "image_id": image_id,
                    "category_id": ci + 1,
                    "bbox": [x, y, bw, bh],
                    "area": float(mask_utils.area(rle)),
                    "iscrowd": 0,
                    "segmentation": [poly],
                }
                if rng.random() < 0.15:  # uncompressed RLE, as some COCO annotations are
                    m = mask_utils.decode(rle)
                    ann["segmentation"] = {"size": [img.height, img.width], "counts": _uncompressed_counts(m)}
                annotations.append(ann)
            if split == "train" and rng.random() < 0.1:  # a crowd region in the corner
                m = np.zeros((img.height, img.width), dtype=np.uint8, order="F")
                m[: img.height // 5, : img.width // 5] = 1
                crowd = mask_utils.encode(m)
                crowd["counts"] = crowd["counts"].decode()
                annotations.append(
                    {
                        "id": len(annotations) + 1 + split_id * 10**7,
                        "image_id": image_id,
                        "category_id": 1,
                        "bbox": [float(v) for v in mask_utils.toBbox(crowd)],
                        "area": float(mask_utils.area(crowd)),
                        "iscrowd": 1,
                        "segmentation": crowd,
                    }
                )
        ann_dir = out / "annotations"
        ann_dir.mkdir(exist_ok=True)
        (ann_dir / f"instances_{split}2017.json").write_text(
            json.dumps(
                {
                    "info": {"description": "dbot-suite tiny COCO", "version": "1"},
                    "licenses": [],
                    "images": images,
                    "annotations": annotations,
                    "categories": categories,
                }
            )
        )
    return out


def _uncompressed_counts(m: np.ndarray) -> list[int]:
    """COCO's uncompressed RLE: run lengths of the column-major mask, starting with zeros."""
    flat = np.asfortranarray(m).flatten(order="F")
    counts, current, run = [], 0, 0
    for v in flat:
        if v != current:
            counts.append(run)
            current, run = v, 0
        run += 1
    counts.append(run)
    return [int(c) for c in counts]


# ------------------------------------------------------------------------------------------ ADE20K layout
# Label ids 1..8 in this order; 0 = "other" (ignored, as in ADE20K). Four "stuff" textures fill the frame,
# four solid "thing" shapes sit on top.
ADE20K_TINY_CLASSES = ("hstripes", "vstripes", "checker", "dots", "circle", "square", "triangle", "star")


def ade20k_image(rng: np.random.Generator, small: bool = False) -> tuple[Image.Image, Image.Image]:
    """One scene and its label map (mode "L", values 0..8): one or two textures split by a straight line
    (stuff), sometimes an "other" region (a noisy gradient, label 0), then 1-3 solid shapes (things).
    `small` gives an image with sides 24-44 px (smaller than the tiny recipe's 48 px crop)."""
    lo, hi = (24, 45) if small else (48, 97)
    w, h = (int(v) for v in rng.integers(lo, hi, size=2))
    first = int(rng.integers(len(TEXTURES)))
    pixels = np.asarray(texture(TEXTURES[first], rng, w, h)).copy()
    label = np.full((h, w), first + 1, dtype=np.uint8)
    if rng.random() < 0.6:  # a second texture on one side of a random line through the image
        second = (first + int(rng.integers(1, len(TEXTURES)))) % len(TEXTURES)
        angle = rng.uniform(0, 2 * math.pi)
        cx, cy = rng.uniform(0.25, 0.75) * w, rng.uniform(0.25, 0.75) * h
        ys, xs = np.mgrid[0:h, 0:w]
        side = (xs - cx) * math.cos(angle) + (ys - cy) * math.sin(angle) > 0
        pixels[side] = np.asarray(texture(TEXTURES[second], rng, w, h))[side]
        label[side] = second + 1
    if rng.random() < 0.5:  # an "other" region: label 0
        box = _ellipse_box(rng, w, h, 0.15, 0.35)
        region = Image.new("L", (w, h), 0)
        ImageDraw.Draw(region).ellipse(box, fill=1)
        region = np.asarray(region).astype(bool)
        pixels[region] = np.asarray(draw_background(rng, w, h))[region]
        label[region] = 0
    img, lab = Image.fromarray(pixels), Image.fromarray(label, mode="L")
    draw_img, draw_lab = ImageDraw.Draw(img), ImageDraw.Draw(lab)
    side = min(w, h)
    for _ in range(int(rng.integers(1, 4))):
        ci = int(rng.integers(4))
        r = side * rng.uniform(0.15, 0.32)
        cx, cy = rng.uniform(r * 0.7, w - r * 0.7), rng.uniform(r * 0.7, h - r * 0.7)
        poly = shape_polygon(ADE20K_TINY_CLASSES[4 + ci], cx, cy, r, rng.uniform(0, 2 * math.pi))
        draw_img.polygon(poly, fill=random_colour(rng))
        draw_lab.polygon(poly, fill=5 + ci)
    return img, lab


def _ellipse_box(rng: np.random.Generator, w: int, h: int, lo: float, hi: float) -> list[float]:
    rx, ry = rng.uniform(lo, hi) * w, rng.uniform(lo, hi) * h
    cx, cy = rng.uniform(rx, w - rx), rng.uniform(ry, h - ry)
    return [cx - rx, cy - ry, cx + rx, cy + ry]


def make_ade20k(out: str | Path, seed: int = 0, train_images: int = 240, val_images: int = 40) -> Path:
    """Tiny ADEChallengeData2016-layout set; returns its root. Deterministic in `seed`.

    `images/{training,validation}/ADE_{train,val}_%08d.jpg` and the matching
    `annotations/.../*.png` (one channel, 0 = other, 1..8 = `ADE20K_TINY_CLASSES`), plus `class_names.txt`
    (one name a line, for label 1, 2, ...). Every 8th image is smaller than a 48 px crop."""
    out = Path(out)
    for split, n, split_id, tag in (("training", train_images, 0, "train"), ("validation", val_images, 1, "val")):
        (out / "images" / split).mkdir(parents=True, exist_ok=True)
        (out / "annotations" / split).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            rng = np.random.default_rng([seed, 20, split_id, i])
            img, lab = ade20k_image(rng, small=i % 8 == 7)
            name = f"ADE_{tag}_{i + 1:08d}"
            img.save(out / "images" / split / f"{name}.jpg", quality=92)
            lab.save(out / "annotations" / split / f"{name}.png")
    (out / "class_names.txt").write_text("\n".join(ADE20K_TINY_CLASSES) + "\n")
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m tools.datasets", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="kind", required=True)
    a = sub.add_parser("imagenet", help="ImageNet folder layout (train/<class>/*.jpg, val/<class>/*.jpg)")
    a.add_argument("--out", default="data/tiny/imagenet")
    a.add_argument("--seed", type=int, default=0)
    a.add_argument("--train-per-class", type=int, default=200)
    a.add_argument("--val-per-class", type=int, default=50)
    c = sub.add_parser("coco", help="COCO 2017 layout (train2017/, val2017/, annotations/instances_*.json)")
    c.add_argument("--out", default="data/tiny/coco")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--train-images", type=int, default=400)
    c.add_argument("--val-images", type=int, default=100)
    s = sub.add_parser("ade20k", help="ADEChallengeData2016 layout (images/ and annotations/, training + validation)")
    s.add_argument("--out", default="data/tiny/ade20k")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--train-images", type=int, default=240)
    s.add_argument("--val-images", type=int, default=40)
    args = p.parse_args(argv)
    t0 = time.time()
    if args.kind == "imagenet":
        root = make_imagenet(args.out, args.seed, args.train_per_class, args.val_per_class)
        n = (args.train_per_class + args.val_per_class) * len(IMAGENET_CLASSES)
        print(f"wrote {n} images in {len(IMAGENET_CLASSES)} classes to {root} in {time.time() - t0:.1f}s")
    elif args.kind == "coco":
        root = make_coco(args.out, args.seed, args.train_images, args.val_images)
        print(f"wrote {args.train_images} + {args.val_images} COCO-layout images to {root} in {time.time() - t0:.1f}s")
    elif args.kind == "ade20k":
        root = make_ade20k(args.out, args.seed, args.train_images, args.val_images)
        n = args.train_images + args.val_images
        print(
            f"wrote {n} images + label maps ({len(ADE20K_TINY_CLASSES)} classes) to {root} in {time.time() - t0:.1f}s"
        )


if __name__ == "__main__":
    main()
