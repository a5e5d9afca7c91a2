"""Two gloo ranks equal one process, per downstream task, weights compared (pretraining: tests/test_dist.py);
and segmentation's SyncBatchNorm conversion (done for multi-GPU runs) keeps the weights and the eval output.

Equality needs the same loss per optimizer step in both runs:
- fine-tuning: cross-entropy is a mean over images, so 1 process x 8 images = 2 ranks x 4 (no mixup, whose
  lambda is drawn per rank; no drop path, drawn from the rank-offset global RNG);
- detection: the RPN and RoI losses are normalised per micro-batch (detectron2's per-GPU normalisation), so the
  1-process run takes the same micro-batches as the ranks: one image each, 4 per step by accumulation
  (1 x 1 x 4 = 2 x 1 x 2); the samplers of anchors and RoIs take every candidate (their random choice is drawn
  from the rank's own stream). Four steps: a float-rounding difference flips a discrete choice (a proposal's
  IoU match) a few steps later, as in any detector (measured: the runs agree to 6 digits for 5 steps, then
  one step's box loss jumps).
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import detection_config, run_module

from core import checkpoint as ckpt
from core.config import save_config

TOL = 1e-4  # float summation order differs (all-reduce of two halves); training moves the weights far more


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    worst = max((x.float() - b[k].float()).abs().max().item() for k, x in a.items())
    assert worst < TOL, worst


def step_losses(out) -> list[float]:
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return [r["loss"] for r in rows if "loss" in r]


def finetune_args(data, out, batch):
    return [
        "-c",
        "tiny",
        f"data.root={data}",
        f"out={out}",
        "checkpoint=null",
        "device=cpu",
        "data.workers=0",
        f"data.batch_per_gpu={batch}",
        "data.eval_batch_per_gpu=4",
        "optim.global_batch=8",
        "epochs=2",
        "optim.warmup_epochs=0.5",
        "aug.mixup=0",
        "model.drop_path=0",
        "optim.clip_grad=1.0",
        "log.tensorboard=false",
    ]


@pytest.mark.dist
def test_finetune_two_processes_equal_one_process(tiny_imagenet, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    run_module("finetune", *finetune_args(tiny_imagenet, one, 8))
    run_module("finetune", *finetune_args(tiny_imagenet, two, 4), processes=2)
    a, b = ckpt.load(one / "checkpoint-last.pth"), ckpt.load(two / "checkpoint-last.pth")
    assert a["stepper"]["step"] == b["stepper"]["step"] == 8  # 32 images / 8 per step x 2 epochs
    assert_same_weights(a["model"], b["model"])
    ra, rb = (json.loads((d / "results.json").read_text()) for d in (one, two))
    assert ra["metrics"] == pytest.approx(rb["metrics"]) and ra["eval_images"] == rb["eval_images"] == 16
    la, lb = step_losses(one), step_losses(two)
    assert la == pytest.approx(lb, rel=1e-5) and len(la) >= 2
    assert abs(la[0] - la[-1]) > 1e-2  # it trained


@pytest.mark.dist
@pytest.mark.slow
def test_detection_two_processes_equal_one_process(tiny_coco, tmp_path):

    common = ["data.batch_per_gpu=1", "optim.global_batch=4", "det.rpn_batch_per_image=100000"]
    common += ["det.rois_per_image=100000", "optim.iters=4", "optim.steps=[2,3]", "log.save_every=4"]
    for name in ("one", "two"):
        save_config(detection_config(tiny_coco, tmp_path / name, *common), tmp_path / f"{name}.yaml")
    run_module("detection", "-c", str(tmp_path / "one.yaml"))
    run_module("detection", "-c", str(tmp_path / "two.yaml"), processes=2)
    a, b = (ckpt.load(tmp_path / d / "checkpoint-last.pth") for d in ("one", "two"))
    assert a["stepper"]["step"] == b["stepper"]["step"] == 4
    assert_same_weights(a["model"], b["model"])
    la, lb = (step_losses(tmp_path / d) for d in ("one", "two"))
    assert la == pytest.approx(lb, rel=1e-5) and len(la) == 4


# ---------------------------------------------------------------------------------------- SyncBatchNorm
def test_syncbn_conversion_keeps_the_state_dict_and_the_eval_output(tiny_segmentor):
    """What segmentation/train.py does for a multi-GPU run: the same keys and values, the same eval output
    (running statistics; the synchronised batch statistics of training need a process group)."""
    model = tiny_segmentor.eval()
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns, "the segmentor has BatchNorm layers"
    for k, m in enumerate(bns):  # non-trivial running statistics, so that eval really uses them
        m.running_mean.normal_(0, 0.1, generator=torch.Generator().manual_seed(k))
        m.running_var.uniform_(0.5, 2.0, generator=torch.Generator().manual_seed(100 + k))
    g = torch.Generator().manual_seed(0)
    x, labels = torch.randn(2, 3, 48, 48, generator=g), torch.randint(0, 8, (2, 48, 48), generator=g)

    def outputs(m):  # the prediction and every loss (decode and auxiliary heads), in eval mode
        with torch.no_grad():
            return [m.predict(x), *m(x, labels).values()]

    want = outputs(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    synced = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    assert any(isinstance(m, torch.nn.SyncBatchNorm) for m in synced.modules())
    assert not any(type(m) is torch.nn.BatchNorm2d for m in synced.modules())
    new = synced.state_dict()
    assert list(new) == list(state) and all(torch.equal(new[k], v) for k, v in state.items())
    got = outputs(synced.eval())
    assert len(got) == len(want) == 4 and all(torch.equal(p, q) for p, q in zip(want, got))
