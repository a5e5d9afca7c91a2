"""Segmentation evaluation: metrics against a confusion matrix worked out by hand, sliding windows (mmseg's
grid, full coverage, equality with whole-image inference), the poly schedule against mmcv's formula."""

import math

import pytest
import torch

from core.optim import warmup_poly
from segmentation.evaluate import intersect_and_union, metrics_from_areas, predict_image, slide_inference, windows

# Five classes; label 255 = ignored. Pixel pairs (label, prediction):
#   (0,0) (0,1) (1,1) (1,1) | (1,2) (2,3) (255,0) (255,3)
# class 0: label 2, pred 1, inter 1 -> IoU 1/2, Acc 1/2
# class 1: label 3, pred 3, inter 2 -> union 4, IoU 1/2, Acc 2/3
# class 2: label 1, pred 1, inter 0 -> union 2, IoU 0, Acc 0
# class 3: label 0, pred 1 (predicted, absent from the labels) -> IoU 0 (counts), Acc undefined
# class 4: in neither -> IoU and Acc undefined (left out of the means)
# mIoU = (1/2 + 1/2 + 0 + 0) / 4 = 25; mAcc = (1/2 + 2/3 + 0) / 3 = 38.89; aAcc = 3 / 6 = 50
LABEL = torch.tensor([[0, 0, 1, 1], [1, 2, 255, 255]])
PRED = torch.tensor([[0, 1, 1, 1], [2, 3, 0, 3]])


def test_metrics_match_the_hand_made_confusion_matrix():
    areas = intersect_and_union(PRED, LABEL, 5)
    assert areas[0].tolist() == [1, 2, 0, 0, 0]  # intersection
    assert areas[1].tolist() == [2, 4, 2, 1, 0]  # union
    m = metrics_from_areas(areas)
    assert m["mIoU"] == pytest.approx(25.0)
    assert m["mAcc"] == pytest.approx(100 * (1 / 2 + 2 / 3 + 0) / 3)
    assert m["aAcc"] == pytest.approx(50.0)
    assert m["iou"][:4] == pytest.approx([50.0, 50.0, 0.0, 0.0]) and math.isnan(m["iou"][4])
    assert math.isnan(m["acc"][3]) and math.isnan(m["acc"][4])


def test_areas_are_accumulated_over_the_dataset_not_averaged_per_image():
    # the two rows as two images: summing their areas gives the whole-set metrics above ...
    a, b = intersect_and_union(PRED[:1], LABEL[:1], 5), intersect_and_union(PRED[1:], LABEL[1:], 5)
    assert torch.equal(a + b, intersect_and_union(PRED, LABEL, 5))
    # ... which differ from the mean of the per-image mIoUs (image 1: classes 0, 1 -> (1/2 + 2/3) / 2;
    # image 2: classes 1, 2, 3 all 0 -> 0)
    per_image = (metrics_from_areas(a)["mIoU"] + metrics_from_areas(b)["mIoU"]) / 2
    assert per_image == pytest.approx(100 * (1 / 2 + 2 / 3) / 4) != pytest.approx(25.0)


def test_ignored_pixels_never_count_even_when_predicted():
    label = torch.full((3, 3), 255)
    label[0, 0] = 1
    pred = torch.full((3, 3), 2)
    pred[0, 0] = 1
    m = metrics_from_areas(intersect_and_union(pred, label, 3))
    assert m["mIoU"] == m["mAcc"] == m["aAcc"] == 100.0  # the eight wrong predictions sit on ignored pixels


def test_window_grid_matches_mmseg_for_the_ade20k_setting():
    # a 512 x 683 image (short side 512 after the test resize): one row, two columns, the last shifted back
    assert windows(512, 683, 512, 341) == [(0, 512, 0, 512), (0, 512, 171, 683)]
    # 1024 x 1024: (1024 - 512 + 340) // 341 + 1 = 3 steps per side at 0, 341, 512 (682 shifted back to 512)
    assert [w[:2] for w in windows(1024, 1024, 512, 341)][::3] == [(0, 512), (341, 853), (512, 1024)]
    assert windows(300, 200, 512, 341) == [(0, 300, 0, 200)]  # smaller than the crop: one window


@pytest.mark.parametrize("h,w", [(48, 48), (40, 30), (48, 97), (100, 61), (160, 160)])
def test_windows_cover_every_pixel_and_logits_are_averaged(h, w):
    crop, stride = 48, 32
    count = torch.zeros(h, w)
    for y1, y2, x1, x2 in windows(h, w, crop, stride):
        assert 0 <= y1 < y2 <= h and 0 <= x1 < x2 <= w and y2 - y1 == min(crop, h) and x2 - x1 == min(crop, w)
        count[y1:y2, x1:x2] += 1
    assert count.min() >= 1
    # a pixel-wise "model" gives the same logits in every window, so the average must equal it exactly
    image = torch.randn(1, 3, h, w)
    out = slide_inference(lambda x: torch.cat([x, -x], dim=1), image, 6, crop, stride, batch=3)
    assert out.shape == (1, 6, h, w)
    assert torch.allclose(out, torch.cat([image, -image], dim=1), atol=1e-6)


def test_one_window_equals_whole_image_inference(tiny_segmentor):
    model = tiny_segmentor.eval()
    image = torch.randn(1, 3, 48, 48)
    with torch.no_grad():
        whole = model.predict(image)
        assert torch.allclose(slide_inference(model.predict, image, 8, 48, 32), whole, atol=1e-5)
        # smaller than the crop: the window is zero-padded to the crop, as training pads, and cut back
        small = image[:, :, :30, :41]
        padded = torch.nn.functional.pad(small, (0, 7, 0, 18))
        expect = model.predict(padded)[:, :, :30, :41]
        assert torch.allclose(slide_inference(model.predict, small, 8, 48, 32), expect, atol=1e-5)


def test_flip_view_is_mirrored_back():
    # a "model" that predicts class 0 on the left half of each window and class 1 on the right: mirrored
    # views disagree everywhere, so with flip the two classes tie (0.5 each) over the whole image
    def halves(x):
        w = x.shape[-1]
        logits = torch.zeros(x.shape[0], 2, *x.shape[2:])
        logits[:, 0, :, : w // 2] = 10
        logits[:, 1, :, w // 2 :] = 10
        return logits

    image = torch.randint(0, 255, (3, 48, 48), dtype=torch.uint8)
    kw = dict(num_classes=2, scale=(192, 48), crop=48, stride=32)
    plain = predict_image(halves, image, **kw)
    assert plain[0, :, :24].min() > 0.99 and plain[1, :, 24:].min() > 0.99
    both = predict_image(halves, image, flip=True, **kw)
    assert torch.allclose(both, torch.full_like(both, 0.5), atol=1e-4)


def test_multi_scale_views_come_back_at_the_original_size():
    seen = []

    def record(x):
        seen.append(tuple(x.shape[2:]))
        return torch.zeros(x.shape[0], 3, *x.shape[2:])

    image = torch.zeros(3, 50, 75, dtype=torch.uint8)
    probs = predict_image(record, image, num_classes=3, scale=(192, 48), crop=48, stride=32, ratios=(0.5, 1.0, 1.5))
    assert probs.shape == (3, 50, 75) and torch.allclose(probs, torch.full_like(probs, 1 / 3))
    # ratio 0.5: 50 x 75 fits (96, 24) at 24 x 36 -> one padded 48 x 48 window; 1.0: 48 x 72 -> two windows
    assert seen[0] == (48, 48) and len(seen) == 1 + 2 + 6  # 1.5: 72 x 108 -> 2 x 3 windows


def test_warmup_poly_matches_mmcv_poly_with_linear_warmup():
    # mmcv: regular = (base - min) * (1 - it / max) ** power + min; during warmup
    # lr = regular * (1 - (1 - it / warmup) * (1 - ratio))
    base, total, warm, ratio = 1e-4, 160_000, 1500, 1e-6
    lr = warmup_poly(base, total, warm, power=1.0, final=0.0, warmup_ratio=ratio)
    assert len(lr) == total
    assert lr[0] == pytest.approx(1e-4 * 1e-6)
    assert lr[750] == pytest.approx(1e-4 * (1 - 750 / 160_000) * (1 - 0.5 * (1 - 1e-6)))
    assert lr[1500] == pytest.approx(1e-4 * (1 - 1500 / 160_000))
    assert lr[159_999] == pytest.approx(1e-4 / 160_000)
    assert all(lr[1500:-1] > lr[1501:])
