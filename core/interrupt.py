"""Clean stops on SIGTERM and SIGINT, for every entry point and the processes it starts.

SIGTERM is what `kill PID`, a scheduler's time limit or a job preemption sends; SIGINT is Ctrl-C. Every
entry point runs its body under `handlers()` (through `core.errors.main`), which replaces Python's default
actions (death without cleanup for SIGTERM, a KeyboardInterrupt traceback for SIGINT) with one rule:

- Outside a training loop the signal raises `Interrupted` at once; `core.errors.main` prints one line
  `stopped by SIGTERM: ...` and exits with the conventional status 128 + signal (143, 130).
- Inside a training loop (`hold()` ... `release()`, `core.trainer`) the signal is a request: the loop
  finishes its step and its events, writes checkpoint-last (every rank, agreed with the step's all-reduce)
  and raises `Interrupted`; the same command resumes. A second signal while a request is pending raises at
  once (from the last checkpoint), unless it follows the first within `REPEAT_S` seconds: a launcher
  forwarding the signal its group received too (torchrun after Ctrl-C or a scheduler's SIGTERM to the job).
- Processes the suite starts itself (`run_in_processes`: the study's per-seed jobs) each lead their own
  process group (their loader workers are in it). A signal here is forwarded to each child's main process,
  which stops cleanly as above; `GRACE_S` seconds later whatever is left of their groups is killed.
- DataLoader workers (`worker_init`) ignore SIGINT (Ctrl-C reaches the whole foreground group, and a
  worker that died of it would break its parent's clean stop). A SIGTERM sent to every process of a job (a
  scheduler's time limit or preemption: `kill -TERM -PGID`) is ignored by a worker whose parent received a
  signal too (the parent's C-level handler writes it to a pipe the forked workers can poll without reading,
  `signal.set_wakeup_fd`): the parent finishes its step with them, then ends them. A SIGTERM that the parent
  did not receive (the parent ending its workers at exit) ends the worker, as torch's own handler does.
"""

from __future__ import annotations

import os
import select
import signal
import sys
import threading
import time
from contextlib import contextmanager, suppress

SIGNALS = (signal.SIGTERM, signal.SIGINT)
GRACE_S = 10.0  # a child's time to write its checkpoint and exit before its process group is killed

REPEAT_S = 2.0  # a second signal sooner than this after the first is the same request
_pending: int | None = None  # the first signal received, not yet acted on
_pending_at = 0.0
_hold = 0  # > 0: inside a training loop, a signal is a request
_wake: tuple[int, int] | None = None  # (read, write) ends of the pipe the C-level handler writes signals to
WORKER_WAIT_S = 0.3  # how long a loader worker given SIGTERM looks for its parent's signal before it exits


class Interrupted(BaseException):
    """The process was asked to stop by `signum`. A BaseException (as KeyboardInterrupt): no `except
    Exception` on the way up swallows it."""

    def __init__(self, signum: int, message: str | None = None):
        self.signum = int(signum)
        super().__init__(message or f"stopped by {name(signum)}")

    @property
    def exit_status(self) -> int:
        return 128 + self.signum


def name(signum: int) -> str:
    return signal.Signals(signum).name


def requested() -> int | None:
    """The signal received and not acted on yet (None: none)."""
    return _pending


def _handler(signum, frame) -> None:
    global _pending, _pending_at
    first = _pending is None
    if first:
        _pending, _pending_at = signum, time.monotonic()
    if _hold > 0 and (first or time.monotonic() - _pending_at < REPEAT_S):
        return  # the training loop stops at the end of the step
    raise Interrupted(signum)


@contextmanager
def handlers():
    """SIGTERM / SIGINT handled as the module doc says, for the duration (the previous handlers restored;
    nothing happens outside the main thread, where signals cannot be handled)."""
    global _pending
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    global _wake
    if _wake is None:
        _wake = os.pipe()
        for fd in _wake:
            os.set_blocking(fd, False)
    _drain()
    previous = {s: signal.signal(s, _handler) for s in SIGNALS}
    previous_fd = signal.set_wakeup_fd(_wake[1], warn_on_full_buffer=False)
    _pending = None
    try:
        yield
    finally:
        signal.set_wakeup_fd(previous_fd)
        for s, h in previous.items():
            signal.signal(s, h)
        _drain()  # the workers still alive at exit then end on their parent's SIGTERM
        _pending = None


def _drain() -> None:
    with suppress(OSError):
        while os.read(_wake[0], 4096):
            pass


def hold() -> None:
    """From here a signal is a request the training loop acts on at the end of a step (see `release`)."""
    global _hold
    _hold += 1


def release(check: bool = True) -> None:
    """End a `hold`. A request still pending (it came after the loop's last check) stops the process here,
    unless `check` is False (the loop is already leaving by an exception)."""
    global _hold
    _hold = max(_hold - 1, 0)
    if check and _hold == 0 and _pending is not None:
        raise Interrupted(_pending)


def worker_init(worker_id: int | None = None) -> None:
    """`worker_init_fn` of the suite's DataLoaders: the worker ignores SIGINT, and SIGTERM while its parent
    stops on a signal of its own (module doc)."""
    signal.set_wakeup_fd(-1)  # inherited from the parent: the worker's own signals must not look like its parent's
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _worker_sigterm)


def _worker_sigterm(signum, frame) -> None:
    if _wake is not None and select.select([_wake[0]], [], [], WORKER_WAIT_S)[0]:
        return  # the parent got a signal as well (the whole job was signalled): it ends us after its step
    os._exit(0)


# ------------------------------------------------------------------------------------------- children
def _child(fn, args: tuple, conn) -> None:
    """Body of a process started by `run_in_processes`: its own process group, the suite's handlers, the
    outcome sent back (an exception that does not pickle as its one-line text)."""
    with suppress(OSError):
        os.setpgid(0, 0)
    outcome = ("ok", None)
    status = 0
    with handlers():
        try:
            outcome = ("ok", fn(*args))
        except Interrupted as e:
            print(f"[pid {os.getpid()}] {e}", file=sys.stderr, flush=True)
            outcome, status = ("interrupted", e.signum), e.exit_status
        except BaseException as e:  # noqa: BLE001 - sent to the parent, which re-raises it
            import pickle

            try:
                pickle.dumps(e)
                outcome = ("error", e)
            except Exception:  # noqa: BLE001
                outcome = ("error", RuntimeError(f"{type(e).__name__}: {e}"))
            status = 1
    try:
        conn.send(outcome)
    finally:
        conn.close()
    if status:
        sys.exit(status)  # multiprocessing's own exit path: its finalizers, daemonic loader workers ended


def _kill_group(pid: int, sig: int) -> None:
    with suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


def stop_children(procs, signum: int, grace: float = GRACE_S) -> None:
    """Forward `signum` to each child's main process, wait up to `grace` seconds for them to exit, then kill
    what is left of each child's process group (its loader workers included)."""
    for p in procs:
        if p.is_alive():
            with suppress(ProcessLookupError):
                os.kill(p.pid, signum)
    deadline = time.monotonic() + grace
    for p in procs:
        p.join(max(deadline - time.monotonic(), 0.0))
    for p in procs:
        _kill_group(p.pid, signal.SIGKILL)
        if p.is_alive():
            p.kill()
        p.join(2.0)


def run_in_processes(fn, calls: list[tuple], jobs: int, grace: float = GRACE_S) -> list:
    """`fn(*args)` for every `args` of `calls`, at most `jobs` at a time, each in a spawned process that
    leads its own process group; the results in order. A child's exception is re-raised here once every
    child has ended (the first one in call order). SIGTERM / SIGINT (or any exception) here stops the
    running children (`stop_children`) before it propagates; a child stopped by a signal is `Interrupted`."""
    import multiprocessing
    from multiprocessing.connection import wait

    ctx = multiprocessing.get_context("spawn")
    results: dict[int, tuple] = {}
    running: dict[int, tuple] = {}  # index -> (process, connection)
    queue = list(range(len(calls)))
    try:
        while queue or running:
            while queue and len(running) < jobs:
                i = queue.pop(0)
                recv, send = ctx.Pipe(duplex=False)
                p = ctx.Process(target=_child, args=(fn, calls[i], send), name=f"job-{i}")
                p.start()
                send.close()
                with suppress(OSError):  # also here, so no signal finds it in our group (EACCES once it ran)
                    os.setpgid(p.pid, p.pid)
                running[i] = (p, recv)
            wait([p.sentinel for p, _ in running.values()], timeout=1.0)
            for i, (p, recv) in list(running.items()):
                if p.is_alive():
                    continue
                try:
                    results[i] = recv.recv() if recv.poll() else ("error", RuntimeError(f"exit status {p.exitcode}"))
                except (EOFError, OSError):
                    results[i] = ("error", RuntimeError(f"job {i} ended with exit status {p.exitcode}"))
                recv.close()
                _kill_group(p.pid, signal.SIGKILL)  # anything it left behind
                del running[i]
                if results[i][0] == "interrupted":  # stopped by a signal that did not come from us
                    raise Interrupted(results[i][1])
    except BaseException as e:
        signum = e.signum if isinstance(e, Interrupted) else signal.SIGTERM
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)  # a second Ctrl-C cannot cut this short
        try:
            stop_children([p for p, _ in running.values()], signum, grace)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        if isinstance(e, Interrupted):
            raise Interrupted(signum, f"stopped by {name(signum)}: {len(running)} child process(es) stopped") from None
        raise
    for i in range(len(calls)):
        if results[i][0] == "error":
            raise results[i][1]
    return [results[i][1] for i in range(len(calls))]
