"""The suite's own error types and how an entry point reports them.

A user's mistake (an option, a dataset, a checkpoint) is one of three errors, each a `UserError` whose
message names the option or the file and what was expected:

- `ConfigError` (`core.config`): an option's type, range or combination with another option;
- `DataError` (`core.data`), with `CorruptImageError`: a dataset's layout or a file in it;
- `CheckpointError` (`core.checkpoint`): a checkpoint that cannot be read, written or used.

Every entry point (`python -m pretrain|finetune|detection|segmentation`, the tools) runs through `main`:
a `UserError` is printed as one line `error: <message>` on stderr and the process exits with status 2;
anything else is a bug and keeps its traceback. `--debug` (or the environment variable `DBOT_DEBUG=1`)
shows the traceback of a `UserError` too.

`main` also runs the body under `core.interrupt.handlers()`: SIGTERM / SIGINT stop the process cleanly (a
training loop first writes checkpoint-last; processes the suite started are stopped with it), with one line
`stopped by SIGTERM: ...` and the conventional exit status 128 + signal (143 for SIGTERM, 130 for SIGINT).
A non-finite loss that stops a run (`nonfinite=stop`, or too many consecutive skips) is a `NonFiniteError`,
one line and status 2 as the other user errors.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable, Sequence

from core import interrupt

EXIT_USER_ERROR = 2
DEBUG_ENV = "DBOT_DEBUG"


class UserError(Exception):
    """Base of the errors a user can fix; the message names what is wrong and what was expected."""


class ConfigError(UserError, ValueError):
    """A configuration value or key that cannot be used; the message names the key and the source."""


class DataError(UserError, ValueError):
    """Bad dataset input; the message names the file or folder and what was expected."""


class CorruptImageError(DataError):
    """An image (or label map) that cannot be decoded; `path` is the file."""

    def __init__(self, message: str, path: str | os.PathLike | None = None):
        super().__init__(message)
        self.path = None if path is None else str(path)


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that cannot be read, written or does not fit; the message names the file and the key."""


class NonFiniteError(UserError, FloatingPointError):
    """A training step whose loss is not finite stopped the run before its update (`nonfinite`); the message
    names the step, the epoch and the last good checkpoint."""


_WORKER = re.compile(r"^Caught \w+ in DataLoader worker process \d+\.")


def one_line(error: BaseException) -> str:
    """The message of `error` on one line. An error re-raised by a DataLoader worker carries the worker's
    traceback in its message; its last line holds the original message."""
    text = str(error).strip()
    if _WORKER.match(text):
        last = text.splitlines()[-1]
        text = last.split(": ", 1)[1] if ": " in last else last
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


def debug_requested(argv: Sequence[str] | None = None) -> bool:
    argv = sys.argv[1:] if argv is None else argv
    return "--debug" in argv or os.environ.get(DEBUG_ENV, "") not in ("", "0")


def main(fn: Callable[[], object], argv: Sequence[str] | None = None) -> int:
    """Run an entry point's body: 0 on success, `error: <message>` and 2 for a `UserError` (re-raised with
    its traceback under `--debug` / DBOT_DEBUG=1), `stopped by SIG...: ...` and 128 + signal for a stop by
    SIGTERM / SIGINT. Other exceptions propagate: they are bugs."""
    try:
        with interrupt.handlers():
            fn()
    except interrupt.Interrupted as e:
        if os.environ.get("RANK", "0") == "0":
            print(one_line(e), file=sys.stderr, flush=True)
        return e.exit_status
    except UserError as e:
        if debug_requested(argv):
            raise
        rank = os.environ.get("RANK", "0")
        if rank == "0" or not isinstance(e, ConfigError):  # a config error is the same on every process
            prefix = "" if rank == "0" else f"[rank {rank}] "
            print(f"error: {prefix}{one_line(e)}", file=sys.stderr, flush=True)
        return EXIT_USER_ERROR
    return 0
