"""The whole tiny chain through the real command lines, as `make demo` runs it: pretrain -> convert ->
finetune -> coco -> ade20k -> table, each stage reading the previous stage's output. The fast test shrinks
every stage to seconds; the slow one runs the demo's own recipes and checks what they must reach."""

import json

import pytest
from conftest import run_module


def cli(module, *args):
    return run_module(module, *args, threads=2).stdout


def test_tiny_chain_end_to_end(tiny_imagenet, tiny_coco, tiny_ade20k, tmp_path):
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
    assert json.loads((pre / "results.json").read_text())["final_student"] == str(student)

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
    assert res["task"] == "finetune" and 0 <= res["metrics"]["top1"] <= 100

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
    assert res["task"] == "coco" and "bbox_AP" in res["metrics"] and "segm_AP" in res["metrics"]

    ade = tmp_path / "ade20k"
    cli(
        "segmentation",
        "-c",
        "tiny",
        f"data.root={tiny_ade20k}",
        f"checkpoint={student}",
        f"out={ade}",
        "iters=2",
        "optim.warmup_iters=1",
        "eval.every=2",
        "eval.workers=0",
        "data.batch_per_gpu=4",
        "optim.global_batch=4",
        *common,
    )
    res = json.loads((ade / "results.json").read_text())
    assert res["task"] == "ade20k" and 0 <= res["metrics"]["mIoU"] <= 100

    # the row of the pretraining run holds the COCO and ADE20K cells; fine-tuning started from the converted
    # timm file, which no run folder produced, so its top-1 sits in a row of unknown teacher
    table = cli("tools.table", "--runs", str(tmp_path))
    rows = {
        line.split("|")[2].strip(): [c.strip() for c in line.strip("|").split("|")]
        for line in table.splitlines()
        if line.startswith("| ViT-tiny/4 |")
    }
    assert set(rows) == {"ViT-tiny (bootstrapped)", "?"}, table
    assert all(rows["ViT-tiny (bootstrapped)"][i] != "-" for i in (6, 9, 12))  # box AP, mask AP, mIoU
    assert rows["?"][3] != "-"  # IN-1K top-1


@pytest.mark.slow
def test_demo_recipes_reach_their_targets(tmp_path):
    """`make demo` in a temporary folder: the tiny recipes on the full generated sets (about 10 minutes)."""
    data, runs = tmp_path / "data", tmp_path / "runs"
    for kind in ("imagenet", "coco", "ade20k"):
        cli("tools.datasets", kind, "--out", str(data / kind))
    cli("pretrain", "-c", "tiny", f"data.root={data / 'imagenet'}", f"out={runs / 'pretrain'}")
    student = runs / "pretrain" / "checkpoint-stage1-student.pth"
    start = f"checkpoint={student}"
    cli("finetune", "-c", "tiny", f"data.root={data / 'imagenet'}", start, f"out={runs / 'finetune'}")
    cli("detection", "-c", "tiny", f"data.root={data / 'coco'}", start, f"out={runs / 'coco'}")
    cli("segmentation", "-c", "tiny", f"data.root={data / 'ade20k'}", start, f"out={runs / 'ade20k'}")
    result = {t: json.loads((runs / t / "results.json").read_text()) for t in ("finetune", "coco", "ade20k")}
    assert result["finetune"]["metrics"]["top1"] > 25  # 10 balanced classes: chance is 10
    assert (
        result["coco"]["metrics"]["bbox_AP"] > 10 and result["coco"]["metrics"]["segm_AP"] > 10
    )  # "clearly above zero"
    assert result["ade20k"]["metrics"]["mIoU"] > 20  # chance (uniform guesses over 8 classes) is about 7
    assert "| ViT-tiny/4 |" in cli("tools.table", "--runs", str(runs))
