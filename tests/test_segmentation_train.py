"""Segmentation training: the loss falls, a tiny run writes results.json, a resumed run equals an uninterrupted
one bit for bit, evaluation alone reproduces the run's numbers, bad labels stop the run before training."""

import json
import shutil

import numpy as np
import pytest
import torch
from conftest import run_module, segmentation_config
from PIL import Image

from core import checkpoint as ckpt
from core.config import ConfigError
from core.data import DataError
from segmentation.data import ADE20K, TrainPipeline
from segmentation.train import build_optimizer, run


def test_a_few_steps_on_the_tiny_set_reduce_the_loss(tiny_ade20k, tiny_segmentor):
    cfg = segmentation_config(tiny_ade20k, "unused", "optim.lr=1e-3")
    ds = ADE20K(tiny_ade20k, "train", 8, TrainPipeline(scale=(192, 48), crop=48))
    images, labels = (torch.stack(t) for t in zip(*(ds[(0, i)] for i in range(8))))
    model = tiny_segmentor.train()
    opt = build_optimizer(cfg, model)
    for g in opt.param_groups:
        g["lr"] = 1e-3 * g["lr_scale"]
    losses = []
    for _ in range(8):
        loss = model(images, labels)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0], losses


def test_tiny_run_writes_results(tiny_ade20k, tiny_pretrained, tmp_path):
    out = tmp_path / "run"
    res = run(segmentation_config(tiny_ade20k, out, f"checkpoint={tiny_pretrained}"))
    saved = json.loads((out / "results.json").read_text())
    assert saved["task"] == "ade20k" and saved["model"] == "tiny" and saved["iterations"] == 4
    assert saved["checkpoint"] == str(tiny_pretrained) and len(saved["checkpoint_sha256"]) == 16
    assert all(0 <= saved["metrics"][k] <= 100 for k in ("mIoU", "mAcc", "aAcc")) and saved["eval_images"] == 4
    assert list(saved["per_class_iou"]) == [
        "hstripes",
        "vstripes",
        "checker",
        "dots",
        "circle",
        "square",
        "triangle",
        "star",
    ]
    assert saved["eval"]["images"] == 4 and res["metrics"] == saved["metrics"]
    state = ckpt.load(out / "checkpoint-last.pth")
    assert state["step"] == 4 and state["meta"]["num_classes"] == 8
    # the backbone started from the pretrained encoder (position grid 8 x 8 -> 12 x 12)
    pre = ckpt.load(tiny_pretrained)["model"]["blocks.0.attn.qkv.weight"]
    assert 0 < (state["model"]["backbone.blocks.0.attn.qkv.weight"] - pre).abs().max() < 0.1
    assert state["model"]["backbone.pos_embed"].shape == (1, 1 + 144, 96)


def test_resume_equals_uninterrupted(tiny_ade20k, tmp_path):
    # batch 2 x 2 accumulation steps over 16 images: 4 iterations per epoch; the run stops after iteration 1
    # (mid-epoch) and the resumed part crosses into the next epoch
    args = ("data.batch_per_gpu=2", "iters=5", "log.save_every=100", "eval.every=100", "model.drop_path=0.1")
    run(segmentation_config(tiny_ade20k, tmp_path / "a", *args))
    stopped = run(segmentation_config(tiny_ade20k, tmp_path / "b", *args, "max_iters=1"))
    assert stopped == {"stopped_at_iteration": 1}
    run(segmentation_config(tiny_ade20k, tmp_path / "b", *args))
    a, b = ckpt.load(tmp_path / "a" / "checkpoint-last.pth"), ckpt.load(tmp_path / "b" / "checkpoint-last.pth")
    assert a["step"] == b["step"] == 5
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    for k, v in a["stepper"]["optimizer"]["state"].items():
        assert torch.equal(v["exp_avg"], b["stepper"]["optimizer"]["state"][k]["exp_avg"]), k
    ra = json.loads((tmp_path / "a" / "results.json").read_text())
    rb = json.loads((tmp_path / "b" / "results.json").read_text())
    assert ra["per_class_iou"] == rb["per_class_iou"]


def test_evaluation_alone_reproduces_the_run_and_takes_multi_scale_flip(tiny_ade20k, tmp_path):
    run(segmentation_config(tiny_ade20k, tmp_path / "run", "iters=2"))
    weights = f"weights={tmp_path / 'run' / 'checkpoint-last.pth'}"
    again = run(segmentation_config(tiny_ade20k, tmp_path / "ev", "eval_only=true", weights))
    trained = json.loads((tmp_path / "run" / "results.json").read_text())
    assert again["metrics"]["mIoU"] == trained["metrics"]["mIoU"] and again["per_class_iou"] == trained["per_class_iou"]
    ms = run(
        segmentation_config(
            tiny_ade20k, tmp_path / "ms", "eval_only=true", weights, "eval.ratios=[0.75,1.25]", "eval.flip=true"
        )
    )
    assert ms["eval"] == {"ratios": [0.75, 1.25], "flip": True, "crop": 48, "stride": 32, "images": 4, "skipped": 0}
    with pytest.raises(ConfigError, match="eval_only=true needs weights"):
        run(segmentation_config(tiny_ade20k, tmp_path / "x", "eval_only=true"))


def test_bad_labels_stop_the_run_before_training(tiny_ade20k, tmp_path):
    root = tmp_path / "ade"
    shutil.copytree(tiny_ade20k, root)
    bad = root / "annotations" / "training" / "ADE_train_00000004.png"
    label = np.array(Image.open(bad))
    label[0, :3] = [9, 40, 9]
    Image.fromarray(label).save(bad)
    with pytest.raises(DataError, match="1 bad label map.*ADE_train_00000004.png: label values outside 0..8: 9, 40"):
        run(segmentation_config(root, tmp_path / "o"))
    assert not (tmp_path / "o" / "checkpoint-last.pth").exists()


def test_config_errors_name_the_option(tiny_ade20k, tmp_path):
    with pytest.raises(ConfigError, match="model.img_size=48 must equal data.crop=64"):
        run(segmentation_config(tiny_ade20k, tmp_path / "o", "data.crop=64"))
    with pytest.raises(ConfigError, match="optim.global_batch=6 is not a multiple"):
        run(segmentation_config(tiny_ade20k, tmp_path / "o", "optim.global_batch=6"))
    with pytest.raises(ConfigError, match="data.batch_per_gpu=1 needs BatchNorm synchronised"):
        run(segmentation_config(tiny_ade20k, tmp_path / "o", "data.batch_per_gpu=1"))
    with pytest.raises(ConfigError, match="checkpoint=.*nope.pth: no such file"):
        run(segmentation_config(tiny_ade20k, tmp_path / "o", f"checkpoint={tmp_path / 'nope.pth'}"))


@pytest.mark.dist
def test_two_processes_evaluate_like_one(tiny_ade20k, tmp_path):
    run(segmentation_config(tiny_ade20k, tmp_path / "run", "iters=1"))
    common = [
        "-c",
        "tiny",
        f"data.root={tiny_ade20k}",
        "device=cpu",
        "eval.workers=0",
        "eval_only=true",
        f"weights={tmp_path / 'run' / 'checkpoint-last.pth'}",
        "log.tensorboard=false",
    ]
    run_module("segmentation", *common, f"out={tmp_path / 'two'}", processes=2)
    one = json.loads((tmp_path / "run" / "results.json").read_text())
    two = json.loads((tmp_path / "two" / "results.json").read_text())
    assert (
        two["eval"]["images"] == 4 and two["per_class_iou"] == one["per_class_iou"] and two["metrics"] == one["metrics"]
    )
