"""The paper's main results table, built from every `results.json` under a runs folder.

    python -m tools.table --runs runs [--out runs/table] [--labels labels.yaml] [--duplicates newest|all]

One row per student/teacher setting; columns IN-1K top-1, COCO box AP and mask AP, ADE20K mIoU (plus linear
probe and transfer columns when such runs exist), each with the published number (`tools/published.yaml`)
and the difference. Writes `table.md` (also printed), `table.tex`, `table.csv`, `provenance.csv` (run folder,
checkpoint sha256, config and commit of every cell), `table.json` and `table.png`. Missing entries are a dash.

How a downstream run finds its row: its `checkpoint` is followed to the run folder that produced it. A
pretraining run folder (pretrain results.json and/or config.yaml) gives the student size and the teacher
setting (`teacher.*`, `target.*`, the stage of the checkpoint); a fine-tuning folder (e.g. the 448 px
recipe starting from a fine-tuned model) is followed further. Checkpoints this suite did not produce (the
authors' or MAE's released files) take their row from `--labels` (YAML: checkpoint path, file name or
sha256 prefix -> {student, teacher, asym}) or from a `label` field in results.json.

Bad input: a malformed results.json is named in a warning and skipped; two runs claiming the same cell are
never merged: the newest is shown (marked, the others listed in the notes) or, with `--duplicates all`,
every value is shown.
"""

from __future__ import annotations

import argparse
import csv
import functools
import io
import json
import math
import re
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import yaml

from core.monitor import file_sha256

PUBLISHED = Path(__file__).with_name("published.yaml")
DASH = "-"


# --------------------------------------------------------------------------------------- field mapping
# How each column is read from results.json. The pipelines' field names may differ slightly; adjust the
# lists here (first present wins; dotted names go into nested objects). Values are percent; `scale`
# converts a pipeline that writes fractions.
@dataclass(frozen=True)
class Metric:
    key: str
    title: str
    tasks: tuple[str, ...]
    fields: tuple[str, ...]
    scale: float = 1.0
    short: str = ""


METRICS: tuple[Metric, ...] = (
    Metric("in1k", "IN-1K top-1", ("finetune",), ("top1", "top1_acc", "acc1"), short="IN-1K"),
    Metric("box_ap", "COCO box AP", ("coco", "detection"), ("bbox.AP", "bbox_AP", "box_AP", "AP_box"), short="box AP"),
    Metric(
        "mask_ap", "COCO mask AP", ("coco", "detection"), ("segm.AP", "segm_AP", "mask_AP", "AP_mask"), short="mask AP"
    ),
    Metric("miou", "ADE20K mIoU", ("ade20k", "segmentation"), ("mIoU", "miou", "mIoU_ss"), short="ADE mIoU"),
)
# Columns shown only when some run fills them (no published number in a row).
LINPROBE = Metric("linprobe", "IN-1K linear probe", ("linprobe",), ("top1", "top1_acc", "acc1"), short="lin. probe")
TRANSFER_FIELDS = ("top1", "top1_acc", "acc1")  # task "transfer": one column per dataset kind ("cars:/path")
CHECKPOINT_FIELDS = ("checkpoint", "pretrained", "init_checkpoint")
SHA_FIELDS = ("checkpoint_sha256", "checkpoint_sha", "ckpt_sha256")
CLASSIFICATION_TASKS = ("finetune", "linprobe", "transfer")
PRETRAIN_TASK = "pretrain"
KNOWN_TASKS = (PRETRAIN_TASK, *CLASSIFICATION_TASKS, "coco", "detection", "ade20k", "segmentation")

SIZE_LETTERS = {"tiny": "tiny", "small": "S", "base": "B", "large": "L", "huge": "H"}


@functools.cache
def presets() -> dict[str, dict]:
    """core.vit.PRESETS, imported on first use (it pulls in torch; the table itself does not need it)."""
    from core.vit import PRESETS

    return PRESETS


def dig(d: dict, dotted: str):
    """`d["a"]["b"]` for "a.b"; None where absent."""
    for part in dotted.split("."):
        if not isinstance(d, dict) or part not in d:
            return None
        d = d[part]
    return d


def first_field(d: dict, names) -> tuple[str | None, object]:
    for n in names:
        v = dig(d, n)
        if v is not None:
            return n, v
    return None, None


# --------------------------------------------------------------------------------------------- records
@dataclass
class Run:
    """One results.json."""

    path: Path
    data: dict

    @property
    def folder(self) -> Path:
        return self.path.parent

    @property
    def task(self) -> str:
        return self.data["task"]

    @property
    def finished(self) -> float:
        """Seconds since the epoch (finished_at, else the file's mtime): orders duplicate runs."""
        s = self.data.get("finished_at")
        if isinstance(s, str):
            try:
                return datetime.strptime(s, "%Y-%m-%dT%H:%M:%S%z").timestamp()
            except ValueError:
                pass
        return self.path.stat().st_mtime


@dataclass(frozen=True)
class Setting:
    """A row: who was distilled from what. `asym` True = MAE-style encoder-decoder, False = BEiT-style."""

    student: str
    teacher: str
    asym: bool | None = None

    @property
    def key(self) -> tuple:
        return (self.student, self.teacher, self.asym)

    def asym_text(self) -> str:
        return "?" if self.asym is None else "yes" if self.asym else "no"

    def name(self) -> str:
        return f"{self.student} / {self.teacher}"


@dataclass
class Origin:
    """Where a run's setting came from (for the provenance)."""

    setting: Setting
    how: str
    pretrain_folder: Path | None = None
    pretrain_commit: str | None = None
    size: str | None = None  # the pretraining model size, when the row came from a pretraining run


@dataclass
class Cell:
    value: float
    run: Run
    metric: str
    checkpoint: str | None
    sha: str | None
    origin: Origin
    field: str

    def provenance(self) -> dict:
        d = self.run.data
        config = (
            str(self.run.folder / "config.yaml") if (self.run.folder / "config.yaml").is_file() else d.get("config")
        )
        return {
            "run": str(self.run.folder),
            "results": str(self.run.path),
            "task": self.run.task,
            "field": self.field,
            "dataset": d.get("dataset"),
            "checkpoint": self.checkpoint,
            "checkpoint_sha256": self.sha,
            "config": config,
            "commit": d.get("git_commit"),
            "finished_at": d.get("finished_at"),
            "row_from": self.origin.how,
            "pretrain_run": str(self.origin.pretrain_folder) if self.origin.pretrain_folder else None,
            "pretrain_commit": self.origin.pretrain_commit,
        }


@dataclass
class Published:
    setting: Setting
    method: str
    values: dict[str, float]
    sources: dict[str, str]


@dataclass
class Row:
    setting: Setting
    method: str = ""
    cells: dict[str, list[Cell]] = field(default_factory=dict)  # newest first
    published: Published | None = None

    def ours(self, metric: str) -> Cell | None:
        cells = self.cells.get(metric)
        return cells[0] if cells else None


@dataclass
class Table:
    rows: list[Row]
    metrics: list[Metric]
    published_metrics: set[str]
    warnings: list[str]
    notes: list[str]
    duplicates: str
    sources: dict[str, str]


# ------------------------------------------------------------------------------------------- collecting
def collect(runs_dir: str | Path) -> tuple[list[Run], list[str]]:
    """Every well-formed results.json under `runs_dir`, and a warning naming each file that is not."""
    runs, warnings = [], []
    for path in sorted(Path(runs_dir).rglob("results.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            warnings.append(f"{path}: not readable JSON ({type(e).__name__}: {e}); skipped")
            continue
        if not isinstance(data, dict):
            warnings.append(f"{path}: expected a JSON object, got {type(data).__name__}; skipped")
            continue
        task = data.get("task")
        if not isinstance(task, str):
            warnings.append(f"{path}: no 'task' field (expected one of {', '.join(KNOWN_TASKS)}); skipped")
            continue
        if task not in KNOWN_TASKS:
            warnings.append(f"{path}: unknown task {task!r} (expected one of {', '.join(KNOWN_TASKS)}); skipped")
            continue
        runs.append(Run(path, data))
    return runs, warnings


def load_published(path: str | Path = PUBLISHED) -> tuple[list[Published], dict, dict, list[dict]]:
    """(rows, sources, notes, other figures) from the published-numbers file."""
    doc = yaml.safe_load(Path(path).read_text())
    sources = doc.get("sources", {})
    rows = []
    keys = {m.key for m in METRICS}
    for i, r in enumerate(doc.get("rows", [])):
        values, srcs = {}, {}
        for k in keys:
            v = r.get(k)
            if v is None:
                continue
            src = r.get("source")
            if isinstance(v, dict):
                v, src = v["value"], v.get("source", src)
            if src not in sources:
                raise ValueError(f"{path}: rows[{i}].{k}: source {src!r} is not a key of 'sources'")
            values[k], srcs[k] = float(v), src
        rows.append(Published(Setting(r["student"], r["teacher"], r.get("asym")), r.get("method", ""), values, srcs))
    return rows, sources, doc.get("notes", {}), doc.get("other", [])


def load_labels(path: str | Path | None) -> dict[str, Setting]:
    """`--labels` file: checkpoint path / file name / sha256 prefix -> Setting. Errors name the entry."""
    if path is None:
        return {}
    try:
        doc = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise ValueError(f"--labels {path}: cannot read ({type(e).__name__}: {e})") from None
    if not isinstance(doc, dict):
        raise ValueError(f"--labels {path}: expected a mapping 'checkpoint or sha256: {{student, teacher}}'")
    out = {}
    for k, v in doc.items():
        if not isinstance(v, dict) or not isinstance(v.get("student"), str) or not isinstance(v.get("teacher"), str):
            raise ValueError(
                f"--labels {path}: entry {k!r} needs 'student' and 'teacher' strings (and optionally asym: "
                f"true|false), got {v!r}"
            )
        asym = v.get("asym", True)
        if not isinstance(asym, bool):
            raise ValueError(f"--labels {path}: entry {k!r}: asym must be true or false, got {asym!r}")
        out[str(k)] = Setting(v["student"], v["teacher"], asym)
    return out


# --------------------------------------------------------------------------------------------- labels
def vit_short(size: str | None) -> str:
    return f"ViT-{SIZE_LETTERS.get(size, size)}" if size else "ViT-?"


def vit_name(size: str | None, patch: int | None = None) -> str:
    """ "ViT-B/16" for a preset size (the preset's patch unless given)."""
    if patch is None and size in presets():
        patch = presets()[size]["patch_size"]
    return vit_short(size) + (f"/{patch}" if patch else "")


def timm_label(name: str | None) -> str:
    """ "CLIP-B/16" for timm's CLIP ViTs (vit_base_patch16_clip_224.openai), else the timm name."""
    if not name:
        return "timm ?"
    m = re.match(r"vit_(\w+?)_patch(\d+)_clip", name)
    sizes = {"base": "B", "large": "L", "huge": "H", "small": "S"}
    if m and m.group(1) in sizes:
        return f"CLIP-{sizes[m.group(1)]}/{m.group(2)}"
    return name


def first_target(cfg: dict) -> tuple[str, bool]:
    """Label of the first stage's target, and whether it is a random ViT teacher (dBOT's start)."""
    kind = dig(cfg, "target.kind") or "teacher"
    size = dig(cfg, "model.size")
    if kind == "teacher":
        tsize = dig(cfg, "teacher.size") or size
        if dig(cfg, "teacher.checkpoint"):
            return vit_short(tsize), False
        return f"random {vit_short(tsize)}", True
    if kind == "pixels":
        return ("pixels" if dig(cfg, "target.pixels.norm_pix") is not False else "pixels (raw)"), False
    if kind == "hog":
        return "HOG", False
    if kind == "ema":
        return "EMA", False
    if kind == "timm":
        return timm_label(dig(cfg, "target.timm.name")), False
    return str(kind), False


def teacher_label(cfg: dict, stage: int) -> str:
    """The teacher setting of the stage-`stage` student of a pretraining run.

    Stage 0 (or no bootstrapping): the first target ("pixels", "ViT-L", "random ViT-B", "CLIP-B/16").
    Later stages distil from the previous student: "ViT-B (bootstrapped)" when the run started from a random
    teacher (dBOT), "<first> + bootstrapped" otherwise; "x2", "x3" for more than one bootstrapping stage.
    """
    first, random_start = first_target(cfg)
    if stage == 0 or dig(cfg, "teacher.bootstrap") is False:
        return first
    times = "" if stage == 1 else f" x{stage}"
    if random_start:
        return f"{vit_short(dig(cfg, 'model.size'))} (bootstrapped{times})"
    return f"{first} + bootstrapped{times}"


def label_from_results(run: Run) -> Setting | None:
    """A `label` in results.json: {student, teacher[, asym]} or "STUDENT | TEACHER" or just "TEACHER"."""
    lab = run.data.get("label")
    if isinstance(lab, dict) and isinstance(lab.get("student"), str) and isinstance(lab.get("teacher"), str):
        return Setting(lab["student"], lab["teacher"], lab.get("asym", True))
    if isinstance(lab, str) and lab.strip():
        student, sep, teacher = lab.partition("|")
        if sep:
            return Setting(student.strip(), teacher.strip(), True)
        return Setting(vit_name(run.data.get("model")), lab.strip(), True)
    return None


# ---------------------------------------------------------------------------------------------- resolver
STAGE_FILE = re.compile(r"checkpoint-stage(\d+)-(student|teacher)")


class Resolver:
    """Finds the setting (row) of a downstream run by following its checkpoint to the run that made it."""

    def __init__(self, runs_dir: str | Path, runs: list[Run], labels: dict[str, Setting] | None = None):
        self.runs_dir = Path(runs_dir)
        self.labels = labels or {}
        self.by_folder = {r.folder.resolve(): r for r in runs}
        self._sha: dict[Path, str] = {}
        self.warnings: list[str] = []

    # ---- files
    def sha(self, path: Path) -> str:
        path = path.resolve()
        if path not in self._sha:
            self._sha[path] = file_sha256(path)
        return self._sha[path]

    def locate(self, written: str, run: Run, sha: str | None) -> Path | None:
        """The checkpoint file a results.json names: relative to the runs folder's parent (where the runs were
        started), the current folder, the run folder or the runs folder; else the same `<run folder>/<file>`
        under the runs folder (runs copied from another machine). A file whose sha256 contradicts the
        recorded one is not used."""
        p = Path(written).expanduser()
        direct = [p] if p.is_absolute() else [self.runs_dir.parent / p, p, run.folder / p, self.runs_dir / p]

        def candidates():
            yield from direct
            if len(p.parts) >= 2 and not any(c.is_file() for c in direct):
                yield from sorted(self.runs_dir.rglob(f"{p.parent.name}/{p.name}"))

        for c in candidates():
            if c.is_file():
                if sha and sha[:16].lower() != self.sha(c)[:16]:
                    self.warnings.append(
                        f"{run.path}: checkpoint {written} found at {c} but its sha256 {self.sha(c)} differs from the "
                        f"recorded {sha}; not used to place the row"
                    )
                    continue
                return c
        return None

    # ---- settings
    def label_for(self, written: str | None, found: Path | None, sha: str | None) -> Setting | None:
        if not self.labels:
            return None
        keys = []
        if written:
            keys += [written, Path(written).name]
        if found is not None:
            keys += [str(found), str(found.resolve()), found.name]
        for k in keys:
            if k in self.labels:
                return self.labels[k]
        if sha:
            for k, s in self.labels.items():
                if re.fullmatch(r"[0-9a-fA-F]{8,64}", k) and (sha.startswith(k.lower()) or k.lower().startswith(sha)):
                    return s
        return None

    def origin(self, run: Run) -> Origin:
        """The row of `run` and how it was found. A classification run at another resolution than its
        pretraining gets " @448" on the student (the H/14-448 rows)."""
        o = self._origin(run, 0)
        suffix = self.resolution_suffix(run, o.size) if o.size else ""
        if suffix:
            s = o.setting
            o = Origin(
                Setting(s.student + suffix, s.teacher, s.asym), o.how, o.pretrain_folder, o.pretrain_commit, o.size
            )
        return o

    def _origin(self, run: Run, depth: int) -> Origin:
        own = label_from_results(run)
        if own is not None:
            return Origin(own, "label in results.json")
        _, written = first_field(run.data, CHECKPOINT_FIELDS)
        _, sha = first_field(run.data, SHA_FIELDS)
        model = run.data.get("model")
        if not written:
            return Origin(Setting(vit_name(model), "none (random init)", None), "no checkpoint: trained from scratch")
        found = self.locate(str(written), run, sha if isinstance(sha, str) else None)
        if sha is None and found is not None:
            sha = self.sha(found)
        lab = self.label_for(str(written), found, sha)
        if lab is not None:
            return Origin(lab, "--labels file")
        if found is None:
            return Origin(
                Setting(vit_name(model), "?", None),
                f"checkpoint {written} not found and not in --labels: add it (path or sha256 {sha}) to a labels file",
            )
        folder = found.parent.resolve()
        producer = self.by_folder.get(folder)
        cfg = read_yaml(folder / "config.yaml")
        if (producer is not None and producer.task == PRETRAIN_TASK) or (
            producer is None and cfg and "stages" in cfg and "teacher" in cfg
        ):
            return self.from_pretraining(found, producer, cfg)
        if producer is not None and producer.task in CLASSIFICATION_TASKS and depth < 8:
            up = self._origin(producer, depth + 1)
            return Origin(
                up.setting, f"{up.how}, via {producer.folder}", up.pretrain_folder, up.pretrain_commit, up.size
            )
        return Origin(
            Setting(vit_name(model), "?", None),
            f"checkpoint {found} was not produced by a run under {self.runs_dir}: add it (path or sha256 {sha}) to "
            "a --labels file",
        )

    def from_pretraining(self, ckpt_path: Path, producer: Run | None, cfg: dict | None) -> Origin:
        cfg = cfg or {}
        if not cfg and producer is not None:  # no config.yaml: the results.json fields are enough for dBOT
            cfg = {"model": {"size": producer.data.get("model")}, "target": {"kind": producer.data.get("target_kind")}}
            cfg["teacher"] = {"bootstrap": producer.data.get("bootstrap", True)}
        size = dig(cfg, "model.size") or (producer.data.get("model") if producer else None)
        stages = dig(cfg, "stages.epochs") or (producer.data.get("stages") if producer else None) or [0, 1]
        last = max(len(stages) - 2, 0)
        m = STAGE_FILE.search(ckpt_path.name)
        asym = dig(cfg, "model.kind") != "beit"
        student = vit_name(size, dig(cfg, "model.patch_size"))
        if m is None:
            stage, how = last, f"pretraining run {ckpt_path.parent}, {ckpt_path.name} taken as the final stage {last}"
        elif m.group(2) == "student":
            stage, how = int(m.group(1)), f"pretraining run {ckpt_path.parent}, stage-{m.group(1)} student"
        elif int(m.group(1)) >= 1 and dig(cfg, "teacher.bootstrap") is not False:
            stage = int(m.group(1)) - 1
            how = f"pretraining run {ckpt_path.parent}, stage-{m.group(1)} teacher = stage-{stage} student"
        else:
            first, _ = first_target(cfg)
            tsize = dig(cfg, "teacher.size") or size
            setting = Setting(vit_name(tsize), f"none (the stage-0 target {first} itself)", asym)
            return Origin(setting, f"pretraining run {ckpt_path.parent}, {ckpt_path.name}", ckpt_path.parent)
        setting = Setting(student, teacher_label(cfg, stage), asym)
        commit = producer.data.get("git_commit") if producer else None
        return Origin(setting, how, ckpt_path.parent, commit, size)

    def resolution_suffix(self, run: Run, size: str | None) -> str:
        """ " @448" when a classification run used another resolution than the pretraining preset."""
        if run.task not in CLASSIFICATION_TASKS:
            return ""
        img = run.data.get("img_size")
        if img is None:
            img = dig(run_config(run) or {}, "model.img_size")
        base = presets().get(size, {}).get("img_size")
        return f" @{int(img)}" if img and base and int(img) != base else ""


def run_config(run: Run) -> dict | None:
    """The run's resolved config: its folder's config.yaml, else the path its results.json names."""
    own = read_yaml(run.folder / "config.yaml")
    if own is not None or not run.data.get("config"):
        return own
    return read_yaml(Path(run.data["config"]))


def read_yaml(path: Path) -> dict | None:
    try:
        doc = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError, UnicodeDecodeError):
        return None
    return doc if isinstance(doc, dict) else None


# ------------------------------------------------------------------------------------------------ table
def metric_value(run: Run, metric: Metric, warnings: list[str]) -> tuple[float | None, str | None]:
    name, v = first_field(run.data, metric.fields)
    if name is None:
        return None, None
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        try:
            v = float(v)
        except (TypeError, ValueError):
            warnings.append(f"{run.path}: {name} = {v!r} is not a number; cell left empty")
            return None, None
    if not math.isfinite(v):
        warnings.append(f"{run.path}: {name} = {v}; cell left empty")
        return None, None
    return float(v) * metric.scale, name


def metrics_of(run: Run) -> list[Metric]:
    """The columns a run fills."""
    if run.task == "linprobe":
        return [LINPROBE]
    if run.task == "transfer":
        kind = str(run.data.get("dataset", "transfer")).split(":")[0] or "transfer"
        return [Metric(f"transfer:{kind}", f"{kind} transfer top-1", ("transfer",), TRANSFER_FIELDS, short=kind)]
    return [m for m in METRICS if run.task in m.tasks]


def build(
    runs: list[Run],
    resolver: Resolver,
    published: list[Published] | None = None,
    *,
    duplicates: str = "newest",
    ours_only: bool = False,
    sources: dict | None = None,
    published_notes: dict | None = None,
    other: list[dict] | None = None,
    warnings: list[str] | None = None,
) -> Table:
    """Rows (published order first, then ours), their cells newest first, and the notes."""
    if duplicates not in ("newest", "all"):
        raise ValueError(f"duplicates must be newest or all, got {duplicates!r}")
    warnings = list(warnings or [])
    rows: dict[tuple, Row] = {}
    for p in published or []:
        rows[p.setting.key] = Row(p.setting, p.method, published=p)
    extra: dict[str, Metric] = {}
    for run in sorted(runs, key=lambda r: (-r.finished, -r.path.stat().st_mtime, str(r.path))):
        if run.task == PRETRAIN_TASK:
            continue
        mets = metrics_of(run)
        values = [(m, *metric_value(run, m, warnings)) for m in mets]
        values = [(m, v, f) for m, v, f in values if v is not None]
        if not values:
            warnings.append(
                f"{run.path}: task {run.task} but none of the fields "
                f"{', '.join(sorted({f for m in mets for f in m.fields}))}; skipped"
            )
            continue
        origin = resolver.origin(run)
        _, sha = first_field(run.data, SHA_FIELDS)
        _, written = first_field(run.data, CHECKPOINT_FIELDS)
        if sha is None and written:
            found = resolver.locate(str(written), run, None)
            sha = resolver.sha(found) if found else None
        row = rows.setdefault(origin.setting.key, Row(origin.setting))
        for m, v, f in values:
            if m not in METRICS:
                extra.setdefault(m.key, m)
            row.cells.setdefault(m.key, []).append(
                Cell(v, run, m.key, str(written) if written else None, sha, origin, f)
            )
    warnings += resolver.warnings
    metrics = (
        list(METRICS)
        + ([extra.pop("linprobe")] if "linprobe" in extra else [])
        + sorted(extra.values(), key=lambda m: m.key)
    )
    ordered = list(rows.values())
    n_pub = len(published or [])
    ours = sorted(ordered[n_pub:], key=lambda r: (size_rank(r.setting.student), r.setting.student, r.setting.teacher))
    ordered = ordered[:n_pub] + ours
    if ours_only:
        ordered = [r for r in ordered if r.cells]
    notes = []
    for r in ordered:
        for m in metrics:
            cells = r.cells.get(m.key, [])
            if len(cells) > 1:
                chosen = "newest shown" if duplicates == "newest" else "all shown, newest first"
                listing = "; ".join(
                    f"{fmt(c.value)} from {c.run.folder} ({c.run.data.get('finished_at', '?')})" for c in cells
                )
                notes.append(f"{r.setting.name()}, {m.title}: {len(cells)} runs claim this cell ({chosen}): {listing}")
    pub_metrics = {k for p in published or [] for k in p.values}
    for key, text in (published_notes or {}).items():
        if any(r.published and key in r.published.values for r in ordered):
            notes.append(f"{next(m.title for m in METRICS if m.key == key)}: {' '.join(str(text).split())}")
    for o in other or []:
        if any(m.key == o.get("metric") for m in metrics):
            notes.append(
                f"published {o['what']}: {o['value']} ({o['source']}); its student/teacher row is not stated, so "
                "it is not placed in a row"
            )
    return Table(ordered, metrics, pub_metrics, warnings, notes, duplicates, dict(sources or {}))


def size_rank(student: str) -> int:
    order = ["tiny", "S", "B", "L", "H"]
    m = re.match(r"ViT-(\w+)", student)
    return order.index(m.group(1)) if m and m.group(1) in order else len(order)


def make_table(
    runs_dir: str | Path,
    labels: str | Path | None = None,
    *,
    duplicates: str = "newest",
    ours_only: bool = False,
    published_file: str | Path = PUBLISHED,
) -> Table:
    """Everything from a runs folder: collect, resolve rows, attach the published numbers."""
    runs, warnings = collect(runs_dir)
    resolver = Resolver(runs_dir, runs, load_labels(labels))
    pub, sources, notes, other = load_published(published_file)
    return build(
        runs,
        resolver,
        pub,
        duplicates=duplicates,
        ours_only=ours_only,
        sources=sources,
        published_notes=notes,
        other=other,
        warnings=warnings,
    )


# ----------------------------------------------------------------------------------------------- output
def fmt(v: float | None, spec: str = ".2f") -> str:
    return DASH if v is None else format(v, spec)


def cell_texts(table: Table, row: Row, m: Metric) -> tuple[str, str | None, str | None]:
    """(ours, paper, diff) as displayed; paper/diff None for columns without published numbers."""
    cells = row.cells.get(m.key, [])
    if not cells:
        ours = DASH
    elif table.duplicates == "all":
        ours = " / ".join(fmt(c.value) for c in cells)
    else:
        ours = fmt(cells[0].value) + ("†" if len(cells) > 1 else "")
    if m.key not in table.published_metrics:
        return ours, None, None
    pub = row.published.values.get(m.key) if row.published else None
    diff = cells[0].value - pub if cells and pub is not None else None
    return ours, fmt(pub, ".1f"), fmt(diff, "+.2f")


def header(table: Table) -> list[str]:
    cols = ["student", "teacher", "asym."]
    for m in table.metrics:
        if m.key in table.published_metrics:
            cols += [f"{m.title} ours", f"{m.short} paper", f"{m.short} Δ"]
        else:
            cols.append(m.title)
    return cols


def body(table: Table) -> list[list[str]]:
    out = []
    for r in table.rows:
        line = [r.setting.student, r.setting.teacher, r.setting.asym_text()]
        for m in table.metrics:
            ours, pub, diff = cell_texts(table, r, m)
            line += [ours] if pub is None else [ours, pub, diff]
        out.append(line)
    return out


def provenance_rows(table: Table) -> list[dict]:
    out = []
    for r in table.rows:
        for m in table.metrics:
            for rank, c in enumerate(r.cells.get(m.key, [])):
                out.append(
                    {
                        "student": r.setting.student,
                        "teacher": r.setting.teacher,
                        "asym": r.setting.asym_text(),
                        "column": m.title,
                        "value": round(c.value, 4),
                        "shown": rank == 0 or table.duplicates == "all",
                        **c.provenance(),
                    }
                )
    return out


def to_markdown(table: Table, full: bool = True) -> str:
    """The table, its legend and notes; with `full` also the warnings, per-cell provenance and sources."""

    def line(cells):
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"

    cols = header(table)
    marked = table.duplicates == "newest" and any(len(c) > 1 for r in table.rows for c in r.cells.values())
    lines = ["# Results", "", line(cols), "|" + "---|" * len(cols)]
    lines += [line(b) for b in body(table)]
    lines += [
        "",
        "Ours: this suite's runs (percent); paper: published (`tools/published.yaml`); Δ = ours - paper; "
        f"{DASH} = no run / not published."
        + (" † = several runs claim the cell, the newest is shown." if marked else ""),
    ]
    if table.notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in table.notes]
    if not full:
        return "\n".join(lines) + "\n"
    if table.warnings:
        lines += ["", "## Warnings", ""] + [f"- {w}" for w in table.warnings]
    prov = provenance_rows(table)
    if prov:
        lines += [
            "",
            "## Provenance",
            "",
            line(["row", "column", "value", "run", "checkpoint sha256", "config", "commit", "row from"]),
            "|---|---|---|---|---|---|---|---|",
        ]
        for p in prov:
            lines.append(
                line(
                    [
                        f"{p['student']} / {p['teacher']}",
                        p["column"] + ("" if p["shown"] else " (not shown)"),
                        fmt(p["value"]),
                        p["run"],
                        p["checkpoint_sha256"] or DASH,
                        p["config"] or DASH,
                        p["commit"] or DASH,
                        p["row_from"],
                    ]
                )
            )
    if table.sources:
        lines += ["", "## Published sources", ""] + [
            f"- `{k}`: {' '.join(v.split())}" for k, v in table.sources.items()
        ]
    return "\n".join(lines) + "\n"


def latex_escape(s: str) -> str:
    repl = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{"}
    repl |= {"}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "Δ": r"$\Delta$", "†": r"$^\dagger$"}
    return "".join(repl.get(ch, ch) for ch in s)


def to_latex(table: Table) -> str:
    """A booktabs table: one column group (ours / paper / Δ) per metric; missing entries are `--`."""
    spec = "lll" + "".join("rrr" if m.key in table.published_metrics else "r" for m in table.metrics)
    groups, rules, sub = [], [], ["Student", "Teacher", "Asym."]
    col = 4
    for m in table.metrics:
        width = 3 if m.key in table.published_metrics else 1
        groups.append(rf"\multicolumn{{{width}}}{{c}}{{{latex_escape(m.title)}}}")
        rules.append(rf"\cmidrule(lr){{{col}-{col + width - 1}}}")
        sub += ["ours", "paper", r"$\Delta$"] if width == 3 else ["ours"]
        col += width
    lines = [
        "% generated by tools/table.py; cell provenance in provenance.csv; -- = no run / not published",
        "% needs \\usepackage{booktabs}",
        rf"\begin{{tabular}}{{{spec}}}",
        r"\toprule",
        " & & & " + " & ".join(groups) + r" \\",
        " ".join(rules),
        " & ".join(sub) + r" \\",
        r"\midrule",
    ]
    for b in body(table):
        lines.append(" & ".join("--" if c == DASH else latex_escape(c) for c in b) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines) + "\n"


def to_csv(table: Table) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header(table))
    w.writerows(body(table))
    return buf.getvalue()


def provenance_csv(table: Table) -> str:
    prov = provenance_rows(table)
    buf = io.StringIO()
    cols = list(prov[0]) if prov else ["student", "teacher", "column", "value", "run"]
    w = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n")
    w.writeheader()
    for p in prov:
        w.writerow({k: DASH if v is None else v for k, v in p.items()})
    return buf.getvalue()


def to_json(table: Table) -> dict:
    rows = []
    for r in table.rows:
        entry = {"student": r.setting.student, "teacher": r.setting.teacher, "asym": r.setting.asym, "method": r.method}
        for m in table.metrics:
            cells = r.cells.get(m.key, [])
            pub = r.published.values.get(m.key) if r.published else None
            entry[m.key] = {
                "ours": cells[0].value if cells else None,
                "all": [c.value for c in cells],
                "paper": pub,
                "paper_source": r.published.sources.get(m.key) if r.published else None,
                "diff": cells[0].value - pub if cells and pub is not None else None,
            }
        rows.append(entry)
    return {
        "columns": {m.key: m.title for m in table.metrics},
        "rows": rows,
        "provenance": provenance_rows(table),
        "notes": table.notes,
        "warnings": table.warnings,
        "sources": table.sources,
        "generated_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def plot(table: Table, path: str | Path) -> Path:
    """A dot plot, one panel per column and one line per row (shared across panels): ours (blue dot), the
    paper (grey diamond), joined by a line labelled with the difference."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in table.rows if r.cells or r.published]
    n = max(len(rows), 1)
    seen: set[str] = set()

    def legend(name: str) -> str | None:
        if name in seen:
            return None
        seen.add(name)
        return name

    fig, axes = plt.subplots(
        1, len(table.metrics), figsize=(2.6 * len(table.metrics) + 2.4, 0.3 * n + 1.4), sharey=True, squeeze=False
    )
    for ax, m in zip(axes[0], table.metrics):
        xs = []
        for y, r in enumerate(rows):
            ours = r.ours(m.key).value if r.ours(m.key) else None
            pub = r.published.values.get(m.key) if r.published else None
            if ours is not None and pub is not None:
                ax.plot([pub, ours], [y, y], color="0.6", lw=1, zorder=1)
                ax.annotate(
                    f"{ours - pub:+.1f}",
                    (max(ours, pub), y),
                    xytext=(4, 0),
                    textcoords="offset points",
                    va="center",
                    fontsize=7,
                )
            if pub is not None:
                ax.scatter(
                    [pub],
                    [y],
                    marker="D",
                    s=22,
                    facecolors="none",
                    edgecolors="0.4",
                    zorder=2,
                    label=legend("paper"),
                )
            if ours is not None:
                ax.scatter([ours], [y], marker="o", s=22, color="tab:blue", zorder=3, label=legend("ours"))
            xs += [v for v in (ours, pub) if v is not None]
        if xs:
            span = max(max(xs) - min(xs), 2.0)
            ax.set_xlim(min(xs) - 0.15 * span, max(xs) + 0.3 * span)
        else:
            ax.text(0.5, 0.5, "no runs", ha="center", va="center", transform=ax.transAxes, color="0.5")
        ax.set_title(m.title, fontsize=9)
        ax.set_xlabel("%", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(axis="both", linestyle=":", alpha=0.6)
    axes[0][0].set_yticks(range(n), [f"{r.setting.student} / {r.setting.teacher}" for r in rows] or [""])
    axes[0][0].set_ylim(n - 0.5, -0.5)
    handles = {h.get_label(): h for ax in axes[0] for h in ax.collections if not h.get_label().startswith("_")}
    if handles:
        fig.legend(handles.values(), handles.keys(), loc="upper right", fontsize=7, ncol=2)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_all(table: Table, out: str | Path, with_plot: bool = True) -> dict[str, Path]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files = {
        "markdown": out / "table.md",
        "latex": out / "table.tex",
        "csv": out / "table.csv",
        "provenance": out / "provenance.csv",
        "json": out / "table.json",
    }
    files["markdown"].write_text(to_markdown(table))
    files["latex"].write_text(to_latex(table))
    files["csv"].write_text(to_csv(table))
    files["provenance"].write_text(provenance_csv(table))
    files["json"].write_text(json.dumps(to_json(table), indent=2, default=str) + "\n")
    if with_plot:
        files["plot"] = plot(table, out / "table.png")
    return files


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.table", description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", default="runs", help="folder searched (recursively) for results.json")
    p.add_argument("--out", default=None, help="output folder (default RUNS/table)")
    p.add_argument(
        "--labels", default=None, help="YAML: checkpoint path | file name | sha256 -> {student, teacher, asym}"
    )
    p.add_argument("--duplicates", choices=("newest", "all"), default="newest", help="runs claiming the same cell")
    p.add_argument("--ours-only", action="store_true", help="only rows with at least one of our numbers")
    p.add_argument("--no-plot", action="store_true")
    a = p.parse_args(argv)
    if not Path(a.runs).is_dir():
        print(f"error: --runs {a.runs}: no such folder", file=sys.stderr)
        return 2
    try:
        table = make_table(a.runs, a.labels, duplicates=a.duplicates, ours_only=a.ours_only)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for w in table.warnings:
        print(f"warning: {w}", file=sys.stderr)
    files = write_all(table, a.out or Path(a.runs) / "table", with_plot=not a.no_plot)
    print(to_markdown(table, full=False).rstrip())
    print(f"\nwrote {', '.join(str(f) for f in files.values())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
