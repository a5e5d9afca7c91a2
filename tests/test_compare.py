"""tools.compare: the demo's closing line, from two results.json files."""

import json

import pytest

from core.config import ConfigError
from tools import compare


def record(tmp_path, name, top1, checkpoint):
    d = tmp_path / name
    d.mkdir()
    (d / "results.json").write_text(
        json.dumps({"task": "finetune", "checkpoint": checkpoint, "metrics": {"top1": top1}})
    )
    return d


def test_the_line_says_which_start_won(tmp_path):
    dbot = record(tmp_path, "a", 43.0, "/runs/pretrain-tiny/checkpoint-stage1-student.pth")
    worse = record(tmp_path, "b", 50.0, None)
    line = compare.verdict(compare.read(dbot), compare.read(worse), "top1")
    assert "43.00 vs random init 50.00 (-7.00)" in line and "does not pay" in line and "make study" in line
    better = record(tmp_path, "c", 30.0, None)
    assert "pretraining pays" in compare.verdict(compare.read(dbot), compare.read(better), "top1")
    even = record(tmp_path, "d", 42.5, None)
    assert "even" in compare.verdict(compare.read(dbot), compare.read(even), "top1")


def test_bad_inputs_are_named(tmp_path):
    dbot = compare.read(record(tmp_path, "a", 43.0, "x.pth"))
    with pytest.raises(ConfigError, match="not from random initialisation"):
        compare.verdict(dbot, dbot, "top1")
    with pytest.raises(ConfigError, match="no metric 'mIoU'"):
        compare.verdict(dbot, compare.read(record(tmp_path, "b", 1.0, None)), "mIoU")
    with pytest.raises(ConfigError, match="not a readable results.json"):
        compare.read(tmp_path / "missing")
