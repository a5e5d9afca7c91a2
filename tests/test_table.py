"""Results table from fixture results files: rows found through checkpoints, published numbers and
differences, missing cells, duplicates, malformed files, external checkpoints, provenance and outputs."""

import csv
import io
import json
import re
import shutil
from pathlib import Path

import pytest
import yaml
from conftest import REPO

from core import checkpoint as ckpt
from core import weights
from core.monitor import file_sha256
from pretrain import setting
from tools import table

DBOT_CFG = {
    "model": {"kind": "mae", "size": "base"},
    "target": {"kind": "teacher", "pixels": {"norm_pix": True}, "timm": {"name": None}},
    "teacher": {"init_depth": None, "seed": None, "checkpoint": None, "size": None, "bootstrap": True},
    "stages": {"epochs": [0, 800, 1600]},
}


def cfg(**over) -> dict:
    """DBOT_CFG with dotted overrides ("teacher.size": "large")."""
    c = json.loads(json.dumps(DBOT_CFG))
    for k, v in over.items():
        node = c
        *parents, last = k.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = v
    return c


def pretrain_run(runs, name, config, stages=2, older=False, **fields):
    """A pretraining run folder: config.yaml, stage checkpoints (small suite files: meta and config, no
    weights) with the records pretraining writes (`older`: without them, as older versions of the suite
    wrote them), results.json."""
    folder = runs / name
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    ckpts = {}
    for s in range(stages):
        meta = {"format": "dbot-suite/pretrain/v1", "stage": s}
        if not older:
            meta.update(setting.records(config, s, meta, teacher_file=False, has_teacher=False))
        ckpt.save({"model": {}, "meta": meta, "config": config}, folder / f"checkpoint-stage{s}-student.pth")
        ckpts[f"stage{s}_student"] = f"runs/{name}/checkpoint-stage{s}-student.pth"
    res = {
        "task": "pretrain",
        "model": config["model"]["size"],
        "checkpoint": f"runs/{name}/checkpoint-stage{stages - 1}-student.pth",
        "checkpoints": ckpts,
        "git_commit": "p" * 40,
        "finished_at": "2026-01-01T00:00:00+0000",
        **fields,
    }
    (folder / "results.json").write_text(json.dumps(res))
    return folder


AUTO = object()


def downstream(runs, name, task, checkpoint, finished="2026-01-02T00:00:00+0000", config=None, metrics=None, **fields):
    """A downstream run's results.json in the contract every task writes: `pretraining` and `checkpoint_sha256`
    of the checkpoint as the task records them (paths relative to the folder above runs/), unless given."""
    folder = runs / name
    folder.mkdir(parents=True)
    if config is not None:
        (folder / "config.yaml").write_text(yaml.safe_dump(config))
    file = runs.parent / checkpoint if checkpoint else None
    exists = file is not None and file.is_file()
    res = {
        "task": task,
        "model": fields.pop("model", None),
        "dataset": fields.pop("dataset", "data"),
        "checkpoint": checkpoint,
        "checkpoint_sha256": fields.pop("checkpoint_sha256", file_sha256(file) if exists else None),
        "pretraining": fields.pop("pretraining", weights.pretraining_setting(file) if exists else None),
        "metrics": metrics if metrics is not None else {},
        "eval_images": 8,
        "checkpoints": {},
        "config": str(folder / "config.yaml"),
        "git_commit": "d" * 40,
        "host": "test",
        "finished_at": finished,
        **fields,
    }
    (folder / "results.json").write_text(json.dumps(res))
    return folder


@pytest.fixture
def runs(tmp_path):
    """runs/ as the suite writes it: paths in results.json are relative to the folder above runs/."""
    r = tmp_path / "runs"
    pretrain_run(r, "pretrain-base", cfg())
    ck = "runs/pretrain-base/checkpoint-stage1-student.pth"
    downstream(r, "finetune-base", "finetune", ck, model="base", metrics={"top1": 84.31, "top5": 96.9})
    downstream(r, "coco-base", "coco", ck, model="base", metrics={"bbox_AP": 52.0, "bbox_AP50": 70.0, "segm_AP": 46.1})
    downstream(r, "ade20k-base", "ade20k", ck, model="base", metrics={"mIoU": 49.9, "mAcc": 60.0, "aAcc": 83.0})
    pretrain_run(r, "pretrain-tiny", cfg(**{"model.size": "tiny"}, **{"stages.epochs": [0, 6, 12]}))
    downstream(
        r,
        "finetune-tiny",
        "finetune",
        "runs/pretrain-tiny/checkpoint-stage1-student.pth",
        model="tiny",
        metrics={"top1": 61.2},
    )
    return r


def row(t: table.Table, student: str, teacher: str) -> table.Row:
    matches = [r for r in t.rows if (r.setting.student, r.setting.teacher) == (student, teacher)]
    assert len(matches) == 1, [r.setting for r in t.rows]
    return matches[0]


def md_line(t: table.Table, student: str, teacher: str) -> list[str]:
    for line in table.to_markdown(t).splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if cells[:2] == [student, teacher]:
            return cells
    raise AssertionError(f"no markdown row {student} / {teacher}")


# ----------------------------------------------------------------------------------------------- labels
@pytest.mark.parametrize(
    "over, stage, expected",
    [
        ({}, 1, "ViT-B (bootstrapped)"),  # dBOT: random teacher, one bootstrapped stage
        ({}, 0, "random ViT-B"),
        ({}, 2, "ViT-B (bootstrapped x2)"),
        ({"model.size": "large", "teacher.init_depth": 0}, 1, "ViT-L (bootstrapped)"),
        ({"teacher.checkpoint": "/w/dbot_large.pth", "teacher.size": "large"}, 0, "ViT-L"),
        ({"teacher.checkpoint": "/w/h.pth", "teacher.size": "huge"}, 1, "ViT-H + bootstrapped"),
        ({"target.kind": "pixels", "teacher.bootstrap": False}, 0, "pixels"),
        ({"target.kind": "pixels", "target.pixels.norm_pix": False}, 0, "pixels (raw)"),
        ({"target.kind": "hog"}, 2, "HOG + bootstrapped x2"),
        ({"target.kind": "ema", "teacher.bootstrap": False}, 1, "EMA"),
        ({"target.kind": "timm", "target.timm.name": "vit_base_patch16_clip_224.openai"}, 0, "CLIP-B/16"),
        ({"target.kind": "timm", "target.timm.name": "vit_large_patch14_clip_224.openai"}, 0, "CLIP-L/14"),
        ({"target.kind": "timm", "target.timm.name": "vit_small_patch16_224.dino"}, 0, "vit_small_patch16_224.dino"),
    ],
)
def test_teacher_labels(over, stage, expected):
    assert table.teacher_label(setting.setting_from_config(cfg(**over), stage)) == expected


def test_student_names():
    assert table.vit_name("base") == "ViT-B/16"
    assert table.vit_name("huge") == "ViT-H/14"
    assert table.vit_name("tiny") == "ViT-tiny/4"


# ------------------------------------------------------------------------------------------------ table
def test_table_from_fixture_runs(runs):
    t = table.make_table(runs)
    assert t.warnings == []
    b = row(t, "ViT-B/16", "ViT-B (bootstrapped)")
    assert b.setting.asym is True and b.published.values["in1k"] == 84.5
    assert [c.value for c in b.cells["in1k"]] == [84.31]
    # ours | paper | diff per metric; mask AP was not published for dBOT: a dash, and so is its difference
    assert md_line(t, "ViT-B/16", "ViT-B (bootstrapped)") == [
        "ViT-B/16", "ViT-B (bootstrapped)", "yes",
        "84.31", "84.5", "-0.19",
        "52.00", "52.7", "-0.70",
        "46.10", "-", "-",
        "49.90", "49.5", "+0.40",
    ]  # fmt: skip
    assert "†" not in table.to_markdown(t)  # no duplicates, no marker
    # published rows without runs are kept, all of ours dashes
    assert md_line(t, "ViT-L/16", "pixels")[3:6] == ["-", "85.9", "-"]


def test_missing_cells_are_dashes_never_numbers(runs):
    t = table.make_table(runs)
    tiny = md_line(t, "ViT-tiny/4", "ViT-tiny (bootstrapped)")
    assert tiny[3:] == ["61.20"] + ["-"] * 11
    csv_rows = list(csv.reader(io.StringIO(table.to_csv(t))))
    tiny_csv = next(r for r in csv_rows if r[0] == "ViT-tiny/4")
    assert tiny_csv[3:] == ["61.20"] + ["-"] * 11
    tex = next(line for line in table.to_latex(t).splitlines() if line.startswith("ViT-tiny/4"))
    assert tex.count("--") == 11 and "61.20" in tex
    for text in (table.to_markdown(t), table.to_csv(t), table.to_latex(t)):
        assert not re.search(r"\b(nan|none|null)\b", text, re.IGNORECASE)
    j = table.to_json(t)
    tiny_json = next(r for r in j["rows"] if r["student"] == "ViT-tiny/4")
    assert tiny_json["box_ap"] == {"ours": None, "all": [], "paper": None, "paper_source": None, "diff": None}


def test_malformed_files_are_named_and_skipped(runs):
    (runs / "broken").mkdir()
    (runs / "broken" / "results.json").write_text("{not json")
    (runs / "list").mkdir()
    (runs / "list" / "results.json").write_text("[1, 2]")
    downstream(runs, "no-task", None, "x.pth", metrics={"top1": 1.0})
    downstream(
        runs, "nan", "finetune", "runs/pretrain-base/checkpoint-stage1-student.pth", metrics={"top1": float("nan")}
    )
    downstream(runs, "text", "ade20k", "runs/pretrain-base/checkpoint-stage1-student.pth", metrics={"mIoU": "high"})
    downstream(runs, "nometric", "coco", "runs/pretrain-base/checkpoint-stage1-student.pth", metrics={"bbox_AP50": 3.0})
    (runs / "old-shape").mkdir()  # fields at the top level, as before the contract: no aliases are read
    (runs / "old-shape" / "results.json").write_text(json.dumps({"task": "finetune", "top1": 80.0, "checkpoint": None}))
    t = table.make_table(runs)
    text = "\n".join(t.warnings)
    assert "no 'metrics' object" in text
    for name in ("broken", "list", "no-task", "nan", "text", "nometric", "old-shape"):
        assert str(runs / name / "results.json") in text, name
    assert "JSONDecodeError" in text and "no 'task' field" in text and "is not a number" in text
    # the rest is still tabulated, unchanged by the bad files
    b = row(t, "ViT-B/16", "ViT-B (bootstrapped)")
    assert [c.value for c in b.cells["in1k"]] == [84.31] and [c.value for c in b.cells["miou"]] == [49.9]
    assert "## Warnings" in table.to_markdown(t)


def test_duplicates_newest_shown_with_note_or_all(runs):
    ck = "runs/pretrain-base/checkpoint-stage1-student.pth"
    downstream(
        runs, "finetune-base-rerun", "finetune", ck, finished="2026-02-01T00:00:00+0000", metrics={"top1": 84.55}
    )
    downstream(runs, "finetune-base-old", "finetune", ck, finished="2025-12-01T00:00:00+0000", metrics={"top1": 83.9})
    t = table.make_table(runs)
    b = row(t, "ViT-B/16", "ViT-B (bootstrapped)")
    assert [c.value for c in b.cells["in1k"]] == [84.55, 84.31, 83.9]  # newest first, none merged
    assert md_line(t, "ViT-B/16", "ViT-B (bootstrapped)")[3:6] == ["84.55†", "84.5", "+0.05"]
    assert "† = several runs claim the cell" in table.to_markdown(t)
    note = next(n for n in t.notes if "3 runs claim" in n)
    assert all(s in note for s in ("84.55", "84.31", "83.90", "finetune-base-rerun", "finetune-base-old"))
    prov = [p for p in table.provenance_rows(t) if p["column"] == "IN-1K top-1" and p["student"] == "ViT-B/16"]
    assert [p["shown"] for p in prov] == [True, False, False]

    t_all = table.make_table(runs, duplicates="all")
    assert md_line(t_all, "ViT-B/16", "ViT-B (bootstrapped)")[3] == "84.55 / 84.31 / 83.90"


def test_provenance_of_each_cell(runs):
    t = table.make_table(runs)
    prov = {p["column"]: p for p in table.provenance_rows(t) if p["student"] == "ViT-B/16"}
    assert set(prov) == {"IN-1K top-1", "COCO box AP", "COCO mask AP", "ADE20K mIoU"}
    ck = runs / "pretrain-base" / "checkpoint-stage1-student.pth"
    p = prov["COCO box AP"]
    assert p["run"] == str(runs / "coco-base") and p["field"] == "bbox_AP"
    assert p["checkpoint_sha256"] == file_sha256(ck)
    assert p["commit"] == "d" * 40 and p["pretrain_commit"] == "p" * 40
    assert p["pretrain_run"] == str(ck.parent) and "stage-1 student" in p["row_from"]
    assert table.to_json(t)["rows"][0]["in1k"]["paper_source"] == "dbot_readme"


def test_older_pretraining_files_are_placed_from_their_saved_config(tmp_path):
    """Checkpoints of older versions record no setting: core calls them unknown (never a guessed row), the
    downstream run records that, and the table reads the row from the run's saved config as before; without
    a saved config the row is "?" with a note."""
    runs = tmp_path / "runs"
    pretrain_run(runs, "pretrain-base", cfg(), older=True)
    ck = "runs/pretrain-base/checkpoint-stage1-student.pth"
    assert weights.is_unknown(weights.pretraining_setting(tmp_path / ck))
    downstream(runs, "finetune-base", "finetune", ck, model="base", metrics={"top1": 84.31})
    assert weights.is_unknown(json.loads((runs / "finetune-base" / "results.json").read_text())["pretraining"])
    t = table.make_table(runs)
    assert md_line(t, "ViT-B/16", "ViT-B (bootstrapped)")[3:6] == ["84.31", "84.5", "-0.19"]
    prov = next(p for p in table.provenance_rows(t) if p["student"] == "ViT-B/16")
    assert "read from checkpoint-stage1-student.pth" in prov["row_from"]
    # no saved config anywhere: unknown stays unknown
    bare = runs / "pretrain-bare"
    bare.mkdir()
    ckpt.save({"model": {}, "meta": {"format": "dbot-suite/pretrain/v1", "stage": 0}}, bare / "student.pth")
    downstream(runs, "finetune-bare", "finetune", "runs/pretrain-bare/student.pth", model="base", metrics={"top1": 1.0})
    t = table.make_table(runs)
    assert md_line(t, "ViT-B/16", "?")[3] == "1.00"
    prov = next(p for p in table.provenance_rows(t) if p["run"] == str(runs / "finetune-bare"))
    assert "records no pretraining setting (written by an older version)" in prov["row_from"]


def test_recorded_sha_is_kept_and_contradicting_file_not_used(runs, tmp_path):
    t = table.make_table(runs)
    ck = "runs/pretrain-base/checkpoint-stage1-student.pth"
    downstream(
        runs, "moved", "finetune", "/cluster/x/" + ck, checkpoint_sha256="0" * 16, model="base", metrics={"top1": 80.0}
    )
    t = table.make_table(runs)
    assert any("differs from the recorded 0000000000000000" in w for w in t.warnings)
    r = row(t, "ViT-B/16", "?")  # not placed in the dBOT row on a contradicting hash
    assert r.cells["in1k"][0].sha == "0" * 16


def test_runs_copied_from_another_machine_are_found_by_folder_and_file(runs):
    sha = file_sha256(runs / "pretrain-base" / "checkpoint-stage0-student.pth")
    ck = "/cluster/x/runs/pretrain-base/checkpoint-stage0-student.pth"
    downstream(runs, "finetune-stage0", "finetune", ck, checkpoint_sha256=sha, model="base", metrics={"top1": 70.0})
    t = table.make_table(runs)
    assert [c.value for c in row(t, "ViT-B/16", "random ViT-B").cells["in1k"]] == [70.0]


def test_448_run_takes_the_setting_its_fine_tuned_start_records(runs):
    pretrain_run(runs, "pretrain-huge", cfg(**{"model.size": "huge", "teacher.init_depth": 0}))
    ck = "runs/pretrain-huge/checkpoint-stage1-student.pth"
    config = {"model": {"size": "huge", "img_size": None}}
    downstream(runs, "finetune-huge", "finetune", ck, config=config, metrics={"top1": 87.1})
    setting = json.loads((runs / "finetune-huge" / "results.json").read_text())["pretraining"]
    best = {"model": {}, "meta": {"format": "dbot-suite/finetune/v1", "pretraining": setting}}
    ckpt.save(best, runs / "finetune-huge" / "checkpoint-best.pth")  # the 224 fine-tuned model records its start
    downstream(
        runs,
        "finetune-huge448",
        "finetune",
        "runs/finetune-huge/checkpoint-best.pth",
        config={"model": {"size": "huge", "img_size": 448}},
        metrics={"top1": 88.2},
    )
    t = table.make_table(runs)
    assert md_line(t, "ViT-H/14", "ViT-H (bootstrapped)")[3:6] == ["87.10", "87.4", "-0.30"]
    assert md_line(t, "ViT-H/14 @448", "ViT-H (bootstrapped)")[3:6] == ["88.20", "88.0", "+0.20"]
    c = row(t, "ViT-H/14 @448", "ViT-H (bootstrapped)").cells["in1k"][0]
    assert "stage-1 student" in c.origin.how and c.checkpoint == "runs/finetune-huge/checkpoint-best.pth"
    assert c.provenance()["config"] == str(runs / "finetune-huge448" / "config.yaml")


def test_mae_baseline_row_and_symmetric_student(runs):
    pixels = cfg(**{"model.size": "large", "target.kind": "pixels", "teacher.bootstrap": False})
    pretrain_run(runs, "pretrain-mae-l", {**pixels, "stages": {"epochs": [0, 1600]}}, stages=1)
    downstream(
        runs, "ft-mae-l", "finetune", "runs/pretrain-mae-l/checkpoint-stage0-student.pth", metrics={"top1": 85.5}
    )
    clip = cfg(**{"model.kind": "beit", "target.kind": "timm", "target.timm.name": "vit_base_patch16_clip_224.openai"})
    pretrain_run(runs, "pretrain-clip-b", {**clip, "stages": {"epochs": [0, 1600]}}, stages=1)
    downstream(
        runs, "ft-clip-b", "finetune", "runs/pretrain-clip-b/checkpoint-stage0-student.pth", metrics={"top1": 85.1}
    )
    t = table.make_table(runs)
    assert md_line(t, "ViT-L/16", "pixels")[2:6] == ["yes", "85.50", "85.9", "-0.40"]
    assert md_line(t, "ViT-B/16", "CLIP-B/16")[2:6] == ["no", "85.10", "85.7", "-0.60"]


def test_external_checkpoints_through_labels_file_or_results_label(runs, tmp_path):
    downstream(
        runs, "ft-authors", "finetune", "/dl/84.5_dbot_base_pre.pth", checkpoint_sha256="ab" * 8, metrics={"top1": 84.4}
    )
    downstream(
        runs, "ft-mae", "finetune", "/dl/mae_pretrain_vit_base.pth", checkpoint_sha256="cd" * 8, metrics={"top1": 83.4}
    )
    downstream(runs, "ft-labelled", "finetune", "/dl/other.pth", label="ViT-L/16 | ViT-H", metrics={"top1": 86.5})
    downstream(runs, "ft-unknown", "finetune", "/dl/unknown.pth", model="base", metrics={"top1": 80.0})
    labels = tmp_path / "labels.yaml"
    labels.write_text(
        "84.5_dbot_base_pre.pth: {student: ViT-B/16, teacher: ViT-B (bootstrapped)}\n"
        f"{'cd' * 4}: {{student: ViT-B/16, teacher: pixels, asym: true}}\n"
    )
    t = table.make_table(runs, labels)
    b = row(t, "ViT-B/16", "ViT-B (bootstrapped)")
    assert sorted(c.value for c in b.cells["in1k"]) == [84.31, 84.4]  # ours and the authors' file: both kept
    assert {c.value: c.origin.how for c in b.cells["in1k"]}[84.4] == "--labels file"
    assert md_line(t, "ViT-B/16", "pixels")[3:6] == ["83.40", "83.6", "-0.20"]
    assert md_line(t, "ViT-L/16", "ViT-H")[3:6] == ["86.50", "86.8", "-0.30"]
    unknown = row(t, "ViT-B/16", "?")
    assert "--labels" in unknown.cells["in1k"][0].origin.how
    bad = tmp_path / "bad.yaml"
    bad.write_text("x.pth: {student: ViT-B/16}\n")
    with pytest.raises(ValueError, match="entry 'x.pth' needs 'student' and 'teacher'"):
        table.make_table(runs, bad)


def test_linprobe_and_transfer_columns_appear_only_with_runs(runs):
    ck = "runs/pretrain-base/checkpoint-stage1-student.pth"
    assert [m.key for m in table.make_table(runs).metrics] == ["in1k", "box_ap", "mask_ap", "miou"]
    downstream(runs, "lin", "linprobe", ck, dataset="imagenet:/in", metrics={"top1": 68.0})
    downstream(runs, "cars", "transfer", ck, dataset="cars:/data/cars", metrics={"top1": 93.0})
    t = table.make_table(runs)
    assert [m.key for m in t.metrics][4:] == ["linprobe", "transfer:cars"]
    assert md_line(t, "ViT-B/16", "ViT-B (bootstrapped)")[-2:] == ["68.00", "93.00"]
    assert any("Stanford Cars" in n and "93.7" in n for n in t.notes)


def test_cli_writes_every_format(runs, capsys):
    (runs / "broken").mkdir()
    (runs / "broken" / "results.json").write_text("{")
    out = runs.parent / "table-out"
    assert table.main(["--runs", str(runs), "--out", str(out), "--ours-only"]) == 0
    printed = capsys.readouterr()
    assert "| ViT-B/16 | ViT-B (bootstrapped) | yes | 84.31 | 84.5 | -0.19 |" in printed.out
    assert "ViT-L/16" not in printed.out.split("## Notes")[0]  # --ours-only: published-only rows dropped
    assert str(runs / "broken" / "results.json") in printed.err
    for name in ("table.md", "table.tex", "table.csv", "provenance.csv", "table.json", "table.png"):
        assert (out / name).stat().st_size > 0, name
    assert (out / "table.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    prov = list(csv.DictReader(io.StringIO((out / "provenance.csv").read_text())))
    assert len(prov) == 5 and all(p["checkpoint_sha256"] != "-" for p in prov)
    assert table.main(["--runs", str(runs / "nope")]) == 2


def test_published_numbers_are_the_sources_numbers():
    """Every published value in tools/published.yaml against docs/RECIPES.md section 1 (the authors' README
    table, the MAE baselines, the other quoted figures), read from that page rather than restated here."""
    text = (REPO / "docs" / "RECIPES.md").read_text()
    section = text.split("## 1.")[1].split("\n## ")[0]
    num = lambda c: None if c == "-" else float(c)  # noqa: E731
    readme, baselines = [], {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 6 and cells[0].startswith("ViT-"):
            readme.append((cells[0], cells[1], cells[2].startswith("yes"), *map(num, cells[3:])))
        elif len(cells) == 6 and cells[0] == "MAE":
            baselines[cells[1]] = dict(zip(("in1k", "box_ap", "mask_ap", "miou"), map(num, cells[2:]), strict=True))
    rows, sources, notes, other = table.load_published()
    keys = [r.setting.key for r in rows]
    assert len(keys) == len(set(keys)) and {r.method for r in rows} == {"dBOT", "MAE"}
    dbot = [r for r in rows if r.method == "dBOT"]
    assert len(dbot) == len(readme) == 11
    for r, (student, teacher, asym, in1k, det, seg) in zip(dbot, readme, strict=True):
        s = r.setting
        assert (s.student, s.asym) == (student, asym) and s.teacher.startswith(teacher), (s, teacher)
        assert r.values == {k: v for k, v in (("in1k", in1k), ("box_ap", det), ("miou", seg)) if v is not None}, s
        assert set(r.sources.values()) == {"dbot_readme"}
    mae = {r.setting.student: r for r in rows if r.method == "MAE"}
    assert set(mae) == set(baselines) == {"ViT-B/16", "ViT-L/16", "ViT-H/14"}
    assert all(mae[s].setting.teacher == "pixels" for s in mae)
    for size, expect in baselines.items():
        assert mae[size].values == {k: v for k, v in expect.items() if v is not None}, size
        assert mae[size].sources["box_ap"] == mae[size].sources["mask_ap"] == "vitdet_readme"
    assert set(sources) >= {"dbot_readme", "mae_paper", "vitdet_readme"} and "box_ap" in notes
    figures = {o["metric"]: o["value"] for o in other}
    cars, inat = re.search(r"Stanford Cars ([\d.]+) and on\s+iNaturalist-2018 ([\d.]+)", section).groups()
    assert figures == {"transfer:cars": float(cars), "transfer:inat2018": float(inat)}


def test_row_of_a_real_pretraining_run(tiny_pretrained, tmp_path):
    """The row comes from what pretrain.train really writes (config.yaml, results.json, stage files)."""
    runs = tmp_path / "runs"
    shutil.copytree(tiny_pretrained.parent, runs / "pretrain-tiny")
    pre = json.loads((runs / "pretrain-tiny" / "results.json").read_text())

    def copied(path: str) -> str:
        return str(runs / "pretrain-tiny" / Path(path).name)

    downstream(runs, "ft", "finetune", copied(pre["final_student"]), model="tiny", metrics={"top1": 55.5})
    downstream(
        runs, "ft0", "finetune", copied(pre["checkpoints"]["stage0_student"]), model="tiny", metrics={"top1": 44.4}
    )
    downstream(
        runs, "ft-t1", "finetune", copied(pre["checkpoints"]["stage1_teacher"]), model="tiny", metrics={"top1": 33.3}
    )
    t = table.make_table(runs)
    assert t.warnings == []
    assert md_line(t, "ViT-tiny/4", "ViT-tiny (bootstrapped)")[3] == "55.50"
    stage0 = row(t, "ViT-tiny/4", "random ViT-tiny")
    # the stage-1 teacher is the stage-0 student: the same row, both runs kept
    assert sorted(c.value for c in stage0.cells["in1k"]) == [33.3, 44.4]
    assert all(c.sha == file_sha256(c.checkpoint) for c in stage0.cells["in1k"])
    assert all(c.origin.pretrain_commit == pre["git_commit"] for c in stage0.cells["in1k"])
