"""One line: a downstream score from pretrained weights beside the same recipe from random initialisation.

    python -m tools.compare runs/finetune-tiny runs/finetune-tiny-random [--metric top1]

Both arguments are run folders (or their results.json) of the same task and recipe; the first started from a
checkpoint, the second from none. `make demo` ends with it, so the demo says plainly whether pretraining paid
at its size.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from core import errors
from core.config import ConfigError

SIGNIFICANT = 1.0  # points: below this difference the two are called even (one seed each)


def read(path: str | Path) -> dict:
    path = Path(path)
    file = path / "results.json" if path.is_dir() else path
    try:
        record = json.loads(file.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"{file}: not a readable results.json ({e})") from None
    if not isinstance(record.get("metrics"), dict):
        raise ConfigError(f"{file}: no 'metrics' object (not a results.json of this suite)")
    return record


def verdict(pretrained: dict, random_init: dict, metric: str) -> str:
    for name, r in (("pretrained", pretrained), ("random-init", random_init)):
        if not isinstance(r["metrics"].get(metric), (int, float)):
            raise ConfigError(f"the {name} run has no metric {metric!r}; it has {sorted(r['metrics'])}")
    if random_init.get("checkpoint"):
        raise ConfigError(f"the second run started from {random_init['checkpoint']}, not from random initialisation")
    a, b = pretrained["metrics"][metric], random_init["metrics"][metric]
    head = (
        f"{pretrained.get('task')} {metric}: from {Path(str(pretrained.get('checkpoint'))).name} {a:.2f} vs random "
        f"init {b:.2f} ({a - b:+.2f})"
    )
    if a - b >= SIGNIFICANT:
        return f"{head}: pretraining pays at this size."
    if b - a >= SIGNIFICANT:
        return f"{head}: at this size pretraining does not pay; `make study` shows where dBOT beats random init."
    return f"{head}: even at this size; `make study` shows where dBOT beats random init."


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m tools.compare", description=__doc__.split("\n\n")[0])
    p.add_argument("pretrained", help="run folder (or results.json) of the run that started from a checkpoint")
    p.add_argument("random_init", help="run folder (or results.json) of the same recipe from random init")
    p.add_argument("--metric", default="top1", help="key of results.json's metrics (default top1)")
    a = p.parse_args(argv)
    print(verdict(read(a.pretrained), read(a.random_init), a.metric))


if __name__ == "__main__":  # a user error: one line `error: ...`, exit 2, as every entry point
    sys.exit(errors.main(main))
