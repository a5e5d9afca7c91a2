"""Segmentation data: the ADE20K layout and its bad inputs, reduce_zero_label, the training pipeline
(geometry shared by image and label, padding with ignore, cat_max_ratio, seeded randomness)."""

import shutil
from unittest.mock import ANY

import numpy as np
import pytest
import torch
from PIL import Image

from core.data import CorruptImageError, DataError, Skipped
from segmentation.classes import ADE20K_CLASSES
from segmentation.data import (
    ADE20K,
    IGNORE,
    MEAN,
    STD,
    TrainPipeline,
    check_labels,
    class_names,
    list_pairs,
    read_label,
    reduce_zero_label,
    rescale_size,
)
from tools.datasets import ADE20K_TINY_CLASSES


def copy(src, tmp_path):
    root = tmp_path / "ade"
    shutil.copytree(src, root)
    return root


def test_reduce_zero_label():
    label = np.array([[0, 1, 2], [150, 255, 7]], dtype=np.uint8)
    assert reduce_zero_label(label).tolist() == [[255, 0, 1], [149, 255, 6]]


def test_generated_set_has_the_ade20k_layout(tiny_ade20k):
    pairs = list_pairs(tiny_ade20k, "train")
    assert len(pairs) == 16 and len(list_pairs(tiny_ade20k, "validation")) == 4
    img, ann = pairs[0]
    assert img.parent.name == "training" and img.parent.parent.name == "images" and img.suffix == ".jpg"
    assert ann.parent.parent.name == "annotations" and ann.stem == img.stem and ann.suffix == ".png"
    values = np.unique(np.concatenate([read_label(a, 8).ravel() for _, a in pairs]))
    assert values.min() == 0 and values.max() <= 8 and len(values) >= 6  # "other" and most classes appear
    assert class_names(tiny_ade20k) == list(ADE20K_TINY_CLASSES)
    assert min(min(Image.open(i).size) for i, _ in pairs) < 48  # some images are smaller than the crop


def test_class_names_default_to_ade20k(tmp_path):
    assert class_names(tmp_path) == list(ADE20K_CLASSES) and len(ADE20K_CLASSES) == 150
    assert class_names(tmp_path, 3) == ["wall", "building", "sky"]


def test_class_count_mismatch_is_named(tiny_ade20k):
    with pytest.raises(DataError, match="data.num_classes=150 but .*class_names.txt lists 8 classes"):
        class_names(tiny_ade20k, 150)


def test_image_without_label_and_label_without_image_are_named(tiny_ade20k, tmp_path):
    root = copy(tiny_ade20k, tmp_path)
    (root / "annotations" / "training" / "ADE_train_00000003.png").unlink()
    with pytest.raises(DataError, match="1 image\\(s\\) without a label file .*ADE_train_00000003.jpg"):
        list_pairs(root, "train")
    (root / "images" / "training" / "ADE_train_00000003.jpg").unlink()
    (root / "images" / "validation" / "ADE_val_00000002.jpg").unlink()
    with pytest.raises(DataError, match="1 label file\\(s\\) without an image .*ADE_val_00000002.png"):
        list_pairs(root, "val")
    with pytest.raises(DataError, match="does not exist; expected the ADEChallengeData2016 layout"):
        list_pairs(tmp_path / "nowhere", "train")


def test_label_values_out_of_range_are_named_with_the_values(tmp_path):
    path = tmp_path / "bad.png"
    Image.fromarray(np.array([[0, 3, 200], [151, 1, 0]], dtype=np.uint8)).save(path)
    with pytest.raises(DataError, match="bad.png: label values outside 0..150: 151, 200"):
        read_label(path, 150)
    assert check_labels([(path, path)], 150) == [f"{path}: label values outside 0..150: 151, 200"]
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "rgb.png")
    with pytest.raises(DataError, match="rgb.png: label maps must have one channel"):
        read_label(tmp_path / "rgb.png", 150)


def test_corrupt_files_are_named_or_skipped(tiny_ade20k, tmp_path):
    root = copy(tiny_ade20k, tmp_path)
    (root / "images" / "validation" / "ADE_val_00000001.jpg").write_bytes(b"not a jpeg")
    (root / "annotations" / "validation" / "ADE_val_00000002.png").write_bytes(b"\x89PNG truncated")
    ds = ADE20K(root, "val", 8)
    with pytest.raises(CorruptImageError, match="ADE_val_00000001.jpg: cannot decode image"):
        ds[0]
    with pytest.raises(CorruptImageError, match="ADE_val_00000002.png: cannot decode label map"):
        ds[1]
    skipping = ADE20K(root, "val", 8, skip_corrupt=True)  # evaluation: left out, named
    assert skipping[0] == Skipped(((str(root / "images" / "validation" / "ADE_val_00000001.jpg"), ANY),))
    assert skipping[1].sample is None and skipping[1].files[0][0].endswith("ADE_val_00000002.png")
    assert not isinstance(skipping[2], Skipped)


def test_label_and_image_of_different_sizes(tiny_ade20k, tmp_path):
    root = copy(tiny_ade20k, tmp_path)
    Image.fromarray(np.ones((5, 5), np.uint8)).save(root / "annotations" / "validation" / "ADE_val_00000001.png")
    with pytest.raises(DataError, match="ADE_val_00000001.png: label map is 5x5 but .*ADE_val_00000001.jpg is"):
        ADE20K(root, "val", 8)[0]


def test_rescale_follows_mmcv_keep_ratio():
    # ADE20K test scale (2048, 512): short side to 512 unless the long side would pass 2048
    assert rescale_size(683, 512, (2048, 512)) == (683, 512)
    assert rescale_size(640, 480, (2048, 512)) == (683, 512)  # 640 * 512 / 480 = 682.67 -> 683
    assert rescale_size(3000, 500, (2048, 512)) == (2048, 341)  # long side bound: factor 2048 / 3000


def test_pipeline_moves_image_and_label_together_and_pads_with_ignore():
    # no rescale (the image already fits (48, 16) exactly), flip always, no colour change: the
    # denormalised image must still encode its label pixel for pixel, and padding must be 0 / 255
    label = np.tile(np.arange(48, dtype=np.uint8) % 7, (16, 1))  # [16, 48]
    image = Image.fromarray(np.repeat((label * 30)[..., None], 3, axis=2))
    pipe = TrainPipeline(
        scale=(48, 16), ratio_range=(1.0, 1.0), crop=32, cat_max_ratio=1.0, flip=1.0, photometric=False
    )
    np.random.seed(0)
    x, y = pipe(image, label)
    assert x.shape == (3, 32, 32) and y.shape == (32, 32) and y.dtype == torch.long
    assert torch.all(y[16:] == IGNORE) and torch.all(x[:, 16:] == 0)  # padded rows
    raw = (x[:, :16] * STD + MEAN).round()
    assert torch.equal(raw[0], y[:16].float() * 30)
    assert not torch.equal(y[0], torch.from_numpy(label[0, :32].astype(np.int64)))  # flipped (not the left part)


def test_crops_dominated_by_one_class_are_redrawn():
    # left 30 columns all class 0; the rest alternate classes 1 / 2 every 2 columns: a 20 x 20 crop starting
    # at x <= 10 is all class 0, one starting at x > 15 is acceptable (no class >= 75 % of it)
    label = np.zeros((20, 100), np.uint8)
    label[:, 30:] = 1 + (np.arange(70) // 2) % 2
    image = Image.fromarray(np.zeros((20, 100, 3), np.uint8))
    strict = TrainPipeline(scale=(100, 20), ratio_range=(1, 1), crop=20, cat_max_ratio=0.75, flip=0, photometric=False)
    loose = TrainPipeline(scale=(100, 20), ratio_range=(1, 1), crop=20, cat_max_ratio=1.0, flip=0, photometric=False)

    def max_share(pipe, seed):
        np.random.seed(seed)
        _, y = pipe(image, label)
        return torch.unique(y, return_counts=True)[1].max().item() / y.numel()

    assert max(max_share(strict, s) for s in range(100)) < 0.75
    assert max(max_share(loose, s) for s in range(100)) == 1.0


def test_training_samples_are_seeded_by_epoch_and_index(tiny_ade20k):
    ds = ADE20K(tiny_ade20k, "train", 8, TrainPipeline(scale=(192, 48), crop=48), seed=3)
    a, b = ds[(1, 5)], ds[(1, 5)]
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    c = ds[(2, 5)]
    assert not torch.equal(a[0], c[0])
    assert a[0].shape == (3, 48, 48) and set(a[1].unique().tolist()) <= set(range(8)) | {IGNORE}


def test_images_smaller_than_the_crop_are_padded(tiny_ade20k):
    ds = ADE20K(tiny_ade20k, "train", 8, TrainPipeline(scale=(192, 48), ratio_range=(0.5, 0.5), crop=48))
    x, y = ds[(0, 7)]  # the 8th image is 24-44 px; at ratio 0.5 its short side is 24
    assert x.shape == (3, 48, 48) and (y == IGNORE).float().mean() > 0.4
