"""Data plumbing shared by every task.

- `ImageFolder`: the ImageNet folder layout (`root/<class>/*.jpg`), validated up front (missing folder,
  class folder without images) and with corrupt images reported by path, or skipped and counted.
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
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler, default_collate

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".JPEG")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class DataError(ValueError):
    """Bad dataset input; the message names the file or folder and what was expected."""


class CorruptImageError(DataError):
    pass


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A well-mixed 63-bit seed for one sample of one epoch."""
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(2, dtype=np.uint64)[0] >> 1)


@contextlib.contextmanager
def seeded(seed: int):
    """Run a block with the CPU torch, python `random` and numpy global RNGs seeded from `seed` (timm's
    augmentations draw from all three), restoring the caller's RNG states afterwards."""
    py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed % 2**32)
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


def open_rgb(path: str | os.PathLike) -> Image.Image:
    """Decode an image fully (so truncated files fail here) as RGB; CorruptImageError names the file."""
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise CorruptImageError(f"{path}: cannot decode image ({type(e).__name__}: {e})") from None


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
        files = sorted(e.path for e in os.scandir(root / c) if e.is_file() and e.name.endswith(IMG_EXTENSIONS))
        if not files:
            raise DataError(f"{what}: class folder {root / c} holds no images ({', '.join(IMG_EXTENSIONS)})")
        samples.extend((f, ci) for f in files)
    return classes, samples


class ImageFolder(Dataset):
    """`root/<class>/*.jpg` with reproducible per-sample augmentation.

    dataset[(epoch, i)] (or dataset[i] for epoch 0) returns `(image, label)`, or
    `(image, label, extra)` when `extra` is given: a function called in the same seeded context after the
    transform (pretraining draws the mask noise there). With `skip_corrupt` an undecodable file gives
    None (dropped by `collate_skip`, counted by the caller) instead of an error.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        transform: Callable | None = None,
        *,
        seed: int = 0,
        skip_corrupt: bool = False,
        extra: Callable[[], torch.Tensor] | None = None,
        what: str = "data",
    ):
        self.root = Path(root)
        self.classes, self.samples = list_image_folder(root, what)
        self.transform = transform
        self.seed = seed
        self.skip_corrupt = skip_corrupt
        self.extra = extra

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def targets(self) -> list[int]:
        return [c for _, c in self.samples]

    def __getitem__(self, key):
        epoch, index = key if isinstance(key, tuple) else (0, key)
        path, label = self.samples[index]
        try:
            img = open_rgb(path)
        except CorruptImageError:
            if self.skip_corrupt:
                return None
            raise
        return augment(img, label, self.transform, self.extra, sample_seed(self.seed, epoch, index))


def augment(img, label, transform, extra, seed: int):
    """`(transform(img), label[, extra()])` drawn inside the sample's seeded RNG context."""
    with seeded(seed):
        x = transform(img) if transform is not None else img
        if extra is not None:
            return x, label, extra()
    return x, label


class Augmented(Dataset):
    """Any dataset of `(PIL image, label)` (torchvision's CIFAR, Flowers-102, ...) with the same reproducible
    per-sample augmentation as `ImageFolder`: keys `(epoch, index)` or `index`."""

    def __init__(self, base, transform, *, seed: int = 0, extra: Callable[[], torch.Tensor] | None = None):
        self.base, self.transform, self.seed, self.extra = base, transform, seed, extra

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key):
        epoch, index = key if isinstance(key, tuple) else (0, key)
        item = self.base[index]
        if item is None:  # a corrupt image skipped by the base dataset
            return None
        img, label = item[:2]
        return augment(img, label, self.transform, self.extra, sample_seed(self.seed, epoch, index))


def collate_skip(batch):
    """default_collate after dropping the None entries of skipped corrupt samples (None if all were)."""
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
    dataset, sampler: ShardedSampler, *, workers: int, device: torch.device, drop_last: bool, collate_fn=collate_skip
):
    """The DataLoader every task uses: keys from `sampler`, corrupt samples dropped by `collate_skip`.

    It has its own generator, so starting an iterator (which draws the workers' base seed) does not consume
    the global RNG: a run resumed mid-epoch then draws the same random numbers as an uninterrupted one."""
    from torch.utils.data import DataLoader

    return DataLoader(
        dataset,
        batch_size=sampler.batch_size,
        sampler=sampler,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        drop_last=drop_last,
        collate_fn=collate_fn,
        persistent_workers=workers > 0,
        generator=torch.Generator().manual_seed(sampler.seed),
    )


def eval_sampler(n: int, batch: int, env) -> ShardedSampler:
    """The evaluation sampler: every item exactly once over all ranks, in order, no padding."""
    return ShardedSampler(n, batch, rank=env.rank, world=env.world_size, shuffle=False, drop_last=False, pad=False)


def train_eval_samplers(n_train: int, n_eval: int, batch: int, eval_batch: int, env, seed: int):
    """The training sampler (shuffled, equal batches on every rank) and the evaluation one (every item once)."""
    train = ShardedSampler(n_train, batch, rank=env.rank, world=env.world_size, seed=seed)
    return train, eval_sampler(n_eval, eval_batch, env)
