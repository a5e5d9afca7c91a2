"""Pretraining targets (pretrain/targets) against the code each claims to follow: MAE's pixels and loss, MaskFeat's
HOG (SlowFast HOGLayerC) re-derived per pixel, SdAE's EMA schedule, folds and loss, MaskDistill's beta; shapes,
determinism, block masking, the symmetric student, and a few training steps of each."""

import json
import math

import numpy as np
import pytest
import timm
import torch
from conftest import REPO, pretrain_config

from core import checkpoint as ckpt
from core.config import ConfigError, load_config
from core.data import seeded
from core.vit import preset
from pretrain import dbot
from pretrain.beit import RelativePositionBias, SymmetricStudent
from pretrain.masking import BlockMasking, RandomMasking
from pretrain.model import MaskedStudent
from pretrain.targets import EMATarget, HOGTarget, PixelTarget, TeacherTarget, TimmTeacherTarget, build_independent
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


# ------------------------------------------------------------------------------------------ MAE pixels
def mae_reference(images: np.ndarray, pred: np.ndarray, mask: np.ndarray, p: int, norm_pix: bool) -> float:
    """facebookresearch/mae `models_mae.py` written out by loops: `patchify` (patch (i, j) row-major, inside
    it pixel (row, col, channel)), `norm_pix_loss` (mean and unbiased variance per patch, eps 1e-6 inside
    the root), `forward_loss` (squared error averaged over a patch's values, then over masked patches)."""
    n, c, h, w = images.shape
    gh, gw = h // p, w // p
    target = np.zeros((n, gh * gw, p * p * c))
    for b in range(n):
        for i in range(gh):
            for j in range(gw):
                for r in range(p):
                    for q in range(p):
                        for ch in range(c):
                            target[b, i * gw + j, (r * p + q) * c + ch] = images[b, ch, i * p + r, j * p + q]
    if norm_pix:
        mean = target.mean(-1, keepdims=True)
        var = target.var(-1, ddof=1, keepdims=True)
        target = (target - mean) / np.sqrt(var + 1e-6)
    per_patch = ((pred - target) ** 2).mean(-1)
    return float((per_patch * mask).sum() / mask.sum())


@pytest.mark.parametrize("norm_pix", [True, False])
def test_pixel_target_from_the_config_equals_maes_forward_loss(norm_pix):
    cfg = load_config(
        REPO / "pretrain" / "configs", "tiny", ["target.kind=pixels", f"target.pixels.norm_pix={norm_pix}"]
    )
    target = build_independent(cfg.target, {}, 4, (2, 2))
    assert target.norm == ("standardize" if norm_pix else "none")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 8, 8, generator=g) * 2 + 1
    mask = RandomMasking(4, 0.5)(torch.rand(2, 4, generator=g))
    pred = torch.randn(2, 5, 48, generator=g)
    loss = target.loss(pred, target(x, mask), mask).item()
    ref = mae_reference(x.double().numpy(), pred[:, 1:].double().numpy(), mask.mask.double().numpy(), 4, norm_pix)
    assert loss == pytest.approx(ref, rel=1e-5)
    # patchify order by hand: patch 1 = row 0, col 1; its value 2 is pixel (0, 0) channel 2, value 3 pixel (0, 1)
    p = patchify(x, 4)
    assert p[0, 1, 2] == x[0, 2, 0, 4] and p[0, 1, 3] == x[0, 0, 0, 5]


def test_pixel_norm_that_contradicts_norm_pix_is_refused(tiny_imagenet, tmp_path):
    with pytest.raises(ConfigError, match="loss.norm=standardize contradicts target.pixels.norm_pix=false"):
        run(
            pretrain_config(
                tiny_imagenet,
                tmp_path / "o",
                "target.kind=pixels",
                "target.pixels.norm_pix=false",
                "loss.norm=standardize",
            )
        )


# ------------------------------------------------------------------------------------------------- HOG
def hog_reference(img: np.ndarray, bins: int, cell: int, window: int = 0) -> np.ndarray:
    """MaskFeat's HOG re-derived per pixel from the definition of SlowFast's `HOGLayerC` (and mmpretrain's
    `HOGGenerator` for the window): reflect padding, kx = [[1,0,-1],[2,0,-2],[1,0,-1]] and ky = kx^T as
    cross-correlations, bin floor(atan2(gx, gy) / pi * bins) mod bins, optional tiled Gaussian (std g // 2,
    sum 1), sums per cell, L2 per cell (eps 1e-12). `[C, H, W]` -> `[C, bins, H/cell, W/cell]`."""
    c, h, w = img.shape
    pad = np.pad(img.astype(np.float64), ((0, 0), (1, 1), (1, 1)), mode="reflect")
    gauss = np.ones((max(window, 1), max(window, 1)))
    if window:
        k = np.arange(window) - (window - 1) / 2
        g1 = np.exp(-0.5 * (k / (window // 2)) ** 2)
        gauss = np.outer(g1, g1) / np.outer(g1, g1).sum()
    out = np.zeros((c, bins, h // cell, w // cell))
    weights = (1, 2, 1)
    for ch in range(c):
        for i in range(h):
            for j in range(w):
                y, x = i + 1, j + 1
                gx = sum(weights[a + 1] * (pad[ch, y + a, x - 1] - pad[ch, y + a, x + 1]) for a in (-1, 0, 1))
                gy = sum(weights[b + 1] * (pad[ch, y - 1, x + b] - pad[ch, y + 1, x + b]) for b in (-1, 0, 1))
                b = math.floor(math.atan2(gx, gy) / math.pi * bins) % bins
                out[ch, b, i // cell, j // cell] += math.hypot(gx, gy) * gauss[i % gauss.shape[0], j % gauss.shape[1]]
    norm = np.sqrt((out**2).sum(1, keepdims=True))
    return out / np.maximum(norm, 1e-12)


def test_hog_of_edges_by_hand():
    # vertical edge, left half 0 / right half 1: at columns 3 and 4 gx = left - right = -(1 + 2 + 1) = -4, gy = 0,
    # atan2(-4, 0) = -pi/2 -> floor(-4.5) = -5 -> bin 4 (mod 9); at columns 0 and 7 the reflected neighbours are
    # equal, so no gradient. Every 4 x 4 cell touches column 3 or 4: all its mass is in bin 4.
    img = torch.zeros(1, 3, 8, 8)
    img[..., 4:] = 1.0
    h = hog_cells(img, bins=9, cell=4)
    assert h.shape == (1, 3, 9, 2, 2)
    assert torch.equal(h[0, :, 4], torch.ones(3, 2, 2)) and h[0, :, [0, 1, 2, 3, 5, 6, 7, 8]].abs().sum() == 0
    # horizontal edge: gy = top - bottom = -4, gx = 0, atan2(0, -4) = pi -> 9 -> bin 0
    h = hog_cells(img.transpose(2, 3).contiguous(), bins=9, cell=4)
    assert torch.equal(h[0, :, 0], torch.ones(3, 2, 2)) and h[0, :, 1:].abs().sum() == 0
    assert torch.all(hog_cells(torch.zeros(1, 3, 8, 8), bins=9, cell=4) == 0)


@pytest.mark.parametrize("window", [0, 4])
def test_hog_cells_equal_the_reference_definition_per_pixel(window):
    img = torch.rand(2, 3, 8, 16, generator=torch.Generator().manual_seed(window))
    h = hog_cells(img, bins=9, cell=4, window=window)
    for n in range(2):
        ref = hog_reference(img[n].numpy(), 9, 4, window)
        assert np.abs(h[n].double().numpy() - ref).max() < 1e-6
    # the patch target lays out (channel, bin, cell row, cell column), as MaskFeat's reshaping does
    t = HOGTarget(8, bins=9, cell=4, gaussian_window=window).compute(img, None)
    assert t.shape == (2, 1 + 2, 3 * 9 * 4)
    patch1 = torch.from_numpy(hog_reference(img[1].numpy(), 9, 4, window)[:, :, 0:2, 2:4].reshape(-1)).float()
    assert torch.allclose(t[1, 2], patch1, atol=1e-6)


def test_hog_window_must_tile_the_image():
    with pytest.raises(ValueError, match="gaussian_window=16 must divide the image size 8x8"):
        hog_cells(torch.rand(1, 3, 8, 8), cell=4, window=16)


# ------------------------------------------------------------------------------------------- SdAE's EMA
def test_ema_update_equals_the_formula():
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


def test_ema_momentum_is_sdaes_cosine_scheduler_per_epoch():
    # SdAE util/cosine_scheduler.py with niter_per_ep=1, no warmup: m(e) = m1 + (m0 - m1)(1 + cos(pi e / E)) / 2
    # E = 4: m(0) = 0.96, m(1) = 0.99 - 0.015 (1 + 0.70711) = 0.964393, m(2) = 0.975, m(3) = 0.985607
    expected = [0.96, 0.99 - 0.015 * (1 + math.sqrt(0.5)), 0.975, 0.99 - 0.015 * (1 - math.sqrt(0.5))]
    assert [ema_momentum(e, 4, 0.96, 0.99) for e in range(4)] == pytest.approx(expected, abs=1e-12)


def test_ema_hooks_use_the_epochs_momentum_every_k_epochs_and_per_step():
    student = tiny_student()
    s = dbot.encoder_state(student)

    def moved(target, calls):
        t0 = {k: v.clone() for k, v in target.teacher.state_dict().items()}
        with torch.no_grad():
            for v in target.teacher.state_dict().values():
                v.zero_()  # teacher 0, student s: after updates with m_1..m_k the teacher is (1 - prod m) s
        for hook, epoch in calls:
            getattr(target, hook)(student, epoch, 4)
        w = target.teacher.state_dict()["blocks.0.attn.qkv.weight"]
        ref = s["blocks.0.attn.qkv.weight"]
        return (w / ref).median().item(), t0

    m = [ema_momentum(e, 4, 0.96, 0.99) for e in range(4)]
    # per epoch: the update after epoch 0 uses m(0) = 0.96 exactly
    assert moved(EMATarget(student), [("after_epoch", 0)])[0] == pytest.approx(1 - 0.96, rel=1e-5)
    # every 2 epochs (SdAE --ema_frequent 2): nothing after epoch 0, m(1) after epoch 1
    ratio, _ = moved(EMATarget(student, every_epochs=2), [("after_epoch", 0), ("after_epoch", 1)])
    assert ratio == pytest.approx(1 - m[1], rel=1e-5)
    # per step (per_ite): m(e) held within epoch e; after_epoch does nothing
    calls = [("after_step", 1), ("after_step", 1), ("after_epoch", 1)]
    assert moved(EMATarget(student, every="step"), calls)[0] == pytest.approx(1 - m[1] ** 2, rel=1e-5)
    with pytest.raises(ValueError, match="every_epochs=2: must be >= 1, and 1 with every=step"):
        EMATarget(student, every="step", every_epochs=2)


def test_the_loop_updates_the_ema_teacher_with_the_momentum_of_the_epoch_just_trained(tiny_imagenet, tmp_path):
    # Two runs that differ only in momentum train the same student in epoch 0 (the teacher changes only at its
    # end); with m = 1 the teacher stays T0, so the first run's teacher must be m(0) T0 + (1 - m(0)) s1.
    def one_epoch(out, momentum):
        run(
            pretrain_config(
                tiny_imagenet,
                out,
                "target.kind=ema",
                f"target.ema.momentum={momentum}",
                "stages.epochs=[0,4]",
                "max_epochs=1",
            )
        )
        state = ckpt.load(out / "checkpoint-last.pth")
        return state["model"], state["target"]

    student, teacher = one_epoch(tmp_path / "a", "[0.96,0.99]")
    _, teacher0 = one_epoch(tmp_path / "b", "[1.0,1.0]")
    key = "teacher.blocks.1.mlp.fc1.weight"
    expected = 0.96 * teacher0[key] + 0.04 * student["blocks.1.mlp.fc1.weight"]
    assert torch.allclose(teacher[key], expected, atol=1e-6)


def test_multi_fold_split_drops_the_remainder_as_sdae_or_keeps_it():
    mask = RandomMasking(196, 0.75)(torch.rand(3, 196))
    folds = fold_ids(mask.masked_ids, 3)
    assert [f.shape[1] for f in folds] == [49, 49, 49]  # SdAE ViT-B: --shrink_num 147 --ncrop_loss 3
    for n in range(3):
        assert sorted(torch.cat([f[n] for f in folds]).tolist()) == sorted(mask.mask[n].nonzero().flatten().tolist())
    ids = torch.arange(10).view(1, 10)  # 10 masked patches, 3 folds: SdAE keeps 9 (shrink_num - 10 % 3)
    assert [f.tolist() for f in fold_ids(ids, 3)] == [[[0, 1, 2]], [[3, 4, 5]], [[6, 7, 8]]]
    assert [f.shape[1] for f in fold_ids(ids, 3, drop_remainder=False)] == [4, 3, 3]


def ema_case(drop_remainder: bool, cosine_over: str = "token"):
    """A tiny EMA target on 16 patches with 10 masked (3 folds), its target, and a prediction equal to the
    target on the first 9 masked patches and opposite to it everywhere else."""
    student = MaskedStudent(
        target_dim=96, decoder_dim=32, decoder_depth=1, decoder_heads=2, **preset("tiny", img_size=16)
    )
    target = EMATarget(student, folds=3, drop_remainder=drop_remainder, cosine_over=cosine_over)
    mask = RandomMasking(16, 10 / 16)(torch.rand(2, 16, generator=torch.Generator().manual_seed(0)))
    goal = target(torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1)), mask)
    pred = -goal.clone()
    kept = mask.masked_ids[:, :9] + 1
    pred.scatter_(1, kept.unsqueeze(-1).expand(-1, -1, 96), goal.gather(1, kept.unsqueeze(-1).expand(-1, -1, 96)))
    return target, goal, pred, mask


def test_ema_loss_leaves_out_the_dropped_remainder():
    target, goal, pred, mask = ema_case(drop_remainder=True)
    filled = goal[:, 1:].abs().sum(-1) > 0
    assert filled.sum(1).tolist() == [9, 9]  # the 10th masked patch has no target
    assert target.loss(pred, goal, mask).item() == pytest.approx(0.0, abs=1e-6)
    target, goal, pred, mask = ema_case(drop_remainder=False)
    assert (goal[:, 1:].abs().sum(-1) > 0).sum(1).tolist() == [10, 10]
    # 9 matching tokens (1 - cos = 0) and 1 opposite one (1 - cos = 2) per sample -> 2 / 10
    assert target.loss(pred, goal, mask).item() == pytest.approx(0.2, abs=1e-5)


def test_ema_fold_cosine_is_the_released_per_channel_cosine_across_a_folds_tokens():
    target, goal, _, mask = ema_case(drop_remainder=True, cosine_over="fold")
    pred = torch.randn(goal.shape, generator=torch.Generator().manual_seed(2))
    # SdAE: F.cosine_similarity(teacher, student) on [N * folds, 3 tokens, D] with dim=1, then 1 - mean
    sims = []
    for f in range(3):
        idx = mask.masked_ids[:, 3 * f : 3 * f + 3] + 1
        for n in range(2):
            t, p = goal[n, idx[n]].double().numpy(), pred[n, idx[n]].double().numpy()  # [3, D]
            sims += list((t * p).sum(0) / np.maximum(np.linalg.norm(t, axis=0) * np.linalg.norm(p, axis=0), 1e-8))
    assert target.loss(pred, goal, mask).item() == pytest.approx(1 - np.mean(sims), abs=1e-5)
    per_token = ema_case(drop_remainder=True)[0]
    assert abs(per_token.loss(pred, goal, mask).item() - target.loss(pred, goal, mask).item()) > 1e-3


# ------------------------------------------------------------------------------------- MaskDistill's beta
def test_timm_teacher_smooth_l1_beta_is_maskdistills_and_dbots_stays_2(timm_teacher_file):
    cfg = load_config(
        REPO / "pretrain" / "configs",
        "tiny",
        ["target.kind=timm", "target.timm.name=vit_tiny_patch16_224", f"target.timm.checkpoint={timm_teacher_file}"],
    )
    target = build_independent(cfg.target, {}, 4, (8, 8))
    teacher = dbot.TeacherTarget(dbot.make_teacher(preset("tiny")))  # dBOT's own target, from the same loss options
    assert cfg.loss.beta is None and target.beta == 1.0 and teacher.beta == 2.0
    # one channel off by 1.5 on every token: Smooth-L1 beta 1 = 1.5 - 0.5 = 1.0; beta 2 would give 0.5625
    goal = torch.zeros(1, 65, 192)
    pred = goal.clone()
    pred[..., 0] = 1.5
    mask = RandomMasking(64, 0.75)(torch.rand(1, 64))
    assert target.loss(pred, goal, mask).item() == pytest.approx(1.0 / 192)


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
    with pytest.raises(ConfigError, match="target.kind='clip': expected one of teacher, timm, pixels, hog, ema"):
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
