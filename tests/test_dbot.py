"""The dBOT method pieces (pretrain/dbot.py) against values worked out by hand."""

import math

import pytest
import torch

from core.vit import preset
from pretrain import dbot
from pretrain.model import MaskedStudent


def tiny_student(target_dim=96, **kw):
    return MaskedStudent(
        target_dim=target_dim, decoder_dim=32, decoder_depth=1, decoder_heads=2, **preset("tiny", **kw)
    )


def test_masking_keeps_exact_count_per_sample_and_restore_inverts_the_shuffle():
    noise = torch.rand(5, 64, generator=torch.Generator().manual_seed(0))
    m = dbot.random_masking(noise, 0.75)
    keep, mask, restore = m.keep_ids, m.mask, m.restore_ids
    assert keep.shape == (5, 16)
    assert torch.equal(mask.sum(1), torch.full((5,), 48.0))
    # the kept patches are exactly the unmasked ones, and they are the 16 smallest noise values
    for n in range(5):
        assert set(keep[n].tolist()) == set(torch.nonzero(mask[n] == 0).flatten().tolist())
        assert set(keep[n].tolist()) == set(torch.argsort(noise[n])[:16].tolist())
    # per-sample independence: different noise rows give different masks
    assert len({tuple(m.tolist()) for m in mask}) == 5
    # restore inverts the shuffle: gathering the shuffled sequence with restore gives back the original
    x = torch.arange(64.0).expand(5, 64)
    shuffled = torch.gather(x, 1, torch.argsort(noise, 1))
    assert torch.equal(torch.gather(shuffled, 1, restore), x)
    # masked_ids are exactly the masked patches
    for n in range(5):
        assert set(m.masked_ids[n].tolist()) == set(torch.nonzero(mask[n]).flatten().tolist())


def test_mask_ratio_rounding_follows_int_truncation():
    m = dbot.random_masking(torch.rand(2, 10), 0.75)  # int(10 * 0.25) = 2 kept
    assert m.keep_ids.shape == (2, 2) and m.mask.sum().item() == 16


def test_standardize_by_hand():
    t = torch.tensor([[[1.0, 2.0, 3.0, 4.0]]])
    # mean 2.5, unbiased variance ((1.5^2 + 0.5^2) * 2) / 3 = 5/3
    expect = (torch.tensor([1.0, 2.0, 3.0, 4.0]) - 2.5) / math.sqrt(5 / 3 + 1e-6)
    assert torch.allclose(dbot.standardize(t)[0, 0], expect)


def test_loss_by_hand_and_blind_to_visible_positions():
    # 1 sample, 3 patches (+cls), 2 channels; patch 1 masked
    target = torch.zeros(1, 4, 2)
    pred = torch.zeros(1, 4, 2)
    pred[0, 0] = torch.tensor([1.0, 3.0])  # cls: smoothL1(beta 2): 0.5*1/2 = 0.25 ; |3|-1 = 2 -> mean 1.125
    pred[0, 2] = torch.tensor([0.5, 0.5])  # masked patch 1: 0.0625 each -> mean 0.0625
    pred[0, 1] = torch.tensor([100.0, -7.0])  # visible patch 0: must not count
    pred[0, 3] = torch.tensor([9.0, 9.0])  # visible patch 2: must not count
    mask = torch.tensor([[0.0, 1.0, 0.0]])
    loss = dbot.distill_loss(pred, target, mask, beta=2.0, include_cls=True)
    assert loss.item() == pytest.approx((1.125 + 0.0625) / 2)
    assert dbot.distill_loss(pred, target, mask, include_cls=False).item() == pytest.approx(0.0625)
    pred.requires_grad_(True)
    dbot.distill_loss(pred, target, mask).backward()
    assert torch.all(pred.grad[0, 1] == 0) and torch.all(pred.grad[0, 3] == 0)


def test_student_accepts_explicit_noise_and_is_deterministic():
    student = tiny_student().eval()
    x = torch.randn(2, 3, 32, 32)
    noise = torch.rand(2, 64)
    p1 = student(x, dbot.random_masking(noise, 0.75))
    p2 = student(x, dbot.random_masking(noise.clone(), 0.75))
    assert p1.shape == (2, 65, 96) and torch.equal(p1, p2)


def test_decoder_predicts_the_teacher_width():
    student = tiny_student(target_dim=160)
    pred = student(torch.randn(1, 3, 32, 32), dbot.random_masking(torch.rand(1, 64), 0.75))
    assert pred.shape[-1] == 160


def test_teacher_is_frozen_and_gets_no_gradient():
    student = tiny_student()
    teacher = dbot.make_teacher(preset("tiny"), dbot.encoder_state(student))
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    opt = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=1e-2)
    x = torch.randn(2, 3, 32, 32)
    for _ in range(3):
        target = dbot.standardize(dbot.teacher_target(teacher, x))
        assert not target.requires_grad
        mask = dbot.random_masking(torch.rand(2, 64), 0.75)
        dbot.distill_loss(student(x, mask), target, mask.mask).backward()
        opt.step()
        opt.zero_grad()
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_depth0_teacher_is_patch_and_position_embedding_only():
    student = tiny_student()
    teacher = dbot.make_teacher(preset("tiny", depth=0), dbot.encoder_state(student))
    x = torch.randn(1, 3, 32, 32)
    tokens = dbot.teacher_target(teacher, x)
    expect = torch.cat([student.cls_token + student.pos_embed[:, :1], student.embed(x)], dim=1)
    assert torch.allclose(tokens, expect.detach())


def test_stage_switch_copies_encoder_and_reinitialises_student_in_place():
    student = tiny_student()
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.1)  # pretend it trained
    trained = dbot.encoder_state(student)
    first = dbot.TeacherTarget(dbot.make_teacher(preset("tiny")))
    params = list(student.parameters())
    same, target, rebuilt = dbot.next_stage(
        student, first, 1, seed=11, depth=4, bootstrap=True, build_student=None, final_norm=False
    )
    assert same is student and not rebuilt and all(a is b for a, b in zip(params, student.parameters()))
    assert isinstance(target, dbot.TeacherTarget) and target.teacher is not first.teacher
    for k, v in target.teacher.state_dict().items():
        assert torch.equal(v, trained[k]), k
    fresh = tiny_student()
    fresh.initialize_weights(torch.Generator().manual_seed(11))
    for (k, v), w in zip(student.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(v, w), k
    # another depth (or teacher width) rebuilds the student; without bootstrapping the target stays
    built = []
    other, kept, rebuilt = dbot.next_stage(
        student, target, 2, seed=12, depth=2, bootstrap=False,
        build_student=lambda d, dim: built.append((d, dim)) or tiny_student(dim, depth=d),
    )  # fmt: skip
    assert rebuilt and kept is target and built == [(2, 96)] and len(other.blocks) == 2


def test_make_teacher_refuses_weights_it_would_drop():
    student = tiny_student()
    sd = dbot.encoder_state(student)
    sd["blocks.0.ls1.gamma"] = torch.ones(96)  # a layer-scaled encoder: a plain ViT teacher would lose it
    with pytest.raises(ValueError, match="not used.*ls1.gamma"):
        dbot.make_teacher(preset("tiny"), sd)
    del sd["blocks.0.ls1.gamma"], sd["norm.weight"]
    with pytest.raises(ValueError, match="missing.*norm.weight"):
        dbot.make_teacher(preset("tiny"), sd)


def test_stages_validation_and_lookup():
    s = dbot.Stages([0, 800, 1600])
    assert len(s) == 2 and s.total_epochs == 1600
    assert s.stage_of(0) == 0 and s.stage_of(799) == 0 and s.stage_of(800) == 1
    assert s.is_last_epoch_of_stage(799) and not s.is_last_epoch_of_stage(800)
    for bad in ([0], [1, 5], [0, 5, 5], [0, 8, 4]):
        with pytest.raises(ValueError, match="strictly increase"):
            dbot.Stages(bad)
