"""Bad input a hostile user gives: the entry points print one line `error: ...` and exit 2 for the
suite's own errors; paths that are files instead of folders and back; checkpoints that cannot be written (a
read-only folder, a full disk) or are not checkpoints (0 bytes, text); nothing of a failed run left behind."""

import errno
import json
import os
import resource
import shutil
import signal
import subprocess
import sys

import pytest
import torch
from conftest import REPO, detection_config, finetune_config, pretrain_config, segmentation_config

from core import checkpoint as ckpt
from core.config import ConfigError, cli
from core.data import CorruptImageError, DataError
from core.errors import main, one_line

TASKS = ("pretrain", "finetune", "detection", "segmentation")


def python_m(module: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """`python -m module args` as a user runs it (the return code is not checked)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=env, capture_output=True, text=True)


def assert_one_error_line(proc: subprocess.CompletedProcess, *fragments: str) -> str:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-2000:]
    for f in fragments:
        assert f in lines[0], lines[0]
    return lines[0]


# ------------------------------------------------------------------------------------------ entry points
@pytest.mark.parametrize("task", TASKS)
def test_every_task_prints_one_error_line_and_exits_2(task, tmp_path):
    proc = python_m(task, "-c", "tiny", "device=cpu", "optim.global_batch=0", f"out={tmp_path / 'o'}")
    assert_one_error_line(proc, "command line: optim.global_batch=0: expected an integer >= 1")
    assert not (tmp_path / "o").exists()


def test_debug_switch_shows_the_traceback(tmp_path):
    proc = python_m("pretrain", "-c", "tiny", "device=cpu", "--debug", "optim.global_batch=0")  # flags anywhere
    assert proc.returncode != 0 and "Traceback" in proc.stderr and "ConfigError" in proc.stderr
    proc = python_m("pretrain", "-c", "tiny", "optim.global_batch=0", env={"DBOT_DEBUG": "1"})
    assert "Traceback" in proc.stderr


def run_main(capsys, body) -> str:
    """core.errors.main around `body` (what every __main__ does), in process: the one stderr line."""
    assert main(body, argv=[]) == 2
    err = capsys.readouterr().err.strip().splitlines()  # a progress bar may precede it
    assert err[-1].startswith("error: ") and sum("error" in line for line in err) == 1, err
    assert not any("Traceback" in line for line in err), err
    return err[-1]


def test_data_and_checkpoint_errors_are_one_line_too(tiny_imagenet, tmp_path, capsys):
    from finetune.train import run as finetune
    from pretrain.train import run as pretrain

    (tmp_path / "empty").mkdir()
    line = run_main(capsys, lambda: pretrain(pretrain_config(tmp_path / "empty", tmp_path / "o")))
    assert "data.root (train split): folder" in line and "does not exist" in line
    (tmp_path / "notes.txt").write_text("weights: somewhere else\n")
    line = run_main(
        capsys, lambda: finetune(finetune_config(tiny_imagenet, tmp_path / "o", f"checkpoint={tmp_path / 'notes.txt'}"))
    )
    assert "notes.txt: not a checkpoint: a text file" in line
    assert not (tmp_path / "o").exists()
    with pytest.raises(ZeroDivisionError):  # anything else is a bug: it keeps its traceback
        main(lambda: 1 / 0, argv=[])


def test_an_error_raised_in_a_loader_worker_is_reported_by_its_own_message(tiny_imagenet, tmp_path, capsys):
    from pretrain.train import run

    root = tmp_path / "data"
    shutil.copytree(tiny_imagenet, root)
    (root / "train" / "circle" / "circle_00003.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    cfg = pretrain_config(root, tmp_path / "o", "data.workers=1", "stages.epochs=[0,1]")
    line = run_main(capsys, lambda: run(cfg))
    assert "circle_00003.jpg: cannot decode image" in line and "DataLoader worker" not in line
    assert (
        one_line(CorruptImageError("a.jpg: cannot decode image\n(details)", "a.jpg"))
        == "a.jpg: cannot decode image (details)"
    )


def test_bad_command_lines_are_config_errors():
    configs = REPO / "pretrain" / "configs"
    with pytest.raises(ConfigError, match="overrides must look like key=value"):
        cli("pretrain", configs, ["optim.lr", "=3"])
    with pytest.raises(ConfigError, match="no recipe named 'gigantic'"):
        cli("pretrain", configs, ["-c", "gigantic"])


# ----------------------------------------------------------------------------------- files and folders
def test_a_config_built_without_the_schema_is_checked_by_run_before_anything_is_written(tiny_coco, tmp_path):
    from core.config import load_config
    from detection.train import run

    cfg = load_config(
        REPO / "detection" / "configs", "tiny", [f"data.root={tiny_coco}", f"out={tmp_path / 'o'}", "log.every=0"]
    )
    with pytest.raises(ConfigError, match="config: log.every=0: expected an integer >= 1"):
        run(cfg)
    assert not (tmp_path / "o").exists()


def test_paths_that_are_files_instead_of_folders_and_back(tiny_imagenet, tiny_ade20k, tmp_path):
    from finetune.train import run as finetune
    from segmentation.train import run as segmentation

    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    a_folder = tmp_path / "a_folder"
    a_folder.mkdir()
    with pytest.raises(ConfigError, match="data.root=.*a_file: is a file, expected a folder"):
        finetune(finetune_config(a_file, tmp_path / "o"))
    with pytest.raises(ConfigError, match="checkpoint=.*a_folder: is a folder, expected a file"):
        finetune(finetune_config(tiny_imagenet, tmp_path / "o", f"checkpoint={a_folder}"))
    with pytest.raises(ConfigError, match="out=.*a_file: is a file, expected a folder"):
        finetune(finetune_config(tiny_imagenet, a_file))
    with pytest.raises(ConfigError, match="out=.*a_file/run: cannot be created, .*a_file is a file"):
        segmentation(segmentation_config(tiny_ade20k, a_file / "run"))
    with pytest.raises(ConfigError, match="weights=.*nothing.pth: no such file"):
        segmentation(
            segmentation_config(tiny_ade20k, tmp_path / "o", "eval_only=true", f"weights={tmp_path / 'nothing.pth'}")
        )
    with pytest.raises(ConfigError, match="command line: data.root=null: expected a string \\(not null\\)"):
        finetune(finetune_config(tiny_imagenet, tmp_path / "o", "data.root="))
    with pytest.raises(ConfigError, match="data.root='': expected a path"):  # not the current folder
        finetune(finetune_config(tiny_imagenet, tmp_path / "o", "data.root=''"))
    with pytest.raises(ConfigError, match="out='': expected a path"):
        finetune(finetune_config(tiny_imagenet, tmp_path / "o", "out=''"))
    with pytest.raises(ckpt.CheckpointError, match="resume: checkpoint .*gone.pth does not exist"):
        finetune(finetune_config(tiny_imagenet, tmp_path / "o", f"resume={tmp_path / 'gone.pth'}"))
    assert not (tmp_path / "o").exists()


def test_empty_folders_are_named(tmp_path):
    from detection.train import run as detection
    from finetune.train import run as finetune
    from segmentation.train import run as segmentation

    empty = tmp_path / "empty"
    (empty / "train" / "dog").mkdir(parents=True)
    with pytest.raises(DataError, match="class folder .*dog holds no images"):
        finetune(finetune_config(empty, tmp_path / "o"))
    with pytest.raises(DataError, match="train2017 does not exist \\(expected the COCO 2017 layout\\)"):
        detection(detection_config(empty, tmp_path / "o"))
    (empty / "images" / "validation").mkdir(parents=True)
    (empty / "annotations" / "validation").mkdir(parents=True)
    with pytest.raises(DataError, match="images/validation holds no images"):
        segmentation(segmentation_config(empty, tmp_path / "o", "data.num_classes=8"))
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------------------ checkpoints
@pytest.mark.parametrize(
    ("content", "what"),
    [
        (b"", "an empty file \\(0 bytes\\)"),
        (b"loss: 0.5\nstep: 10\n", "a text file \\(19 bytes, starting with 'loss: 0.5 step: 10'\\)"),
        (bytes(range(200, 256)), "56 bytes of an unknown format, starting with c8 c9 ca cb cc cd ce cf"),
    ],
)
def test_files_that_are_not_checkpoints_say_so(tmp_path, content, what):
    path = tmp_path / "c.pth"
    path.write_bytes(content)
    with pytest.raises(
        ckpt.CheckpointError, match=f"c.pth: not a checkpoint: {what}; expected a file written by torch.save"
    ):
        ckpt.load(path)
    with pytest.raises(ckpt.CheckpointError, match="is a folder, not a checkpoint"):
        ckpt.load(tmp_path)


def test_damaged_checkpoints_say_so(tmp_path):
    good = ckpt.save({"w": torch.ones(100)}, tmp_path / "good.pth")
    (tmp_path / "cut.pth").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ckpt.CheckpointError, match="cut.pth: a torch.save zip file that is damaged or truncated"):
        ckpt.load(tmp_path / "cut.pth")
    from safetensors.torch import save_file

    save_file({"w": torch.ones(100)}, tmp_path / "w.safetensors")
    (tmp_path / "cut.safetensors").write_bytes((tmp_path / "w.safetensors").read_bytes()[:-8])
    with pytest.raises(ckpt.CheckpointError, match="cut.safetensors: a damaged or truncated safetensors file"):
        ckpt.load(tmp_path / "cut.safetensors")
    shutil.copy(tmp_path / "w.safetensors", tmp_path / "renamed.pth")  # told by its bytes, not its name
    assert torch.equal(ckpt.load(tmp_path / "renamed.pth")["w"], torch.ones(100))


def test_an_empty_last_checkpoint_or_weights_file_is_named_by_the_task(tiny_ade20k, tmp_path):
    from segmentation.train import run

    out = tmp_path / "o"
    out.mkdir()
    (out / "checkpoint-last.pth").write_bytes(b"")
    with pytest.raises(ckpt.CheckpointError, match="checkpoint-last.pth: not a checkpoint: an empty file"):
        run(segmentation_config(tiny_ade20k, out))
    with pytest.raises(ckpt.CheckpointError, match="checkpoint-last.pth: not a checkpoint: an empty file"):
        run(
            segmentation_config(tiny_ade20k, tmp_path / "p", "eval_only=true", f"weights={out / 'checkpoint-last.pth'}")
        )


class FullDisk:
    """A file that takes `room` bytes, then fails as a full disk does (ENOSPC)."""

    def __init__(self, f, room: int):
        self.f, self.room = f, room

    def write(self, b):
        if len(b) > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(b)
        return self.f.write(b)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return self.f.__exit__(*exc)


def test_a_full_disk_is_a_checkpoint_error_naming_the_path_and_the_cause(tmp_path, monkeypatch):
    path = ckpt.save({"w": torch.zeros(10)}, tmp_path / "checkpoint-last.pth")
    real = os.fdopen
    monkeypatch.setattr(ckpt.os, "fdopen", lambda fd, mode: FullDisk(real(fd, mode), 5000))
    with pytest.raises(ckpt.CheckpointError) as e:
        ckpt.save({"w": torch.randn(100, 100)}, path)
    assert str(e.value).startswith(f"{path}: cannot write the checkpoint: No space left on device [ENOSPC]")
    assert "unexpected pos" in str(e.value.__cause__)  # what torch itself says
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint-last.pth"]  # no temporary left
    assert torch.equal(ckpt.load(path)["w"], torch.zeros(10))  # the previous checkpoint is intact


def test_a_write_the_operating_system_refuses_is_named(tmp_path):
    """A real failing write: past RLIMIT_FSIZE the kernel refuses it (EFBIG), as it refuses one on a full disk."""
    code = (
        "import resource, signal, torch\nfrom core import checkpoint as ckpt\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (100000, 100000))\n"
        f"ckpt.save({{'w': torch.randn(1000, 1000)}}, {str(tmp_path / 'big.pth')!r})\n"
    )
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    if hard != resource.RLIM_INFINITY and hard < 100000:
        pytest.skip("file size limit below the test's")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert proc.returncode != 0
    assert (
        f"CheckpointError: {tmp_path / 'big.pth'}: cannot write the checkpoint: File too large [EFBIG]" in proc.stderr
    )
    assert list(tmp_path.iterdir()) == []


def test_a_folder_without_write_permission_is_named(tmp_path, monkeypatch):
    def refused(**kw):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), kw["dir"])

    monkeypatch.setattr(ckpt.tempfile, "mkstemp", refused)
    with pytest.raises(
        ckpt.CheckpointError, match="c.pth: cannot write the checkpoint: Permission denied \\[EACCES\\]; no permission"
    ):
        ckpt.save({"w": torch.ones(1)}, tmp_path / "c.pth")
    monkeypatch.undo()
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(
        ckpt.CheckpointError, match="c.pth: cannot write the checkpoint: .*a_file is a file, not a folder"
    ):
        ckpt.save({"w": torch.ones(1)}, tmp_path / "a_file" / "c.pth")
    with pytest.raises(ckpt.CheckpointError, match="cannot write the checkpoint: Not a directory \\[ENOTDIR\\]"):
        ckpt.save({"w": torch.ones(1)}, tmp_path / "a_file" / "deeper" / "c.pth")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_folder_is_named(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        with pytest.raises(ckpt.CheckpointError, match="cannot write the checkpoint: Permission denied"):
            ckpt.save({"w": torch.ones(1)}, ro / "c.pth")
        from core.config import check_output_folder

        with pytest.raises(ConfigError, match="out=.*ro: the folder is not writable"):
            check_output_folder("out", ro)
    finally:
        ro.chmod(0o755)


def test_stale_temporaries_of_killed_writes_are_removed_at_the_start(tiny_imagenet, tmp_path):
    from finetune.train import run

    out = tmp_path / "o"
    out.mkdir()
    stale = [out / ".checkpoint-last.pth.abc123.tmp", out / ".checkpoint-best.pth.x.tmp"]
    for p in stale:
        p.write_bytes(b"half a checkpoint")
    (out / "notes.tmp").write_text("not ours")
    run(finetune_config(tiny_imagenet, out, "epochs=1", "optim.warmup_epochs=0"))
    assert not any(p.exists() for p in stale) and (out / "notes.tmp").exists()


def test_a_killed_write_leaves_the_previous_checkpoint_and_no_temporary(tmp_path):
    """kill -9 of a process in the middle of ckpt.save."""
    path = tmp_path / "c.pth"
    ckpt.save({"w": torch.zeros(3)}, path)
    code = (
        "import os, signal, torch\nfrom core import checkpoint as ckpt\n"
        "real = torch.save\n"
        "def save(obj, f):\n    f.write(b'partial'); f.flush(); os.kill(os.getpid(), signal.SIGKILL)\n"
        f"torch.save = save\nckpt.save({{'w': torch.ones(3)}}, {str(path)!r})\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == -signal.SIGKILL
    assert len(list(tmp_path.glob(".c.pth.*.tmp"))) == 1  # what the killed write left
    assert torch.equal(ckpt.load(path)["w"], torch.zeros(3))
    assert (
        ckpt.remove_stale_temporaries(tmp_path) == [] and len(list(tmp_path.glob(".*.tmp"))) == 1
    )  # not ".checkpoint*"
    os.rename(path, tmp_path / "checkpoint-last.pth")
    (tmp_path / ".checkpoint-last.pth.q.tmp").write_bytes(b"x")
    assert [p.name for p in ckpt.remove_stale_temporaries(tmp_path)] == [".checkpoint-last.pth.q.tmp"]


def test_coco_annotations_without_usable_masks_say_why(tiny_coco, tmp_path):
    from detection.data import CocoInstances

    root = tmp_path / "coco"
    shutil.copytree(tiny_coco, root)
    path = root / "annotations" / "instances_train2017.json"
    d = json.loads(path.read_text())
    for a in d["annotations"]:
        a.pop("segmentation", None)
        a["iscrowd"] = 0
    path.write_text(json.dumps(d))
    n = len(d["annotations"])
    why = f"all {n} annotations were dropped \\({n} missing or malformed segmentation\\)"
    with pytest.raises(DataError, match=f"no usable images with instances: {why}"):
        CocoInstances(root, "train", train=True, img_size=32)
    d["annotations"] = []
    path.write_text(json.dumps(d))
    with pytest.raises(DataError, match="no usable images with instances: the file lists no annotations"):
        CocoInstances(root, "train", train=True, img_size=32)


# ------------------------------------------------------------------------------------------------ tools
def test_the_study_the_benchmark_and_compare_print_one_error_line(tmp_path):
    out = str(tmp_path / "c.png")
    assert_one_error_line(python_m("tools.study", "targets", "--stages", "0"), "--stages must be >= 1, got 0")
    missing = str(tmp_path / "nowhere")
    assert_one_error_line(python_m("tools.study", "curves", missing, "--out", out), "nowhere has no config.yaml")
    (tmp_path / "run").mkdir()
    for f in ("config.yaml", "metrics.jsonl"):
        (tmp_path / "run" / f).write_text("probe: {every: 1}\nstages: {epochs: [0, 1]}\n" if f == "config.yaml" else "")
    bad = tmp_path / "settings.json"
    bad.write_text("{}")
    args = ("curves", str(tmp_path / "run"), "--out", out)
    assert_one_error_line(python_m("tools.study", *args, "--study", str(bad)), "settings.json: expected the study.json")
    bad.write_text("not json")
    assert_one_error_line(python_m("tools.study", *args, "--study", str(bad)), "settings.json: expected the study.json")
    assert_one_error_line(python_m("tools.study", *args), "no online-probe lines")
    proc = python_m("tools.study", "targets", "--stages", "0", "--debug")
    assert proc.returncode != 0 and "Traceback" in proc.stderr
    assert_one_error_line(python_m("tools.bench", "pretrain", "-c", "nosuch"), "no recipe named 'nosuch'")
    assert_one_error_line(python_m("tools.compare", missing, missing), "nowhere: not a readable results.json")


def test_the_converter_prints_one_error_line(tmp_path):
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    assert_one_error_line(python_m("tools.convert", str(empty), str(tmp_path / "x.pth")), "empty.pth: not a checkpoint")
    from core.vit import build_vit

    vit = ckpt.save({"model": build_vit("tiny").state_dict()}, tmp_path / "vit.pth")
    from tools import convert

    with pytest.raises(ConfigError, match="--img-size 33 is not a multiple of the patch size 4"):
        convert.main([str(vit), str(tmp_path / "x.pth"), "--img-size", "33"])
    for bad in (["--img-size", "-5"], ["--patch-size", "0"], ["--model", "giant"]):
        with pytest.raises(SystemExit):  # argparse: usage and one error line
            convert.main([str(vit), str(tmp_path / "x.pth"), *bad])
    assert not (tmp_path / "x.pth").exists()


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux /proc")
def test_an_output_folder_the_system_refuses_is_named_before_anything_runs(tiny_imagenet, tmp_path):
    """/proc refuses new folders even to root: the output folder is tried for real (and nothing is left)."""
    from finetune.train import run

    with pytest.raises(ConfigError, match="out=/proc/dbot-suite/run: cannot be created"):
        run(finetune_config(tiny_imagenet, "/proc/dbot-suite/run"))
    from core.config import check_output_folder

    check_output_folder("out", tmp_path / "a" / "b")
    assert list(tmp_path.iterdir()) == []  # the probe's folders are removed again


def test_a_doubtful_setting_is_warned_about_when_the_run_starts(tiny_imagenet, tmp_path, capsys):
    from finetune.train import run

    run(finetune_config(tiny_imagenet, tmp_path / "o", "epochs=1", "optim.warmup_epochs=2"))
    out = capsys.readouterr().out
    assert "warning: optim.warmup_epochs=2 is longer than the run (epochs=1): the lr never reaches its peak" in out
