"""The non-finite policy of the engine (`nonfinite: stop | skip`, `nonfinite_max_skips`), on a test-only task
whose data holds poisoned items (NaN inputs, so a NaN loss) at chosen (epoch, item) keys: `stop` ends the run
before the bad update with one line naming the step, the epoch and the last good checkpoint; `skip` drops the
update (weights, Adam moments and step count, lr schedule as if the batch had not been drawn), counts it, and
resumes exactly. The references are computed here by hand: the sampler's order, and plain AdamW over the
batches that remain."""

import json

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from torch import nn
from torch.utils.data import Dataset

from core import checkpoint as ckpt
from core import dist
from core.data import ShardedSampler, make_loader
from core.errors import NonFiniteError, main
from core.trainer import Run, Task, Trainer

N, BATCH, EPOCHS, SEED = 16, 4, 3, 0
STEPS_PER_EPOCH = N // BATCH
TOTAL = EPOCHS * STEPS_PER_EPOCH
SCHEDULE = np.linspace(0.05, 0.005, TOTAL)


def item(i: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + i)
    x = torch.randn(4, generator=g)
    return x, x.sum() * 0.5 + 1.0


class Toy(Dataset):
    def __init__(self, poison: set):
        self.poison = poison

    def __len__(self):
        return N

    def __getitem__(self, key):
        epoch, i = key
        x, y = item(i)
        return (torch.full_like(x, float("nan")) if (epoch, i) in self.poison else x), y


class ToyTask(Task):
    name = "toy"
    format = "dbot-suite/toy/v1"
    unit = "epoch"

    def build(self, state):
        torch.manual_seed(0)
        self.model = nn.Linear(4, 1)
        if state is not None:
            self.model.load_state_dict(state["model"])
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=0.0, weight_decay=0.01)
        self.train_sampler = ShardedSampler(N, BATCH, seed=SEED)
        poison = {tuple(p) for p in self.cfg.poison}
        self.train_loader = make_loader(Toy(poison), self.train_sampler, workers=0, device=self.device, drop_last=True)
        self.applied_lrs = []
        return Run(
            model=self.model,
            optimizer=self.optimizer,
            schedule=SCHEDULE,
            train_loader=self.train_loader,
            train_sampler=self.train_sampler,
        )

    def forward(self, model, x, y):
        return {"loss": ((model(x).squeeze(1) - y) ** 2).mean()}

    def after_step(self, step, epoch):
        self.applied_lrs.append(self.optimizer.param_groups[0]["lr"])

    def evaluate(self, step):
        return {"w0": self.model.weight[0, 0].item()}

    def state_dict(self):
        return {"model": self.model.state_dict()}


def config(out, poison=(), **kw):
    base = dict(
        out=str(out),
        seed=SEED,
        device="cpu",
        amp="none",
        compile=False,
        resume="auto",
        nonfinite="stop",
        nonfinite_max_skips=10,
        max_epochs=None,
        poison=[list(p) for p in poison],
        log={"every": 1, "save_every": 1, "tensorboard": False},
    )
    base.update(kw)
    return OmegaConf.create(base)


def fit(cfg) -> ToyTask:
    task = ToyTask(cfg, dist.init("cpu"))
    Trainer(task).fit()
    return task


def batches(epoch: int) -> list[list[int]]:
    """The items of each batch of `epoch`: the sampler's convention, a permutation seeded by (seed, epoch)."""
    order = np.random.default_rng([SEED, epoch]).permutation(N)
    return [order[b * BATCH : (b + 1) * BATCH].tolist() for b in range(STEPS_PER_EPOCH)]


def step_of(epoch: int, i: int) -> int:
    """1-based optimizer step whose batch holds item i in that epoch."""
    b = next(k for k, items in enumerate(batches(epoch)) if i in items)
    return epoch * STEPS_PER_EPOCH + b + 1


def reference(skip_steps: set) -> nn.Linear:
    """Plain AdamW over every batch except those of `skip_steps`, the k-th applied update with SCHEDULE[k]."""
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    opt = torch.optim.AdamW(model.parameters(), lr=0.0, weight_decay=0.01)
    applied = 0
    for epoch in range(EPOCHS):
        for b, items in enumerate(batches(epoch)):
            if epoch * STEPS_PER_EPOCH + b + 1 in skip_steps:
                continue
            x = torch.stack([item(i)[0] for i in items])
            y = torch.stack([item(i)[1] for i in items])
            opt.param_groups[0]["lr"] = SCHEDULE[applied]
            ((model(x).squeeze(1) - y) ** 2).mean().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            applied += 1
    return model


def metrics(out) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def same_weights(a: nn.Module, b: nn.Module) -> bool:
    return all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


# ------------------------------------------------------------------------------------------------- stop
def test_stop_ends_before_the_update_and_names_step_epoch_and_last_good_checkpoint(tmp_path):
    out = tmp_path / "o"
    bad = step_of(1, 3)
    with pytest.raises(NonFiniteError) as e:
        fit(config(out, poison=[(1, 3)]))
    msg = str(e.value)
    assert f"loss is not finite at step {bad} (epoch 1)" in msg and "nonfinite=stop" in msg
    assert f"last good checkpoint: {out / 'checkpoint-last.pth'} (step {STEPS_PER_EPOCH})" in msg
    # checkpoint-last is the one from before the bad step, and its weights are the by-hand run's up to there
    state = ckpt.load(out / "checkpoint-last.pth")
    assert state["step"] == STEPS_PER_EPOCH and all(torch.isfinite(v).all() for v in state["model"].values())
    assert not (out / "results.json").exists()
    steps = [r["step"] for r in metrics(out) if "lr" in r]
    assert steps == list(range(1, bad))  # no line for the bad step: nothing of it was applied or logged


def test_stop_before_any_checkpoint_is_one_line_with_status_2(tmp_path, capsys):
    out = tmp_path / "o"
    bad = step_of(0, 5)
    task_holder = {}

    def body():
        task_holder["task"] = task = ToyTask(config(out, poison=[(0, 5)]), dist.init("cpu"))
        Trainer(task).fit()

    assert main(body, argv=[]) == 2
    err = capsys.readouterr().err.strip().splitlines()  # a progress bar may precede it
    assert sum("error" in line for line in err) == 1, err
    assert err[-1].startswith(f"error: loss is not finite at step {bad} (epoch 0)"), err
    assert "last good checkpoint: none written yet" in err[-1]
    # no update applied: the weights in memory are those of the by-hand run over the steps before
    assert same_weights(task_holder["task"].model, reference_prefix(bad - 1))


def reference_prefix(steps: int) -> nn.Linear:
    """The by-hand run stopped after `steps` updates."""
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    opt = torch.optim.AdamW(model.parameters(), lr=0.0, weight_decay=0.01)
    for k in range(steps):
        items = batches(k // STEPS_PER_EPOCH)[k % STEPS_PER_EPOCH]
        x = torch.stack([item(i)[0] for i in items])
        y = torch.stack([item(i)[1] for i in items])
        opt.param_groups[0]["lr"] = SCHEDULE[k]
        ((model(x).squeeze(1) - y) ** 2).mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return model


# ------------------------------------------------------------------------------------------------- skip
def test_skip_drops_the_update_as_if_the_batch_had_not_been_drawn(tmp_path):
    out = tmp_path / "o"
    bad = step_of(1, 3)
    task = fit(config(out, poison=[(1, 3)], nonfinite="skip"))
    assert same_weights(task.model, reference({bad}))  # weights and moments: plain AdamW without that batch
    adam_steps = {int(s["step"]) for s in task.optimizer.state.values()}
    assert adam_steps == {TOTAL - 1}  # Adam's own step count did not move for the skipped step
    assert task.applied_lrs == pytest.approx(SCHEDULE[: TOTAL - 1].tolist(), abs=0)  # after_step: not for it
    res = json.loads((out / "results.json").read_text())
    assert res["skipped_steps"] == 1
    lines = [r for r in metrics(out) if "lr" in r]
    assert [r["step"] for r in lines] == list(range(1, TOTAL + 1))  # the stream advanced by the step
    bad_line = next(r for r in lines if r["step"] == bad)
    assert bad_line["skipped_steps"] == 1 and bad_line["skipped_steps_total"] == 1 and "loss" not in bad_line
    assert [r["skipped_steps_total"] for r in lines] == [0] * (bad - 1) + [1] * (TOTAL - bad + 1)
    assert all(np.isfinite(r["loss"]) for r in lines if r["step"] != bad)


def test_skip_across_a_resume_equals_the_uninterrupted_run_bitwise(tmp_path):
    poison = [(0, 6)]
    whole = fit(config(tmp_path / "a", poison=poison, nonfinite="skip"))
    out = tmp_path / "b"
    fit(config(out, poison=poison, nonfinite="skip", max_epochs=1))  # stops after epoch 0, the skip in it
    assert ckpt.load(out / "checkpoint-last.pth")["stepper"]["skipped"] == 1
    resumed = fit(config(out, poison=poison, nonfinite="skip"))
    assert same_weights(whole.model, resumed.model)
    assert same_weights(whole.model, reference({step_of(0, 6)}))
    assert json.loads((out / "results.json").read_text())["skipped_steps"] == 1
    assert metrics(out)[-2]["skipped_steps_total"] == 1  # the count carried over (last line: evaluation)


def test_a_run_stopped_by_a_nan_resumes_with_skip_and_equals_a_skip_run(tmp_path):
    """The user's path: nonfinite=stop ends the run; the same command with nonfinite=skip resumes it from the
    last good checkpoint (the policy may change on resume) and ends as a run that skipped from the start."""
    poison = [(1, 9)]
    out = tmp_path / "o"
    with pytest.raises(NonFiniteError):
        fit(config(out, poison=poison))
    resumed = fit(config(out, poison=poison, nonfinite="skip"))
    assert same_weights(resumed.model, reference({step_of(1, 9)}))


def test_too_many_skips_in_a_row_stop_as_stop_does(tmp_path):
    first, second = batches(2)[1][0], batches(2)[2][0]  # items of two consecutive steps of epoch 2
    out = tmp_path / "o"
    with pytest.raises(NonFiniteError) as e:
        fit(config(out, poison=[(2, first), (2, second)], nonfinite="skip", nonfinite_max_skips=1))
    bad = step_of(2, second)
    assert bad == step_of(2, first) + 1
    msg = str(e.value)
    assert f"loss is not finite at step {bad} (epoch 2), 2 in a row, more than nonfinite_max_skips=1" in msg
    assert f"(step {2 * STEPS_PER_EPOCH})" in msg  # the last good checkpoint: end of epoch 1
    # the same two poisoned steps with room for two skips: the run ends, both counted
    res = fit(config(tmp_path / "p", poison=[(2, first), (2, second)], nonfinite="skip", nonfinite_max_skips=2))
    assert same_weights(res.model, reference({bad - 1, bad}))


def test_nonfinite_options_are_checked_and_free_on_resume():
    from core.config import ConfigError, load_config
    from finetune.schema import FinetuneConfig

    with pytest.raises(ConfigError, match="nonfinite='ignore'"):
        load_config(ckpt_configs("finetune"), "tiny", ["nonfinite=ignore"], schema=FinetuneConfig)
    with pytest.raises(ConfigError, match="nonfinite_max_skips=-1"):
        load_config(ckpt_configs("finetune"), "tiny", ["nonfinite_max_skips=-1"], schema=FinetuneConfig)
    assert ckpt.config_changes({"nonfinite": "stop", "seed": 0}, {"nonfinite": "skip", "seed": 0}) == []


def ckpt_configs(task):
    from pathlib import Path

    return Path(__file__).resolve().parents[1] / task / "configs"
