"""From runs to rows: each downstream run's row (student / teacher setting) and its cells, with provenance.

A run's row is the `pretraining` setting its results.json records. Runs without one (older results, or one
recorded as unknown) have it read from their checkpoint when this suite made it (`pretrain.setting.read_setting`:
the checkpoint's records, or for a file written before them its saved config); checkpoints made
elsewhere (the authors' or MAE's released files) take their row from `--labels` or a `label` in results.json.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from core.monitor import file_sha256
from core.weights import is_unknown
from tools.table.labels import Setting, label_from_results, load_labels, setting_row, setting_text, vit_name
from tools.table.labels import presets as _presets
from tools.table.published import PUBLISHED, Published, load_published
from tools.table.records import (
    CLASSIFICATION_TASKS,
    METRICS,
    PRETRAIN_TASK,
    Metric,
    Run,
    collect,
    metric_value,
    metrics_of,
)


@dataclass
class Origin:
    """Where a run's setting came from (for the provenance)."""

    setting: Setting
    how: str
    pretrain_folder: Path | None = None
    pretrain_commit: str | None = None
    size: str | None = None  # the pretraining model size, when the row came from a pretraining setting


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


class Resolver:
    """Finds the setting (row) of a downstream run."""

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
        o = self._origin(run)
        suffix = self.resolution_suffix(run, o.size) if o.size else ""
        if suffix:
            s = o.setting
            o = Origin(
                Setting(s.student + suffix, s.teacher, s.asym), o.how, o.pretrain_folder, o.pretrain_commit, o.size
            )
        return o

    def _origin(self, run: Run) -> Origin:
        model = run.data.get("model")
        own = label_from_results(run.data, model)
        if own is not None:
            return Origin(own, "label in results.json")
        written, sha = run.data.get("checkpoint"), run.data.get("checkpoint_sha256")
        if not written:
            return Origin(Setting(vit_name(model), "none (random init)", None), "no checkpoint: trained from scratch")
        found = self.locate(str(written), run, sha if isinstance(sha, str) else None)
        recorded = run.data.get("pretraining")
        if isinstance(recorded, dict) and not is_unknown(recorded):
            return self.from_setting(recorded, "results.json", found)
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
        setting = self.read_setting(found)
        if is_unknown(setting):
            return Origin(
                Setting(vit_name(model), "?", None),
                f"checkpoint {found}: {setting['unknown']}, and no saved config to read it from: add it "
                f"(path or sha256 {sha}) to a --labels file",
            )
        if setting is not None:
            return self.from_setting(setting, f"read from {found.name}", found)
        return Origin(
            Setting(vit_name(model), "?", None),
            f"checkpoint {found} records no pretraining setting (not made by this suite's pretraining): add it "
            f"(path or sha256 {sha}) to a --labels file",
        )

    def read_setting(self, path: Path) -> dict | None:
        from core import checkpoint as ckpt
        from pretrain.setting import read_setting

        try:
            return read_setting(path)
        except ckpt.CheckpointError as e:
            self.warnings.append(f"{path}: {e}")
            return None

    def from_setting(self, setting: dict, where: str, found: Path | None) -> Origin:
        producer = self.by_folder.get(found.parent.resolve()) if found is not None else None
        folder = found.parent if producer is not None and producer.task == PRETRAIN_TASK else None
        how = f"pretraining setting ({where}): {setting_text(setting)}" + (f" of {folder}" if folder else "")
        commit = producer.data.get("git_commit") if folder else None
        return Origin(setting_row(setting), how, folder, commit, (setting.get("student") or {}).get("size"))

    def resolution_suffix(self, run: Run, size: str | None) -> str:
        """ " @448" when a classification run used another resolution than the pretraining preset."""
        if run.task not in CLASSIFICATION_TASKS:
            return ""
        img = run.data.get("img_size")
        if img is None:
            img = ((run_config(run) or {}).get("model") or {}).get("img_size")
        base = _presets().get(size, {}).get("img_size")
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
    from tools.table.render import fmt

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
        values = [(m, metric_value(run, m, warnings)) for m in mets]
        values = [(m, v) for m, v in values if v is not None]
        if not values:
            warnings.append(
                f"{run.path}: task {run.task} but none of metrics.{', metrics.'.join(sorted({m.field for m in mets}))}"
                "; skipped"
            )
            continue
        origin = resolver.origin(run)
        sha, written = run.data.get("checkpoint_sha256"), run.data.get("checkpoint")
        if sha is None and written:
            found = resolver.locate(str(written), run, None)
            sha = resolver.sha(found) if found else None
        row = rows.setdefault(origin.setting.key, Row(origin.setting))
        for m, v in values:
            if m not in METRICS:
                extra.setdefault(m.key, m)
            row.cells.setdefault(m.key, []).append(
                Cell(v, run, m.key, str(written) if written else None, sha, origin, m.field)
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
