"""Nothing accepted silently, for every task: image extensions in any case; one rule for corrupt images
(data.skip_corrupt: training replaces, evaluation leaves out, each file counted once per run and named in the log
and in results.json, metrics over a stated number of images); resume refuses training data of another size and
continues the run's bookkeeping (metrics.jsonl once per step, every checkpoint listed, the same "resuming at")."""

import json
import shutil

import pytest
import torch
from conftest import detection_config, finetune_config, pretrain_config, segmentation_config
from PIL import Image

from core import checkpoint as ckpt
from core.data import ImageFolder, list_image_folder
from tools.datasets import IMAGENET_CLASSES, make_ade20k, make_coco, make_imagenet

NOT_AN_IMAGE = b"\xff\xd8\xff\xe0 not really a jpeg"


def results(out):
    return json.loads((out / "results.json").read_text())


def train_steps(out):
    """Steps of the training lines of metrics.jsonl (evaluation lines have no lr)."""
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in lines if "lr" in r]


# ------------------------------------------------------------------------------------------- extensions
def test_image_extensions_match_in_any_case(tiny_imagenet, tmp_path):
    root = tmp_path / "mixed"
    shutil.copytree(tiny_imagenet / "train", root)
    files = sorted((root / "circle").iterdir())
    files[0].rename(files[0].with_suffix(".JPG"))
    files[1].rename(files[1].with_suffix(".Jpeg"))
    Image.open(files[2]).save(files[2].with_suffix(".PNG"))
    files[2].unlink()
    (root / "circle" / "notes.TXT").write_text("not an image")
    classes, samples = list_image_folder(root)
    assert len(samples) == 32 and {p.rsplit(".", 1)[1] for p, _ in samples} == {"jpg", "JPG", "Jpeg", "PNG"}
    assert ImageFolder(root)[0][0].size == Image.open(samples[0][0]).size

    from tools.analysis import image_files

    assert len(image_files(root)) == 32

    only_upper = tmp_path / "upper" / "dog"
    only_upper.mkdir(parents=True)
    shutil.copy(files[3], only_upper / "a.JPEG")
    assert len(list_image_folder(only_upper.parent)[1]) == 1


def test_ade20k_images_and_labels_in_upper_case(tiny_ade20k, tmp_path):
    from segmentation.data import list_pairs

    root = tmp_path / "ade"
    shutil.copytree(tiny_ade20k, root)
    img = root / "images" / "validation" / "ADE_val_00000001.jpg"
    img.rename(img.with_suffix(".JPG"))
    lab = root / "annotations" / "validation" / "ADE_val_00000001.png"
    lab.rename(lab.with_suffix(".PNG"))
    pairs = list_pairs(root, "val")
    assert len(pairs) == 4 and pairs[0][0].suffix == ".JPG" and pairs[0][1].suffix == ".PNG"


# --------------------------------------------------------------------------------------- corrupt images
def test_pretraining_counts_a_corrupt_file_once_per_run_across_epochs_and_a_resume(tiny_imagenet, tmp_path, capsys):
    from pretrain.train import run

    root = tmp_path / "data"
    shutil.copytree(tiny_imagenet, root)
    bad = root / "train" / "circle" / "circle_00003.jpg"
    bad.write_bytes(NOT_AN_IMAGE)
    out = tmp_path / "o"
    run(pretrain_config(root, out, "data.skip_corrupt=true", "max_epochs=1"))  # epoch 0 of 2
    saved = ckpt.load(out / "checkpoint-last.pth")["engine"]["corrupt"]
    assert list(saved["train"]) == [str(bad)] and "cannot decode image" in saved["train"][str(bad)]
    res = run(pretrain_config(root, out, "data.skip_corrupt=true"))  # epoch 1 meets the file again
    assert res["corrupt_images"] == {"train": {"count": 1, "files": [str(bad)]}}
    log = capsys.readouterr().out
    assert log.count("data.skip_corrupt: skipping") == 1 and f"skipping {bad}: cannot decode image" in log
    assert "data.skip_corrupt: 1 train corrupt image(s) skipped; named in results.json" in log


@pytest.mark.parametrize("backend", ["uint8", "gpu"])
def test_every_pretraining_data_backend_follows_the_rule(backend, tiny_imagenet, tmp_path):
    from pretrain.train import run

    root = tmp_path / "data"
    shutil.copytree(tiny_imagenet, root)
    garbage, truncated = root / "train" / "circle" / "circle_00003.jpg", root / "train" / "square" / "square_00001.jpg"
    garbage.write_bytes(NOT_AN_IMAGE)
    truncated.write_bytes(truncated.read_bytes()[:300])  # the header reads; the data does not decode
    res = run(
        pretrain_config(
            root, tmp_path / "o", "data.skip_corrupt=true", f"data.backend={backend}", "stages.epochs=[0,1]"
        )
    )
    assert res["corrupt_images"]["train"] == {"count": 2, "files": sorted([str(garbage), str(truncated)])}


def test_finetuning_names_corrupt_train_and_val_images_and_scores_the_rest(tiny_imagenet, tmp_path, capsys):
    from finetune.train import run

    root = tmp_path / "data"
    shutil.copytree(tiny_imagenet, root)
    bad_train = root / "train" / "square" / "square_00001.jpg"
    bad_val = sorted((root / "val" / "circle").iterdir())[0]
    bad_train.write_bytes(NOT_AN_IMAGE)
    bad_val.write_bytes(b"")
    res = run(finetune_config(root, tmp_path / "o", "data.skip_corrupt=true"))
    assert res["corrupt_images"] == {
        "train": {"count": 1, "files": [str(bad_train)]},
        "val": {"count": 1, "files": [str(bad_val)]},
    }
    assert res["eval_images"] == 15 and all(h["count"] == 15 and h["skipped"] == 1 for h in res["history"])
    log = capsys.readouterr().out
    assert "over 15 val images, 1 corrupt skipped" in log and log.count("data.skip_corrupt: skipping") == 2


def test_detection_skips_corrupt_training_and_validation_images_alike(tiny_coco, tmp_path):
    from detection.train import run

    root = tmp_path / "coco"
    shutil.copytree(tiny_coco, root)
    bad_train = root / "train2017" / "000000000002.jpg"
    bad_val = root / "val2017" / "000001000001.jpg"
    bad_train.write_bytes(NOT_AN_IMAGE)
    bad_val.write_bytes(NOT_AN_IMAGE)
    res = run(detection_config(root, tmp_path / "o", "data.skip_corrupt=true"))
    assert res["corrupt_images"]["train"] == {"count": 1, "files": [str(bad_train)]}
    assert res["corrupt_images"]["val"] == {"count": 1, "files": [str(bad_val)]}
    assert res["eval_images"] == 7  # of 8: the metrics are over the images evaluated


def test_segmentation_skips_corrupt_training_and_validation_images_alike(tiny_ade20k, tmp_path):
    from segmentation.train import run

    root = tmp_path / "ade"
    shutil.copytree(tiny_ade20k, root)
    bad_train = root / "annotations" / "training" / "ADE_train_00000002.png"
    bad_val = root / "images" / "validation" / "ADE_val_00000003.jpg"
    bad_train.write_bytes(b"\x89PNG truncated")
    bad_val.write_bytes(NOT_AN_IMAGE)
    res = run(segmentation_config(root, tmp_path / "o", "data.skip_corrupt=true"))
    assert res["corrupt_images"]["train"] == {"count": 1, "files": [str(bad_train)]}
    assert res["corrupt_images"]["val"] == {"count": 1, "files": [str(bad_val)]}
    assert res["eval_images"] == 3 and res["eval"]["skipped"] == 1


# ----------------------------------------------------------------------------------------------- resume
def imagenet_of_another_size(tmp_path):
    return make_imagenet(tmp_path / "other", seed=0, train_per_class=6, val_per_class=4, classes=IMAGENET_CLASSES[:4])


RESUME = {
    # task: (config, fixture of the data, the data of another size, the stop option, checkpoints of a finished run)
    "pretrain": (
        pretrain_config,
        "tiny_imagenet",
        imagenet_of_another_size,
        "max_epochs=1",
        {"last", "stage1_student"},
    ),
    "finetune": (finetune_config, "tiny_imagenet", imagenet_of_another_size, "max_epochs=1", {"last", "best"}),
    "detection": (
        detection_config,
        "tiny_coco",
        lambda tmp: make_coco(tmp / "other", seed=0, train_images=20, val_images=8),
        "max_iters=3",
        {"last"},
    ),
    "segmentation": (
        segmentation_config,
        "tiny_ade20k",
        lambda tmp: make_ade20k(tmp / "other", seed=0, train_images=12, val_images=4),
        "max_iters=2",
        {"last"},
    ),
}


@pytest.mark.parametrize("task", RESUME)
def test_resume_refuses_other_data_and_continues_the_runs_bookkeeping(task, request, tmp_path, capsys):
    import importlib

    config, fixture, other_data, stop, checkpoints = RESUME[task]
    run = importlib.import_module(f"{task}.train").run
    data, out = request.getfixturevalue(fixture), tmp_path / "o"
    run(config(data, out, stop))
    first = ckpt.load(out / "checkpoint-last.pth")["step"]
    with open(out / "metrics.jsonl", "a") as f:  # a line the killed run wrote after its last checkpoint
        f.write(json.dumps({"step": first + 1, "loss": 9.0}) + "\n")
    stale = out / ".checkpoint-last.pth.killed.tmp"
    stale.write_bytes(b"half")
    other = other_data(tmp_path)
    other_size = "saved by a run on other training data \\(images: \\d+ -> \\d+"
    with pytest.raises(ckpt.CheckpointError, match=other_size) as e:
        run(config(other, out))
    # the option to change is named, with the data the run used
    assert f"): data.root={other} now, the run used {data}; " in str(e.value) and "set data.root to" in str(e.value)
    capsys.readouterr()
    res = run(config(data, out))
    log = capsys.readouterr().out
    assert f"resuming at step {first} of " in log and str(out / "checkpoint-last.pth") in log
    logged = train_steps(out)
    assert logged == sorted(set(logged)) and logged[-1] > first, logged  # each step once, up to the end
    assert not any(json.loads(line).get("loss") == 9.0 for line in (out / "metrics.jsonl").read_text().splitlines())
    assert not stale.exists()
    assert checkpoints <= set(res["checkpoints"]), res["checkpoints"]
    assert results(out)["checkpoints"] == res["checkpoints"]
    assert torch.is_tensor(next(iter(ckpt.load(out / "checkpoint-last.pth")["model"].values())))
