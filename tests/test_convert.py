"""Checkpoint converters: timm round trip, the authors' and MAE's layouts, target layouts, resizing, errors."""

import argparse

import pytest
import timm
import torch

from core import checkpoint as ckpt
from core.vit import build_vit, preset
from pretrain.model import MaskedStudent
from tools import convert


def mae_style_pretrain_file(tmp_path, decoder_pred="decoder_predp"):
    """A file in the released dBOT/MAE pretraining layout: {'model', 'optimizer', 'epoch', 'scaler', 'args'},
    MAE key names, decoder keys, `decoder_predp` (dBOT) or `decoder_pred` (MAE)."""
    student = MaskedStudent(target_dim=96, decoder_dim=32, decoder_depth=1, decoder_heads=2, **preset("tiny"))
    sd = student.state_dict()
    sd = {k.replace("decoder_pred.", f"{decoder_pred}."): v for k, v in sd.items()}
    path = tmp_path / f"released_{decoder_pred}.pth"
    torch.save(
        {
            "model": sd,
            "optimizer": {"state": {}, "param_groups": []},
            "epoch": 1599,
            "scaler": {"scale": 65536.0},
            "args": argparse.Namespace(model="mae_vit_base_patch16"),
        },
        path,
    )
    return path, student


@pytest.mark.parametrize("pred", ["decoder_predp", "decoder_pred"])
def test_released_pretraining_file_imports_with_decoder_dropped_and_nothing_missing(tmp_path, pred):
    path, student = mae_style_pretrain_file(tmp_path, pred)
    sd, info = convert.read_backbone(path)
    assert info.layout == ("dbot-released/pretrain" if pred == "decoder_predp" else "mae/pretrain")
    assert all(k.startswith(("decoder_", "mask_token")) for k in info.dropped) and "mask_token" in info.dropped
    model = build_vit("tiny")
    report = ckpt.load_weights(model, sd, source=str(path))  # strict: nothing missing, nothing unexpected
    assert not report.missing and not report.unexpected
    assert torch.equal(model.blocks[2].mlp.fc1.weight, student.blocks[2].mlp.fc1.weight)


def test_our_encoder_to_timm_file_to_timm_model_gives_the_same_features(tmp_path):
    ours = build_vit("base").eval()
    ours.initialize_weights(torch.Generator().manual_seed(0))
    src = ckpt.save({"model": ours.state_dict()}, tmp_path / "ours.pth")
    dst, _, report = convert.convert(src, tmp_path / "timm.pth", "timm", model="base")
    assert not report.missing and not report.adapted
    theirs = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0, checkpoint_path=str(dst)).eval()
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert torch.allclose(ours.forward_features(x), theirs.forward_features(x), atol=1e-5)


@pytest.mark.parametrize("size, name", [("large", "vit_large_patch16_224"), ("huge", "vit_huge_patch14_224")])
def test_timm_layout_has_every_backbone_key_for_large_and_huge(size, name):
    with torch.device("meta"):
        ours = build_vit(size).state_dict()
        theirs = timm.create_model(name, pretrained=False, num_classes=0).state_dict()
    written = convert.to_timm(ours)
    assert written.keys() == theirs.keys()
    assert all(written[k].shape == theirs[k].shape for k in theirs)


def test_position_embedding_resized_for_448(tmp_path):
    model = build_vit("tiny")
    src = ckpt.save({"model": model.state_dict()}, tmp_path / "t.pth")
    path, _, report = convert.convert(src, tmp_path / "t64.pth", "backbone", model="tiny", img_size=64)
    assert report.adapted == {"pos_embed": "(1, 65, 96) -> (1, 257, 96)"}
    assert ckpt.load(path)["model"]["pos_embed"].shape == (1, 257, 96)


def test_a_large_file_into_a_base_model_is_a_clear_error(tmp_path):
    with torch.device("meta"):
        large = build_vit("large").state_dict()
    src = tmp_path / "large.safetensors"
    from safetensors.torch import save_file

    save_file(
        {k: torch.zeros(v.shape) for k, v in large.items() if k.startswith(("cls_token", "patch_embed"))}
        | {"pos_embed": torch.zeros(1, 197, 1024)},
        str(src),
    )
    with pytest.raises(ckpt.CheckpointError, match="large.safetensors: does not fit a ViT-base: cls_token"):
        convert.convert(src, tmp_path / "x.pth", "timm", model="base")


def test_detectron2_layout_keys():
    sd = build_vit("tiny").state_dict()
    d2 = convert.to_detectron2(sd)
    assert "backbone.net.pos_embed" in d2 and d2["backbone.net.pos_embed"].shape == (1, 65, 96)
    assert "backbone.net.patch_embed.proj.weight" in d2 and "backbone.net.blocks.3.attn.qkv.weight" in d2
    assert "backbone.net.blocks.0.mlp.fc2.bias" in d2
    assert not any(k.endswith("cls_token") or k.startswith("backbone.net.norm.") for k in d2)


def test_openmmlab_layouts_follow_the_published_mappings():
    sd = build_vit("tiny").state_dict()
    mmseg = convert.to_mmseg(sd)
    expected = {
        "cls_token",
        "pos_embed",
        "patch_embed.projection.weight",
        "patch_embed.projection.bias",
        "ln1.weight",
        "layers.0.ln1.weight",
        "layers.0.ln2.bias",
        "layers.0.attn.attn.in_proj_weight",
        "layers.0.attn.attn.in_proj_bias",
        "layers.0.attn.attn.out_proj.weight",
        "layers.0.ffn.layers.0.0.weight",
        "layers.0.ffn.layers.1.bias",
    }
    assert expected <= mmseg.keys()
    assert len(mmseg) == len(sd)
    assert torch.equal(mmseg["layers.1.attn.attn.in_proj_weight"], sd["blocks.1.attn.qkv.weight"])
    mmpre = convert.to_mmpretrain(sd)
    assert {"layers.0.attn.qkv.weight", "layers.0.attn.proj.bias", "layers.2.ffn.layers.1.weight"} <= mmpre.keys()


def test_command_line_and_safetensors_output(tmp_path, capsys):
    path, _ = mae_style_pretrain_file(tmp_path)
    convert.main([str(path), str(tmp_path / "out.safetensors"), "--to", "timm", "--model", "tiny"])
    out = capsys.readouterr().out
    assert "dbot-released/pretrain" in out and "wrote" in out
    sd = ckpt.read_state_dict(tmp_path / "out.safetensors")
    assert "blocks.0.attn.qkv.weight" in sd and "decoder_embed.weight" not in sd


def test_the_teacher_inside_checkpoint_last_reads_with_key_target(tmp_path):
    teacher = build_vit("tiny")
    state = {"model": {}, "target": {f"teacher.{k}": v for k, v in teacher.state_dict().items()}}
    path = ckpt.save(state, tmp_path / "last.pth")
    sd, _ = convert.read_backbone(path, key="target")
    assert sd.keys() == teacher.state_dict().keys()
    cnn = ckpt.save({"model": {"conv.weight": torch.ones(1)}}, tmp_path / "cnn.pth")
    with pytest.raises(ckpt.CheckpointError, match="not a ViT checkpoint in a known layout"):
        convert.read_backbone(cnn)
