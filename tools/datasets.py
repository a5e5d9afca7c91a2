"""Tiny procedural datasets in the standard layouts, for the demo and the tests (never downloaded).

    python -m tools.datasets imagenet --out data/tiny/imagenet [--seed 0 --train-per-class 200 ...]

`imagenet`: `train/<class>/*.jpg` and `val/<class>/*.jpg`, ten visually distinct classes: six solid shapes
(circle, square, triangle, star, cross, hexagon) at random positions, scales, rotations and colours on a
noisy background, and four textures (horizontal stripes, vertical stripes, checkerboard, dots) with
random period, phase and colours. Image sides are 32-64 px. Everything is a function of the seed.

The drawing primitives (`shape_polygon`, `draw_background`, `texture`) are shared by the COCO- and
ADE20K-layout generators, which place several shapes per image and keep their polygons as annotations.
"""

from __future__ import annotations

import argparse
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


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m tools.datasets", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="kind", required=True)
    a = sub.add_parser("imagenet", help="ImageNet folder layout (train/<class>/*.jpg, val/<class>/*.jpg)")
    a.add_argument("--out", default="data/tiny/imagenet")
    a.add_argument("--seed", type=int, default=0)
    a.add_argument("--train-per-class", type=int, default=200)
    a.add_argument("--val-per-class", type=int, default=50)
    args = p.parse_args(argv)
    t0 = time.time()
    if args.kind == "imagenet":
        root = make_imagenet(args.out, args.seed, args.train_per_class, args.val_per_class)
        n = (args.train_per_class + args.val_per_class) * len(IMAGENET_CLASSES)
        print(f"wrote {n} images in {len(IMAGENET_CLASSES)} classes to {root} in {time.time() - t0:.1f}s")


if __name__ == "__main__":
    main()
