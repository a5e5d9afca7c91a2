"""`python -m tools.table`: collect, build, write every format, print the Markdown table."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from core.config import ConfigError, check_output_folder
from tools.table.render import to_markdown, write_all
from tools.table.rows import make_table


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m tools.table",
        description="The paper's main results table, built from every results.json under a runs folder.",
    )
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
    out = a.out or Path(a.runs) / "table"
    try:
        check_output_folder("--out", out)  # before any work: a file on the way is one line, not a traceback
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        table = make_table(a.runs, a.labels, duplicates=a.duplicates, ours_only=a.ours_only)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for w in table.warnings:
        print(f"warning: {w}", file=sys.stderr)
    files = write_all(table, out, with_plot=not a.no_plot)
    print(to_markdown(table, full=False).rstrip())
    print(f"\nwrote {', '.join(str(f) for f in files.values())}")
    return 0
