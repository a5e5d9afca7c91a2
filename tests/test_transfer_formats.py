"""The transfer-classification releases read for real: tiny files written in each release's own layout
(CIFAR-10/100 pickled batches, Flowers-102 `.mat` labels and splits, Stanford Cars devkit annotations,
iNaturalist json), read through `finetune.data.base_datasets` and trained on for one step each."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
from conftest import finetune_config
from PIL import Image

from core.data import DataError
from finetune.data import base_datasets
from finetune.train import run

scipy_io = pytest.importorskip("scipy.io")


def pixels(n: int, seed: int, h: int = 32, w: int = 32) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, h, w, 3), dtype=np.uint8)


def cifar_rows(images: np.ndarray) -> np.ndarray:
    """The release's row layout: 3072 bytes per image, the red plane then green then blue, each row-major."""
    return images.transpose(0, 3, 1, 2).reshape(len(images), -1)


def write_pickle(path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(obj, protocol=2))  # the release was pickled by Python 2


def make_cifar10(root, per_batch: int = 2, test: int = 4):
    folder = root / "cifar-10-batches-py"
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    write_pickle(folder / "batches.meta", {"label_names": names, "num_cases_per_batch": per_batch, "num_vis": 3072})
    images, labels = pixels(5 * per_batch + test, seed=1), [i % 10 for i in range(5 * per_batch + test)]
    for b in range(5):
        sl = slice(b * per_batch, (b + 1) * per_batch)
        batch = {"batch_label": f"training batch {b + 1} of 5", "labels": labels[sl], "data": cifar_rows(images[sl])}
        write_pickle(folder / f"data_batch_{b + 1}", {**batch, "filenames": [f"im{i}.png" for i in range(per_batch)]})
    rest = slice(5 * per_batch, None)
    write_pickle(
        folder / "test_batch",
        {"batch_label": "testing batch 1 of 1", "labels": labels[rest]}
        | {"data": cifar_rows(images[rest]), "filenames": [f"t{i}.png" for i in range(test)]},
    )
    return images, labels


def make_cifar100(root, train: int = 8, test: int = 4):
    folder = root / "cifar-100-python"
    write_pickle(
        folder / "meta",
        {"fine_label_names": [f"f{i}" for i in range(100)], "coarse_label_names": [f"c{i}" for i in range(20)]},
    )
    images = pixels(train + test, seed=2)
    fine = [(7 * i) % 100 for i in range(train + test)]
    for name, sl in (("train", slice(0, train)), ("test", slice(train, None))):
        batch = {"filenames": [], "batch_label": name, "fine_labels": fine[sl], "data": cifar_rows(images[sl])}
        write_pickle(folder / name, {**batch, "coarse_labels": [f // 5 for f in fine[sl]]})
    return images, fine


def write_jpgs(folder, names, seed: int, size=(40, 36)):
    folder.mkdir(parents=True, exist_ok=True)
    for k, name in enumerate(names):
        Image.fromarray(pixels(1, seed + k, size[1], size[0])[0]).save(folder / name, quality=95)


def make_flowers(root):
    """12 images; labels 1..102 in imagelabels.mat, 1-based image ids per split in setid.mat (as released)."""
    base = root / "flowers-102"
    write_jpgs(base / "jpg", [f"image_{i:05d}.jpg" for i in range(1, 13)], seed=10)
    labels = np.array([[1, 5, 102, 5, 7, 1, 2, 3, 4, 99, 50, 6]], dtype=np.uint8)
    scipy_io.savemat(base / "imagelabels.mat", {"labels": labels})
    splits = {"trnid": [[1, 4, 9, 12]], "valid": [[2, 3, 5, 6]], "tstid": [[7, 8, 10, 11]]}
    scipy_io.savemat(base / "setid.mat", {k: np.array(v, dtype=np.uint16) for k, v in splits.items()})
    return labels[0]


def annotations(names, classes) -> np.ndarray:
    """A MATLAB struct array as the Cars devkit stores its annotations (1 x N, one field per column)."""
    fields = ["bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "fname"]
    rec = np.zeros((1, len(names)), dtype=[(f, object) for f in fields])
    for k, (name, c) in enumerate(zip(names, classes)):
        rec[0, k] = (np.uint8(1), np.uint8(2), np.uint8(30), np.uint8(20), np.uint8(c), name)
    return rec


def make_cars(root):
    base = root / "stanford_cars"
    names = np.array([[f"Make Model {i}" for i in range(1, 5)]], dtype=object)
    (base / "devkit").mkdir(parents=True)
    scipy_io.savemat(base / "devkit" / "cars_meta.mat", {"class_names": names})
    train, test = [f"{i:05d}.jpg" for i in range(1, 9)], [f"{i:05d}.jpg" for i in range(1, 5)]
    write_jpgs(base / "cars_train", train, seed=20)
    write_jpgs(base / "cars_test", test, seed=30)
    train_cls, test_cls = [1, 2, 3, 4, 4, 3, 2, 1], [2, 2, 4, 1]
    scipy_io.savemat(base / "devkit" / "cars_train_annos.mat", {"annotations": annotations(train, train_cls)})
    scipy_io.savemat(base / "cars_test_annos_withlabels.mat", {"annotations": annotations(test, test_cls)})
    return train_cls, test_cls


def make_inat(root, year: str = "2018"):
    """The competition json: images under train_val{year}/<supercategory>/<category>/, category ids 0..C-1."""
    files, d = {}, {}
    for split, n in (("train", 8), ("val", 4)):
        images, anns = [], []
        for i in range(n):
            cat = i % 3
            name = f"train_val{year}/Plantae/{cat}/{split}{i}.jpg"
            images.append({"id": 100 * (split == "val") + i, "file_name": name, "width": 40, "height": 36})
            anns.append({"id": i, "image_id": images[-1]["id"], "category_id": cat})
            files[name] = cat
        d[split] = {"images": images, "annotations": anns, "categories": [{"id": c, "name": f"c{c}"} for c in range(3)]}
        (root / f"{split}{year}.json").write_text(json.dumps(d[split]))
    for k, name in enumerate(files):
        write_jpgs((root / name).parent, [(root / name).name], seed=40 + k)
    return d


def one_step(root, tmp_path, kind: str) -> dict:
    """One fine-tuning step (batch 8, one epoch, no warmup so the step moves the weights) and the evaluation,
    from scratch."""
    out = tmp_path / f"ft-{kind}"
    run(finetune_config(root, out, f"data.kind={kind}", "epochs=1", "optim.warmup_epochs=0"))
    res = json.loads((out / "results.json").read_text())
    assert np.isfinite(res["history"][0]["loss"]) and res["speed"]["train_s_per_step"] > 0
    return res


def test_cifar10_batches_are_read_as_released(tmp_path):
    images, labels = make_cifar10(tmp_path)
    train, val, classes = base_datasets("cifar10", tmp_path)
    assert (len(train), len(val), classes[:2]) == (10, 4, ["airplane", "automobile"])
    img, label = train[3]
    # pixel (row 2, column 5) of image 3: bytes 2 * 32 + 5 of its red, green and blue planes
    assert img.size == (32, 32) and img.getpixel((5, 2)) == tuple(int(v) for v in images[3, 2, 5])
    assert label == labels[3] and val[1][1] == labels[11]
    res = one_step(tmp_path, tmp_path, "cifar10")
    assert res["num_classes"] == 10 and res["eval_images"] == 4


def test_cifar100_fine_labels_are_read_as_released(tmp_path):
    images, fine = make_cifar100(tmp_path)
    train, val, classes = base_datasets("cifar100", tmp_path)
    assert (len(train), len(val), len(classes), classes[7]) == (8, 4, 100, "f7")
    assert [train[i][1] for i in range(8)] == fine[:8] and np.array_equal(np.asarray(val[2][0]), images[10])
    res = one_step(tmp_path, tmp_path, "cifar100")
    assert res["num_classes"] == 100 and res["eval_images"] == 4


def test_flowers102_mat_labels_and_splits_are_read_as_released(tmp_path):
    labels = make_flowers(tmp_path)
    train, test, classes = base_datasets("flowers102", tmp_path)
    assert len(classes) == 102 and (len(train), len(test)) == (8, 4)
    # train = trnid then valid; labels 1-based in the file, 0-based here
    assert [train[i][1] for i in range(8)] == [labels[k - 1] - 1 for k in (1, 4, 9, 12, 2, 3, 5, 6)]
    img = test[2][0]  # tstid[2] = image 10
    assert img.size == (40, 36) and np.array_equal(
        np.asarray(img), np.asarray(Image.open(tmp_path / "flowers-102" / "jpg" / "image_00010.jpg").convert("RGB"))
    )
    res = one_step(tmp_path, tmp_path, "flowers102")
    assert res["num_classes"] == 102 and res["eval_images"] == 4


def test_stanford_cars_devkit_annotations_are_read_as_released(tmp_path):
    train_cls, test_cls = make_cars(tmp_path)
    train, test, classes = base_datasets("cars", tmp_path)
    assert classes == [f"Make Model {i}" for i in range(1, 5)] and (len(train), len(test)) == (8, 4)
    assert [train[i][1] for i in range(8)] == [c - 1 for c in train_cls]
    assert [test[i][1] for i in range(4)] == [c - 1 for c in test_cls]
    res = one_step(tmp_path, tmp_path, "cars")
    assert res["num_classes"] == 4 and res["eval_images"] == 4


def test_inaturalist_json_is_read_as_released(tmp_path):
    d = make_inat(tmp_path)
    train, val, classes = base_datasets("inat2018", tmp_path)
    assert classes == ["0", "1", "2"] and (len(train), len(val)) == (8, 4)
    assert [train[i][1] for i in range(8)] == [a["category_id"] for a in d["train"]["annotations"]]
    assert train[4][0].size == (40, 36)
    res = one_step(tmp_path, tmp_path, "inat2018")
    assert res["num_classes"] == 3 and res["eval_images"] == 4


def test_a_missing_release_file_is_named(tmp_path):
    make_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_4").unlink()
    with pytest.raises(DataError, match="does not hold the cifar10 release: missing cifar-10-batches-py/data_batch_4"):
        base_datasets("cifar10", tmp_path)
    make_flowers(tmp_path)
    (tmp_path / "flowers-102" / "setid.mat").write_bytes(b"not a mat file")
    with pytest.raises(DataError, match="does not hold a readable Flowers-102 release"):
        base_datasets("flowers102", tmp_path)
