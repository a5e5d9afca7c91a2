"""Segmentation reads and resizes as mmsegmentation does: label maps resized with cv2's nearest rule (checked
against mmcv's own `imresize`), images turned upright by their EXIF orientation (mmcv's cv2 decode does it for
images, not for the label PNGs)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from segmentation.data import ADE20K, nearest_index, resize_label


def test_nearest_index_written_out():
    # 5 -> 3: scale 1 / (3 / 5) = 5/3: floor(0), floor(1.67), floor(3.33) = 0, 1, 3
    assert nearest_index(5, 3).tolist() == [0, 1, 3]
    # 3 -> 7: floor(i * 3/7): 0 0 0 1 1 2 2
    assert nearest_index(3, 7).tolist() == [0, 0, 0, 1, 1, 2, 2]


def test_label_resize_differs_from_torch_nearest_where_float32_rounds():
    # 2 -> 82 rows: output row i reads source row floor(i * 2 / 82), so rows 0..40 read row 0 and 41..81 row 1;
    # torch's float32 scale puts 41 x 0.024390243 just under 1 and reads row 0 there
    label = torch.tensor([[0], [1]], dtype=torch.uint8)
    ours = resize_label(label, (82, 1))[:, 0]
    torch_nearest = F.interpolate(label[None, None].float(), size=(82, 1), mode="nearest")[0, 0, :, 0]
    assert ours.tolist() == [0] * 41 + [1] * 41
    assert torch_nearest[41] == 0 and torch_nearest.sum() == 40


@pytest.mark.interop
def test_label_resize_equals_mmcv_imresize_nearest():
    mmcv = pytest.importorskip("mmcv")
    rng = np.random.default_rng(0)
    for _ in range(40):
        sh, sw = rng.integers(20, 300, size=2)
        dh, dw = rng.integers(20, 700, size=2)
        label = rng.integers(0, 151, size=(sh, sw)).astype(np.uint8)
        ref = mmcv.imresize(label, (int(dw), int(dh)), interpolation="nearest")
        assert np.array_equal(resize_label(torch.from_numpy(label), (int(dh), int(dw))).numpy(), ref)


def test_images_are_read_upright_and_labels_as_stored(tmp_path):
    # upright: 24 wide, 16 high, red left half; stored turned clockwise with EXIF orientation 8 (shown turned back)
    upright = np.zeros((16, 24, 3), np.uint8)
    upright[:, :12] = (255, 0, 0)
    (tmp_path / "images" / "validation").mkdir(parents=True)
    (tmp_path / "annotations" / "validation").mkdir(parents=True)
    exif = Image.Exif()
    exif[0x0112] = 8
    Image.fromarray(np.ascontiguousarray(np.rot90(upright, k=-1))).save(
        tmp_path / "images" / "validation" / "a.jpg", quality=100, subsampling=0, exif=exif.tobytes()
    )
    label = np.ones((16, 24), np.uint8)
    label[:, :12] = 2
    Image.fromarray(label).save(tmp_path / "annotations" / "validation" / "a.png")
    img, lab, _ = ADE20K(tmp_path, "val", num_classes=150)[0]
    assert img.shape == (3, 16, 24) and lab.shape == (16, 24)
    assert img[0, :, :12].float().mean() > 240 and img[0, :, 12:].float().mean() < 15
    assert (lab[:, :12] == 1).all()  # reduce_zero_label: 2 -> 1
