"""The pretraining input pipeline with three interchangeable backends (`data.backend`).

Every backend draws the same random numbers for sample `i` of epoch `e` (core.data: a generator seeded by
`(seed, e, i)`, in this order: RandomResizedCrop's `get_params`, the flip, ColorJitter's `get_params`, then
`extra()`, the mask spec), so the crops, flips and masks are the same whatever the backend, the number of
loader workers or processes. They differ in where the pixels are made:

- `pil` (default): the reference path, unchanged: PIL decode, bicubic RandomResizedCrop, flip (and jitter),
  ToTensor and Normalize in the loader workers; float32 batches travel to the device.
- `uint8`: the same PIL decode, crop and flip in the workers, but the batch stays uint8 `[N, H, W, 3]` (a
  quarter of the bytes through shared memory, pinned memory and the bus) and is converted and normalised on
  the device. On CPU the images are bit-identical to `pil`'s. `data.jpeg_draft=true` adds libjpeg's
  DCT-domain downscaling (PIL `draft`, 1/2, 1/4 or 1/8) for samples whose crop stays at least twice the
  output size on both sides after it: the crop box is drawn on the full-size image as before and mapped into
  the reduced one, so the crops are the same; the resampling differs slightly (`draft_scale`, measured in
  tests/test_datapath.py). At 224 px this needs crops of 896 px or more: it pays for large photos, not for
  ImageNet's typical 500 x 375.
- `gpu`: the workers only read the file bytes and draw the parameters; JPEG decoding (torchvision's batched
  `decode_jpeg`, nvJPEG on CUDA), the crop + bicubic antialiased resize, flip, jitter and normalisation run
  on the training device. On a CPU device the same code runs on the CPU (how the tests exercise it).

`pretrain_data(...)` builds the dataset, sampler and loader from the `data` config section; the training
loop moves each batch with `PretrainData.to_device(batch, device) -> (images, labels, spec)`.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as nnf
from PIL import Image
from torch.utils.data import Dataset
from torchvision import transforms
from torchvision.transforms import functional as F

from core.config import ConfigError
from core.data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    CorruptImageError,
    ImageFolder,
    ShardedSampler,
    collate_skip,
    decode_skipping,
    list_image_folder,
    make_loader,
    open_rgb,
    sample_seed,
    with_skipped,
)
from core.errors import one_line

BACKENDS = ("pil", "uint8", "gpu")
BICUBIC = transforms.InterpolationMode.BICUBIC
RATIO = (3.0 / 4.0, 4.0 / 3.0)  # RandomResizedCrop's default aspect-ratio range


# ------------------------------------------------------------------------------------------ parameters
@dataclass(frozen=True)
class Augment:
    """The pretraining augmentation: RandomResizedCrop(size, scale, bicubic), horizontal flip, optional
    ColorJitter(b = c = s = color_jitter)."""

    size: int
    scale: tuple[float, float] = (0.2, 1.0)
    color_jitter: float | None = None

    def reference(self) -> transforms.Compose:
        """The `pil` backend's transform (the suite's pretraining transform since its first version)."""
        c = self.color_jitter
        return transforms.Compose(
            [
                transforms.RandomResizedCrop(self.size, scale=self.scale, interpolation=BICUBIC),
                transforms.RandomHorizontalFlip(),
                *([transforms.ColorJitter(c, c, c)] if c else []),
                transforms.ToTensor(),
                transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
            ]
        )

    def jitter_ranges(self):
        c = self.color_jitter
        j = transforms.ColorJitter(c, c, c)
        return j.brightness, j.contrast, j.saturation, j.hue


@dataclass(frozen=True)
class Params:
    """One sample's draws: crop box in full-image pixels, flip, and ColorJitter's order and factors."""

    top: int
    left: int
    height: int
    width: int
    flip: bool
    jitter: tuple | None = None  # (fn_idx, brightness, contrast, saturation, hue) as ColorJitter draws them


def draw_params(aug: Augment, width: int, height: int) -> Params:
    """The draws the reference transform makes for an image of `width` x `height`, from torch's global CPU
    generator, in the reference order (call inside the sample's seeded context)."""
    shape_only = torch.empty((), dtype=torch.uint8).expand(3, height, width)  # get_params reads the shape
    top, left, h, w = transforms.RandomResizedCrop.get_params(shape_only, list(aug.scale), list(RATIO))
    flip = bool(torch.rand(1) < 0.5)  # RandomHorizontalFlip(p=0.5)
    jitter = None
    if aug.color_jitter:
        fn_idx, b, c, s, hue = transforms.ColorJitter.get_params(*aug.jitter_ranges())
        jitter = (tuple(int(i) for i in fn_idx), b, c, s, hue)
    return Params(top, left, h, w, flip, jitter)


@contextlib.contextmanager
def torch_seeded(seed: int):
    """Seed torch's CPU generator for one sample and restore it afterwards. Every draw of the pretraining
    augmentation and of the maskers comes from it, so this gives the reference's draws; unlike
    core.data.seeded it leaves python's, numpy's and the CUDA generators alone (cheaper, and a loader without
    workers on a GPU host does not reseed the CUDA generator that drop path uses)."""
    gen = torch.default_generator
    state = gen.get_state()
    gen.manual_seed(seed)
    try:
        yield
    finally:
        gen.set_state(state)


DRAFT_MARGIN = 2  # after the DCT scaling the crop must still be >= 2 x the output size on both sides


def draft_scale(p: Params, size: int) -> int:
    """The largest JPEG DCT scaling 1/s (s in 8, 4, 2) after which the crop is still at least
    `DRAFT_MARGIN` x `size` pixels on both sides, so a bicubic downscale by 2 or more still makes the output
    (measured: mean abs difference to the full decode about 1 level, high-frequency energy +3%); 1 when none."""
    for s in (8, 4, 2):
        if p.width >= DRAFT_MARGIN * s * size and p.height >= DRAFT_MARGIN * s * size:
            return s
    return 1


def _jitter_pil(img: Image.Image, jitter) -> Image.Image:
    fn_idx, b, c, s, h = jitter
    for fn in fn_idx:  # ColorJitter.forward's order and functions
        if fn == 0 and b is not None:
            img = F.adjust_brightness(img, b)
        elif fn == 1 and c is not None:
            img = F.adjust_contrast(img, c)
        elif fn == 2 and s is not None:
            img = F.adjust_saturation(img, s)
        elif fn == 3 and h is not None:
            img = F.adjust_hue(img, h)
    return img


# --------------------------------------------------------------------------------------------- uint8
class Uint8Folder(Dataset):
    """`root/<class>/*` -> `(uint8 [H, W, 3], label[, spec])`, the reference's pixels before ToTensor.
    Keys `(epoch, index)` as core.data.ImageFolder; undecodable files: CorruptImageError, or with
    `skip_corrupt` skipped as ImageFolder skips them (the next decodable image, with the draws of the key)."""

    def __init__(self, root, aug: Augment, *, seed=0, skip_corrupt=False, extra=None, draft=False, what="data"):
        self.root = Path(root)
        self.classes, self.samples = list_image_folder(root, what)
        self.aug, self.seed, self.skip_corrupt, self.extra, self.draft = aug, seed, skip_corrupt, extra, draft

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key):
        epoch, index = key if isinstance(key, tuple) else (0, key)

        def load(j):
            path, label = self.samples[j]
            return *self._decode(path, epoch, index), label

        item, files = decode_skipping(load, index, len(self), skip=self.skip_corrupt, replace=True)
        img, spec, label = item
        x = torch.from_numpy(np.array(img, dtype=np.uint8))
        return with_skipped((x, label) if self.extra is None else (x, label, spec), files)

    def _decode(self, path, epoch: int, index: int):
        try:
            with Image.open(path) as im:
                width, height = im.size
                with torch_seeded(sample_seed(self.seed, epoch, index)):
                    p = draw_params(self.aug, width, height)
                    spec = self.extra() if self.extra is not None else None
                s = draft_scale(p, self.aug.size) if self.draft and im.format == "JPEG" else 1
                if s > 1:
                    drafted = im.draft("RGB", (width // s, height // s))
                    s = 1 if drafted is None else round(width / drafted[1][2])  # the scale libjpeg applies
                img = im.convert("RGB")
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            raise CorruptImageError(f"{path}: cannot decode image ({type(e).__name__}: {e})", path) from None
        return self._crop(img, p, s), spec

    def _crop(self, img: Image.Image, p: Params, s: int) -> Image.Image:
        size = self.aug.size
        if s == 1:  # exactly torchvision's resized_crop on a PIL image
            img = img.crop((p.left, p.top, p.left + p.width, p.top + p.height)).resize((size, size), Image.BICUBIC)
        else:  # the box in the 1/s image: crop to the pixels it touches, resample the fractional box
            x0, y0, x1, y1 = p.left / s, p.top / s, (p.left + p.width) / s, (p.top + p.height) / s
            c0, r0 = math.floor(x0), math.floor(y0)
            c1, r1 = min(math.ceil(x1), img.size[0]), min(math.ceil(y1), img.size[1])
            img = img.crop((c0, r0, c1, r1)).resize(
                (size, size), Image.BICUBIC, box=(x0 - c0, y0 - r0, min(x1, c1) - c0, min(y1, r1) - r0)
            )
        if p.flip:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        if p.jitter is not None:
            img = _jitter_pil(img, p.jitter)
        return img


def normalize_uint8(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 `[N, H, W, 3]` -> float32 `[N, 3, H, W]` on `device`, ToTensor + Normalize's arithmetic."""
    x = x.to(device, non_blocking=True).permute(0, 3, 1, 2).contiguous().float().div_(255)
    mean = torch.tensor(IMAGENET_MEAN, dtype=x.dtype, device=device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=x.dtype, device=device).view(1, 3, 1, 1)
    return x.sub_(mean).div_(std)


# ----------------------------------------------------------------------------------------------- gpu
@dataclass
class Encoded:
    """One sample as the `gpu` backend's workers hand it over: the file's bytes (or, for a file that is not a
    JPEG, its pixels decoded by PIL), the draws, the label and the mask spec."""

    path: str
    data: torch.Tensor | None  # uint8 [bytes] of a JPEG file
    pixels: torch.Tensor | None  # uint8 [3, H, W]: a non-JPEG file, decoded in the worker
    params: Params
    label: int
    spec: torch.Tensor | None


class EncodedFolder(Dataset):
    """`root/<class>/*` -> `Encoded` (file bytes + the reference's draws); decoding happens on the device.
    A file whose header cannot be read is a CorruptImageError, or with `skip_corrupt` skipped as ImageFolder
    skips it (the next readable file, with the draws of the key)."""

    def __init__(self, root, aug: Augment, *, seed=0, skip_corrupt=False, extra=None, what="data"):
        self.root = Path(root)
        self.classes, self.samples = list_image_folder(root, what)
        self.aug, self.seed, self.skip_corrupt, self.extra = aug, seed, skip_corrupt, extra

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key):
        epoch, index = key if isinstance(key, tuple) else (0, key)
        item, files = decode_skipping(
            lambda j: self._encode(j, epoch, index), index, len(self), skip=self.skip_corrupt, replace=True
        )
        return with_skipped(item, files)

    def _encode(self, j: int, epoch: int, index: int) -> Encoded:
        path, label = self.samples[j]
        try:
            raw = np.fromfile(path, dtype=np.uint8)
            with Image.open(io.BytesIO(raw.tobytes())) as im:  # the header only
                width, height = im.size
                jpeg = im.format == "JPEG"
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            raise CorruptImageError(f"{path}: cannot decode image ({type(e).__name__}: {e})", path) from None
        with torch_seeded(sample_seed(self.seed, epoch, index)):
            p = draw_params(self.aug, width, height)
            spec = self.extra() if self.extra is not None else None
        pixels = None if jpeg else torch.from_numpy(np.array(open_rgb(path), dtype=np.uint8)).permute(2, 0, 1)
        return Encoded(str(path), torch.from_numpy(raw) if jpeg else None, pixels, p, label, spec)


def collate_encoded(batch):
    """A list of `Encoded` (corrupt ones dropped; None if none is left): stays a list, decoded on the device."""
    batch = [b for b in batch if b is not None]
    return batch or None


class DeviceAugment:
    """Decode a batch of `Encoded` samples on `device` and apply their draws there: crop, bicubic antialiased
    resize (PIL's filter, rounded to whole levels as PIL's uint8 output is), flip, jitter, ToTensor +
    Normalize. Returns `(images [N, 3, S, S] float32, labels [N], spec [N, ...] or None)`. A file whose header
    read but whose data decodes neither here nor with PIL is a CorruptImageError naming it, or with
    `skip_corrupt` dropped from the batch (fewer rows; None when none is left; it cannot be replaced this late)
    and listed in `skipped` ((path, reason) of the last call)."""

    def __init__(self, aug: Augment, skip_corrupt: bool = False):
        self.aug, self.skip_corrupt = aug, skip_corrupt
        self.skipped: list[tuple[str, str]] = []

    def decode(self, batch: list[Encoded], device: torch.device) -> list[torch.Tensor | None]:
        from torchvision.io import ImageReadMode, decode_jpeg

        self.skipped = []
        out: list[torch.Tensor | None] = [b.pixels.to(device) if b.pixels is not None else None for b in batch]
        todo = [k for k, b in enumerate(batch) if b.data is not None]
        try:
            images = decode_jpeg([batch[k].data for k in todo], mode=ImageReadMode.RGB, device=device)
        except RuntimeError:  # one bad file fails the whole call: decode one by one to find it
            images = []
            for k in todo:
                try:
                    images.append(decode_jpeg(batch[k].data, mode=ImageReadMode.RGB, device=device))
                except RuntimeError:
                    images.append(None)
        for k, img in zip(todo, images):
            if img is None:  # not decodable here (CMYK, exotic sampling): PIL in this process
                try:
                    img = torch.from_numpy(np.array(open_rgb(batch[k].path), dtype=np.uint8)).permute(2, 0, 1)
                    img = img.to(device)
                except CorruptImageError as e:
                    if not self.skip_corrupt:
                        raise
                    self.skipped.append((batch[k].path, one_line(e)))
                    img = None
            out[k] = img
        return out

    def __call__(self, batch: list[Encoded], device: torch.device):
        size = self.aug.size
        decoded = self.decode(batch, device)
        keep = [k for k, img in enumerate(decoded) if img is not None]
        if not keep:  # every file of the batch failed to decode (skip_corrupt), as collate_skip's None
            return None
        images = torch.empty(len(keep), 3, size, size, device=device)
        for row, k in enumerate(keep):
            p, img = batch[k].params, decoded[k]
            if img.shape[0] == 1:
                img = img.expand(3, -1, -1)
            crop = img[None, :3, p.top : p.top + p.height, p.left : p.left + p.width].float()
            x = nnf.interpolate(crop, size=(size, size), mode="bicubic", align_corners=False, antialias=True)
            x = x.round_().clamp_(0, 255)[0]
            if p.flip:
                x = x.flip(-1)
            if p.jitter is not None:
                x = _jitter_tensor(x, p.jitter)
            images[row] = x
        images.div_(255)
        mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
        images.sub_(mean).div_(std)
        labels = torch.tensor([batch[k].label for k in keep], dtype=torch.long)
        spec = torch.stack([batch[k].spec for k in keep]).to(device) if batch[0].spec is not None else None
        return images, labels, spec


def _blend(a: torch.Tensor, b: torch.Tensor | float, alpha: float) -> torch.Tensor:
    """PIL's Image.blend(a, b, alpha) on whole-level values: a + alpha (b - a), clipped, truncated."""
    return (a + alpha * (b - a)).clamp_(0, 255).floor_()


def _luma(x: torch.Tensor) -> torch.Tensor:
    """PIL's RGB -> L conversion (ITU-R 601-2 weights in 16-bit fixed point, rounded), `[3, H, W]` -> `[H, W]`."""
    r, g, b = x.double()
    return torch.floor((r * 19595 + g * 38470 + b * 7471 + 0x8000) / 65536).to(x.dtype)


def _jitter_tensor(x: torch.Tensor, jitter) -> torch.Tensor:
    """ColorJitter on `[3, H, W]` whole-level values 0..255, as torchvision's PIL functions compute it
    (ImageEnhance's blends with PIL's integer grey and mean); hue through torchvision's tensor function."""
    fn_idx, b, c, s, h = jitter
    for fn in fn_idx:
        if fn == 0 and b is not None:  # ImageEnhance.Brightness: blend with black
            x = _blend(torch.zeros_like(x), x, b)
        elif fn == 1 and c is not None:  # ImageEnhance.Contrast: blend with the rounded mean grey
            mean = math.floor(_luma(x).double().mean().item() + 0.5)
            x = _blend(torch.full_like(x, float(mean)), x, c)
        elif fn == 2 and s is not None:  # ImageEnhance.Color: blend with the grey image
            x = _blend(_luma(x).expand_as(x), x, s)
        elif fn == 3 and h is not None:
            x = (F.adjust_hue(x / 255, h) * 255).round_()
    return x


def check_device_decode(device: torch.device) -> None:
    """ConfigError when torchvision cannot decode a JPEG on `device` (data.backend=gpu), before any compute."""
    from torchvision.io import ImageReadMode, decode_jpeg

    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 30, 90)).save(buf, "JPEG", quality=90)
    data = torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)
    try:
        decode_jpeg([data], mode=ImageReadMode.RGB, device=device)
    except (RuntimeError, NotImplementedError, TypeError) as e:
        raise ConfigError(
            f"data.backend=gpu: torchvision cannot decode JPEG on {device} ({e}); use uint8 or pil"
        ) from None


# --------------------------------------------------------------------------------------- the loader
@dataclass
class PretrainData:
    """What the pretraining loop iterates: `for batch in data.loader: images, labels, spec =
    data.to_device(batch, device)`. With data.skip_corrupt, a batch whose every image failed to decode is None
    from the loader (pil, uint8) or from `to_device` (gpu, which decodes there)."""

    backend: str
    dataset: Dataset
    sampler: ShardedSampler
    loader: torch.utils.data.DataLoader
    augment: DeviceAugment | None = None

    def to_device(self, batch, device: torch.device):
        if batch is None:
            return None
        if self.backend == "gpu":
            out = self.augment(batch, device)
            for path, reason in self.augment.skipped:  # dropped on the device: recorded with the loader's
                self.loader.skip(path, reason)
            return out
        images, labels, *rest = batch
        spec = rest[0].to(device, non_blocking=True) if rest else None
        if self.backend == "uint8":
            return normalize_uint8(images, device), labels, spec
        return images.to(device, non_blocking=True), labels, spec


def augment_from_config(c, img_size: int) -> Augment:
    return Augment(size=int(img_size), scale=tuple(float(v) for v in c.crop_scale), color_jitter=c.color_jitter)


def check_config(c) -> None:
    """The data.backend / data.jpeg_draft values (ConfigError naming the option)."""
    backend = c.get("backend", "pil")
    if backend not in BACKENDS:
        raise ConfigError(f"data.backend must be one of {', '.join(BACKENDS)}; got {backend!r}")
    if c.get("jpeg_draft", False) and backend != "uint8":
        raise ConfigError(f"data.jpeg_draft=true needs data.backend=uint8 (got data.backend={backend})")


def pretrain_data(
    c,
    root: str | os.PathLike,
    img_size: int,
    *,
    seed: int,
    env,
    extra: Callable[[], torch.Tensor] | None = None,
    what: str = "data.root (train split)",
) -> PretrainData:
    """Dataset, sampler and loader of the pretraining images under `root` (`<root>/<class>/*`) from the
    `data` config section `c` (batch_per_gpu, workers, crop_scale, color_jitter, skip_corrupt, backend,
    jpeg_draft); `extra` is the masker's per-sample draw. Raises ConfigError/DataError before any compute."""
    check_config(c)
    backend = c.get("backend", "pil")
    aug = augment_from_config(c, img_size)
    common = dict(seed=seed, skip_corrupt=c.skip_corrupt, extra=extra, what=what)
    augment, collate = None, collate_skip
    if backend == "pil":
        dataset = ImageFolder(root, aug.reference(), **common)
    elif backend == "uint8":
        dataset = Uint8Folder(root, aug, draft=bool(c.get("jpeg_draft", False)), **common)
    else:
        check_device_decode(env.device)
        dataset = EncodedFolder(root, aug, **common)
        augment, collate = DeviceAugment(aug, skip_corrupt=c.skip_corrupt), collate_encoded
    sampler = ShardedSampler(len(dataset), c.batch_per_gpu, rank=env.rank, world=env.world_size, seed=seed)
    if sampler.batches_per_epoch == 0:
        raise ConfigError(
            f"data.root: {len(dataset)} training images give no full batch of data.batch_per_gpu="
            f"{c.batch_per_gpu} on {env.world_size} process(es)"
        )
    loader = make_loader(dataset, sampler, workers=c.workers, device=env.device, drop_last=True, collate_fn=collate)
    return PretrainData(backend, dataset, sampler, loader, augment)
