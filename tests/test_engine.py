"""The shared training-step skeleton and schedules."""

import math

import numpy as np
import pytest
import torch

from core.engine import Stepper, steps_per_epoch
from core.optim import param_groups, warmup_cosine, warmup_poly, warmup_step


def test_accumulation_steps_even_when_an_epoch_has_fewer_batches_than_accum():
    torch.manual_seed(0)
    x, y = torch.randn(12, 3), torch.randn(12, 1)
    a, b = torch.nn.Linear(3, 1), torch.nn.Linear(3, 1)
    b.load_state_dict(a.state_dict())
    # a: 3 micro-batches of 4 with accum 8 -> one step with group size 3; b: one batch of 12
    sa = Stepper(a, torch.optim.SGD(a.parameters(), lr=0.1), accum=8)
    sb = Stepper(b, torch.optim.SGD(b.parameters(), lr=0.1), accum=1)
    assert steps_per_epoch(3, 8) == 1
    for i in range(3):
        g = sa.group(i, 3)
        assert g.size == 3 and g.first == (i == 0) and g.last == (i == 2)
        sa.backward(torch.nn.functional.mse_loss(a(x[4 * i : 4 * i + 4]), y[4 * i : 4 * i + 4]), g)
    sa.step()
    sb.backward(torch.nn.functional.mse_loss(b(x), y), sb.group(0, 1))
    sb.step()
    assert sa.step_count == sb.step_count == 1
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.allclose(p, q, atol=1e-6)


def test_schedule_is_applied_with_layer_scales_and_clipping_reports_the_norm():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
    groups = param_groups(model, 0.0, layer_decay=0.5, layer_id=lambda n: int(n[0]), num_layers=2)
    st = Stepper(model, torch.optim.SGD(groups, lr=1.0), schedule=[0.1, 0.2], clip_grad=1e-3)
    st.group(0, 1)  # the first micro-batch of a group sets the lr of the current step
    lrs = {g["layer_id"]: g["lr"] for g in st.optimizer.param_groups}
    assert lrs == pytest.approx({0: 0.1 * 0.25, 1: 0.1 * 0.5})
    before = [p.detach().clone() for p in model.parameters()]
    st.backward(model(torch.ones(1, 2)).sum() * 100, st.group(0, 1))
    norm = st.step()
    assert norm > 1e-3  # the norm before clipping is reported
    moved = torch.cat([(p.detach() - q).flatten() for p, q in zip(model.parameters(), before)])
    # SGD with clipped gradients: each parameter moved by at most lr * scale * 1e-3
    assert moved.abs().max() <= 0.05 * 1e-3 + 1e-9
    assert all(p.grad is None for p in model.parameters())
    st.group(0, 1)
    assert {g["layer_id"]: g["lr"] for g in st.optimizer.param_groups} == pytest.approx({0: 0.05, 1: 0.1})


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
