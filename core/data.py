"""Data plumbing shared by every task.

- `ImageFolder`: the ImageNet folder layout (`root/<class>/*.jpg`, extensions in any case), validated up
  front (missing folder, class folder without images) and with corrupt images reported by path.
- Corrupt images, one rule for every task and split: without `data.skip_corrupt` an undecodable file stops
  the run with a `CorruptImageError` naming it; with it, the sample is skipped: in training it is replaced
  by the next decodable image of the split (wrapping around; the batch keeps its size), in evaluation it is
  left out (the metrics say how many images they were computed on). A dataset returns `Skipped` for it;
  the loader `make_loader` builds drops the marker, and its `corrupt` record holds each file once with the
  reason (the engine names each file once in the log and lists them in results.json).
- Reproducible randomness: every random choice made for sample `i` in epoch `e` (augmentation, the mask
  noise) is drawn from a generator seeded by `(seed, e, i)`. The sampler hands `(epoch, index)` keys to
  the dataset, so results do not depend on the number of loader workers or processes, and a resumed run
  sees exactly the samples and augmentations an uninterrupted one would.
- `ShardedSampler`: a deterministic distributed sampler (same permutation on every rank, each rank takes
  every world-th index) that can start mid-epoch.
"""

from __future__ import annotations

import contextlib
import os
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler, default_collate

from core import interrupt
from core.errors import CorruptImageError, DataError, one_line

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")  # any case
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A well-mixed 63-bit seed for one sample of one epoch."""
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(2, dtype=np.uint64)[0] >> 1)


@contextlib.contextmanager
def seeded(seed: int):
    """Run a block with the CPU torch, python `random` and numpy global RNGs seeded from `seed` (timm's
    augmentations draw from all three), restoring the caller's RNG states afterwards. Only the CPU generator:
    `torch.manual_seed` would also seed every accelerator backend's generator (lazily, recording a stack trace
    per backend and call: about a third of a worker's time per sample), which `fork_rng(devices=[])` does not
    restore."""
    py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed % 2**32)
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


def is_image_file(name: str | os.PathLike) -> bool:
    """An image by its extension, in any case (`.JPEG`, `.jpg`, `.Png`)."""
    return str(name).lower().endswith(IMG_EXTENSIONS)


# EXIF orientation tag (0x0112) -> the transpose that shows the image upright
EXIF_ORIENTATION = 0x0112
EXIF_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def open_rgb(path: str | os.PathLike, *, exif_orientation: bool = False) -> Image.Image:
    """Decode an image fully (so truncated files fail here) as RGB; CorruptImageError names the file.

    `exif_orientation`: turn the pixels upright by the file's EXIF orientation tag first, as detectron2's
    `read_image` does for COCO. Off by default: the classification references (MAE, timm, torchvision's
    ImageFolder loader) read ImageNet pixels as stored."""
    try:
        with Image.open(path) as im:
            if exif_orientation:
                method = EXIF_TRANSPOSE.get(im.getexif().get(EXIF_ORIENTATION))
                if method is not None:
                    return im.transpose(method).convert("RGB")
            return im.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise CorruptImageError(f"{path}: cannot decode image ({type(e).__name__}: {e})", path) from None


# ---------------------------------------------------------------------------------------- corrupt images
@dataclass(frozen=True)
class Skipped:
    """A sample whose file(s) could not be decoded, under `skip_corrupt`: `files` = ((path, reason), ...),
    `sample` = the replacement (training) or None (evaluation: left out)."""

    files: tuple[tuple[str, str], ...]
    sample: object = None


def decode_skipping(load: Callable[[int], object], index: int, n: int, *, skip: bool, replace: bool):
    """`(load(index), files)`. Without `skip` a CorruptImageError propagates. With it, the files that failed
    are returned as `((path, reason), ...)` and: `replace` (training) tries index + 1, index + 2, ... (wrapping)
    until an item decodes; otherwise (evaluation) the item is None."""
    files = []
    for k in range(n if replace else 1):
        try:
            return load((index + k) % n), tuple(files)
        except CorruptImageError as e:
            if not skip:
                raise
            files.append((e.path or str(e), one_line(e)))
    if replace:
        raise DataError(f"data.skip_corrupt: none of the {n} images of the split can be decoded (e.g. {files[0][0]})")
    return None, tuple(files)


def with_skipped(sample, files: tuple):
    """`sample`, or `Skipped(files, sample)` when files were skipped to get it (None: left out)."""
    return Skipped(files, sample) if files or sample is None else sample


class SkipCollate:
    """Collate a batch of samples and `Skipped` markers: `(collate(kept samples) or None, ((path, reason), ...))`.
    `batched=False` (a loader with batch_size=None): one sample at a time, kept as it is."""

    def __init__(self, collate: Callable = default_collate, batched: bool = True):
        self.collate, self.batched = collate, batched

    def __call__(self, batch):
        samples = batch if self.batched else [batch]
        files, kept = [], []
        for b in samples:
            if isinstance(b, Skipped):
                files.extend(b.files)
                b = b.sample
            if b is not None:
                kept.append(b)
        if not kept:
            return None, tuple(files)
        return (self.collate(kept) if self.batched else kept[0]), tuple(files)


class Loader:
    """A DataLoader whose batches arrive without the markers of skipped corrupt samples (a batch of which
    nothing is left is None). `corrupt`: path -> reason for every file this process skipped, each once;
    `on_skip(split, path, reason)` is called the first time a file is skipped."""

    def __init__(self, loader, split: str = "train"):
        self.loader, self.split = loader, split
        self.corrupt: dict[str, str] = {}
        self.on_skip: Callable[[str, str, str], None] | None = None

    def __iter__(self):
        for batch, files in self.loader:
            for path, reason in files:
                self.skip(path, reason)
            yield batch

    def skip(self, path: str, reason: str) -> None:
        """Record a skipped file (also for one dropped after the loader, e.g. decoded on the device)."""
        if path not in self.corrupt:
            self.corrupt[path] = reason
            if self.on_skip is not None:
                self.on_skip(self.split, path, reason)

    def __len__(self) -> int:
        return len(self.loader)

    def __getattr__(self, name):  # dataset, sampler, batch_size, ... of the DataLoader
        if name == "loader":
            raise AttributeError(name)
        return getattr(self.loader, name)


def list_image_folder(root: str | os.PathLike, what: str = "data") -> tuple[list[str], list[tuple[str, int]]]:
    """Classes (sorted sub-folder names) and `(path, class_index)` samples of an ImageNet-layout folder."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{what}: folder {root} does not exist (expected the layout {root}/<class>/<image>.jpg)")
    classes = sorted(d.name for d in os.scandir(root) if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise DataError(f"{what}: {root} has no class sub-folders (expected {root}/<class>/<image>.jpg)")
    samples = []
    for ci, c in enumerate(classes):
        files = sorted(e.path for e in os.scandir(root / c) if e.is_file() and is_image_file(e.name))
        if not files:
            raise DataError(
                f"{what}: class folder {root / c} holds no images ({', '.join(IMG_EXTENSIONS)}, in any case)"
            )
        samples.extend((f, ci) for f in files)
    return classes, samples


class ImageFolder(Dataset):
    """`root/<class>/*.jpg` with reproducible per-sample augmentation.

    dataset[(epoch, i)] (or dataset[i] for epoch 0) returns `(image, label)`, or
    `(image, label, extra)` when `extra` is given: a function called in the same seeded context after the
    transform (pretraining draws the mask noise there). With `skip_corrupt` an undecodable file is skipped
    (`Skipped`): replaced by the next decodable image when `train`, left out otherwise.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        transform: Callable | None = None,
        *,
        seed: int = 0,
        skip_corrupt: bool = False,
        train: bool = True,
        extra: Callable[[], torch.Tensor] | None = None,
        what: str = "data",
    ):
        self.root = Path(root)
        self.classes, self.samples = list_image_folder(root, what)
        self.transform = transform
        self.seed = seed
        self.skip_corrupt, self.train = skip_corrupt, train
        self.extra = extra

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def targets(self) -> list[int]:
        return [c for _, c in self.samples]

    def decode(self, index: int):
        path, label = self.samples[index]
        return open_rgb(path), label

    def __getitem__(self, key):
        epoch, index = key if isinstance(key, tuple) else (0, key)
        item, files = decode_skipping(self.decode, index, len(self), skip=self.skip_corrupt, replace=self.train)
        if item is None:
            return Skipped(files)
        img, label = item
        return with_skipped(
            augment(img, label, self.transform, self.extra, sample_seed(self.seed, epoch, index)), files
        )


def augment(img, label, transform, extra, seed: int):
    """`(transform(img), label[, extra()])` drawn inside the sample's seeded RNG context."""
    with seeded(seed):
        x = transform(img) if transform is not None else img
        if extra is not None:
            return x, label, extra()
    return x, label


class Augmented(Dataset):
    """Any dataset of `(PIL image, label)` (torchvision's CIFAR, Flowers-102, ...) with the same reproducible
    per-sample augmentation as `ImageFolder`: keys `(epoch, index)` or `index`. A file the base dataset cannot
    decode is a CorruptImageError, or with `skip_corrupt` skipped as `ImageFolder` skips it (`train`:
    replaced by the next decodable one; otherwise left out)."""

    def __init__(
        self,
        base,
        transform,
        *,
        seed: int = 0,
        extra: Callable[[], torch.Tensor] | None = None,
        skip_corrupt: bool = False,
        train: bool = True,
    ):
        self.base, self.transform, self.seed, self.extra = base, transform, seed, extra
        self.skip_corrupt, self.train = skip_corrupt, train

    def __len__(self) -> int:
        return len(self.base)

    def decode(self, index: int):
        try:
            item = self.base[index]
        except CorruptImageError:
            raise
        except (OSError, SyntaxError, Image.DecompressionBombError) as e:  # torchvision's datasets decode with PIL
            name = f"{type(self.base).__name__}[{index}]"
            raise CorruptImageError(f"{name}: cannot decode image ({type(e).__name__}: {e})", name) from None
        if isinstance(item, Skipped):  # a base that skips by itself
            raise CorruptImageError(item.files[0][1], item.files[0][0])
        return item[:2]

    def __getitem__(self, key):
        epoch, index = key if isinstance(key, tuple) else (0, key)
        item, files = decode_skipping(self.decode, index, len(self), skip=self.skip_corrupt, replace=self.train)
        if item is None:
            return Skipped(files)
        img, label = item
        return with_skipped(
            augment(img, label, self.transform, self.extra, sample_seed(self.seed, epoch, index)), files
        )


def collate_skip(batch):
    """default_collate after dropping the None entries and `Skipped` markers of skipped corrupt samples (the
    replacement a marker carries is kept; None if nothing is left)."""
    batch = [b.sample if isinstance(b, Skipped) else b for b in batch]
    batch = [b for b in batch if b is not None]
    return default_collate(batch) if batch else None


class ShardedSampler(Sampler):
    """Deterministic sampler over `n` items for rank `rank` of `world` processes.

    Training (default): the permutation depends only on (seed, epoch); it is padded to a multiple of
    `world * batch_size` by wrapping around (or cut, with drop_last), so every rank gets the same whole
    number of batches. Evaluation (`shuffle=False, drop_last=False, pad=False`): rank r takes items
    r, r + world, ... with nothing repeated, so metrics summed over ranks count every item once.
    Yields `(epoch, index)` keys. `start_batch` skips the batches an interrupted epoch already did.
    """

    def __init__(
        self,
        n: int,
        batch_size: int,
        *,
        rank: int = 0,
        world: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = True,
        pad: bool = True,
    ):
        if n == 0:
            raise DataError("the dataset is empty")
        self.n, self.batch_size, self.rank, self.world = n, batch_size, rank, world
        self.seed, self.shuffle, self.drop_last, self.pad = seed, shuffle, drop_last, pad
        self.epoch = 0
        self.start_batch = 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def _mine(self) -> np.ndarray:
        order = (
            np.random.default_rng([self.seed, self.epoch]).permutation(self.n) if self.shuffle else np.arange(self.n)
        )
        if not self.pad and not self.drop_last:
            return order[self.rank :: self.world]
        per_rank = self.n / self.world
        batches = int(per_rank // self.batch_size) if self.drop_last else int(np.ceil(per_rank / self.batch_size))
        total = batches * self.batch_size * self.world
        if total > len(order):
            order = np.resize(order, total)  # wrap around
        return order[:total][self.rank :: self.world]

    @property
    def batches_per_epoch(self) -> int:
        mine = len(self._mine()) if not self.pad and not self.drop_last else None
        if mine is not None:
            return int(np.ceil(mine / self.batch_size))
        per_rank = self.n / self.world
        return int(per_rank // self.batch_size) if self.drop_last else int(np.ceil(per_rank / self.batch_size))

    def __len__(self) -> int:
        return max(len(self._mine()) - self.start_batch * self.batch_size, 0)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        for i in self._mine()[self.start_batch * self.batch_size :]:
            yield self.epoch, int(i)


def make_loader(
    dataset,
    sampler: ShardedSampler,
    *,
    workers: int,
    device: torch.device,
    drop_last: bool,
    collate_fn=default_collate,
    split: str = "train",
    batched: bool = True,
) -> Loader:
    """The loader every task uses: keys from `sampler`, the samples of skipped corrupt files dropped and
    recorded (`Loader.corrupt`), the rest collated by `collate_fn`. `batched=False`: one sample at a time
    (batch_size None; the sampler's batch size is ignored).

    It has its own generator, so starting an iterator (which draws the workers' base seed) does not consume
    the global RNG: a run resumed mid-epoch then draws the same random numbers as an uninterrupted one."""
    from torch.utils.data import DataLoader

    loader = DataLoader(
        dataset,
        batch_size=sampler.batch_size if batched else None,
        sampler=sampler,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        drop_last=drop_last if batched else False,
        collate_fn=SkipCollate(collate_fn, batched),
        persistent_workers=workers > 0,
        generator=torch.Generator().manual_seed(sampler.seed),
        worker_init_fn=interrupt.worker_init,  # SIGINT / SIGTERM are the main process's to handle
    )
    return Loader(loader, split)


def eval_sampler(n: int, batch: int, env) -> ShardedSampler:
    """The evaluation sampler: every item exactly once over all ranks, in order, no padding."""
    return ShardedSampler(n, batch, rank=env.rank, world=env.world_size, shuffle=False, drop_last=False, pad=False)


def train_eval_samplers(n_train: int, n_eval: int, batch: int, eval_batch: int, env, seed: int):
    """The training sampler (shuffled, equal batches on every rank) and the evaluation one (every item once)."""
    train = ShardedSampler(n_train, batch, rank=env.rank, world=env.world_size, seed=seed)
    return train, eval_sampler(n_eval, eval_batch, env)
