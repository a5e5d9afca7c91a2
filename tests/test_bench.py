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
