"""The whole tiny chain through the real command lines, as `make demo` runs it (shrunk to seconds):
pretrain -> convert -> finetune -> coco, each stage reading the previous stage's output."""

import json
import os
import subprocess
import sys

from conftest import REPO


def cli(*args, cwd=REPO):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "2"}
    proc = subprocess.run([sys.executable, "-m", *args], cwd=cwd, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, f"{args[0]} failed:\n{proc.stderr[-3000:]}"
    return proc.stdout


def test_tiny_chain_end_to_end(tiny_imagenet, tiny_coco, tmp_path):
    common = ["device=cpu", "data.workers=0", "log.tensorboard=false"]
    pre = tmp_path / "pretrain"
    cli(
        "pretrain",
        "-c",
        "tiny",
        f"data.root={tiny_imagenet}",
        f"out={pre}",
        "data.batch_per_gpu=8",
        "optim.global_batch=8",
        "stages.epochs=[0,1,2]",
        "model.decoder.depth=1",
        *common,
    )
    student = pre / "checkpoint-stage1-student.pth"
    assert json.loads((pre / "results.json").read_text())["checkpoint"] == str(student)

    out = cli("tools.convert", str(student), str(tmp_path / "timm.pth"), "--to", "timm", "--model", "tiny")
    assert "dbot-suite/pretrain/v1" in out

    ft = tmp_path / "finetune"
    cli(
        "finetune",
        "-c",
        "tiny",
        f"data.root={tiny_imagenet}",
        f"checkpoint={tmp_path / 'timm.pth'}",
        f"out={ft}",
        "epochs=1",
        "data.batch_per_gpu=8",
        "optim.global_batch=8",
        "data.eval_batch_per_gpu=16",
        *common,
    )
    res = json.loads((ft / "results.json").read_text())
    assert res["task"] == "finetune" and 0 <= res["top1"] <= 100

    coco = tmp_path / "coco"
    cli(
        "detection",
        "-c",
        "tiny",
        f"data.root={tiny_coco}",
        f"checkpoint={student}",
        f"out={coco}",
        "optim.iters=2",
        "optim.steps=[1]",
        "optim.warmup_iters=1",
        "data.batch_per_gpu=4",
        "optim.global_batch=4",
        *common,
    )
    res = json.loads((coco / "results.json").read_text())
    assert res["task"] == "coco" and "AP" in res["bbox"] and "AP" in res["segm"]
