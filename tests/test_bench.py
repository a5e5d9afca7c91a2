"""The benchmark entry points run (tiny, one step) and report counted FLOPs consistent with the model."""

import json

from tools import bench


def test_pretrain_bench_reports_counted_flops(capsys):
    bench.main(["pretrain", "--model", "tiny", "--batch", "4", "--steps", "1", "--warmup", "0", "--device", "cpu"])
    res = json.loads(capsys.readouterr().out)
    assert res["images_per_s"] > 0 and res["batch"] == 4
    # teacher forward (65 tokens) + student fwd/bwd: well above the teacher's forward alone (~0.012 GFLOP/img)
    assert 0.03 < res["gflop_per_image"] < 1.0


def test_loader_bench(tiny_imagenet, capsys):
    bench.main(
        [
            "loader",
            "--data",
            str(tiny_imagenet / "train"),
            "--workers",
            "0",
            "--batch",
            "4",
            "--img-size",
            "32",
            "--steps",
            "2",
        ]
    )
    assert json.loads(capsys.readouterr().out)["images_per_s"] > 0


def test_task_benches_run_one_step_and_report(capsys):
    """finetune / COCO / ADE20K benchmarks: one training step and inference of the tiny recipes on CPU."""
    from detection import bench as det_bench
    from finetune import bench as ft_bench
    from segmentation import bench as seg_bench

    ft_bench.main(
        ["--model", "tiny", "--batch", "4", "--classes", "10", "--steps", "1", "--warmup", "0", "--device", "cpu"]
    )
    det_bench.main(["-c", "tiny", "--batch", "2", "--steps", "1", "--warmup", "0", "--num-classes", "4"])
    seg_bench.main(
        [
            "--recipe",
            "tiny",
            "--batch",
            "2",
            "--classes",
            "8",
            "--steps",
            "1",
            "--warmup",
            "0",
            "--images",
            "1",
            "--device",
            "cpu",
        ]
    )
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert len(lines) == 3, lines
    for res in lines:
        assert any(k.endswith("per_s") or k.endswith("s_per_iter") for k in res), res
        assert all(v > 0 for k, v in res.items() if "per_s" in k or "per_iter" in k), res
