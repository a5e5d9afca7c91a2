"""Benchmarks: FLOPs counted against figures worked out by hand (attention included on CPU), the pretraining
bench builds the recipe it is given, the side-by-side harness and the loader bench run, the four task
benches share one command line (`-c RECIPE [key=value ...]` + measurement flags, `-h` per subcommand), and
the driver's step is the training step: its first loss equals the first loss a training run logs."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from conftest import detection_config, finetune_config
from torch.utils.flop_counter import FlopCounterMode

from core import speed
from core.config import ConfigError, load_config
from core.vit import ViT
from tools import bench

REPO = Path(__file__).resolve().parents[1]


def block_flops(b: int, n: int, d: int) -> int:
    """One ViT block's forward on `b` x `n` tokens of width `d`: qkv 6bnd^2, proj 2bnd^2, MLP (ratio 4)
    16bnd^2; attention Q K^T and P V 2bn^2d each."""
    return 24 * b * n * d * d + 4 * b * n * n * d


def block_train_flops(b: int, n: int, d: int) -> int:
    """Forward + backward: linear layers 3x their forward; attention forward 4bn^2d plus a backward of five
    products (scores recomputed, dP, dV, dQ, dK) of 2bn^2d each."""
    return 72 * b * n * d * d + 14 * b * n * n * d


def test_flops_of_a_tiny_vit_equal_the_hand_count_with_attention():
    b, d, depth, img, p = 2, 32, 2, 16, 4
    m = ViT(img_size=img, patch_size=p, embed_dim=d, depth=depth, num_heads=4)
    x = torch.randn(b, 3, img, img)
    patches, n = (img // p) ** 2, (img // p) ** 2 + 1
    conv = 2 * b * patches * (3 * p * p) * d
    assert speed.count_flops(lambda: m.forward_tokens(x)) == depth * block_flops(b, n, d) + conv
    with FlopCounterMode(display=False) as plain:  # torch's counter alone misses the CPU attention kernel
        m.forward_tokens(x)
    assert plain.get_total_flops() == depth * (block_flops(b, n, d) - 4 * b * n * n * d) + conv
    # forward + backward; the image needs no gradient, so the patch projection's backward is its weight only
    step = lambda: m.forward_tokens(x).sum().backward()  # noqa: E731
    assert speed.count_flops(step) == depth * block_train_flops(b, n, d) + 2 * conv


def test_pretrain_step_flops_equal_the_hand_count(capsys):
    """The whole tiny dBOT step as the bench counts it: teacher forward on 65 tokens, student encoder on the 16
    visible patches + cls (forward + backward), decoder 96 -> 64 on 17 tokens, 2 blocks on 65, 64 -> 96."""
    b = 4
    bench.main(["pretrain", "-c", "tiny", "device=cpu", "--batch", str(b), "--steps", "1", "--warmup", "0"])
    res = json.loads(capsys.readouterr().out)
    d, dd, depth, ddepth, n, vis, patches = 96, 64, 4, 2, 65, 17, 64
    conv = 2 * b * patches * 48 * d
    teacher = depth * block_flops(b, n, d) + conv
    encoder = depth * block_train_flops(b, vis, d) + 2 * conv
    decoder = 3 * 2 * b * vis * d * dd + ddepth * block_train_flops(b, n, dd) + 3 * 2 * b * n * dd * d
    assert res["gflop_per_image"] == round((teacher + encoder + decoder) / b / 1e9, 2)
    assert res["arch"]["embed_dim"] == 96 and res["decoder"] == {"dim": 64, "depth": 2, "heads": 4}
    assert res["ours_images_per_s"] > 0 and res["batch"] == b


def test_pretrain_bench_builds_the_recipe_and_its_overrides(tiny_imagenet):
    """`-c small` is the recipe's ViT-S/16 with the default 512 x 8 decoder (not a bench-local shape), its
    drop path and teacher; overrides apply as on `python -m pretrain`."""

    def step(recipe, *overrides, stage=0):
        small = [f"data.root={tiny_imagenet}", "data.workers=0", "data.batch_per_gpu=8", "optim.global_batch=8"]
        cfg = load_config(REPO / "pretrain" / "configs", recipe, ["device=cpu", *small, *overrides])
        return bench.pretrain_step(cfg, torch.device("cpu"), stage)

    ours = step("small")
    s, target = ours.task.student, ours.task.target
    assert ours.run.model is s
    assert (s.embed_dim, len(s.blocks), s.patch_size) == (384, 12, 16)
    assert (s.decoder_embed.out_features, len(s.decoder_blocks), s.decoder_blocks[0].attn.num_heads) == (512, 8, 16)
    assert s.blocks[-1].drop_path1.drop_prob == pytest.approx(0.1)
    assert target.teacher.embed_dim == 384 and len(target.teacher.blocks) == 12
    ours = step("base", "model.decoder.depth=2", "model.img_size=64")
    assert len(ours.task.student.decoder_blocks) == 2 and ours.task.plan.arch["img_size"] == 64
    assert ours.stepper.clip_grad == ours.run.clip_grad == 3.0  # the recipe's clipping, in the Stepper
    assert len(ours.task.target.teacher.blocks) == 12  # base: teacher.init_depth 12
    # large-style first teacher of depth 0; stage 1 distils from the (full-depth) stage-0 student
    first, second = step("tiny", "teacher.init_depth=0"), step("tiny", "teacher.init_depth=0", stage=1)
    assert len(first.task.target.teacher.blocks) == 0 and len(second.task.target.teacher.blocks) == 4
    assert second.task.target.describe() == "bootstrapped: stage-0 student" and second.task.stage == 1
    with pytest.raises(ConfigError, match="--stage 2: the recipe has stages 0..1"):
        step("tiny", stage=2)


AUTHORS_LIKE = '''
"""A stand-in with the interface of the authors' models_mae.py (MaskedAutoencoderViT(...), forward(samples,
teacher, mask_ratio, tlayernorm) -> (loss, pred, mask), forward_teacher) built from this suite's modules, so
the harness can be checked where their file is not at hand."""
import torch
from core.vit import ViT
from pretrain.dbot import random_masking
from pretrain.model import MaskedStudent
from pretrain.targets.base import normalize, token_loss
from util.pos_embed import GRID_CHECK  # the harness must put the checkout root on sys.path


class MaskedAutoencoderViT(torch.nn.Module):
    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=1024, depth=24, num_heads=16,
                 decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16, mlp_ratio=4., norm_layer=None,
                 norm_feature_loss=False, drop_path_rate=0.0):
        super().__init__()
        arch = dict(img_size=img_size, patch_size=patch_size, embed_dim=embed_dim, depth=depth, num_heads=num_heads)
        if decoder_depth == 0:  # the teacher
            self.net = ViT(fixed_pos_embed=True, **arch)
        else:
            self.net = MaskedStudent(target_dim=embed_dim, decoder_dim=decoder_embed_dim, decoder_depth=decoder_depth,
                                     decoder_heads=decoder_num_heads, drop_path_rate=drop_path_rate, **arch)
        self.float_check = np_float_check()

    def forward_teacher(self, x, tlayernorm):
        return self.net.forward_tokens(x, final_norm=bool(tlayernorm))

    def forward(self, samples, teacher=None, mask_ratio=0.75, tlayernorm=0):
        mask = random_masking(torch.rand(samples.shape[0], self.net.num_patches, device=samples.device), mask_ratio)
        pred = self.net(samples, mask)
        with torch.no_grad():
            target = normalize(teacher.forward_teacher(samples, tlayernorm).float(), "standardize")
        weight = torch.cat([torch.ones_like(mask.mask[:, :1]), mask.mask], 1)
        return token_loss(pred, target, weight, "smooth_l1", 2.0), pred, mask.mask


def np_float_check():
    import numpy as np
    return np.float  # removed from numpy; the authors' pos_embed uses it while building
'''


def test_side_by_side_harness_times_both_steps_interleaved(tmp_path, capsys):
    """With a models_mae-compatible file computing what ours computes, the counted FLOPs are equal (both sides
    do the same work); the ratio is the median over rounds of authors' / ours' seconds per step. (No bound on
    the ratio itself: timings on a shared CPU are not a test.)"""
    (tmp_path / "util").mkdir()
    (tmp_path / "util" / "pos_embed.py").write_text("GRID_CHECK = True\n")
    (tmp_path / "models_mae.py").write_text(AUTHORS_LIKE)
    argv = ["pretrain", "-c", "tiny", "device=cpu", "--batch", "8", "--steps", "2", "--warmup", "1", "--rounds", "3"]
    bench.main([*argv, "--authors", str(tmp_path / "models_mae.py")])
    res = json.loads(capsys.readouterr().out)
    assert res["authors_gflop_per_image"] == res["gflop_per_image"]
    assert len(res["authors_rounds_s"]) == len(res["ours_rounds_s"]) == 3
    ratios = sorted(a / o for a, o in zip(res["authors_rounds_s"], res["ours_rounds_s"]))
    assert res["ours_vs_authors"] == pytest.approx(ratios[1], rel=0.02)  # rounds_s are rounded to 0.1 ms
    with pytest.raises(ConfigError, match="util/pos_embed.py is missing"):
        (tmp_path / "util" / "pos_embed.py").unlink()
        bench.main([*argv, "--authors", str(tmp_path / "models_mae.py")])
    with pytest.raises(ConfigError, match="does not exist"):
        bench.main([*argv, "--authors", str(tmp_path / "nothing.py")])


@pytest.mark.skipif(not os.environ.get("DBOT_AUTHORS"), reason="DBOT_AUTHORS=<checkout of liuxingbin/dbot> not set")
def test_side_by_side_with_the_authors_file(capsys):
    """The authors' own models_mae.py (their checkout given by DBOT_AUTHORS): same FLOPs as ours."""
    path = Path(os.environ["DBOT_AUTHORS"]) / "models_mae.py"
    bench.main(["pretrain", "-c", "tiny", "device=cpu", "--batch", "8", "--steps", "1", "--warmup", "0",
                "--rounds", "1", "--authors", str(path)])  # fmt: skip
    res = json.loads(capsys.readouterr().out)
    assert res["authors_gflop_per_image"] == res["gflop_per_image"] and res["ours_vs_authors"] > 0


@pytest.mark.parametrize("backend", ["pil", "uint8", "gpu"])
def test_loader_bench_reports_rate_and_cpu_cost(tiny_imagenet, capsys, backend):
    bench.main(["loader", "-c", "tiny", "device=cpu", f"data.root={tiny_imagenet}", f"data.backend={backend}",
                "data.workers=0", "--batch", "8", "--steps", "2", "--warmup", "1"])  # fmt: skip
    res = json.loads(capsys.readouterr().out)
    assert res["backend"] == backend and res["images_per_s"] > 0 and res["cpu_ms_per_image"] > 0
    assert res["images_per_gpu_s"] is None  # decoded on the CPU here


def test_loader_compare_times_backends_in_turns(tiny_imagenet, capsys):
    bench.main(["loader", "-c", "tiny", "device=cpu", f"data.root={tiny_imagenet}", "data.workers=0",
                "--batch", "8", "--steps", "1", "--rounds", "2", "--compare", "pil", "uint8"])  # fmt: skip
    res = json.loads(capsys.readouterr().out)
    assert res["pil_cpu_ms_per_image"] > 0 and res["uint8_images_per_s"] > 0 and res["uint8_cpu_speedup_vs_pil"] > 0


def test_end_to_end_bench_runs_through_the_data_path(tiny_imagenet, capsys):
    bench.main(["pretrain", "-c", "tiny", "device=cpu", f"data.root={tiny_imagenet}", "data.backend=uint8",
                "data.workers=0", "--batch", "8", "--steps", "2", "--warmup", "1", "--end-to-end"])  # fmt: skip
    res = json.loads(capsys.readouterr().out)
    assert res["e2e_backend"] == "uint8" and res["e2e_images_per_s"] > 0


def test_task_benches_take_the_recipe_and_overrides(capsys):
    """finetune / COCO / ADE20K benchmarks: `-c tiny key=value ...` plus the shared flags; one training step
    and inference of the tiny recipes on CPU, on a synthetic set in each task's layout."""
    flags = ["device=cpu", "--batch", "2", "--steps", "1", "--warmup", "0"]
    bench.main(["finetune", "-c", "tiny", *flags, "--classes", "10"])
    bench.main(["coco", "-c", "tiny", "data.img_size=48", *flags, "--classes", "5", "optim.clip_grad=1.0"])
    bench.main(["ade20k", "-c", "tiny", *flags, "--classes", "9", "--images", "1"])
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert len(lines) == 3, lines
    assert lines[1]["img_size"] == 48
    assert lines[1]["overrides"] == ["data.img_size=48", "device=cpu", "optim.clip_grad=1.0"]
    assert [res["classes"] for res in lines] == [10, 5, 9]  # the synthetic sets have what was asked
    assert lines[1]["clip_grad"] == 1.0 and lines[0]["clip_grad"] is None  # the recipe's clipping is timed
    for res in lines:
        assert res["recipe"] == "tiny" and res["batch"] == 2 and res["accum"] == 1 and res["data"] == "synthetic"
        assert all(v > 0 for k, v in res.items() if "per_s" in k or "per_step" in k), res


@pytest.mark.parametrize("command", ["pretrain", "finetune", "coco", "ade20k", "loader"])
def test_every_bench_subcommand_prints_its_own_flags(command, capsys):
    with pytest.raises(SystemExit) as e:
        bench.main([command, "-h"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: python -m tools.bench {command}") and "--steps" in out
    own = {
        "pretrain": "--authors",
        "finetune": "--classes",
        "coco": "--classes",
        "ade20k": "--image",
        "loader": "--compare",
    }
    assert own[command] in out


def test_linear_probe_bench_times_the_frozen_encoder_and_its_criterion(tiny_imagenet):
    """The linear-probe recipe's step as training takes it: LARS on the head only, plain cross-entropy, no
    Mixup, the encoder in eval mode and without gradients; fine-tuning's step mixes its batch."""
    from timm.loss import SoftTargetCrossEntropy
    from timm.optim import Lars

    from core.bench import StepBench
    from finetune.train import Finetune

    lp = ["task=linprobe", "optim.name=lars", "optim.weight_decay=0", "model.global_pool=token", "aug.mixup=0"]
    cfg = finetune_config(tiny_imagenet, REPO / "unused", *lp, "aug.cutmix=0", "aug.smoothing=0")
    probe = StepBench(Finetune, cfg, torch.device("cpu"))
    model = probe.run.model
    assert isinstance(probe.run.optimizer, Lars) and probe.task.mixup is None
    assert type(probe.task.criterion) is torch.nn.CrossEntropyLoss
    frozen = [p for n, p in model.named_parameters() if not n.startswith("head")]
    before = [p.clone() for p in frozen]
    probe.step()
    assert not model.blocks.training and model.head.training
    assert all(p.grad is None and torch.equal(p, b) for p, b in zip(frozen, before))  # the encoder never moves
    tune = StepBench(Finetune, finetune_config(tiny_imagenet, REPO / "unused"), torch.device("cpu"))
    assert tune.task.mixup is not None and isinstance(tune.task.criterion, SoftTargetCrossEntropy)


@pytest.mark.parametrize("task", ["finetune", "coco"])
def test_the_bench_step_is_the_first_training_step(task, tiny_imagenet, tiny_coco, tmp_path):
    """Same seed, same config: the driver's first step computes the loss a training run logs at step 1
    (fine-tuning: its Mixup drawn per batch; detection: clipping on), bit for bit."""
    from core.bench import StepBench
    from detection.train import Detection
    from detection.train import run as run_detection
    from finetune.train import Finetune
    from finetune.train import run as run_finetune

    if task == "finetune":
        cfg, cls, fit = (
            finetune_config(tiny_imagenet, tmp_path / "r", "log.every=1", "max_epochs=1"),
            Finetune,
            run_finetune,
        )
    else:
        cfg, cls, fit = (
            detection_config(tiny_coco, tmp_path / "r", "optim.clip_grad=1.0", "max_iters=1"),
            Detection,
            run_detection,
        )
    loss, _ = StepBench(cls, cfg, torch.device("cpu")).step()
    fit(cfg)
    first = json.loads((tmp_path / "r" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["step"] == 1 and first["loss"] == loss.item()


def test_gpu_check_writes_its_summary_and_says_what_it_could_not_do(tmp_path):
    """The GPU check in its dry run, two of its steps (the full dry run is the slow test below): one JSON and
    one Markdown summary, each step's figures, and the list of what was not done (here: no CUDA)."""
    from tools import gpu_check

    report = gpu_check.main(["--dry-run", "--out", str(tmp_path), "--only", "jpegs", "decode_gpu", "--budget-s", "600"])
    saved = json.loads((tmp_path / "gpu_check.json").read_text())
    assert [s["name"] for s in saved["steps"]] == ["jpegs", "decode_gpu"]
    assert all(s["status"] == "done" for s in saved["steps"]), saved["steps"]
    assert saved["steps"][1]["result"]["backend"] == "gpu" and saved["steps"][1]["result"]["images_per_s"] > 0
    md = (tmp_path / "gpu_check.md").read_text()
    assert "| decode_gpu | done |" in md and "## Not done" in md
    if not torch.cuda.is_available():
        assert any(x.startswith("no CUDA device") for x in report["not_done"])
    assert any("--dry-run" in x for x in report["not_done"])


@pytest.mark.slow
def test_gpu_check_dry_run_does_every_step(tmp_path):
    from tools import gpu_check

    report = gpu_check.main(["--dry-run", "--out", str(tmp_path), "--budget-s", "2000"])
    names = [s["name"] for s in report["steps"]]
    assert names == ["gpu_tests", "side_by_side", "jpegs", "decode_gpu", "pretrain_run", "mfu_large", "mfu_huge"] + [
        "study_gpu",
        "decode_uint8",
        "decode_pil",
        "end_to_end",
    ]
    done = [s for s in report["steps"] if s["name"] != "study_gpu"]
    assert all(s["status"] == "done" for s in done), [(s["name"], s["status"]) for s in report["steps"]]
    assert report["steps"][7]["status"].startswith("skipped: dry run")
    assert report["steps"][0]["result"]["tests_passed"] >= 10 and "tests_failed" not in report["steps"][0]["result"]
    assert report["pretrain_run"]["optimizer_steps"] == 6 and set(report["pretrain_run"]["stage_final_loss"]) == {
        "0",
        "1",
    }


def test_gpu_check_skips_a_step_over_the_budget(tmp_path):
    from tools import gpu_check

    report = gpu_check.main(["--dry-run", "--out", str(tmp_path), "--only", "side_by_side", "--budget-s", "5"])
    assert report["steps"][0]["status"].startswith("skipped: 5 s of the budget left")
    assert "side_by_side: skipped" in (tmp_path / "gpu_check.md").read_text()


def test_gpu_check_plans_the_device_steps_and_judges_the_targets(tmp_path):
    """The real (non-dry) plan on a CUDA host: the GPU tests with --device cuda first, the pretraining run with
    data.backend=gpu and CUDA graphs, the GPU study; and the targets judged only on a real GPU run."""
    import argparse

    from tools import gpu_check

    args = argparse.Namespace(out=str(tmp_path), dry_run=False, authors=None)
    plan = {s["name"]: s for s in gpu_check.plan_steps(args, cuda=True)}
    assert list(plan)[:2] == ["gpu_tests", "side_by_side"] and list(plan)[-1] == "end_to_end"
    assert plan["gpu_tests"]["cmd"][-2:] == ["--device", "cuda"]
    run = plan["pretrain_run"]["cmd"]
    assert "data.backend=gpu" in run and "compile=reduce-overhead" in run and "device=cpu" not in run
    assert plan["study_gpu"]["cmd"][3:6] == ["targets", "--scale", "gpu"] and not plan["study_gpu"].get("skip")
    # the first five (tests, side by side, JPEGs, gpu decoding, the pretraining run) fit the 660 s budget even at
    # their time limits, leaving over 3 minutes for the rest (MFU L/H, the study: what their steps did not use)
    limits = [s["limit"] for s in gpu_check.plan_steps(args, cuda=True)]
    assert sum(limits[:5]) <= 660 - 180
    assert gpu_check.pytest_summary(
        "..\nFAILED tests/x.py::test_a - assert 1\n1 failed, 9 passed, 1 skipped in 3s"
    ) == {
        "tests_failed": 1,
        "tests_passed": 9,
        "tests_skipped": 1,
        "failed_tests": ["tests/x.py::test_a"],
    }

    def report(device, cuda=True, dry=False):
        steps = [
            {"name": "side_by_side", "result": {"ours_compiled_mfu": 0.43, "ours_compiled_vs_authors": 1.4}},
            {"name": "decode_gpu", "result": {"images_per_s": 6200.0}},
        ]
        env = {"device": device, "cuda": cuda, "cpus": 16}
        return gpu_check.check_targets({"environment": env, "dry_run": dry, "steps": steps})

    by_name = {t["name"]: t for t in report("NVIDIA H100 80GB HBM3")}
    assert by_name["vit_b_compiled_mfu"]["pass"] is True  # 0.43 >= 0.40
    assert by_name["vit_b_compiled_vs_authors"]["pass"] is False  # 1.4 < 1.5
    assert (
        by_name["gpu_backend_images_per_s"]["pass"] is True
        and by_name["gpu_backend_images_per_s"]["host_cpu_cores"] == 16
    )
    a100 = {t["name"]: t for t in report("NVIDIA A100-SXM4-80GB")}
    assert a100["vit_b_compiled_mfu"]["pass"] is None and "H100/H200" in a100["vit_b_compiled_mfu"]["not_judged"]
    assert all(t["pass"] is None for t in report("x86_64 CPU", cuda=False) + report("NVIDIA H200", dry=True))
