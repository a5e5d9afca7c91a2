"""Checkpoint I/O shared by every task.

- `save`: atomic (temporary file in the same folder, fsync, rename), so a killed run never leaves a
  half-written checkpoint under the real name.
- `load`: never executes pickled code: `.safetensors` through safetensors, everything else through
  `torch.load(weights_only=True)` with only the harmless extra types published checkpoints carry
  (`argparse.Namespace` in MAE's and dBOT's files) allowed.
- `state_dict_of`: the weights inside the containers in circulation (`{'model': ...}` from MAE/dBOT,
  `{'state_dict': ...}` from OpenMMLab, plain state dicts from timm), `module.` prefixes removed.
- `load_weights`: copy a state dict into a model with a full report (missing, unexpected, reshaped,
  dropped) and a clear error for shapes that cannot be adapted.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import os
import pickle
import re
import tempfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from core.errors import CheckpointError, one_line

# Non-tensor types found in published checkpoints that are safe to rebuild.
SAFE_GLOBALS = [argparse.Namespace]


def save(obj, path: str | os.PathLike) -> Path:
    """torch.save `obj` to `path` atomically. A write that fails (a full disk, a folder without write
    permission) is a CheckpointError naming the path and the cause, and leaves no temporary file."""
    path = Path(path)
    if path.parent.exists() and not path.parent.is_dir():
        raise CheckpointError(f"{path}: cannot write the checkpoint: {path.parent} is a file, not a folder")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot write the checkpoint: {_cause(e)}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        cause = _os_error(e)
        if cause is not None:  # torch reports a failed write as "unexpected pos ..." with the OSError as context
            raise CheckpointError(f"{path}: cannot write the checkpoint: {_cause(cause)}") from e
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return path


def _os_error(e: BaseException | None) -> OSError | None:
    """The OSError behind `e` (itself, or along its cause / context chain), if any."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, OSError):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


def _cause(e: OSError) -> str:
    what = e.strerror or str(e)
    hint = {
        errno.ENOSPC: "the disk is full: free space or write elsewhere (out=...)",
        errno.EDQUOT: "the disk quota is exhausted: free space or write elsewhere (out=...)",
        errno.EACCES: "no permission to write there: choose another folder (out=...)",
        errno.EPERM: "no permission to write there: choose another folder (out=...)",
        errno.EROFS: "the file system is read-only: choose another folder (out=...)",
        errno.EFBIG: "the file exceeds the size limit of the file system or the process",
    }.get(e.errno)
    name = errno.errorcode.get(e.errno, "") if e.errno is not None else ""
    return f"{what}" + (f" [{name}]" if name else "") + (f"; {hint}" if hint else "")


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporary files `save` leaves when a process is killed mid-write (`.<name>.*.tmp`; at ViT-L
    scale each is gigabytes). Call at the start of a run, before it writes checkpoints of its own."""
    folder = Path(folder)
    removed = []
    if folder.is_dir():
        for tmp in folder.glob(".checkpoint*.tmp"):
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
                removed.append(tmp)
    return removed


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


NOT_A_CHECKPOINT = "expected a file written by torch.save (.pth/.pt/.bin) or a .safetensors file"


def sniff(path: str | os.PathLike) -> tuple[str | None, str]:
    """(format, description) of a file from its first bytes: "torch" (torch.save's zip), "torch-legacy"
    (torch.save's pickle format), "safetensors", or None with what the file looks like instead."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(64)
    if size == 0:
        return None, "an empty file (0 bytes)"
    if head.startswith(b"PK\x03\x04"):
        return "torch", "a torch.save zip file"
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return "torch-legacy", "a pickle file"
    if len(head) > 8 and 0 < int.from_bytes(head[:8], "little") <= size - 8 and head[8:9] == b"{":
        return "safetensors", "a safetensors file"
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return None, f"{size} bytes of an unknown format, starting with {head[:8].hex(' ')}"
    shown = " ".join(text.split())[:40]
    return None, f"a text file ({size} bytes, starting with {shown!r})"


def load(path: str | os.PathLike, map_location="cpu"):
    """Read a torch.save file (`.pth`/`.pt`/`.bin`, any name) or a safetensors file without executing pickled
    code; the format is told by the file's first bytes. Anything else (an empty file, a text file) is a
    CheckpointError saying it is not a checkpoint."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path}: is a folder, not a checkpoint; {NOT_A_CHECKPOINT}")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        kind, what = sniff(path)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot be read ({e.strerror or e})") from None
    if kind is None:
        raise CheckpointError(f"{path}: not a checkpoint: {what}; {NOT_A_CHECKPOINT}")
    if kind == "safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device=str(map_location))
        except Exception as e:  # noqa: BLE001 - any decode failure is reported with the path
            raise CheckpointError(f"{path}: a damaged or truncated safetensors file ({one_line(e)})") from None
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        if found is None and "weights only" not in str(e).lower():
            raise CheckpointError(f"{path}: {what} that cannot be unpickled ({_first_sentence(e)})") from None
        objects = f" ({found.group(1)})" if found else ""
        raise CheckpointError(
            f"{path}: holds objects that cannot be loaded with weights_only=True{objects}. Only tensors, plain "
            "containers and argparse.Namespace are accepted; re-save the weights (e.g. as safetensors) if the "
            "file holds other objects."
        ) from None
    except Exception as e:  # noqa: BLE001 - a damaged zip, a truncated pickle, ...
        raise CheckpointError(
            f"{path}: {what} that is damaged or truncated ({type(e).__name__}: {_first_sentence(e)})"
        ) from None


def _first_sentence(e: BaseException) -> str:
    text = one_line(e)
    return (text.split(". ")[0] if ". " in text else text)[:200] or "no detail"


def resume_path(out_dir: str | os.PathLike, resume: str | None) -> Path | None:
    """The checkpoint a run continues from: `auto` = `<out>/checkpoint-last.pth` if it exists, `none`/None =
    start fresh, anything else = that file (which must exist)."""
    if resume in (None, "none"):
        return None
    if resume == "auto":
        last = Path(out_dir) / "checkpoint-last.pth"
        return last if last.is_file() else None
    path = Path(resume)
    if not path.is_file():
        raise CheckpointError(f"resume: checkpoint {path} does not exist")
    return path


# Options that may differ between a run and its resumption: where things are and how this invocation runs,
# not what is computed (a prefix ending in "." covers a whole section).
RESUME_FREE = (
    "out", "resume", "device", "amp", "compile", "max_epochs", "max_iters", "checkpoint", "log.", "eval.",
    "nonfinite", "nonfinite_max_skips",
    "data.root", "data.workers", "data.skip_corrupt", "data.eval_batch_per_gpu", "model.grad_checkpointing",
)  # fmt: skip


def _flatten(d: Mapping, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_changes(saved: Mapping, current: Mapping, free: Iterable[str] = RESUME_FREE) -> list[str]:
    """`key: saved -> current` for every option that differs, except those in `free` (names, or prefixes
    ending in ".")."""
    a, b = _flatten(saved), _flatten(current)

    def is_free(k: str) -> bool:
        return any(k == f or (f.endswith(".") and k.startswith(f)) for f in free)

    return [
        f"{k}: {a.get(k, '<absent>')} -> {b.get(k, '<absent>')}"
        for k in sorted(set(a) | set(b))
        if a.get(k, "<absent>") != b.get(k, "<absent>") and not is_free(k)
    ]


def check_same_config(path, saved: Mapping | None, current: Mapping) -> None:
    """A resumed run continues the saved one exactly, so what it computes must be configured the same."""
    changes = config_changes(saved, current) if saved is not None else []
    if changes:
        raise CheckpointError(
            f"{path}: saved by a run configured differently ({'; '.join(changes[:6])}"
            + (f"; +{len(changes) - 6} more" if len(changes) > 6 else "")
            + "); a resumed run must match the one it continues: use another out folder, or resume=none"
        )


def load_resume(out_dir: str | os.PathLike, resume: str | None, fmt: str, config: Mapping | None = None):
    """(path, state) of the checkpoint a run continues from (None, None for a fresh run); the state must have
    been written by the same task (`meta.format == fmt`) and, when `config` is given, with the same settings
    (`check_same_config`)."""
    path = resume_path(out_dir, resume)
    if path is None:
        return None, None
    state = load(path)
    found = state.get("meta", {}).get("format") if isinstance(state, dict) else None
    if found != fmt:
        raise CheckpointError(
            f"{path}: written by {found or 'something else'}, not by this task ({fmt}); use another "
            "out folder or resume=none"
        )
    if config is not None:
        check_same_config(path, state.get("config"), config)
    return path, state


STATE_KEYS = ("model", "state_dict", "module", "model_ema", "teacher")


def state_dict_of(obj, path: str | os.PathLike = "<checkpoint>", key: str | None = None) -> dict:
    """The weights in a loaded checkpoint object, with DDP `module.` prefixes stripped.

    key: take this entry (e.g. "teacher"); otherwise the first of `STATE_KEYS` present, or `obj` itself
    if it already maps names to tensors.
    """
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: expected a dict of weights, found {type(obj).__name__}")
    if key is not None:
        if key not in obj:
            raise CheckpointError(f"{path}: no entry {key!r}; top-level keys: {sorted(obj)[:20]}")
        sd = obj[key]
    elif obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        sd = obj
    else:
        found = [k for k in STATE_KEYS if isinstance(obj.get(k), Mapping)]
        if not found:
            raise CheckpointError(
                f"{path}: no weights found; expected a state dict or one of the keys {list(STATE_KEYS)}, "
                f"found top-level keys {sorted(map(str, obj))[:20]}"
            )
        sd = obj[found[0]]
    out = {}
    for k, v in sd.items():
        if not isinstance(v, torch.Tensor):
            continue
        while k.startswith("module."):
            k = k[len("module.") :]
        out[k] = v
    if not out:
        raise CheckpointError(f"{path}: the weights entry holds no tensors")
    return out


def read_state_dict(path: str | os.PathLike, key: str | None = None) -> dict:
    return state_dict_of(load(path), path, key)


@dataclass
class LoadReport:
    """What happened when weights were copied into a model."""

    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    adapted: dict[str, str] = field(default_factory=dict)  # name -> "old shape -> new shape"

    def summary(self) -> str:
        lines = [f"loaded {len(self.loaded)} tensors"]
        if self.adapted:
            lines.append("adapted: " + "; ".join(f"{k} {v}" for k, v in self.adapted.items()))
        if self.missing:
            lines.append(f"missing ({len(self.missing)}): {_abbrev(self.missing)}")
        if self.unexpected:
            lines.append(f"unexpected/dropped ({len(self.unexpected)}): {_abbrev(self.unexpected)}")
        return "\n".join(lines)


def _abbrev(names: list[str], n: int = 12) -> str:
    return ", ".join(names[:n]) + (f", ... (+{len(names) - n})" if len(names) > n else "")


Adapter = Callable[[str, torch.Tensor, torch.Tensor], "torch.Tensor | None"]


def load_weights(
    model: nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    *,
    source: str = "<state dict>",
    adapters: Iterable[Adapter] = (),
    allow_missing: Callable[[str], bool] = lambda name: False,
    ignore: Callable[[str], bool] = lambda name: False,
    strict: bool = True,
) -> LoadReport:
    """Copy `state_dict` into `model` and report.

    adapters: functions `(name, tensor, target) -> tensor or None` tried in order for a shape mismatch
    (e.g. position-embedding resizing); the first that returns a tensor of the target's shape wins.
    allow_missing: model keys that may stay at their initial value (new heads, relative-position tables).
    ignore: checkpoint keys dropped silently (decoders, mask tokens, heads).
    strict: raise CheckpointError if keys are missing (beyond `allow_missing`) or unexpected (beyond
    `ignore`). A shape no adapter can fix is always an error.
    """
    own = model.state_dict()
    report = LoadReport()
    new_sd = {}
    problems = []
    for name, tensor in state_dict.items():
        if name not in own:
            if not ignore(name):
                report.unexpected.append(name)
            continue
        target = own[name]
        if tensor.shape != target.shape:
            fixed = None
            for adapt in adapters:
                fixed = adapt(name, tensor, target)
                if fixed is not None and fixed.shape == target.shape:
                    break
                fixed = None
            if fixed is None:
                problems.append(f"{name}: checkpoint {tuple(tensor.shape)} vs model {tuple(target.shape)}")
                continue
            report.adapted[name] = f"{tuple(tensor.shape)} -> {tuple(target.shape)}"
            tensor = fixed
        new_sd[name] = tensor.to(target.dtype)
        report.loaded.append(name)
    if problems:
        raise CheckpointError(
            f"{source}: {len(problems)} tensor(s) do not fit the model (is it the right model size?): "
            + "; ".join(problems[:6])
            + (" ..." if len(problems) > 6 else "")
        )
    report.missing = [k for k in own if k not in new_sd and not allow_missing(k)]
    if strict and (report.missing or report.unexpected):
        raise CheckpointError(f"{source}: does not match the model.\n{report.summary()}")
    model.load_state_dict(new_sd, strict=False)
    return report
