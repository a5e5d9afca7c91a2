"""`compile=true` (torch.compile with its default backend, inductor, on CPU here) = eager, per task, through the
engine: the same per-step losses and final weights within a stated tolerance, the compiled run stopped midway
and resumed. Inductor draws random numbers (drop path, dropout) with its own generator; `fallback_random` makes
it draw them as eager does, so that the two runs can be compared step by step.

Inductor compiles take a minute or more on two cores: fine-tuning runs in `make test`, the other tasks are slow.
"""

from __future__ import annotations

import json
from functools import partial

import pytest
from conftest import detection_config, finetune_config, pretrain_config, segmentation_config

from core import checkpoint as ckpt

LOSS_RTOL = 1e-4  # fp32: inductor fuses and reorders reductions; the losses agree to ~1e-6 relative
WEIGHT_ATOL = 2e-4  # a few AdamW steps of lr ~1e-3: rounding differences stay far below one step's movement


@pytest.fixture
def eager_random():
    import torch._inductor.config as inductor

    with inductor.patch(fallback_random=True):  # inductor's own switch (monkeypatch's undo breaks its config)
        yield


def step_losses(out) -> dict[int, float]:
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def compare(eager, compiled, steps: int, key: str = "model") -> None:
    le, lc = step_losses(eager), step_losses(compiled)
    assert sorted(le) == sorted(lc) and len(le) == steps, (le, lc)
    for s in le:
        assert lc[s] == pytest.approx(le[s], rel=LOSS_RTOL), (s, le[s], lc[s])
    assert len({round(v, 6) for v in le.values()}) > 1  # the losses change from step to step
    a, b = (ckpt.load(d / "checkpoint-last.pth") for d in (eager, compiled))
    assert a["stepper"]["step"] == b["stepper"]["step"] == steps
    worst = max((x - b[key][k]).abs().max().item() for k, x in a[key].items() if x.is_floating_point())
    assert worst < WEIGHT_ATOL, worst


def eager_and_resumed_compiled(run, config, tmp_path, stop: str):
    """The eager run to its end; the compiled run stopped by `stop` (max_epochs / max_iters) and run again."""
    run(config(tmp_path / "eager"))
    run(config(tmp_path / "compiled", "compile=true", stop))
    assert (tmp_path / "compiled" / "checkpoint-last.pth").is_file()
    run(config(tmp_path / "compiled", "compile=true"))
    return tmp_path / "eager", tmp_path / "compiled"


def test_finetune_compiled_equals_eager_across_a_resume(tiny_imagenet, tmp_path, eager_random):
    from finetune.train import run

    def config(out, *extra):  # drop path and mixup stay on: their draws must match too
        return finetune_config(tiny_imagenet, out, "checkpoint=null", "model.drop_path=0.1", "log.every=1", *extra)

    eager, compiled = eager_and_resumed_compiled(run, config, tmp_path, "max_epochs=1")
    compare(eager, compiled, steps=8)


@pytest.mark.slow
def test_pretrain_compiled_equals_eager_across_a_stage_switch_and_a_resume(tiny_imagenet, tmp_path, eager_random):
    from pretrain.train import run

    eager, compiled = eager_and_resumed_compiled(run, partial(pretrain_config, tiny_imagenet), tmp_path, "max_epochs=1")
    compare(eager, compiled, steps=8)


@pytest.mark.slow
def test_detection_compiled_backbone_equals_eager_across_a_resume(tiny_coco, tmp_path, eager_random):
    from detection.train import run

    eager, compiled = eager_and_resumed_compiled(run, partial(detection_config, tiny_coco), tmp_path, "max_iters=3")
    compare(eager, compiled, steps=6)


@pytest.mark.slow
def test_segmentation_compiled_equals_eager_across_a_resume(tiny_ade20k, tmp_path, eager_random):
    from segmentation.train import run

    eager, compiled = eager_and_resumed_compiled(
        run, partial(segmentation_config, tiny_ade20k), tmp_path, "max_iters=2"
    )
    compare(eager, compiled, steps=4)
