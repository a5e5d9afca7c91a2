"""The engine <-> task contract on a toy task (a sixth task as a newcomer would write it from docs/ENGINE.md):
`build` returns a `Run` and the loop trains exactly that; a stage end returns a `Switch` and the loop trains
the new model with the new optimizer from then on and writes checkpoint-last for it; evaluation follows
`Run.eval_every`; a `build` that returns no `Run` is named."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from core.data import ShardedSampler, make_loader
from core.dist import DistEnv
from core.trainer import Run, Switch, Task, fit


class Points(torch.utils.data.Dataset):
    """16 fixed points of y = x . (1, 2, 3, 4)."""

    def __init__(self):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(16, 4, generator=g)
        self.y = self.x @ torch.tensor([1.0, 2.0, 3.0, 4.0])

    def __len__(self):
        return 16

    def __getitem__(self, key):
        _, i = key
        return self.x[i], self.y[i]


class Toy(Task):
    """Linear regression, 2 epochs of 4 steps; at the end of epoch 0 a switch to a fresh model and optimizer."""

    name, format, unit = "toy", "dbot-suite/toy/v1", "epoch"

    def build(self, state):
        self.model, self.evaluated, self.saves = nn.Linear(4, 1), [], 0
        sampler = ShardedSampler(16, 4, seed=self.cfg.seed)
        return Run(
            model=self.model,
            optimizer=torch.optim.SGD(self.model.parameters(), lr=0.0),
            schedule=[0.05] * 8,
            train_loader=make_loader(Points(), sampler, workers=0, device=self.device, drop_last=True),
            train_sampler=sampler,
            eval_every=1,
        )

    def forward(self, model, x, y):
        return {"loss": ((model(x).squeeze(1) - y) ** 2).mean()}

    def evaluate(self, step):
        self.evaluated.append(step)
        return {"weight_norm": float(self.model.weight.detach().norm())}

    def end_of_epoch(self, epoch, losses, stepper):
        if epoch != 0:
            return None
        self.first, self.first_weight = self.model, self.model.weight.detach().clone()
        self.switch_step = stepper.step_count
        self.model = nn.Linear(4, 1)
        self.second_init = self.model.weight.detach().clone()
        return Switch(model=self.model, optimizer=torch.optim.SGD(self.model.parameters(), lr=0.0))

    def state_dict(self):
        self.saves += 1
        return {"model": self.model.state_dict()}


def toy_config(out):
    return OmegaConf.create(
        {
            "out": str(out),
            "seed": 0,
            "device": "cpu",
            "amp": "none",
            "compile": False,
            "resume": "none",
            "nonfinite": "stop",
            "nonfinite_max_skips": 0,
            "max_epochs": None,
            "log": {"every": 1, "save_every": None, "tensorboard": False},
        }
    )


def test_the_loop_trains_what_build_returns_and_switches_when_told(tmp_path):
    task = Toy(toy_config(tmp_path / "r"), DistEnv())
    fit(task)
    assert task.switch_step == 4 and task.evaluated == [4, 8]  # eval_every=1 epoch: after steps 4 and 8
    assert torch.equal(task.first.weight, task.first_weight)  # the first model is not touched after the switch
    assert not torch.equal(task.model.weight, task.second_init)  # the second one trained from step 5 on
    assert task.saves == 2  # log.save_every=null: checkpoint-last only at the switch and at the end
    saved = torch.load(tmp_path / "r" / "checkpoint-last.pth", weights_only=False)
    assert saved["step"] == 8 and torch.equal(saved["model"]["weight"], task.model.weight)


def test_a_build_that_returns_no_run_is_named(tmp_path):
    class Forgetful(Toy):
        def build(self, state):
            super().build(state)

    with pytest.raises(TypeError, match="Forgetful.build must return a core.trainer.Run, not NoneType"):
        fit(Forgetful(toy_config(tmp_path / "r"), DistEnv()))
