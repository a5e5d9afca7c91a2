"""Collecting `results.json` files and reading their metrics: one contract, written the same way by every task.

    {"task": "pretrain|finetune|linprobe|transfer|coco|ade20k", "model": size, "dataset": str,
     "checkpoint": path|null, "checkpoint_sha256": str|null, "pretraining": setting|null,
     "metrics": {flat name -> number}, "eval_images": int, "checkpoints": {name -> path}, "config": path,
     "git_commit", "host", "finished_at", ...task-specific extras}

`pretraining` is `core.weights.pretraining_setting` of the run's checkpoint. Values are percent.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

PRETRAIN_TASK = "pretrain"
CLASSIFICATION_TASKS = ("finetune", "linprobe", "transfer")
KNOWN_TASKS = (PRETRAIN_TASK, *CLASSIFICATION_TASKS, "coco", "ade20k")


@dataclass(frozen=True)
class Metric:
    """A column: `field` of `metrics` in the results of `tasks`."""

    key: str
    title: str
    tasks: tuple[str, ...]
    field: str
    short: str = ""


METRICS: tuple[Metric, ...] = (
    Metric("in1k", "IN-1K top-1", ("finetune",), "top1", short="IN-1K"),
    Metric("box_ap", "COCO box AP", ("coco",), "bbox_AP", short="box AP"),
    Metric("mask_ap", "COCO mask AP", ("coco",), "segm_AP", short="mask AP"),
    Metric("miou", "ADE20K mIoU", ("ade20k",), "mIoU", short="ADE mIoU"),
)
# Columns shown only when some run fills them (no published number in a row).
LINPROBE = Metric("linprobe", "IN-1K linear probe", ("linprobe",), "top1", short="lin. probe")


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
        if task != PRETRAIN_TASK and not isinstance(data.get("metrics"), dict):
            warnings.append(f"{path}: no 'metrics' object (the results.json contract); skipped")
            continue
        runs.append(Run(path, data))
    return runs, warnings


def metrics_of(run: Run) -> list[Metric]:
    """The columns a run fills (transfer: one per dataset kind, from `dataset` "kind:root")."""
    if run.task == "linprobe":
        return [LINPROBE]
    if run.task == "transfer":
        kind = str(run.data.get("dataset", "transfer")).split(":")[0] or "transfer"
        return [Metric(f"transfer:{kind}", f"{kind} transfer top-1", ("transfer",), "top1", short=kind)]
    return [m for m in METRICS if run.task in m.tasks]


def metric_value(run: Run, metric: Metric, warnings: list[str]) -> float | None:
    """`metrics[metric.field]` as a finite float; None (with a warning for a bad value) otherwise."""
    v = run.data["metrics"].get(metric.field)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        try:
            v = float(v)
        except (TypeError, ValueError):
            warnings.append(f"{run.path}: metrics.{metric.field} = {v!r} is not a number; cell left empty")
            return None
    if not math.isfinite(v):
        warnings.append(f"{run.path}: metrics.{metric.field} = {v}; cell left empty")
        return None
    return float(v)
