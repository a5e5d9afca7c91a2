"""Tiny procedural datasets in the standard layouts, for the demo and the tests (never downloaded).

    python -m tools.datasets imagenet --out data/tiny/imagenet [--seed 0 --train-per-class 200 ...]

`imagenet`: `train/<class>/*.jpg` and `val/<class>/*.jpg`, ten visually distinct classes: six solid shapes
(circle, square, triangle, star, cross, hexagon) at random positions, scales, rotations and colours on a
noisy background, and four textures (horizontal stripes, vertical stripes, checkerboard, dots) with
random period, phase and colours. Image sides are 32-64 px. Everything is a function of the seed.

The drawing primitives (`shape_polygon`, `draw_background`, `texture`) are shared by the COCO- and
ADE20K-layout generators, which place several shapes per image and keep their polygons as annotations.

    python -m tools.datasets study --preset cpu [--out data/study-cpu --seed 0 --pool 20000 --workers 4]

`study`: the data of `tools/study/` ("Does it learn?", docs/STUDY.md). Sixteen classes defined by shape and
structure only (`STUDY_CLASSES`: solid polygons, shapes with holes or cut-outs, letters, two-part shapes),
with every colour, the background (noisy gradient or faint texture), the fill (solid or textured), position,
scale, rotation, stretch, small distractor blobs and occluding lines drawn at random, so colour and other
low-level cues say nothing about the class. `pool/train/unlabeled/*.jpg` is the unlabeled pretraining pool;
`labelled/{train,val}/<class>/*.jpg` the small labelled split of the downstream task (`STUDY_PRESETS`: cpu
20,000 + 16 x (40 + 40) images at 36-48 px; gpu 200,000 + 16 x (100 + 50) at 72-96 px).

    python -m tools.datasets coco --out data/tiny/coco [--seed 0 --train-images 500 --val-images 100]

`coco`: `train2017/`, `val2017/`, `annotations/instances_{train,val}2017.json` (COCO 2017 layout). Four
shape categories (`COCO_CLASSES`), 0-4 non-overlapping objects per 56-80 px image with polygon masks; some
objects are stored as uncompressed or compressed RLE and some images hold an `iscrowd=1` region (a cluster
of small shapes of one class), so every annotation encoding COCO uses is exercised.

    python -m tools.datasets ade20k --out data/tiny/ade20k [--seed 0 --train-images 240 --val-images 40]

`ade20k`: `images/{training,validation}/ADE_*.jpg` and `annotations/{training,validation}/ADE_*.png` (the
ADEChallengeData2016 layout): four textures as "stuff", four solid shapes as "things", label 0 = other.

    python -m tools.datasets jpegs --out data/jpegs [--images 2000 --classes 10 --size 500 375 --quality 90]

`jpegs`: photo-like 500 x 375 JPEGs at quality 90 (about 100 KB each, like ImageNet photos) in
`train/<class>/`, for the input-pipeline and end-to-end benchmarks (`tools.bench loader`, docs/BENCHMARKS.md).
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


# ------------------------------------------------------------------------------------------------- COCO
COCO_CLASSES = ("circle", "square", "triangle", "star")


def _contrasting_colour(rng: np.random.Generator, background: np.ndarray) -> tuple[int, int, int]:
    while True:
        colour = random_colour(rng)
        if np.abs(np.array(colour) - background).sum() > 160:
            return colour


def coco_image(rng: np.random.Generator, size_range=(56, 81), max_objects: int = 4):
    """One detection image: a noisy gradient background with 0-`max_objects` non-overlapping shapes and, in
    about one image in eight, a crowd (a cluster of 3-5 small shapes of one class).

    Returns (image, objects, crowds): objects `[(class index, polygon [x0, y0, x1, y1, ...])]` in pixel-edge
    coordinates (what pycocotools rasterises), crowds `[(class index, [polygon, ...])]`.
    """
    w, h = (int(v) for v in rng.integers(*size_range, size=2))
    img = draw_background(rng, w, h)
    pixels = np.asarray(img, dtype=np.float32)
    draw = ImageDraw.Draw(img)
    placed: list[tuple[float, float, float]] = []

    def place(r_lo: float, r_hi: float):
        for _ in range(30):
            r = float(rng.uniform(r_lo, r_hi))
            cx, cy = float(rng.uniform(r, w - r)), float(rng.uniform(r, h - r))
            if all((cx - x) ** 2 + (cy - y) ** 2 > (r + q + 1) ** 2 for x, y, q in placed):
                placed.append((cx, cy, r))
                return cx, cy, r
        return None

    def shape(ci: int, cx: float, cy: float, r: float) -> list[float]:
        pts = shape_polygon(COCO_CLASSES[ci], cx, cy, r, float(rng.uniform(0, 2 * math.pi)))
        colour = _contrasting_colour(rng, pixels[int(cy), int(cx)])
        draw.polygon(pts, fill=colour)
        return [round(c, 2) for xy in pts for c in xy]

    crowds = []
    if rng.random() < 0.125:
        spot = place(9, 12)
        if spot is not None:
            ci, (cx, cy, r) = int(rng.integers(len(COCO_CLASSES))), spot
            polys = []
            for k in range(int(rng.integers(3, 6))):
                a = 2 * math.pi * k / 5 + float(rng.uniform(-0.3, 0.3))
                polys.append(shape(ci, cx + 0.55 * r * math.cos(a), cy + 0.55 * r * math.sin(a), 0.4 * r))
            crowds.append((ci, polys))
    objects = []
    n = 0 if rng.random() < 0.05 else int(rng.integers(1, max_objects + 1))  # a few images without objects
    for _ in range(n):
        spot = place(7, 0.28 * min(w, h))
        if spot is not None:
            ci = int(rng.integers(len(COCO_CLASSES)))
            objects.append((ci, shape(ci, *spot)))
    return img, objects, crowds


def make_coco(out: str | Path, seed: int = 0, train_images: int = 500, val_images: int = 100) -> Path:
    """Write the tiny COCO-2017-layout set (see the module docstring); returns its root. Deterministic in `seed`.

    Category ids are 1..4 in `COCO_CLASSES` order; image ids are unique across the two splits. Objects are
    polygons, except about one in six stored as uncompressed RLE and one in ten as compressed RLE; crowds are
    uncompressed RLE with `iscrowd=1`, as in COCO.
    """
    from pycocotools import mask as mask_utils

    out = Path(out)
    categories = [{"id": i + 1, "name": n, "supercategory": "shape"} for i, n in enumerate(COCO_CLASSES)]
    (out / "annotations").mkdir(parents=True, exist_ok=True)
    for split, n, split_id in (("train", train_images, 0), ("val", val_images, 1)):
        (out / f"{split}2017").mkdir(parents=True, exist_ok=True)
        images, annotations = [], []
        for i in range(n):
            rng = np.random.default_rng([seed, 17, split_id, i])
            img, objects, crowds = coco_image(rng)
            image_id = split_id * 1_000_000 + i + 1
            name = f"{image_id:012d}.jpg"
            img.save(out / f"{split}2017" / name, quality=92)
            images.append({"id": image_id, "file_name": name, "width": img.width, "height": img.height})
            entries = [(ci, [poly], 0) for ci, poly in objects] + [(ci, polys, 1) for ci, polys in crowds]
            for ci, polys, crowd in entries:
                rle = mask_utils.merge(mask_utils.frPyObjects(polys, img.height, img.width))
                u = 1.0 if crowd else rng.random()
                if u < 1 / 6 or crowd:
                    seg = {"size": [img.height, img.width], "counts": rle_counts(mask_utils.decode(rle))}
                elif u < 1 / 6 + 1 / 10:
                    seg = {"size": [img.height, img.width], "counts": rle["counts"].decode("ascii")}
                else:
                    seg = polys
                annotations.append(
                    {
                        "id": len(annotations) + 1 + split_id * 1_000_000,
                        "image_id": image_id,
                        "category_id": ci + 1,
                        "bbox": [round(float(v), 2) for v in mask_utils.toBbox(rle)],
                        "area": float(mask_utils.area(rle)),
                        "iscrowd": crowd,
                        "segmentation": seg,
                    }
                )
        d = {
            "info": {"description": "dbot-suite tiny COCO-layout shapes", "version": "1.0", "year": 2017},
            "licenses": [],
            "images": images,
            "annotations": annotations,
            "categories": categories,
        }
        (out / "annotations" / f"instances_{split}2017.json").write_text(json.dumps(d))
    return out


def rle_counts(mask: np.ndarray) -> list[int]:
    """COCO's uncompressed RLE of a binary mask `[h, w]`: run lengths in column-major order, starting with a
    (possibly empty) run of zeros."""
    flat = np.asarray(mask, dtype=np.uint8).reshape(mask.shape[:2]).flatten(order="F")
    edges = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], edges, [flat.size]])
    runs = np.diff(bounds).tolist()
    return ([0] + runs if flat.size and flat[0] == 1 else runs) or [0]


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


# ------------------------------------------------------------------------------------------- study set
# Sixteen classes that differ in shape and structure only. Colour, texture, background, position, scale,
# rotation, stretch, distractors and occluders are nuisances drawn independently of the class. A class is
# a list of (polygon in the unit frame [-1, 1]^2, fill 1 or 0) painted in order into a mask, so holes
# (ring, frame) and cut-outs (crescent) are shapes too.
STUDY_CLASSES = (
    "circle",
    "square",
    "triangle",
    "star",
    "cross",
    "hexagon",
    "ring",
    "frame",
    "crescent",
    "semicircle",
    "ell",
    "tee",
    "arrow",
    "bowtie",
    "bar",
    "two_discs",
)
# Sizes of the study set: `cpu` for the 2-core study (32 px models), `gpu` for the ViT-S-like 64 px one.
STUDY_PRESETS = {
    "cpu": dict(pool=20000, train_per_class=40, val_per_class=40, size=(36, 48)),
    "gpu": dict(pool=200000, train_per_class=100, val_per_class=50, size=(72, 96)),
}


def _disc(cx: float, cy: float, r: float, n: int = 32) -> list[tuple[float, float]]:
    return [(cx + r * math.cos(2 * math.pi * i / n), cy + r * math.sin(2 * math.pi * i / n)) for i in range(n)]


def _box(x0: float, y0: float, x1: float, y1: float) -> list[tuple[float, float]]:
    return [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]


def study_shape(kind: str) -> list[tuple[list[tuple[float, float]], int]]:
    """The unit-frame drawing of a study class: `[(polygon, fill)]`, painted in order (fill 0 cuts a hole)."""
    if kind in SHAPES:
        return [(shape_polygon(kind, 0.0, 0.0, 1.0, 0.0), 1)]
    half = [(math.cos(math.pi * i / 24), 0.45 - math.sin(math.pi * i / 24)) for i in range(25)]
    drawings = {
        "ring": [(_disc(0, 0, 1.0), 1), (_disc(0, 0, 0.55), 0)],
        "frame": [(_box(-0.8, -0.8, 0.8, 0.8), 1), (_box(-0.42, -0.42, 0.42, 0.42), 0)],
        "crescent": [(_disc(0, 0, 1.0), 1), (_disc(0.5, -0.15, 0.8), 0)],
        "semicircle": [(half, 1)],
        "ell": [([(-0.8, -1), (-0.25, -1), (-0.25, 0.45), (0.8, 0.45), (0.8, 1), (-0.8, 1)], 1)],
        "tee": [(_box(-0.9, -1, 0.9, -0.45), 1), (_box(-0.28, -0.45, 0.28, 1), 1)],
        "arrow": [([(-1, -0.25), (0.15, -0.25), (0.15, -0.75), (1, 0), (0.15, 0.75), (0.15, 0.25), (-1, 0.25)], 1)],
        "bowtie": [([(-1, -0.8), (0, 0), (-1, 0.8)], 1), ([(1, -0.8), (0, 0), (1, 0.8)], 1)],
        "bar": [(_box(-1, -0.24, 1, 0.24), 1)],
        "two_discs": [(_disc(-0.52, 0, 0.42), 1), (_disc(0.52, 0, 0.42), 1)],
    }
    if kind not in drawings:
        raise ValueError(f"unknown study class {kind!r}; expected one of {STUDY_CLASSES}")
    return drawings[kind]


def _study_background(rng: np.random.Generator, w: int, h: int, lo: int, hi: int) -> np.ndarray:
    """A nuisance background `[h, w, 3]` float with channel values in [lo, hi): a noisy gradient between two
    colours, or a faint texture on one colour."""
    if rng.random() < 0.7:
        c0, c1 = (np.array(random_colour(rng, lo, hi), dtype=np.float32) for _ in range(2))
        t = np.linspace(0, 1, w, dtype=np.float32)[None, :, None] * np.ones((h, 1, 1), np.float32)
        if rng.random() < 0.5:
            t = np.linspace(0, 1, h, dtype=np.float32)[:, None, None] * np.ones((1, w, 1), np.float32)
        return c0 * (1 - t) + c1 * t
    tex = np.asarray(texture(TEXTURES[int(rng.integers(len(TEXTURES)))], rng, w, h), dtype=np.float32)
    base = np.array(random_colour(rng, lo, hi), dtype=np.float32)
    return base + (tex - tex.mean((0, 1))) * rng.uniform(0.05, 0.15)


def study_image(kind: str, rng: np.random.Generator, size: tuple[int, int] = (36, 48), supersample: int = 4):
    """One study image of class `kind`: the class mask (drawn at `supersample` x, box-filtered to an
    anti-aliased alpha) filled with a bright colour of random hue (sometimes faintly textured) on a dark
    nuisance background, with small distractor dots, sometimes a thin occluding line, and pixel noise.
    Position, scale (circumradius 0.32-0.46 of the shorter side), rotation, stretch (up to 1.16x) and every
    colour are drawn at random."""
    w, h = (int(v) for v in rng.integers(size[0], size[1] + 1, size=2))
    dark, bright = (0, 110), (130, 256)
    if rng.random() < 0.5:  # polarity: a bright shape on a dark ground or a dark shape on a bright one
        dark, bright = bright, dark
    bg = _study_background(rng, w, h, *dark)
    side = min(w, h)
    r = side * rng.uniform(0.32, 0.46)
    stretch = math.exp(rng.uniform(-0.15, 0.15))
    angle = rng.uniform(0, 2 * math.pi)
    cx, cy = rng.uniform(r * 0.9, w - r * 0.9), rng.uniform(r * 0.9, h - r * 0.9)
    ca, sa, s = math.cos(angle), math.sin(angle), supersample
    mask = Image.new("L", (w * s, h * s), 0)
    draw = ImageDraw.Draw(mask)
    for poly, fill in study_shape(kind):
        pts = []
        for x, y in poly:
            x, y = x * r * stretch, y * r / stretch
            pts.append(((cx + ca * x - sa * y) * s, (cy + sa * x + ca * y) * s))
        draw.polygon(pts, fill=255 * fill)
    alpha = np.asarray(mask.resize((w, h), Image.BOX), dtype=np.float32)[..., None] / 255.0
    fg = np.broadcast_to(np.array(random_colour(rng, *bright), dtype=np.float32), (h, w, 3))
    if rng.random() < 0.1:  # a faintly textured fill
        tex = np.asarray(texture(TEXTURES[int(rng.integers(len(TEXTURES)))], rng, w, h), dtype=np.float32)
        fg = fg + (tex - tex.mean((0, 1))) * 0.2
    img = Image.fromarray(np.clip(bg * (1 - alpha) + fg * alpha, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(0, 3))):  # distractors, well below the shape's scale
        q = rng.uniform(0.6, 1.4)
        x, y = rng.uniform(0, w), rng.uniform(0, h)
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)([x - q, y - q, x + q, y + q], fill=random_colour(rng))
    if rng.random() < 0.1:  # an occluding line
        x0, y0, x1, y1 = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(0, w), rng.uniform(0, h)
        draw.line([x0, y0, x1, y1], fill=random_colour(rng, *dark), width=1)
    noisy = np.asarray(img, dtype=np.float32) + rng.normal(0, rng.uniform(2, 6), size=(h, w, 3))
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


def _write_study_images(job) -> None:
    seed, split_id, start, stop, folder, size, labelled = job
    folder = Path(folder)
    for i in range(start, stop):
        rng = np.random.default_rng([seed, 31, split_id, i])
        if labelled:
            ci, k = divmod(i, labelled)
            name = STUDY_CLASSES[ci]
            path = folder / name / f"{name}_{k:05d}.jpg"
        else:
            name = STUDY_CLASSES[int(rng.integers(len(STUDY_CLASSES)))]
            path = folder / f"img_{i:07d}.jpg"
        study_image(name, rng, size).save(path, quality=92)


def make_study(
    out: str | Path,
    seed: int = 0,
    pool: int = 20000,
    train_per_class: int = 40,
    val_per_class: int = 40,
    size: tuple[int, int] = (36, 48),
    workers: int = 0,
) -> Path:
    """Write the study set; returns its root. Deterministic in `seed` (not in `workers`: every image draws
    from its own generator).

    `<out>/pool/train/unlabeled/*.jpg`: `pool` images of uniformly drawn classes, labels not kept (the
    pretraining data, `data.root=<out>/pool`). `<out>/labelled/{train,val}/<class>/*.jpg`: the small
    labelled split of the downstream task (fine-tuning, linear probe, k-NN; `data.root=<out>/labelled`).
    Image sides are drawn from `size` (inclusive)."""
    out = Path(out)
    jobs = []
    chunk = 500
    (out / "pool" / "train" / "unlabeled").mkdir(parents=True, exist_ok=True)
    for start in range(0, pool, chunk):
        jobs.append((seed, 0, start, min(start + chunk, pool), str(out / "pool" / "train" / "unlabeled"), size, 0))
    for split, per_class, split_id in (("train", train_per_class, 1), ("val", val_per_class, 2)):
        for name in STUDY_CLASSES:
            (out / "labelled" / split / name).mkdir(parents=True, exist_ok=True)
        n = per_class * len(STUDY_CLASSES)
        for start in range(0, n, chunk):
            jobs.append((seed, split_id, start, min(start + chunk, n), str(out / "labelled" / split), size, per_class))
    if workers > 0:
        import multiprocessing

        with multiprocessing.get_context("spawn").Pool(workers) as p:
            p.map(_write_study_images, jobs)
    else:
        for job in jobs:
            _write_study_images(job)
    return out


# -------------------------------------------------------------------------------- realistic JPEGs (benchmarks)
def natural_image(rng: np.random.Generator, w: int = 500, h: int = 375) -> Image.Image:
    """A photo-like RGB image: colour noise with a 1/f amplitude spectrum (the average spectrum of natural
    images), a few solid shapes with sharp edges, and sensor-like pixel noise. At quality 90 a 500 x 375
    image is a JPEG of about 100 KB, like an ImageNet training photo, so decoding costs what it costs there."""
    fy = np.fft.fftfreq(h)[:, None]
    fx = np.fft.rfftfreq(w)[None, :]
    f = np.sqrt(fx**2 + fy**2)
    f[0, 0] = 1.0
    amp = 1.0 / f
    amp[0, 0] = 0.0
    channels = [
        np.fft.irfft2(amp * (rng.normal(size=f.shape) + 1j * rng.normal(size=f.shape)), s=(h, w)) for _ in "rgb"
    ]
    mix = rng.normal(size=(3, 3)) * 0.5 + np.eye(3)  # correlated channels
    field = np.stack(channels, -1) @ mix
    field = (field - field.mean()) / (field.std() + 1e-8)
    img = Image.fromarray(np.clip(128 + 45 * field + rng.uniform(-40, 40, 3), 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(2, 6))):
        x, y, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(15, 120)
        if rng.random() < 0.5:
            draw.ellipse([x - r, y - r * rng.uniform(0.5, 1.5), x + r, y + r], fill=random_colour(rng))
        else:
            draw.polygon(
                [(x + r * math.cos(t), y + r * math.sin(t)) for t in rng.uniform(0, 2 * math.pi, 5)],
                fill=random_colour(rng),
            )
    noisy = np.asarray(img).astype(np.float32) + rng.normal(0, 6, size=(h, w, 3))
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


def _write_jpeg(job) -> None:
    path, seed, w, h, quality = job
    natural_image(np.random.default_rng(seed), w, h).save(path, quality=quality)


def make_jpegs(
    out: str | Path,
    images: int = 2000,
    classes: int = 10,
    seed: int = 0,
    size: tuple[int, int] = (500, 375),
    quality: int = 90,
    workers: int = 1,
) -> Path:
    """`images` photo-like JPEGs (`natural_image`, `size` = (width, height)) in the ImageNet training layout
    `out/train/c<k>/<k>_<i>.JPEG`, spread over `classes` folders, for the loader and end-to-end benchmarks.
    Deterministic in `seed` (image i from the generator seeded by (seed, 30, i)); `workers` processes."""
    out = Path(out)
    jobs = []
    for i in range(images):
        d = out / "train" / f"c{i % classes:03d}"
        d.mkdir(parents=True, exist_ok=True)
        jobs.append((str(d / f"{i % classes:03d}_{i:06d}.JPEG"), [seed, 30, i], size[0], size[1], quality))
    if workers > 1:
        from multiprocessing import get_context

        with get_context("spawn").Pool(workers) as pool:
            pool.map(_write_jpeg, jobs, chunksize=16)
    else:
        for job in jobs:
            _write_jpeg(job)
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
    c.add_argument("--train-images", type=int, default=500)
    c.add_argument("--val-images", type=int, default=100)
    s = sub.add_parser("ade20k", help="ADEChallengeData2016 layout (images/ and annotations/, training + validation)")
    s.add_argument("--out", default="data/tiny/ade20k")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--train-images", type=int, default=240)
    s.add_argument("--val-images", type=int, default=40)
    st = sub.add_parser("study", help="the study set: unlabeled pool + small labelled split, 16 shape classes")
    st.add_argument(
        "--preset", choices=sorted(STUDY_PRESETS), default="cpu", help="sizes (cpu: 32 px models, gpu: 64 px)"
    )
    st.add_argument("--out", default=None, help="default: data/study-<preset>")
    st.add_argument("--seed", type=int, default=0)
    st.add_argument("--pool", type=int, default=None, help="unlabeled images (default: the preset's)")
    st.add_argument("--train-per-class", type=int, default=None)
    st.add_argument("--val-per-class", type=int, default=None)
    st.add_argument("--workers", type=int, default=0, help="processes (0: this one)")
    j = sub.add_parser("jpegs", help="photo-like JPEGs (500x375, quality 90) in train/<class>/ for the benchmarks")
    j.add_argument("--out", default="data/jpegs")
    j.add_argument("--seed", type=int, default=0)
    j.add_argument("--images", type=int, default=2000)
    j.add_argument("--classes", type=int, default=10)
    j.add_argument("--size", type=int, nargs=2, default=(500, 375), metavar=("W", "H"))
    j.add_argument("--quality", type=int, default=90)
    j.add_argument("--workers", type=int, default=1, help="processes writing images")
    args = p.parse_args(argv)
    t0 = time.time()
    if args.kind == "study":
        sizes = dict(STUDY_PRESETS[args.preset])
        for key in ("pool", "train_per_class", "val_per_class"):
            if getattr(args, key) is not None:
                sizes[key] = getattr(args, key)
        root = make_study(args.out or f"data/study-{args.preset}", args.seed, **sizes, workers=args.workers)
        n = sizes["pool"] + (sizes["train_per_class"] + sizes["val_per_class"]) * len(STUDY_CLASSES)
        print(
            f"wrote {n} images ({sizes['pool']} unlabeled, {len(STUDY_CLASSES)} classes) to {root} "
            f"in {time.time() - t0:.1f}s"
        )
        return
    if args.kind == "imagenet":
        root = make_imagenet(args.out, args.seed, args.train_per_class, args.val_per_class)
        n = (args.train_per_class + args.val_per_class) * len(IMAGENET_CLASSES)
        print(f"wrote {n} images in {len(IMAGENET_CLASSES)} classes to {root} in {time.time() - t0:.1f}s")
    elif args.kind == "coco":
        root = make_coco(args.out, args.seed, args.train_images, args.val_images)
        print(
            f"wrote {args.train_images} + {args.val_images} COCO-layout images ({len(COCO_CLASSES)} categories) "
            f"to {root} in {time.time() - t0:.1f}s"
        )
    elif args.kind == "jpegs":
        root = make_jpegs(args.out, args.images, args.classes, args.seed, tuple(args.size), args.quality, args.workers)
        print(
            f"wrote {args.images} {args.size[0]}x{args.size[1]} JPEGs (quality {args.quality}) to {root / 'train'} "
            f"in {time.time() - t0:.1f}s"
        )
    elif args.kind == "ade20k":
        root = make_ade20k(args.out, args.seed, args.train_images, args.val_images)
        n = args.train_images + args.val_images
        print(
            f"wrote {n} images + label maps ({len(ADE20K_TINY_CLASSES)} classes) to {root} in {time.time() - t0:.1f}s"
        )


if __name__ == "__main__":
    main()
