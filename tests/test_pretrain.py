"""dBOT pretraining runs on the tiny data: outputs, stage switch, resume, wider teacher, bad input."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import PRETRAIN_MICRO, REPO, pretrain_config

from core import checkpoint as ckpt
from core.config import ConfigError
from core.data import CorruptImageError, DataError
from core.vit import build_vit
from pretrain.train import Plan, build_student, run


def metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def assert_same_state(a: dict, b: dict, keys=("model", "target")):
    for key in keys:
        assert a[key].keys() == b[key].keys()
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), f"{key}.{name}"


def assert_same_optimizer(a: dict, b: dict):
    for pid, st in a["stepper"]["optimizer"]["state"].items():
        for k, v in st.items():
            assert torch.equal(v, b["stepper"]["optimizer"]["state"][pid][k]), (pid, k)


@pytest.fixture(scope="module")
def uninterrupted(tiny_imagenet, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "full"
    results = run(pretrain_config(tiny_imagenet, out, "stages.epochs=[0,2,4]"))
    return out, results


def test_run_writes_outputs_and_loss_falls_within_each_stage(uninterrupted):
    out, results = uninterrupted
    for f in (
        "config.yaml",
        "metrics.jsonl",
        "results.json",
        "checkpoint-last.pth",
        "checkpoint-stage0-student.pth",
        "checkpoint-stage0-teacher.pth",
        "checkpoint-stage1-student.pth",
        "checkpoint-stage1-teacher.pth",
    ):
        assert (out / f).is_file(), f
    assert not list(out.glob("*.tmp")) and not list(out.glob(".*.tmp"))
    saved = json.loads((out / "results.json").read_text())
    assert saved["task"] == "pretrain" and saved["model"] == "tiny"
    assert set(saved["stage_final_loss"]) == {"0", "1"} and saved["git_commit"]
    rows = metrics(out)
    assert {"step", "epoch", "stage", "loss", "lr", "images_per_s"} <= rows[0].keys()
    for stage in (0, 1):
        losses = [r["loss"] for r in rows if r["stage"] == stage]
        assert len(losses) == 8
        assert losses[-1] < 0.8 * losses[0], (stage, losses)


def test_stage_switch_teacher_is_previous_student_and_lr_restarts(uninterrupted):
    out, _ = uninterrupted
    student0 = ckpt.load(out / "checkpoint-stage0-student.pth")["model"]
    teacher1 = ckpt.load(out / "checkpoint-stage1-teacher.pth")["model"]
    teacher0 = ckpt.load(out / "checkpoint-stage0-teacher.pth")["model"]
    for k, v in teacher1.items():
        assert torch.equal(v, student0[k]), k
    assert not torch.equal(teacher0["blocks.0.attn.qkv.weight"], teacher1["blocks.0.attn.qkv.weight"])
    rows = metrics(out)
    lr0 = [r["lr"] for r in rows if r["stage"] == 0]
    lr1 = [r["lr"] for r in rows if r["stage"] == 1]
    assert lr0 == pytest.approx(lr1)  # warmup + cosine restarted: the same curve in both stages
    assert lr0[0] < lr0[1] and lr0[-1] < lr0[2]


def test_student_is_reinitialised_at_the_boundary(tiny_imagenet, tmp_path):
    cfg = pretrain_config(tiny_imagenet, tmp_path / "r", "max_epochs=1")
    run(cfg)  # stops right after the switch to stage 1
    last = ckpt.load(tmp_path / "r" / "checkpoint-last.pth")
    assert last["stage"] == 1 and last["epoch"] == 1
    plan = Plan(cfg, _cpu_env())
    fresh = build_student(plan, 1, target_dim=96).state_dict()
    for k, v in last["model"].items():
        assert torch.equal(v, fresh[k]), k
    stage0_student = ckpt.load(tmp_path / "r" / "checkpoint-stage0-student.pth")["model"]
    assert not torch.equal(stage0_student["blocks.0.attn.qkv.weight"], fresh["blocks.0.attn.qkv.weight"])


def _cpu_env():
    from core.dist import DistEnv

    return DistEnv()


def test_resume_equals_uninterrupted_bitwise(uninterrupted, tiny_imagenet, tmp_path):
    full_out, _ = uninterrupted
    out = tmp_path / "pieces"
    for _ in range(3):  # 1 + 1 epochs (through the stage switch at epoch 2) + the rest
        run(pretrain_config(tiny_imagenet, out, "stages.epochs=[0,2,4]", "max_epochs=1"))
    run(pretrain_config(tiny_imagenet, out, "stages.epochs=[0,2,4]"))
    a = ckpt.load(full_out / "checkpoint-last.pth")
    b = ckpt.load(out / "checkpoint-last.pth")
    assert a["epoch"] == b["epoch"] == 4 and a["stepper"]["step"] == b["stepper"]["step"]
    assert_same_state(a, b)
    assert_same_optimizer(a, b)
    assert [r["loss"] for r in metrics(full_out)] == [r["loss"] for r in metrics(out)]


def test_loader_workers_do_not_change_the_result(tiny_imagenet, tmp_path):
    a = tmp_path / "w0"
    b = tmp_path / "w2"
    run(pretrain_config(tiny_imagenet, a, "stages.epochs=[0,1]"))
    run(pretrain_config(tiny_imagenet, b, "stages.epochs=[0,1]", "data.workers=2"))
    assert_same_state(ckpt.load(a / "checkpoint-last.pth"), ckpt.load(b / "checkpoint-last.pth"))


def test_killed_run_resumes_to_the_uninterrupted_result(tiny_imagenet, tmp_path):
    common = [f"data.root={tiny_imagenet}", *PRETRAIN_MICRO, "stages.epochs=[0,3,6]"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "2"}
    cmd = [sys.executable, "-m", "pretrain", "-c", "tiny", *common]
    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        [*cmd, f"out={killed}"], cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    last = killed / "checkpoint-last.pth"
    deadline = time.time() + 120
    while not last.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    time.sleep(0.3)  # somewhere inside the next epoch
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    assert ckpt.load(last)["epoch"] < 6
    subprocess.run([*cmd, f"out={killed}"], cwd=REPO, env=env, check=True, capture_output=True)
    full = tmp_path / "full"
    subprocess.run([*cmd, f"out={full}"], cwd=REPO, env=env, check=True, capture_output=True)
    assert_same_state(ckpt.load(full / "checkpoint-last.pth"), ckpt.load(last))


def test_wider_teacher_from_a_checkpoint_trains(tiny_imagenet, tmp_path):
    teacher = build_vit("tiny")  # 96 wide; the student below is 48 wide
    path = ckpt.save({"model": teacher.state_dict()}, tmp_path / "teacher.pth")
    out = tmp_path / "wide"
    res = run(
        pretrain_config(
            tiny_imagenet,
            out,
            f"teacher.checkpoint={path}",
            "teacher.size=tiny",
            "model.embed_dim=48",
            "model.num_heads=2",
            "teacher.bootstrap=false",
            "stages.epochs=[0,3]",
        )
    )
    student = ckpt.load(out / "checkpoint-stage0-student.pth")["model"]
    assert student["cls_token"].shape[-1] == 48 and student["decoder_pred.weight"].shape[0] == 96
    losses = [r["loss"] for r in metrics(out)]
    assert losses[-1] < 0.8 * losses[0]
    assert "checkpoint" in res["target"] and "teacher" not in res  # the first target once


# ------------------------------------------------------------------------------------------- bad input
def no_outputs(out):
    return not out.exists() or not any(out.glob("*.pth"))


@pytest.mark.parametrize(
    "overrides, error, match",
    [
        (["stages.epochs=[0,5,3]"], ConfigError, "stages.epochs"),
        (["stages.epochs=[2,5]"], ConfigError, "stages.epochs"),
        (["model.depth_per_stage=[4,4,4]"], ConfigError, "depth_per_stage has 3 entries"),
        (["optim.global_batch=12"], ConfigError, "global_batch=12"),
        (["optim.lrr=1"], ConfigError, "unknown option 'optim.lrr'"),
        (["teacher.init_depth=-1"], ConfigError, "init_depth"),
    ],
)
def test_bad_config_fails_before_compute(tiny_imagenet, tmp_path, overrides, error, match):
    out = tmp_path / "bad"
    with pytest.raises(error, match=match):
        run(pretrain_config(tiny_imagenet, out, *overrides))
    assert no_outputs(out)


def test_missing_data_folder(tmp_path):
    with pytest.raises(ConfigError, match="data.root=.*nowhere: no such folder"):
        run(pretrain_config(tmp_path / "nowhere", tmp_path / "o"))


def test_class_folder_without_images(tiny_imagenet, tmp_path):
    import shutil

    root = tmp_path / "data"
    shutil.copytree(tiny_imagenet, root)
    for f in (root / "train" / "square").iterdir():
        f.unlink()
    with pytest.raises(DataError, match="square holds no images"):
        run(pretrain_config(root, tmp_path / "o"))
    assert no_outputs(tmp_path / "o")


def test_corrupt_image_is_named_or_skipped_and_counted(tiny_imagenet, tmp_path):
    import shutil

    root = tmp_path / "data"
    shutil.copytree(tiny_imagenet, root)
    bad = root / "train" / "circle" / "circle_00003.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    with pytest.raises(CorruptImageError, match="circle_00003.jpg"):
        run(pretrain_config(root, tmp_path / "o1", "stages.epochs=[0,1]"))
    res = run(pretrain_config(root, tmp_path / "o2", "stages.epochs=[0,1]", "data.skip_corrupt=true"))
    assert res["corrupt_images"]["train"] == {"count": 1, "files": [str(bad)]}


def test_teacher_checkpoint_that_does_not_fit(tiny_imagenet, tmp_path):
    wrong = build_vit("tiny", embed_dim=48, num_heads=2)
    path = ckpt.save({"model": wrong.state_dict()}, tmp_path / "t.pth")
    with pytest.raises(ckpt.CheckpointError, match="do not fit the model"):
        run(pretrain_config(tiny_imagenet, tmp_path / "o", f"teacher.checkpoint={path}", "teacher.size=tiny"))
    assert no_outputs(tmp_path / "o")


def test_resume_from_another_model_is_refused(uninterrupted, tiny_imagenet, tmp_path):
    full_out, _ = uninterrupted
    with pytest.raises(ckpt.CheckpointError, match="saved for another model"):
        run(
            pretrain_config(
                tiny_imagenet,
                tmp_path / "o",
                f"resume={full_out / 'checkpoint-last.pth'}",
                "model.embed_dim=48",
                "model.num_heads=2",
            )
        )
    assert no_outputs(tmp_path / "o")


# ------------------------------------------------------------------------------------------- first teacher
def test_first_teacher_is_the_students_initial_encoder_for_both_student_kinds(tiny_imagenet, tmp_path):
    """The released random teacher (`teacher.init_depth` set, as the base recipe does) computes exactly what the
    student's initial encoder computes; for the BEiT-style student that includes layer scale and the shared
    relative position bias (a plain ViT copy would drop them)."""
    from pretrain.train import first_target

    x = torch.randn(2, 3, 32, 32)
    for extra in ([], ["model.kind=beit", "model.masking=block", "model.mask_ratio=0.4"]):
        cfg = pretrain_config(tiny_imagenet, tmp_path / "o", "teacher.init_depth=4", *extra)
        student, target = first_target(Plan(cfg, _cpu_env()), 0)
        student.eval()
        with torch.no_grad():
            tokens = target.teacher.forward_tokens(x, final_norm=False)
            assert torch.allclose(tokens, student.forward_tokens(x, final_norm=False), atol=1e-6, rtol=0)
        if extra:
            assert target.teacher.blocks[0].ls1.gamma.eq(0.1).all() and target.teacher.rel_pos_bias is not None


def test_random_first_teacher_follows_width_overrides(tiny_imagenet, tmp_path):
    """model.embed_dim / num_heads change the student and its random first teacher alike (the head predicts the
    teacher's 48 channels), instead of a size-mismatch error."""
    out = tmp_path / "narrow"
    run(pretrain_config(tiny_imagenet, out, "model.embed_dim=48", "model.num_heads=2", "stages.epochs=[0,1,2]"))
    student = ckpt.load(out / "checkpoint-stage0-student.pth")["model"]
    teacher = ckpt.load(out / "checkpoint-stage0-teacher.pth")["model"]
    assert student["decoder_pred.weight"].shape[0] == teacher["cls_token"].shape[-1] == 48


def test_resumed_run_logs_each_step_once_and_lists_every_checkpoint(tiny_imagenet, tmp_path):
    out = tmp_path / "r"
    run(pretrain_config(tiny_imagenet, out, "max_epochs=1"))
    with open(out / "metrics.jsonl", "a") as f:  # lines a killed run wrote after its last checkpoint
        f.write(json.dumps({"step": 5, "loss": 1.0}) + "\n" + json.dumps({"step": 6, "loss": 1.0}) + "\n")
    res = run(pretrain_config(tiny_imagenet, out))
    steps = [r["step"] for r in metrics(out)]
    assert steps == sorted(set(steps)) and steps == list(range(1, 9)), steps
    assert {"stage0_student", "stage0_teacher", "stage1_student", "stage1_teacher", "last"} <= set(res["checkpoints"])


def test_online_probe_is_logged_and_leaves_training_unchanged(uninterrupted, tiny_imagenet, tmp_path):
    """probe.every=1: knn and linprobe after every epoch (metrics.jsonl; val/* in TensorBoard) and in results.json; the
    student trains exactly as without the probe, also across a resume (the probe draws no global randomness)."""
    full_out, _ = uninterrupted
    out = tmp_path / "probed"
    probed = ("stages.epochs=[0,2,4]", "probe.every=1", "probe.epochs=5", "probe.train_images=40")
    run(pretrain_config(tiny_imagenet, out, *probed, "max_epochs=2"))
    results = run(pretrain_config(tiny_imagenet, out, *probed))
    a, b = ckpt.load(full_out / "checkpoint-last.pth"), ckpt.load(out / "checkpoint-last.pth")
    assert_same_state(a, b)
    lines = metrics(out)
    assert [r["loss"] for r in lines if "loss" in r] == [r["loss"] for r in metrics(full_out)]
    probes = [r for r in lines if "linprobe" in r]
    steps_per_epoch = a["stepper"]["step"] // 4
    assert [r["step"] for r in probes] == [steps_per_epoch * e for e in (1, 2, 3, 4)]
    for r in probes:
        assert 0.0 <= r["knn"] <= 100.0 and 0.0 <= r["linprobe"] <= 100.0 and r["probe_images"] > 40
    assert results["metrics"]["probe_linprobe"] == probes[-1]["linprobe"]
    assert results["metrics"]["probe_knn"] == probes[-1]["knn"]


def test_online_probe_needs_a_labelled_split(tiny_imagenet, tmp_path):
    with pytest.raises(ConfigError, match=r"probe.every=1: probe.root=.* has no train/, val/"):
        run(pretrain_config(tiny_imagenet, tmp_path / "o", "probe.every=1", f"probe.root={tiny_imagenet / 'train'}"))
    with pytest.raises(ConfigError, match="probe.every"):
        run(pretrain_config(tiny_imagenet, tmp_path / "o", "probe.every=0"))
