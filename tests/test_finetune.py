"""Fine-tuning / linear probe: metrics by hand, the published layer-decay rule, timm's pieces, resume, bad input."""

import json
import shutil

import pytest
import torch
from conftest import REPO, finetune_config
from PIL import Image
from timm.optim import param_groups_layer_decay

from core import checkpoint as ckpt
from core.config import ConfigError, load_config
from core.data import DataError
from core.vit import build_vit
from finetune.data import JsonImages, SingleDrawResizedCrop, eval_transform, train_transform
from finetune.evaluate import topk_correct
from finetune.train import build_optimizer, run

CONFIGS = REPO / "finetune" / "configs"


def test_topk_on_hand_made_logits():
    logits = torch.tensor(
        [
            [0.1, 0.9, 0.0, 0.0, 0.0, 0.0],  # label 1: top-1 hit
            [0.5, 0.1, 0.4, 0.3, 0.2, 0.0],  # label 2: rank 2 -> top-5 hit only
            [0.0, 0.1, 0.2, 0.3, 0.4, 0.5],  # label 0: rank 6 -> miss
        ]
    )
    assert topk_correct(logits, torch.tensor([1, 2, 0]), ks=(1, 5)) == [1, 2]
    assert topk_correct(logits[:, :3], torch.tensor([1, 2, 0]), ks=(1, 5)) == [1, 3]  # k capped at 3 classes


def test_vit_b_layer_decay_groups_follow_the_published_rule_and_match_timm():
    with torch.device("meta"):
        model = build_vit("base", num_classes=1000, global_pool="avg")
    decay = 0.65  # 13 layer ids: embedding 0, blocks 1-12, head 13
    ours = build_optimizer(load_config(CONFIGS, "base"), model).param_groups
    by_name = {n: g for g in ours for n in g["names"]}
    assert len(by_name) == sum(1 for p in model.parameters() if p.requires_grad)
    for name, p in model.named_parameters():
        g = by_name[name]
        expect_id = (
            0
            if name in ("cls_token", "pos_embed") or name.startswith("patch_embed")
            else (int(name.split(".")[1]) + 1 if name.startswith("blocks.") else 13)
        )
        assert g["layer_id"] == expect_id, name
        assert g["lr_scale"] == pytest.approx(decay ** (13 - expect_id)), name
        # released rule (MAE/dBOT param_groups_lrd): no decay on 1-D tensors nor on no_weight_decay() names
        assert g["weight_decay"] == (0.0 if p.ndim == 1 or name in ("cls_token", "pos_embed") else 0.05), name
    # timm's param_groups_layer_decay gives every parameter the same scale and decay (for the avg-pool model,
    # whose `norm` is an Identity)
    theirs = param_groups_layer_decay(model, 0.05, no_weight_decay_list=model.no_weight_decay(), layer_decay=decay)
    timm_scale = {id(p): (g["lr_scale"], g["weight_decay"]) for g in theirs for p in g["params"]}
    for name, p in model.named_parameters():
        g = by_name[name]
        assert timm_scale[id(p)] == (pytest.approx(g["lr_scale"]), g["weight_decay"]), name


def test_the_optimizer_of_each_task_follows_its_script():
    with torch.device("meta"):
        model = build_vit("tiny", num_classes=4, global_pool="token")
    for recipe, exempt in (("tiny", {"cls_token", "pos_embed", "bias", "1-D"}), ("transfer_base", set())):
        cfg = load_config(CONFIGS, recipe, ["model.size=tiny"])
        opt = build_optimizer(cfg, model)
        no_decay = {n for g in opt.param_groups if g["weight_decay"] == 0 for n in g["names"]}
        if exempt:  # fine-tuning (main_finetune.py): 1-D tensors, cls_token, pos_embed
            assert no_decay == {n for n, p in model.named_parameters() if p.ndim == 1} | {"cls_token", "pos_embed"}
        else:  # transfer (evaluation/eval_cls.py, disable_weight_decay_* flags off): every tensor decays
            assert no_decay == set() and cfg.optim.layer_decay == 1.0


PUBLISHED = {  # docs/RECIPES.md section 3: epochs, blr, layer decay, drop path, grad clip, warmup epochs, img size
    "base": (100, 3e-4, 0.65, 0.1, None, 5, None),
    "large": (50, 3e-4, 0.75, 0.25, 1.0, 5, None),
    "huge": (50, 3e-4, 0.75, 0.3, None, 5, None),
    "huge448": (10, 7e-5, 0.9, 0.4, None, 2, 448),
}


@pytest.mark.parametrize("recipe", sorted(PUBLISHED))
def test_imagenet_recipes_are_the_published_ones(recipe):
    c = load_config(CONFIGS, recipe)
    epochs, blr, decay, drop_path, clip, warmup, img = PUBLISHED[recipe]
    assert (c.epochs, c.optim.blr, c.optim.layer_decay, c.model.drop_path) == (epochs, blr, decay, drop_path)
    assert (c.optim.clip_grad, c.optim.warmup_epochs, c.model.img_size) == (clip, warmup, img)
    assert (c.optim.global_batch, c.optim.lr, c.optim.min_lr, c.optim.weight_decay) == (1024, None, 1e-6, 0.05)
    assert (c.model.global_pool, c.model.head_init_std) == ("avg", 0.01)
    a = c.aug
    assert (a.auto_augment, a.smoothing, a.reprob, a.mixup, a.cutmix) == ("rand-m9-mstd0.5-inc1", 0.1, 0.25, 0.8, 1.0)


def test_augmentation_is_maes():
    cfg = load_config(CONFIGS, "base")
    steps = train_transform(cfg, 224).transforms
    kinds = [type(t).__name__ for t in steps]
    assert kinds == [
        "RandomResizedCropAndInterpolation",
        "RandomHorizontalFlip",
        "RandAugment",
        "MaybeToTensor",
        "Normalize",
        "RandomErasing",
    ]
    crop, flip, randaug, _, norm, erase = steps
    assert crop.size == (224, 224) and crop.scale == (0.08, 1.0) and "BICUBIC" in str(crop.interpolation).upper()
    assert flip.p == 0.5 and randaug.num_layers == 2  # rand-m9-mstd0.5-inc1: two ops per image
    assert {op.magnitude for op in randaug.ops} == {9} and {op.magnitude_std for op in randaug.ops} == {0.5}
    assert "SolarizeIncreasing" in {op.name for op in randaug.ops}  # inc1 picks the increasing variants
    assert (erase.probability, erase.mode, erase.max_count) == (0.25, "pixel", 1)
    assert [round(float(m), 3) for m in norm.mean] == [0.485, 0.456, 0.406]
    resize, center = eval_transform(cfg, 224).transforms[:2]
    assert (resize.size, center.size) == (256, (224, 224))  # resize 256, centre crop 224
    resize, center = eval_transform(cfg, 448).transforms[:2]
    assert (resize.size, center.size) == (448, (448, 448))  # crop_pct 1.0 above 224 px, as MAE at 448


def test_linear_probe_crop_is_one_draw_inside_the_image():
    torch.manual_seed(0)
    img = Image.new("RGB", (40, 30))
    for _ in range(300):
        top, left, h, w = SingleDrawResizedCrop.get_params(img, (0.08, 1.0), (3 / 4, 4 / 3))
        assert 0 <= top <= 30 - h and 0 <= left <= 40 - w and 1 <= h <= 30 and 1 <= w <= 40
    # the whole image at its own aspect ratio; a box wider than the image is clamped, not redrawn
    assert SingleDrawResizedCrop.get_params(img, (1.0, 1.0), (4 / 3, 4 / 3)) == (0, 0, 30, 40)
    assert SingleDrawResizedCrop.get_params(img, (1.0, 1.0), (4.0, 4.0))[2:] == (17, 40)


def test_timm_lars_matches_maes_lars_step():
    torch.manual_seed(0)
    w, b = torch.randn(4, 3, requires_grad=True), torch.randn(4, requires_grad=True)
    gw, gb = torch.randn(4, 3), torch.randn(4)
    model = torch.nn.Linear(3, 4)
    with torch.no_grad():
        model.weight.copy_(w)
        model.bias.copy_(b)
    model.weight.grad, model.bias.grad = gw.clone(), gb.clone()
    cfg = type("C", (), {"optim": type("O", (), {"name": "lars", "weight_decay": 0.0})})()
    opt = build_optimizer(cfg, model)
    for g in opt.param_groups:
        g["lr"] = 0.5
    opt.step()
    # MAE's LARS (util/lars.py): matrices scaled by 0.001 * |w| / |g|, vectors plain; first momentum = update
    expect_w = w - 0.5 * gw * (0.001 * w.norm() / gw.norm())
    expect_b = b - 0.5 * gb
    assert torch.allclose(model.weight, expect_w, atol=1e-6) and torch.allclose(model.bias, expect_b, atol=1e-6)


def test_finetune_from_pretrained_writes_results(tiny_imagenet, tiny_pretrained, tmp_path):
    res = run(finetune_config(tiny_imagenet, tmp_path / "ft", f"checkpoint={tiny_pretrained}"))
    saved = json.loads((tmp_path / "ft" / "results.json").read_text())
    assert saved["task"] == "finetune" and saved["checkpoint"] == str(tiny_pretrained)
    m = saved["metrics"]
    assert (
        saved["checkpoint_sha256"] and 0 <= m["top1"] <= 100 and m["top5"] >= m["top1"] and saved["eval_images"] == 16
    )
    assert res["num_classes"] == 4 and (tmp_path / "ft" / "checkpoint-best.pth").exists()
    # the encoder started from the pretrained weights: fine-tuning moved them, but not far in 2 epochs
    pre = ckpt.load(tiny_pretrained)["model"]["blocks.0.attn.qkv.weight"]
    post = ckpt.load(tmp_path / "ft" / "checkpoint-last.pth")["model"]["blocks.0.attn.qkv.weight"]
    assert 0 < (pre - post).abs().max() < 0.2


def test_resume_equals_uninterrupted(tiny_imagenet, tiny_pretrained, tmp_path):
    args = (f"checkpoint={tiny_pretrained}", "epochs=3")
    run(finetune_config(tiny_imagenet, tmp_path / "a", *args))
    run(finetune_config(tiny_imagenet, tmp_path / "b", *args, "max_epochs=1"))
    run(finetune_config(tiny_imagenet, tmp_path / "b", *args))
    a, b = ckpt.load(tmp_path / "a" / "checkpoint-last.pth"), ckpt.load(tmp_path / "b" / "checkpoint-last.pth")
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    assert [h["top1"] for h in a["history"]] == [h["top1"] for h in b["history"]]


def test_linear_probe_trains_only_the_head(tiny_imagenet, tiny_pretrained, tmp_path):
    run(
        finetune_config(
            tiny_imagenet,
            tmp_path / "lp",
            f"checkpoint={tiny_pretrained}",
            "task=linprobe",
            "optim.name=lars",
            "optim.weight_decay=0",
            "optim.lr=0.1",
            "optim.layer_decay=1.0",
            "model.global_pool=token",
        )
    )
    saved = json.loads((tmp_path / "lp" / "results.json").read_text())
    assert saved["task"] == "linprobe"
    pre = ckpt.load(tiny_pretrained)["model"]
    post = ckpt.load(tmp_path / "lp" / "checkpoint-last.pth")["model"]
    assert torch.equal(pre["blocks.3.mlp.fc2.weight"], post["blocks.3.mlp.fc2.weight"])
    assert "head.0.running_mean" in post and not torch.equal(post["head.0.running_mean"], torch.zeros(96))


# ------------------------------------------------------------------------------------------- bad input
def test_num_classes_mismatch(tiny_imagenet, tmp_path):
    with pytest.raises(ConfigError, match="data.num_classes=10 but .* has 4 classes"):
        run(finetune_config(tiny_imagenet, tmp_path / "o", "data.num_classes=10"))


def test_val_classes_differing_from_train(tiny_imagenet, tmp_path):
    root = tmp_path / "d"
    shutil.copytree(tiny_imagenet, root)
    (root / "val" / "square").rename(root / "val" / "squares")
    with pytest.raises(DataError, match="train and val class folders differ.*only in val: \\['squares'\\]"):
        run(finetune_config(root, tmp_path / "o"))


def test_wrong_model_size_fails_before_the_data_is_read(tiny_pretrained, tmp_path):
    # the data folder holds no dataset: the checkpoint is checked before the data is listed
    (tmp_path / "empty").mkdir()
    cfg = finetune_config(tmp_path / "empty", tmp_path / "o", f"checkpoint={tiny_pretrained}", "model.size=small")
    with pytest.raises(ckpt.CheckpointError, match="does not fit a ViT-small \\(the weights look like ViT-tiny\\)"):
        run(cfg)


def test_unknown_checkpoint_layout_lists_what_was_found(tiny_imagenet, tmp_path):
    path = ckpt.save({"weights": {"conv1.weight": torch.ones(1)}}, tmp_path / "resnet.pth")
    with pytest.raises(ckpt.CheckpointError, match="found top-level keys \\['weights'\\]"):
        run(finetune_config(tiny_imagenet, tmp_path / "o", f"checkpoint={path}"))


def test_lars_with_weight_decay_is_refused(tiny_imagenet, tmp_path):
    with pytest.raises(ConfigError, match="optim.weight_decay=0.05 with optim.name=lars"):
        run(finetune_config(tiny_imagenet, tmp_path / "o", "task=linprobe", "optim.name=lars"))


def test_inat_category_ids_out_of_range_are_named(tmp_path):
    d = {
        "images": [{"id": 1, "file_name": "a.jpg"}, {"id": 2, "file_name": "b.jpg"}],
        "annotations": [{"image_id": 1, "category_id": 0}, {"image_id": 2, "category_id": 7}],
        "categories": [{"id": 0}, {"id": 1}],
    }
    (tmp_path / "train2018.json").write_text(json.dumps(d))
    with pytest.raises(DataError, match="train2018.json: category ids must be 0..1 .*found e.g. \\[7\\]"):
        JsonImages(tmp_path, tmp_path / "train2018.json")
    (tmp_path / "val2018.json").write_text(json.dumps({"images": []}))
    with pytest.raises(DataError, match="val2018.json: not an iNaturalist annotation file .*KeyError"):
        JsonImages(tmp_path, tmp_path / "val2018.json")


def test_unknown_dataset_kind(tiny_imagenet, tmp_path):
    with pytest.raises(ConfigError, match="data.kind='mnist': expected one of imagenet, folder, cifar10"):
        run(finetune_config(tiny_imagenet, tmp_path / "o", "data.kind=mnist"))
    with pytest.raises(DataError, match="does not hold the cifar100 release"):
        run(finetune_config(tiny_imagenet, tmp_path / "o", "data.kind=cifar100"))
