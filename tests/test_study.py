"""The target-representation study: k-NN by hand, and a tiny end-to-end study."""

import json

import pytest
import torch
from conftest import PRETRAIN_MICRO

from pretrain import study


def test_knn_votes_by_hand():
    train_f = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]]), dim=1)
    train_y = torch.tensor([0, 0, 1, 1])
    val_f = torch.nn.functional.normalize(torch.tensor([[1.0, 0.05], [0.05, 1.0]]), dim=1)
    assert study.knn_top1(train_f, train_y, val_f, torch.tensor([0, 1]), k=2) == 100.0
    assert study.knn_top1(train_f, train_y, val_f, torch.tensor([1, 0]), k=2) == 0.0


def test_target_specs():
    assert study.target_overrides("hog") == ["target.kind=hog"]
    assert study.target_overrides("timm:vit_b=/w.pth") == [
        "target.kind=timm",
        "target.timm.name=vit_b",
        "target.timm.checkpoint=/w.pth",
    ]
    with pytest.raises(ValueError, match="timm:<timm model name>=<weights file>"):
        study.target_overrides("timm:vit_b")


def test_tiny_study_runs_every_target_through_every_stage(tiny_imagenet, tmp_path):
    common = [o for o in PRETRAIN_MICRO if not o.startswith("stages.")]
    summary = study.run_study(
        study.argparse.Namespace(
            data=str(tiny_imagenet),
            model="tiny",
            targets=["teacher", "pixels"],
            stages=2,
            epochs=1,
            eval="knn",
            eval_recipe=None,
            out=str(tmp_path),
            overrides=common,
        )
    )
    assert set(summary["scores"]) == {"teacher", "pixels"}
    assert all(len(v) == 2 and all(0 <= s <= 100 for s in v) for v in summary["scores"].values())
    assert (tmp_path / "study.png").stat().st_size > 0
    assert "spread" in (tmp_path / "study.md").read_text()
    assert json.loads((tmp_path / "study.json").read_text())["eval"] == "knn"
    # the pixels run switched to a bootstrapped teacher in stage 1
    res = json.loads((tmp_path / "pixels" / "results.json").read_text())
    assert res["target_kind"] == "pixels" and (tmp_path / "pixels" / "checkpoint-stage1-teacher.pth").exists()
