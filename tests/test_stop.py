"""Clean stops (core.interrupt): SIGTERM / SIGINT end an entry point's whole process tree within seconds, a
training run first writing checkpoint-last, with one line and status 128 + signal; the same command resumes.
The process trees are found through /proc by session (each command here starts its own session)."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import PRETRAIN_MICRO, REPO

from core import interrupt


# ------------------------------------------------------------------------------------------------ helpers
def session_pids(sid: int) -> set[int]:
    """Live processes (zombies left out) whose session is `sid`."""
    found = set()
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()  # state ppid pgrp session ...
        if fields[0] != "Z" and int(fields[3]) == sid:
            found.add(int(d.name))
    return found


def start(module: str, *args: str, log: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    with open(log, "w") as f:
        return subprocess.Popen(
            [sys.executable, "-m", module, *args], cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip


def wait_for(cond, timeout: float, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if proc.poll() is not None:
            pytest.fail(f"ended early ({proc.returncode}):\n{log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            kill_session(proc.pid)
            pytest.fail(f"timed out waiting:\n{log.read_text()[-3000:]}")
        time.sleep(0.2)


def kill_session(sid: int) -> None:
    for pid in session_pids(sid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def stop_and_check(proc: subprocess.Popen, sig: int, log: Path, group: bool = False) -> str:
    """Send `sig` (to the driver, or to its whole process group as Ctrl-C does); every process of the
    session must be gone 20 s later, and the command must have exited with 128 + sig."""
    tree = session_pids(proc.pid)
    assert len(tree) >= 2, tree  # the command and the processes it started (loader workers, seed jobs)
    (os.killpg if group else os.kill)(proc.pid, sig)
    deadline = time.monotonic() + 20
    while session_pids(proc.pid) and time.monotonic() < deadline:
        proc.poll()
        time.sleep(0.2)
    left = session_pids(proc.pid)
    kill_session(proc.pid)
    assert not left, f"still alive 20 s after {signal.Signals(sig).name}: {left}\n{log.read_text()[-3000:]}"
    assert proc.wait(5) == 128 + sig, log.read_text()[-3000:]
    return log.read_text()


def train_lines(path: Path) -> int:
    if not path.is_file():
        return 0
    return sum('"lr"' in line for line in path.read_text().splitlines())


# ------------------------------------------------------------------------------------------------ module
def test_a_signal_outside_a_loop_raises_at_once_and_inside_one_waits_for_the_step(monkeypatch):
    with pytest.raises(interrupt.Interrupted) as e, interrupt.handlers():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(1)
    assert e.value.exit_status == 143 and str(e.value) == "stopped by SIGTERM"
    with interrupt.handlers():
        interrupt.hold()
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.1)
        assert interrupt.requested() == signal.SIGINT  # a request, nothing raised
        os.kill(os.getpid(), signal.SIGTERM)  # a launcher forwarding it at once: the same request
        time.sleep(0.1)
        with pytest.raises(interrupt.Interrupted) as e:
            interrupt.release()  # not acted on by the loop: stops here
        assert e.value.exit_status == 130
    monkeypatch.setattr(interrupt, "REPEAT_S", 0.0)
    with pytest.raises(interrupt.Interrupted) as e, interrupt.handlers():
        interrupt.hold()
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.1)
            os.kill(os.getpid(), signal.SIGINT)  # pressed again, later: at once
            time.sleep(1)
        finally:
            interrupt.release(check=False)
    assert e.value.exit_status == 130
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored


def test_run_in_processes_returns_in_order_and_re_raises_a_childs_error():
    """Builtins as the jobs: a spawned child then imports nothing but core.interrupt (seconds, not tens)."""
    assert interrupt.run_in_processes(pow, [(2, 2), (3, 2), (4, 2)], jobs=2) == [4, 9, 16]
    with pytest.raises(ValueError, match="invalid literal for int"):
        interrupt.run_in_processes(int, [("7",), ("x",)], jobs=2)


EXIT_WITH_WORKERS = """
import torch
from core import interrupt
from core.data import ShardedSampler, make_loader

class Zeros(torch.utils.data.Dataset):
    def __len__(self):
        return 32

    def __getitem__(self, key):
        return torch.zeros(3)

alive = []
with interrupt.handlers():  # as under core.errors.main: the workers inherit its wakeup fd
    loader = make_loader(Zeros(), ShardedSampler(32, 4), workers=2, device=torch.device("cpu"), drop_last=True)
    alive.append(iter(loader))
    next(alive[0])
print("leaving with persistent workers alive", flush=True)
"""


def test_a_process_exits_with_persistent_loader_workers_alive(tmp_path):
    """Interpreter exit terminates daemonic loader workers with SIGTERM and joins them: the workers'
    handler must let that SIGTERM end them (a worker ignoring it hangs the exit forever)."""
    script = tmp_path / "exit.py"
    script.write_text(EXIT_WITH_WORKERS)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "leaving" in proc.stdout, proc.stderr[-2000:]


# ------------------------------------------------------------------------------------- a task's workers
def test_finetune_with_loader_workers_stops_on_sigterm_and_ctrl_c_and_resumes(tiny_imagenet, tmp_path):
    """SIGTERM to the main process (`kill PID`), then to every process of the job (a scheduler's time limit:
    the loader workers get it too), then Ctrl-C (SIGINT to the foreground group): each time a clean stop at a
    step, checkpoint-last of that step, nothing left alive, and the same command goes on from there."""
    from core import checkpoint as ckpt

    out = tmp_path / "ft"
    args = [
        "-c", "tiny", f"data.root={tiny_imagenet}", f"out={out}", "device=cpu", "data.workers=2",
        "data.batch_per_gpu=8", "data.eval_batch_per_gpu=8", "optim.global_batch=8", "epochs=200",
        "log.every=1", "log.tensorboard=false",
    ]  # fmt: skip
    step = 0
    for k, (sig, group) in enumerate(((signal.SIGTERM, False), (signal.SIGTERM, True), (signal.SIGINT, True))):
        log = tmp_path / f"ft{k}.log"
        proc = start("finetune", *args, log=log)
        wait_for(lambda: train_lines(out / "metrics.jsonl") >= step + 2, 120, proc, log)  # noqa: B023
        text = stop_and_check(proc, sig, log, group=group)
        last = text.strip().splitlines()[-1]
        assert last.startswith(f"stopped by {signal.Signals(sig).name} at step "), text[-2000:]
        assert "checkpoint-last.pth written" in last, text[-2000:]
        assert k == 0 or f"resuming at step {step} of " in text
        stopped = int(last.split("at step ")[1].split()[0])
        assert stopped > step and ckpt.load(out / "checkpoint-last.pth")["step"] == stopped
        step = stopped


# ---------------------------------------------------------------------------------------------- a study
@pytest.mark.slow
def test_study_with_two_parallel_seeds_stops_whole_tree_on_sigterm_and_goes_on(tmp_path):
    from tools.datasets import make_study

    data = make_study(tmp_path / "data", seed=0, pool=16, train_per_class=1, val_per_class=1)
    out = tmp_path / "study"
    pre = [o for o in PRETRAIN_MICRO if not o.startswith(("stages.", "probe.every", "data.workers"))]
    args = [
        "targets", "--data", str(data), "--out", str(out), "--seeds", "0", "1", "--stages", "2", "--epochs", "100",
        "--device", "cpu", "--workers", "1", "--jobs", "2", "--probe-epochs", "2", "--targets", "teacher",
        "--no-finetune", "--", *pre, "probe.every=null",
    ]  # fmt: skip
    runs = [out / "pretrain" / f"teacher-s{s}" / "metrics.jsonl" for s in (0, 1)]
    log = tmp_path / "study.log"
    proc = start("tools.study", *args, log=log)
    wait_for(lambda: all(train_lines(r) >= 2 for r in runs), 180, proc, log)
    text = stop_and_check(proc, signal.SIGTERM, log)
    assert "\nstopped by SIGTERM: 2 child process(es) stopped" in text, text[-2000:]
    steps = []
    for r in runs:
        from core import checkpoint as ckpt

        steps.append(ckpt.load(r.parent / "checkpoint-last.pth")["step"])
        assert steps[-1] >= 2 and not (r.parent / "results.json").exists()
    # started again, each seed's run resumes from its checkpoint-last
    log2 = tmp_path / "study2.log"
    proc = start("tools.study", *args, log=log2)
    wait_for(lambda: log2.read_text().count("resuming at step") >= 2, 180, proc, log2)
    text = stop_and_check(proc, signal.SIGTERM, log2)
    for s in steps:
        assert f"resuming at step {s} of " in text
    assert json.loads((out / "settings.json").read_text())["epochs_per_stage"] == 100
