"""Shared fixtures: tiny generated datasets and tiny run configs (CPU, seconds)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from core.config import load_config
from tools.datasets import IMAGENET_CLASSES, make_imagenet

REPO = Path(__file__).resolve().parents[1]

torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_module(module: str, *args: str, processes: int = 1, threads: int = 1) -> subprocess.CompletedProcess:
    """`python -m module args` from the repository root, as a user runs it; with `processes` > 1 under
    torchrun (gloo on CPU). A failure shows the end of the command's stderr."""
    launch = []
    if processes > 1:
        launch = ["-m", "torch.distributed.run", f"--nproc_per_node={processes}", f"--master_port={free_port()}"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.run(
        [sys.executable, *launch, "-m", module, *args], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, f"{module} failed:\n{proc.stderr[-3000:]}"
    return proc


def pytest_addoption(parser):
    parser.addoption(
        "--device",
        default="cpu",
        help="device of the GPU-twin tests (tests/test_gpu_twins.py): cpu (default) or cuda (tools/gpu_check.py)",
    )


@pytest.fixture(scope="session")
def device(request) -> torch.device:
    """The device the GPU-twin tests run their code path on: CPU in `make test`, cuda in the GPU check."""
    dev = torch.device(request.config.getoption("--device"))
    if dev.type == "cuda" and not torch.cuda.is_available():
        pytest.skip("--device cuda: no CUDA device here")
    return dev


@pytest.fixture(scope="session")
def tiny_imagenet(tmp_path_factory) -> Path:
    """4 classes x 8 train / 4 val images in ImageNet layout."""
    root = tmp_path_factory.mktemp("data") / "imagenet"
    return make_imagenet(root, seed=0, train_per_class=8, val_per_class=4, classes=IMAGENET_CLASSES[:4])


# the tiny pretraining recipe shrunk further: 32 images, batch 8, one-epoch stages, no workers
PRETRAIN_MICRO = [
    "device=cpu",
    "data.workers=0",
    "data.batch_per_gpu=8",
    "optim.global_batch=8",
    "optim.lr=2e-3",
    "optim.warmup_epochs=0.5",
    "stages.epochs=[0,1,2]",
    "model.decoder.depth=1",
    "log.every=1",
    "log.save_every=1",
    "log.tensorboard=false",
    "probe.every=null",  # the tiny recipe probes every 2 epochs; tests/test_pretrain.py tests the probe itself
]


def pretrain_config(data_root: Path, out: Path, *overrides: str):
    base = [f"data.root={data_root}", f"out={out}", *PRETRAIN_MICRO]
    from pretrain.schema import PretrainConfig

    return load_config(REPO / "pretrain" / "configs", "tiny", base + list(overrides), schema=PretrainConfig)


def finetune_config(data_root: Path, out: Path, *overrides: str):
    """The tiny fine-tuning recipe shrunk: batch 8, two epochs, no workers."""
    base = [
        f"data.root={data_root}",
        f"out={out}",
        "device=cpu",
        "data.workers=0",
        "data.batch_per_gpu=8",
        "data.eval_batch_per_gpu=8",
        "optim.global_batch=8",
        "epochs=2",
        "optim.warmup_epochs=0.5",
        "log.tensorboard=false",
    ]
    from finetune.schema import FinetuneConfig

    return load_config(REPO / "finetune" / "configs", "tiny", base + list(overrides), schema=FinetuneConfig)


@pytest.fixture(scope="session")
def tiny_pretrained(tiny_imagenet, tmp_path_factory) -> Path:
    """A real (micro) dBOT pretraining run's final student checkpoint."""
    from pretrain.train import run

    out = tmp_path_factory.mktemp("pretrained") / "run"
    run(pretrain_config(tiny_imagenet, out))
    return out / "checkpoint-stage1-student.pth"


@pytest.fixture(scope="session")
def tiny_coco(tmp_path_factory) -> Path:
    """24 train / 8 val images in the COCO 2017 layout (polygons, RLE, crowds, an image without objects)."""
    from tools.datasets import make_coco

    return make_coco(tmp_path_factory.mktemp("data") / "coco", seed=0, train_images=24, val_images=8)


def detection_config(data_root: Path, out: Path, *overrides: str):
    """The tiny detection recipe shrunk: 32 px images, batch 4, six iterations, no workers."""
    base = [
        f"data.root={data_root}",
        f"out={out}",
        "device=cpu",
        "data.img_size=32",
        "data.workers=0",
        "data.batch_per_gpu=4",
        "data.eval_batch_per_gpu=4",
        "optim.global_batch=4",
        "optim.iters=6",
        "optim.steps=[4,5]",
        "optim.warmup_iters=2",
        "log.every=1",
        "log.save_every=3",
        "log.tensorboard=false",
    ]
    from detection.schema import DetectionConfig

    return load_config(REPO / "detection" / "configs", "tiny", base + list(overrides), schema=DetectionConfig)


@pytest.fixture(scope="session")
def tiny_ade20k(tmp_path_factory) -> Path:
    """16 train / 4 val images in the ADEChallengeData2016 layout (8 classes, label 0 = other)."""
    from tools.datasets import make_ade20k

    return make_ade20k(tmp_path_factory.mktemp("data") / "ade20k", seed=0, train_images=16, val_images=4)


def segmentation_config(data_root: Path, out: Path, *overrides: str):
    """The tiny segmentation recipe shrunk: batch 4, four iterations, no workers."""
    base = [
        f"data.root={data_root}",
        f"out={out}",
        "device=cpu",
        "data.workers=0",
        "eval.workers=0",
        "data.batch_per_gpu=4",
        "optim.global_batch=4",
        "iters=4",
        "optim.warmup_iters=1",
        "eval.every=4",
        "log.every=1",
        "log.save_every=2",
        "log.tensorboard=false",
    ]
    from segmentation.schema import SegmentationConfig

    return load_config(REPO / "segmentation" / "configs", "tiny", base + list(overrides), schema=SegmentationConfig)


@pytest.fixture
def tiny_segmentor():
    """The tiny recipe's segmentor (48 px crops, 8 classes), randomly initialised from a fixed seed."""
    from segmentation.model import build_segmentor

    torch.manual_seed(0)
    cfg = load_config(REPO / "segmentation" / "configs", "tiny")
    return build_segmentor(cfg.model, 8)
