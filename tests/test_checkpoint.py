"""Checkpoint I/O: atomic writes, loading without executing pickled code, load reports."""

import argparse
import pickle

import pytest
import torch

from core import checkpoint as ckpt
from core.vit import build_vit, resize_pos_embed


def test_save_is_atomic_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "c.pth"
    ckpt.save({"x": torch.ones(2)}, path)

    def boom(obj, f):
        f.write(b"partial")
        raise KeyboardInterrupt  # killed mid-write

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save({"x": torch.zeros(2)}, path)
    assert torch.equal(ckpt.load(path)["x"], torch.ones(2))  # the old file is intact
    assert [p.name for p in tmp_path.iterdir()] == ["c.pth"]  # no temporary left behind


class Evil:
    def __reduce__(self):
        return (print, ("pwned",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_load_refuses_pickled_code_and_names_the_file(tmp_path):
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"model": {"w": torch.ones(1)}, "x": Evil()}, f)
    with pytest.raises(ckpt.CheckpointError, match="evil.pth: holds objects that cannot be loaded with weights_only"):
        ckpt.load(path)


def test_mae_style_file_with_args_namespace_loads(tmp_path):
    path = tmp_path / "mae.pth"
    torch.save({"model": {"module.w": torch.ones(1)}, "epoch": 3, "args": argparse.Namespace(lr=1.0)}, path)
    sd = ckpt.read_state_dict(path)
    assert list(sd) == ["w"]


def test_safetensors_round_trip(tmp_path):
    from safetensors.torch import save_file

    save_file({"a": torch.arange(3.0)}, tmp_path / "w.safetensors")
    assert torch.equal(ckpt.read_state_dict(tmp_path / "w.safetensors")["a"], torch.arange(3.0))


def test_unknown_container_lists_what_was_found(tmp_path):
    path = ckpt.save({"weights_here": {"nested": 1}, "epoch": 1}, tmp_path / "x.pth")
    with pytest.raises(ckpt.CheckpointError, match="found top-level keys"):
        ckpt.read_state_dict(path)


def test_load_weights_reports_and_adapts():
    src = build_vit("tiny", img_size=16)
    dst = build_vit("tiny", num_classes=3)

    def pos(name, t, target):
        return resize_pos_embed(t, (8, 8)) if name == "pos_embed" else None

    rep = ckpt.load_weights(dst, src.state_dict(), adapters=[pos], allow_missing=lambda k: k.startswith("head."))
    assert rep.adapted == {"pos_embed": "(1, 17, 96) -> (1, 65, 96)"}
    assert not rep.missing and not rep.unexpected
    wrong = build_vit("tiny", embed_dim=48, num_heads=2)
    with pytest.raises(ckpt.CheckpointError, match="do not fit the model"):
        ckpt.load_weights(dst, wrong.state_dict(), source="w.pth")
    with pytest.raises(ckpt.CheckpointError, match="missing"):
        ckpt.load_weights(
            dst,
            {k: v for k, v in src.state_dict().items() if k != "cls_token"},
            adapters=[pos],
            allow_missing=lambda k: k.startswith("head."),
        )


def test_config_changes_ignore_where_and_how_but_not_what():
    saved = {"out": "a", "epochs": 8, "optim": {"lr": 1e-3, "betas": [0.9, 0.95]}, "log": {"every": 10}}
    same_work = {"out": "b", "epochs": 8, "optim": {"lr": 1e-3, "betas": [0.9, 0.95]}, "log": {"every": 1}}
    assert ckpt.config_changes(saved, same_work) == []
    other = {"out": "a", "epochs": 15, "optim": {"lr": 1e-3, "betas": [0.9, 0.999]}, "new": 1, "log": {}}
    assert ckpt.config_changes(saved, other) == [
        "epochs: 8 -> 15",
        "new: <absent> -> 1",
        "optim.betas: [0.9, 0.95] -> [0.9, 0.999]",
    ]


def test_resuming_with_other_settings_is_refused_and_names_them(tmp_path):
    state = {"meta": {"format": "x/v1"}, "config": {"epochs": 8, "seed": 0, "log": {"every": 5}}}
    ckpt.save(state, tmp_path / "checkpoint-last.pth")
    path, got = ckpt.load_resume(tmp_path, "auto", "x/v1", config={"epochs": 8, "seed": 0, "log": {"every": 1}})
    assert path == tmp_path / "checkpoint-last.pth" and got["config"]["epochs"] == 8
    with pytest.raises(ckpt.CheckpointError, match="configured differently \\(epochs: 8 -> 15\\).*resume=none"):
        ckpt.load_resume(tmp_path, "auto", "x/v1", config={"epochs": 15, "seed": 0, "log": {"every": 5}})
    assert ckpt.load_resume(tmp_path, "none", "x/v1", config={"epochs": 15}) == (None, None)
