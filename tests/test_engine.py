"""The shared training-step skeleton and schedules."""

import math

import numpy as np
import pytest
import torch

from core.engine import Stepper
from core.optim import param_groups, warmup_cosine, warmup_poly, warmup_step
from core.trainer import Layout


def test_a_short_last_group_of_an_epoch_still_steps_and_equals_one_batch():
    """Epoch unit: 3 micro-batches of 4 with accum 8 give one step of group size 3 (the released loop never
    steps there), whose update equals one batch of 12."""
    torch.manual_seed(0)
    x, y = torch.randn(12, 3), torch.randn(12, 1)
    a, b = torch.nn.Linear(3, 1), torch.nn.Linear(3, 1)
    b.load_state_dict(a.state_dict())
    layout = Layout(batches=3, accum=8, unit="epoch")
    assert layout.steps_per_epoch == 1 and layout.size(0) == 3 and layout.first_micro(1) == 3
    sa = Stepper(a, torch.optim.SGD(a.parameters(), lr=0.1))
    sb = Stepper(b, torch.optim.SGD(b.parameters(), lr=0.1))
    for i in range(3):
        sa.backward(torch.nn.functional.mse_loss(a(x[4 * i : 4 * i + 4]), y[4 * i : 4 * i + 4]), size=3, last=i == 2)
    sa.step()
    sb.backward(torch.nn.functional.mse_loss(b(x), y))
    sb.step()
    assert sa.step_count == sb.step_count == 1
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.allclose(p, q, atol=1e-6)


def test_layout_places_every_step_by_unit():
    epochs = Layout(batches=5, accum=2, unit="epoch")  # steps of 2, 2, 1 micro-batches per epoch
    assert [epochs.first_micro(k) for k in range(7)] == [0, 2, 4, 5, 7, 9, 10]
    assert [epochs.size(k) for k in range(6)] == [2, 2, 1, 2, 2, 1]
    assert [epochs.ends_epoch(k) for k in range(6)] == [False, False, True, False, False, True]
    iters = Layout(batches=5, accum=2, unit="iter")  # steps of 2 across epoch boundaries
    assert [iters.first_micro(k) for k in range(4)] == [0, 2, 4, 6] and iters.epoch_of(3) == 1
    assert {iters.size(k) for k in range(10)} == {2} and not any(iters.ends_epoch(k) for k in range(10))


def test_schedule_is_applied_with_layer_scales_and_clipping_reports_the_norm():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
    groups = param_groups(model, 0.0, layer_decay=0.5, layer_id=lambda n: int(n[0]), num_layers=2)
    st = Stepper(model, torch.optim.SGD(groups, lr=1.0), schedule=[0.1, 0.2], clip_grad=1e-3)
    st.start_step()  # the lr of the coming step, times each group's scale
    lrs = {g["layer_id"]: g["lr"] for g in st.optimizer.param_groups}
    assert lrs == pytest.approx({0: 0.1 * 0.25, 1: 0.1 * 0.5})
    before = [p.detach().clone() for p in model.parameters()]
    st.backward(model(torch.ones(1, 2)).sum() * 100)
    norm = st.step()
    assert norm > 1e-3  # the norm before clipping is reported
    moved = torch.cat([(p.detach() - q).flatten() for p, q in zip(model.parameters(), before)])
    # SGD with clipped gradients: each parameter moved by at most lr * scale * 1e-3
    assert moved.abs().max() <= 0.05 * 1e-3 + 1e-9
    assert all(p.grad is None for p in model.parameters())
    st.start_step()
    assert {g["layer_id"]: g["lr"] for g in st.optimizer.param_groups} == pytest.approx({0: 0.05, 1: 0.1})


def test_no_norm_pass_without_clipping_unless_asked_and_the_same_update():
    torch.manual_seed(0)
    a, b = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    b.load_state_dict(a.state_dict())
    x = torch.randn(4, 3)
    sa, sb = (
        Stepper(a, torch.optim.AdamW(a.parameters(), lr=0.1)),
        Stepper(b, torch.optim.AdamW(b.parameters(), lr=0.1)),
    )
    sa.backward(a(x).square().sum())
    sb.backward(b(x).square().sum())
    grads = torch.cat([p.grad.flatten() for p in b.parameters()])
    assert sa.step() is None
    assert sb.step(norm=True).item() == pytest.approx(grads.norm().item())
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


def test_warmup_cosine_by_hand():
    lr = warmup_cosine(1.0, 0.0, total=10, warmup=2)
    assert lr[0] == 0 and lr[1] == pytest.approx(0.5) and lr[2] == pytest.approx(1.0)
    assert lr[6] == pytest.approx(0.5 * (1 + math.cos(math.pi * 4 / 8)))
    fractional = warmup_cosine(2.0, 0.1, total=4, warmup=1, positions=np.array([0.5, 2.5]))
    assert fractional[0] == pytest.approx(1.0)
    assert fractional[1] == pytest.approx(0.1 + 1.9 * 0.5 * (1 + math.cos(math.pi * 1.5 / 3)))


def test_step_and_poly_schedules_by_hand():
    lr = warmup_step(1.0, total_steps=10, warmup_steps=2, milestones=[5, 8], warmup_factor=0.001)
    assert lr[0] == pytest.approx(0.001) and lr[1] == pytest.approx(0.001 * 0.5 + 0.5)
    assert lr[4] == 1.0 and lr[5] == pytest.approx(0.1) and lr[8] == pytest.approx(0.01)
    poly = warmup_poly(1.0, total_steps=10, warmup_steps=2, power=1.0, warmup_ratio=1e-6)
    assert poly[0] == pytest.approx(1e-6) and poly[2] == pytest.approx(0.8) and poly[9] == pytest.approx(0.1)
    assert poly[1] == pytest.approx(0.9 * (1 - 0.5 * (1 - 1e-6)))
