"""Fine-tuning / linear probe: metrics by hand, the published layer-decay rule, timm's pieces, resume, bad input."""

import json
import shutil

import pytest
import torch
from conftest import finetune_config
from timm.optim import param_groups_layer_decay

from core import checkpoint as ckpt
from core.config import ConfigError
from core.optim import param_groups
from core.vit import build_vit
from finetune.evaluate import topk_correct
from finetune.train import build_optimizer, run


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
    decay, layers = 0.65, model.num_layers  # 13
    ours = param_groups(model, 0.05, layer_decay=decay, layer_id=model.layer_id, num_layers=layers)
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
        assert g["weight_decay"] == (0.0 if p.ndim == 1 else 0.05), name
    # timm's param_groups_layer_decay gives every parameter the same scale (for the avg-pool model, whose
    # `norm` is an Identity); its weight-decay rule additionally exempts cls_token/pos_embed
    theirs = param_groups_layer_decay(model, 0.05, no_weight_decay_list=model.no_weight_decay(), layer_decay=decay)
    timm_scale = {id(p): g["lr_scale"] for g in theirs for p in g["params"]}
    for name, p in model.named_parameters():
        assert timm_scale[id(p)] == pytest.approx(by_name[name]["lr_scale"]), name


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
    assert saved["checkpoint_sha256"] and 0 <= saved["top1"] <= 100 and saved["top5"] >= saved["top1"]
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
    with pytest.raises(ConfigError, match="train and val class folders differ.*only in val: \\['squares'\\]"):
        run(finetune_config(root, tmp_path / "o"))


def test_wrong_model_size_for_a_checkpoint(tiny_imagenet, tiny_pretrained, tmp_path):
    with pytest.raises(ckpt.CheckpointError, match="do not fit the model"):
        run(
            finetune_config(
                tiny_imagenet, tmp_path / "o", f"checkpoint={tiny_pretrained}", "model.size=small", "model.img_size=32"
            )
        )


def test_unknown_checkpoint_layout_lists_what_was_found(tiny_imagenet, tmp_path):
    path = ckpt.save({"weights": {"conv1.weight": torch.ones(1)}}, tmp_path / "resnet.pth")
    with pytest.raises(ckpt.CheckpointError, match="found top-level keys \\['weights'\\]"):
        run(finetune_config(tiny_imagenet, tmp_path / "o", f"checkpoint={path}"))


def test_unknown_dataset_kind(tiny_imagenet, tmp_path):
    with pytest.raises(ConfigError, match="unknown dataset 'mnist'"):
        run(finetune_config(tiny_imagenet, tmp_path / "o", "data.kind=mnist"))
    with pytest.raises(ConfigError, match="does not hold the cifar100 release"):
        run(finetune_config(tiny_imagenet, tmp_path / "o", "data.kind=cifar100"))
