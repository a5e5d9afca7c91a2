"""Data plumbing: the deterministic sharded sampler, reproducible augmentation, the tiny generator."""

from pathlib import Path

import pytest
import torch
from torchvision import transforms

from core.data import DataError, ImageFolder, ShardedSampler, list_image_folder, sample_seed
from tools.datasets import IMAGENET_CLASSES, make_imagenet


def test_two_ranks_partition_the_single_process_batches():
    one = list(ShardedSampler(40, 8, seed=3))
    r0 = list(ShardedSampler(40, 4, rank=0, world=2, seed=3))
    r1 = list(ShardedSampler(40, 4, rank=1, world=2, seed=3))
    assert len(one) == len(r0) + len(r1) == 40
    for b in range(5):  # global batch b of one process = union of the two ranks' batch b
        assert {i for _, i in one[8 * b : 8 * b + 8]} == {i for _, i in r0[4 * b : 4 * b + 4] + r1[4 * b : 4 * b + 4]}


def test_sampler_is_a_function_of_seed_and_epoch_and_can_start_mid_epoch():
    s = ShardedSampler(30, 4, seed=1)
    s.set_epoch(2)
    a = list(s)
    s.set_epoch(2, start_batch=3)
    assert list(s) == a[12:]
    assert len(s) == len(a) - 12
    s.set_epoch(3)
    assert [i for _, i in s] != [i for _, i in a]
    assert all(e == 2 for e, _ in a)
    assert len(a) == 28  # drop_last: 7 full batches of 4


def test_augmentation_depends_only_on_seed_epoch_index(tiny_imagenet):
    tf = transforms.Compose([transforms.RandomResizedCrop(16), transforms.ToTensor()])
    ds = ImageFolder(tiny_imagenet / "train", tf, seed=5, extra=lambda: torch.rand(4))
    torch.manual_seed(0)
    x1, y1, n1 = ds[(1, 7)]
    torch.manual_seed(123)  # the caller's RNG does not matter ...
    x2, y2, n2 = ds[(1, 7)]
    assert torch.equal(x1, x2) and torch.equal(n1, n2) and y1 == y2
    x3, _, n3 = ds[(2, 7)]  # ... the epoch does
    assert not torch.equal(n1, n3)
    state = torch.get_rng_state()
    ds[(0, 0)]
    assert torch.equal(state, torch.get_rng_state())  # and the caller's RNG is left untouched


def test_sample_seed_differs_across_keys():
    seeds = {sample_seed(0, e, i) for e in range(5) for i in range(200)}
    assert len(seeds) == 1000


def test_missing_and_empty_folders_are_named(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        list_image_folder(tmp_path / "none")
    (tmp_path / "a").mkdir()
    with pytest.raises(DataError, match="no class sub-folders"):
        list_image_folder(tmp_path / "a")
    (tmp_path / "a" / "cls").mkdir()
    with pytest.raises(DataError, match="cls holds no images"):
        list_image_folder(tmp_path / "a")


def test_tiny_generator_is_deterministic_and_in_imagenet_layout(tmp_path):
    a = make_imagenet(tmp_path / "a", seed=4, train_per_class=3, val_per_class=1)
    b = make_imagenet(tmp_path / "b", seed=4, train_per_class=3, val_per_class=1)
    classes, samples = list_image_folder(a / "train")
    assert classes == sorted(IMAGENET_CLASSES) and len(samples) == 30
    assert len(list_image_folder(a / "val")[1]) == 10
    for (pa, _), (pb, _) in zip(samples, list_image_folder(b / "train")[1]):
        assert Path(pa).read_bytes() == Path(pb).read_bytes()
    from PIL import Image

    sizes = {Image.open(p).size for p, _ in samples}
    assert all(32 <= w <= 64 and 32 <= h <= 64 for w, h in sizes)


def test_evaluation_sharding_counts_every_item_once():
    shards = [list(ShardedSampler(10, 4, rank=r, world=3, shuffle=False, drop_last=False, pad=False)) for r in range(3)]
    items = sorted(i for shard in shards for _, i in shard)
    assert items == list(range(10))
    assert [
        ShardedSampler(10, 4, rank=r, world=3, shuffle=False, drop_last=False, pad=False).batches_per_epoch
        for r in range(3)
    ] == [1, 1, 1]
