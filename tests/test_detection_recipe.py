"""The ViTDet recipes' schedule against the numbers of detectron2's configs (projects/ViTDet/configs/COCO):
B and L `max_iter=184375`, milestones [163889, 177546], `warmup_length=250 / train.max_iter` evaluated in the B
config (a fraction), warmup_factor 0.001; H (`mask_rcnn_vitdet_h_75ep.py`) takes `max_iter * 3 // 4` and each
milestone `* 3 // 4` and keeps the fraction, so its warmup is 250 / 184375 x 138281 = 187.4997 iterations.
(tests/test_interop.py compares the whole schedule with fvcore's schedulers.)"""

import pytest
from conftest import REPO

from core.config import load_config
from core.optim import warmup_step


@pytest.mark.parametrize("recipe", ["base", "large", "huge"])
def test_vitdet_schedule_numbers_are_detectron2s(recipe):
    o = load_config(REPO / "detection" / "configs", recipe).optim
    max_iter = 184375 * 3 // 4 if recipe == "huge" else 184375
    assert o.iters == max_iter and list(o.steps) == [m * 3 // 4 if recipe == "huge" else m for m in (163889, 177546)]
    assert o.warmup_iters == pytest.approx(250 / 184375 * max_iter, rel=1e-12) and o.warmup_factor == 0.001
    lr = warmup_step(1.0, o.iters, o.warmup_iters, list(o.steps), gamma=0.1, warmup_factor=o.warmup_factor)
    # LRMultiplier at iteration t: 0.001 + 0.999 * (t / max_iter) / warmup_length while t / max_iter < warmup_length
    for t in (0, 1, 100, 187):
        assert lr[t] == pytest.approx(0.001 + 0.999 * t / (250 / 184375 * max_iter), rel=1e-12)
    warm = int((lr[:400] < 1.0).sum())
    assert warm == (188 if recipe == "huge" else 250)  # ViT-H at 75 epochs: iterations 0..187, not 0..249
    assert lr[o.steps[0]] == pytest.approx(0.1) and lr[o.steps[0] - 1] == 1.0
