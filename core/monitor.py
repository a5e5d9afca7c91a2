"""Run output shared by every task: `metrics.jsonl`, TensorBoard events, a progress bar, `results.json`.

Only the main process writes; on other ranks every method is a no-op.
"""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from tqdm import tqdm

REPO = Path(__file__).resolve().parents[1]


def git_commit() -> str:
    """`<sha>` of the suite's checkout, with `-dirty` if it has uncommitted changes; "unknown" outside git."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10
        ).stdout.strip()
        if not sha:
            return "unknown"
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def file_sha256(path: str | os.PathLike, length: int = 16) -> str:
    """Hex prefix of a file's SHA-256 (how results.json identifies the checkpoint a run used)."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:length]


def _clean(v):
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


class RunLogger:
    """Metrics sink for one run folder.

    log(step, **scalars) appends a JSON line and TensorBoard scalars; progress(total) gives a tqdm bar
    (speed and ETA) that `update` advances.

    resume_step: the step a resumed run continues from; lines of later steps (written by the interrupted run
    after its last checkpoint, and about to be redone) are dropped from metrics.jsonl and TensorBoard, so
    each step is logged once.
    """

    def __init__(
        self,
        out_dir: str | os.PathLike,
        enabled: bool = True,
        tensorboard: bool = True,
        resume_step: int | None = None,
    ):
        self.out_dir = Path(out_dir)
        self.enabled = enabled
        self._tb = None
        self._bar = None
        if not enabled:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        path = self.out_dir / "metrics.jsonl"
        if resume_step is not None and path.is_file():
            keep = [line for line in path.read_text().splitlines(keepends=True) if _step_of(line) <= resume_step]
            tmp = path.with_suffix(".jsonl.tmp")
            tmp.write_text("".join(keep))
            os.replace(tmp, path)
        elif resume_step is None and path.is_file():
            path.unlink()  # a fresh run in a folder of an older one
        self._jsonl = open(path, "a", buffering=1)  # noqa: SIM115
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            purge = None if resume_step is None else resume_step + 1
            self._tb = SummaryWriter(log_dir=str(self.out_dir / "tb"), purge_step=purge)

    def log(self, step: int, prefix: str = "", **scalars) -> None:
        if not self.enabled:
            return
        rec = {"step": int(step), "time": round(time.time(), 3)}
        rec.update({k: _clean(v) for k, v in scalars.items()})
        self._jsonl.write(json.dumps(rec) + "\n")
        if self._tb is not None:
            for k, v in rec.items():
                if k not in ("step", "time") and isinstance(v, (int, float)):
                    self._tb.add_scalar(f"{prefix}{k}", v, int(step))

    def progress(self, total: int, initial: int = 0, desc: str = "") -> None:
        if not self.enabled:
            return
        interactive = sys.stderr.isatty()
        self._bar = tqdm(
            total=total,
            initial=initial,
            desc=desc,
            dynamic_ncols=True,
            unit="it",
            mininterval=0.5 if interactive else 30.0,
            smoothing=0.05,
        )

    def update(self, n: int = 1, **postfix) -> None:
        if self._bar is not None:
            if postfix:
                self._bar.set_postfix({k: _fmt(v) for k, v in postfix.items()}, refresh=False)
            self._bar.update(n)

    def write(self, msg: str) -> None:
        """Print a line without breaking the progress bar (main process only)."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(msg)
        else:
            print(msg, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self.enabled and not self._jsonl.closed:
            self._jsonl.close()


def _step_of(line: str) -> float:
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf  # an unreadable (half-written) line is dropped


def _fmt(v):
    v = _clean(v)
    if isinstance(v, float):
        return f"{v:.4g}"
    return v


def write_results(out_dir: str | os.PathLike, task: str, **fields) -> Path:
    """`results.json` in the shape every task shares (read by `tools.table`).

    Always present: task, git_commit, host, finished_at; the caller adds model, dataset, checkpoint,
    metrics and anything task-specific.
    """
    rec = {
        "task": task,
        **fields,
        "git_commit": git_commit(),
        "host": platform.node(),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    path = Path(out_dir) / "results.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(rec, indent=2, default=str) + "\n")
    os.replace(tmp, path)
    return path
