"""Pretraining targets (pretrain/targets): shapes, determinism, hand-computed HOG, the EMA formula,
multi-fold coverage, block masking, the symmetric student, and a few training steps of each."""

import json
import math

import pytest
import timm
import torch
from conftest import pretrain_config

from core import checkpoint as ckpt
from core.config import ConfigError
from core.data import seeded
from core.vit import preset
from pretrain import dbot
from pretrain.beit import RelativePositionBias, SymmetricStudent
from pretrain.masking import BlockMasking, RandomMasking
from pretrain.model import MaskedStudent
from pretrain.targets import EMATarget, HOGTarget, PixelTarget, TeacherTarget, TimmTeacherTarget
from pretrain.targets.ema import ema_momentum, ema_update, fold_ids
from pretrain.targets.hog import hog_cells
from pretrain.targets.pixels import patchify
from pretrain.train import run


def tiny_student(dim=96):
    return MaskedStudent(target_dim=dim, decoder_dim=32, decoder_depth=1, decoder_heads=2, **preset("tiny"))


@pytest.fixture(scope="module")
def timm_teacher_file(tmp_path_factory):
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0)
    return ckpt.save(model.state_dict(), tmp_path_factory.mktemp("timm") / "vit_tiny.pth")


def all_targets(timm_file):
    student = tiny_student()
    return {
        "teacher": TeacherTarget(dbot.make_teacher(preset("tiny"), dbot.encoder_state(student))),
        "pixels": PixelTarget(4),
        "hog": HOGTarget(4, bins=9, cell=2),
        "ema": EMATarget(student, folds=3),
        "timm": TimmTeacherTarget("vit_tiny_patch16_224", str(timm_file), (8, 8)),
    }


def test_each_target_has_the_documented_shape_and_is_deterministic(timm_teacher_file):
    x = torch.randn(2, 3, 32, 32)
    mask = RandomMasking(64, 0.75)(torch.rand(2, 64))
    dims = {"teacher": 96, "pixels": 48, "hog": 3 * 9 * 4, "ema": 96, "timm": 192}
    for name, target in all_targets(timm_teacher_file).items():
        out = target(x, mask)
        assert out.shape == (2, 65, dims[name]), name
        assert target.dim == dims[name]
        assert torch.equal(out, target(x, mask)), name
        assert not out.requires_grad


def test_pixel_target_is_patchified_and_per_patch_standardised():
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).reshape(2, 3, 8, 8)
    p = patchify(x, 4)
    assert p.shape == (2, 4, 48)
    # patch 1 (row 0, col 1), pixel (0, 0), channel 2 = x[0, 2, 0, 4]; MAE's (row, col, channel) order
    assert p[0, 1, 2] == x[0, 2, 0, 4] and p[0, 1, 3] == x[0, 0, 0, 5]
    t = PixelTarget(4)(x, RandomMasking(4, 0.5)(torch.rand(2, 4)))
    assert torch.allclose(t[:, 1:].mean(-1), torch.zeros(2, 4), atol=1e-5)
    assert torch.all(t[:, 0] == 0)


def test_hog_of_a_vertical_edge_by_hand():
    # left half 0, right half 1 (all channels): gx = x[c+1] - x[c-1] is 1 at the two columns next to the edge,
    # gy = 0 everywhere, so all magnitude is in orientation bin 0 of the cells touching the edge.
    img = torch.zeros(1, 3, 8, 8)
    img[..., 4:] = 1.0
    h = hog_cells(img, bins=9, cell=4)  # [1, 3, 9, 2, 2]
    assert h.shape == (1, 3, 9, 2, 2)
    # cell (0, 0) covers columns 0-3: column 3 has gx = 1 for 4 rows -> raw bin0 = 4 -> L2-normalised 1
    assert torch.allclose(h[0, :, 0], torch.ones(3, 2, 2), atol=1e-6)
    assert torch.all(h[0, :, 1:] == 0)
    flat = torch.zeros(1, 3, 8, 8)
    assert torch.all(hog_cells(flat, bins=9, cell=4) == 0)  # replicate padding: no border gradients


def test_hog_orientation_bins_by_hand():
    # a horizontal edge: gy only -> orientation pi/2 -> bin floor((pi/2) / (pi/9)) = 4
    img = torch.zeros(1, 1, 8, 8)
    img[..., 4:, :] = 1.0
    h = hog_cells(img, bins=9, cell=8)[0, 0, :, 0, 0]
    assert h.argmax().item() == 4 and h[4] == pytest.approx(1.0)
    # a 45-degree ramp x + y: gx = gy = 2 inside -> angle pi/4 -> bin 2
    ys, xs = torch.meshgrid(torch.arange(8.0), torch.arange(8.0), indexing="ij")
    h = hog_cells((xs + ys).view(1, 1, 8, 8), bins=9, cell=8)[0, 0, :, 0, 0]
    assert h.argmax().item() == 2


def test_ema_update_equals_the_formula_and_momentum_schedule():
    student = tiny_student()
    target = EMATarget(student)
    t0 = {k: v.clone() for k, v in target.teacher.state_dict().items()}
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    s = dbot.encoder_state(student)
    ema_update(target.teacher, s, 0.9)
    for k, v in target.teacher.state_dict().items():
        assert torch.allclose(v, 0.9 * t0[k] + 0.1 * s[k]), k
    assert ema_momentum(0.0, 0.96, 0.99) == pytest.approx(0.96)
    assert ema_momentum(1.0, 0.96, 0.99) == pytest.approx(0.99)
    assert ema_momentum(0.5, 0.96, 0.99) == pytest.approx(0.975)


def test_multi_fold_masking_covers_each_masked_patch_exactly_once():
    mask = RandomMasking(196, 0.75)(torch.rand(3, 196))
    folds = fold_ids(mask.masked_ids, 3)
    assert [f.shape[1] for f in folds] == [49, 49, 49]  # SdAE ViT-B: 3 folds of 49
    for n in range(3):
        seen = torch.cat([f[n] for f in folds]).tolist()
        assert sorted(seen) == sorted(torch.nonzero(mask.mask[n]).flatten().tolist())
    # and the EMA target fills exactly the masked positions
    student = tiny_student()
    small = RandomMasking(64, 0.75)(torch.rand(2, 64))
    out = EMATarget(student, folds=3).compute(torch.randn(2, 3, 32, 32), small)
    filled = out[:, 1:].abs().sum(-1) > 0
    assert torch.equal(filled.float(), small.mask)


def test_block_masking_is_reproducible_and_near_the_ratio():
    bm = BlockMasking((14, 14), 0.4)
    with seeded(3):
        a = bm.sample()
    with seeded(3):
        b = bm.sample()
    assert torch.equal(a, b)
    counts = []
    for s in range(20):
        with seeded(s):
            counts.append(int(bm.sample().sum()))
    assert all(60 <= c <= 79 for c in counts), counts  # target round(0.4 * 196) = 78, never above
    assert sum(counts) / len(counts) > 70


def test_relative_position_bias_index_by_hand():
    rpb = RelativePositionBias((2, 2), num_heads=1)
    # offsets (dy, dx) in [-1, 1]^2 -> index (dy + 1) * 3 + (dx + 1); patch 0 = (0,0), patch 3 = (1,1)
    assert rpb.index[1, 4].item() == (0 - 1 + 1) * 3 + (0 - 1 + 1)  # from (0,0) to (1,1): dy = dx = -1
    assert rpb.index[4, 1].item() == 2 * 3 + 2
    assert rpb.index[0, 2].item() == 9 and rpb.index[2, 0].item() == 10 and rpb.index[0, 0].item() == 11
    with torch.no_grad():
        rpb.table.copy_(torch.arange(12.0).unsqueeze(1))
    assert rpb()[0, 0, 1, 4] == 0 and rpb()[0, 0, 4, 1] == 8


def test_symmetric_student_with_zero_bias_equals_plain_attention_and_predicts_every_position():
    s = SymmetricStudent(target_dim=10, **preset("tiny"))
    x = torch.randn(2, 3, 32, 32)
    no_mask = torch.zeros(2, 64)
    with_bias = s.encode(x, no_mask)
    s.rel_pos_bias = None
    assert torch.allclose(with_bias, s.encode(x, no_mask), atol=1e-5)
    mask = BlockMasking((8, 8), 0.4)(torch.ones(2, 64))
    assert s(x, mask).shape == (2, 65, 10)
    assert all(b.ls1.gamma.eq(0.1).all() for b in s.blocks)


# --------------------------------------------------------------------------------- training with each
def losses(out):
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize(
    "overrides",
    [
        ["target.kind=pixels"],
        ["target.kind=hog", "target.hog.cell=2"],
        ["target.kind=ema", "target.ema.every=step"],
        ["model.kind=beit", "model.masking=block", "model.mask_ratio=0.4"],
    ],
    ids=["pixels", "hog", "ema", "beit-block"],
)
def test_a_few_steps_reduce_each_targets_loss(tiny_imagenet, tmp_path, overrides):
    out = tmp_path / "run"
    res = run(pretrain_config(tiny_imagenet, out, "stages.epochs=[0,3]", *overrides))
    values = losses(out)
    assert values[-1] < 0.9 * values[0], values
    chosen = dict(o.split("=") for o in overrides)
    assert res["target_kind"] == chosen.get("target.kind", "teacher")  # the BEiT student distils from a teacher


def test_timm_teacher_trains_and_first_stage_target_then_bootstraps(tiny_imagenet, tmp_path, timm_teacher_file):
    out = tmp_path / "run"
    res = run(
        pretrain_config(
            tiny_imagenet,
            out,
            "target.kind=timm",
            "target.timm.name=vit_tiny_patch16_224",
            f"target.timm.checkpoint={timm_teacher_file}",
            "stages.epochs=[0,3,4]",
        )
    )
    values = losses(out)
    assert values[11] < 0.9 * values[0], values  # stage 0 (timm teacher) learns
    assert "timm vit_tiny_patch16_224" in res["target"]
    assert not (out / "checkpoint-stage0-teacher.pth").exists()  # the external teacher is not copied
    stage1_teacher = ckpt.load(out / "checkpoint-stage1-teacher.pth")
    student0 = ckpt.load(out / "checkpoint-stage0-student.pth")["model"]
    for k, v in stage1_teacher["model"].items():
        assert torch.equal(v, student0[k]), k
    assert stage1_teacher["meta"]["target_dim"] == 96


# ---------------------------------------------------------------------------------------------- bad input
def test_unknown_target_lists_the_valid_ones(tiny_imagenet, tmp_path):
    with pytest.raises(ConfigError, match="unknown target 'clip'.*teacher, timm, pixels, hog, ema"):
        run(pretrain_config(tiny_imagenet, tmp_path / "o", "target.kind=clip"))


def test_timm_weights_that_do_not_fit_the_architecture(tiny_imagenet, tmp_path, timm_teacher_file):
    with pytest.raises(ckpt.CheckpointError, match="vit_tiny.pth: .*do not fit"):
        run(
            pretrain_config(
                tiny_imagenet,
                tmp_path / "o",
                "target.kind=timm",
                "target.timm.name=vit_small_patch16_224",
                f"target.timm.checkpoint={timm_teacher_file}",
            )
        )


def test_a_resolution_the_teacher_cannot_take(tiny_imagenet, tmp_path, timm_teacher_file):
    with pytest.raises(ConfigError, match="img_size=100.*not the student's 8x8"):
        run(
            pretrain_config(
                tiny_imagenet,
                tmp_path / "o",
                "target.kind=timm",
                "target.timm.name=vit_tiny_patch16_224",
                f"target.timm.checkpoint={timm_teacher_file}",
                "target.timm.img_size=100",
            )
        )


def test_loss_kinds_by_hand():
    from pretrain.targets import token_loss

    pred = torch.tensor([[[1.0, 0.0], [0.0, 2.0]]])
    tgt = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    w = torch.tensor([[1.0, 1.0]])
    assert token_loss(pred, tgt, w, "mse").item() == pytest.approx((0 + 0.5) / 2)
    assert token_loss(pred, tgt, w, "cosine").item() == pytest.approx(0.0, abs=1e-6)
    assert token_loss(pred, -tgt, w, "cosine").item() == pytest.approx(2.0)
    # token 2 differs by (0, 1): SmoothL1(beta 2) = 0.5 * 1^2 / 2 = 0.25 on one channel -> 0.125 per token
    assert token_loss(pred, tgt, w, "smooth_l1", beta=2.0).item() == pytest.approx((0 + 0.125) / 2)
    assert math.isfinite(token_loss(pred, tgt, torch.zeros(1, 2), "mse").item())
