"""Checkpoint converters: the authors' and MAE's layouts, timm round trip, target layouts written out from the
published code, position-embedding and patch-kernel resizing, errors."""

import argparse

import numpy as np
import pytest
import timm
import torch
from timm.layers import resample_abs_pos_embed

from core import checkpoint as ckpt
from core import weights
from core.vit import build_vit, preset
from tools import convert

# tiny dims: 96-d, 4 blocks, patch 4, 8x8 grid; a 32-d decoder with 1 block predicting 96-d targets
D, DEPTH, P, GRID, DD = 96, 4, 4, 8, 32


def block_keys(prefix: str, dim: int) -> dict:
    """One timm/MAE `Block`: norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2 (mlp ratio 4)."""
    shapes = {
        "norm1.weight": (dim,),
        "norm1.bias": (dim,),
        "attn.qkv.weight": (3 * dim, dim),
        "attn.qkv.bias": (3 * dim,),
        "attn.proj.weight": (dim, dim),
        "attn.proj.bias": (dim,),
        "norm2.weight": (dim,),
        "norm2.bias": (dim,),
        "mlp.fc1.weight": (4 * dim, dim),
        "mlp.fc1.bias": (4 * dim,),
        "mlp.fc2.weight": (dim, 4 * dim),
        "mlp.fc2.bias": (dim,),
    }
    return {f"{prefix}{k}": s for k, s in shapes.items()}


def published_pretrain_keys(pred: str) -> tuple[dict, dict]:
    """(encoder, pretraining-only) key -> shape of MAE's `MaskedAutoencoderViT` (models_mae.py); the released
    dBOT file names the prediction layer `decoder_predp`."""
    enc = {
        "cls_token": (1, 1, D),
        "pos_embed": (1, 1 + GRID * GRID, D),
        "patch_embed.proj.weight": (D, 3, P, P),
        "patch_embed.proj.bias": (D,),
        "norm.weight": (D,),
        "norm.bias": (D,),
    }
    for i in range(DEPTH):
        enc |= block_keys(f"blocks.{i}.", D)
    dec = {
        "mask_token": (1, 1, DD),
        "decoder_embed.weight": (DD, D),
        "decoder_embed.bias": (DD,),
        "decoder_pos_embed": (1, 1 + GRID * GRID, DD),
        "decoder_norm.weight": (DD,),
        "decoder_norm.bias": (DD,),
        f"{pred}.weight": (D, DD),
        f"{pred}.bias": (D,),
    } | block_keys("decoder_blocks.0.", DD)
    return enc, dec


def released_file(tmp_path, pred="decoder_predp"):
    """A file in the released dBOT/MAE pretraining container: {'model', 'optimizer', 'epoch', 'scaler', 'args'}."""
    enc, dec = published_pretrain_keys(pred)
    g = torch.Generator().manual_seed(0)
    sd = {k: torch.randn(s, generator=g) for k, s in (enc | dec).items()}
    path = tmp_path / f"released_{pred}.pth"
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
    return path, sd, set(dec)


@pytest.mark.parametrize("pred", ["decoder_predp", "decoder_pred"])
def test_released_pretraining_file_imports_with_decoder_dropped_and_nothing_missing(tmp_path, pred):
    path, sd, decoder_keys = released_file(tmp_path, pred)
    enc, info = weights.read_backbone(path)
    assert info.layout == ("dbot-released/pretrain" if pred == "decoder_predp" else "mae/pretrain")
    assert set(info.dropped) == decoder_keys
    model = build_vit("tiny")
    report = ckpt.load_weights(model, enc, source=str(path))  # strict: nothing missing, nothing unexpected
    assert not report.missing and not report.unexpected and not report.adapted
    assert torch.equal(model.blocks[2].mlp.fc1.weight, sd["blocks.2.mlp.fc1.weight"])


def test_fine_tuned_file_head_dropped_unless_asked(tmp_path):
    enc, _ = published_pretrain_keys("decoder_pred")
    sd = {k: torch.zeros(s) for k, s in enc.items() if not k.startswith("norm.")}
    sd |= {"fc_norm.weight": torch.ones(D), "fc_norm.bias": torch.zeros(D), "head.weight": torch.zeros(1000, D)}
    sd |= {"head.bias": torch.zeros(1000)}
    path = ckpt.save({"model": sd, "epoch": 99, "args": argparse.Namespace()}, tmp_path / "ft.pth")
    body, info = weights.read_backbone(path)
    assert info.layout == "mae/finetune" and sorted(info.dropped) == [
        "fc_norm.bias",
        "fc_norm.weight",
        "head.bias",
        "head.weight",
    ]
    assert not any(k.startswith(("head.", "fc_norm.")) for k in body)
    full, _ = weights.read_backbone(path, keep_head=True)
    assert "fc_norm.weight" in full and "head.weight" in full


def test_our_encoder_to_timm_file_to_timm_model_gives_the_same_features(tmp_path):
    ours = build_vit("base").eval()
    ours.initialize_weights(torch.Generator().manual_seed(0))
    src = ckpt.save({"model": ours.state_dict()}, tmp_path / "ours.pth")
    done = convert.convert(src, tmp_path / "timm.pth", "timm")  # size guessed: base
    dst, report = done.path, done.report
    assert not report.missing and not report.adapted and not report.unexpected
    assert done.load.consumer.kwargs == {"model_name": "vit_base_patch16_224", "num_classes": 0} and done.load.ok
    theirs = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0, checkpoint_path=str(dst)).eval()
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(1))
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


def keys_cubic(t: float, a: float = -0.75) -> float:
    """Keys' cubic convolution kernel with PyTorch's a = -0.75."""
    t = abs(t)
    if t <= 1:
        return (a + 2) * t**3 - (a + 3) * t**2 + 1
    if t < 2:
        return a * t**3 - 5 * a * t**2 + 8 * a * t - 4 * a
    return 0.0


def bicubic_reference(grid: np.ndarray, out: int) -> np.ndarray:
    """[n, n, C] -> [out, out, C] by separable cubic convolution with half-pixel centres
    (align_corners=False: source x = (i + 0.5) * n / out - 0.5) and border replication."""
    n = grid.shape[0]
    w = np.zeros((out, n))
    for i in range(out):
        x = (i + 0.5) * n / out - 0.5
        x0 = int(np.floor(x))
        for k in range(x0 - 1, x0 + 3):
            w[i, min(max(k, 0), n - 1)] += keys_cubic(x - k)
    return np.einsum("ih,jw,hwc->ijc", w, w, grid)


def test_position_embedding_interpolation_is_bicubic_align_corners_false_with_cls_kept(tmp_path):
    model = build_vit("tiny")
    src = ckpt.save({"model": model.state_dict()}, tmp_path / "t.pth")
    done = convert.convert(src, tmp_path / "t64.pth", "backbone", model="tiny", img_size=64)
    path, report = done.path, done.report
    assert report.adapted == {"pos_embed": "(1, 65, 96) -> (1, 257, 96)"}
    old, new = model.pos_embed.detach(), ckpt.load(path)["model"]["pos_embed"]
    assert torch.equal(new[:, 0], old[:, 0])  # cls position untouched
    ref = bicubic_reference(old[0, 1:].reshape(8, 8, 96).double().numpy(), 16)
    assert np.allclose(new[0, 1:].reshape(16, 16, 96).numpy(), ref, atol=1e-5)
    # timm's resampler agrees with antialias off; its default (antialias=True) uses PIL's a = -0.5 kernel, not
    # the one MAE / BEiT / dBOT fine-tuning used
    assert torch.allclose(new, resample_abs_pos_embed(old, [16, 16], num_prefix_tokens=1, antialias=False), atol=1e-6)
    assert not torch.allclose(new, resample_abs_pos_embed(old, [16, 16], num_prefix_tokens=1), atol=1e-4)


def test_patch_kernel_resized_as_vitdet_did_for_vit_h(tmp_path):
    model = build_vit("tiny")  # patch 4 on 32 px; ViTDet-style 14 -> 16 here is 4 -> 8 on 64 px
    src = ckpt.save({"model": model.state_dict()}, tmp_path / "t.pth")
    done = convert.convert(src, tmp_path / "p8.pth", "backbone", model="tiny", img_size=64, patch_size=8)
    path, report = done.path, done.report
    assert report.adapted == {"patch_embed.proj.weight": "(96, 3, 4, 4) -> (96, 3, 8, 8)"}  # grid stays 8 x 8
    w = ckpt.load(path)["model"]["patch_embed.proj.weight"]
    ref = torch.nn.functional.interpolate(model.patch_embed.proj.weight.detach(), size=(8, 8), mode="bicubic")
    assert w.shape == (96, 3, 8, 8) and torch.allclose(w, ref)


def test_a_large_file_into_a_base_model_is_a_clear_error(tmp_path):
    with torch.device("meta"):
        large = build_vit("large").state_dict()
    src = tmp_path / "large.safetensors"
    from safetensors.torch import save_file

    save_file({k: torch.zeros(v.shape) for k, v in large.items() if not k.startswith("blocks.1")}, str(src))
    with pytest.raises(
        ckpt.CheckpointError, match=r"large.safetensors: does not fit a ViT-base \(the weights look like ViT-large\)"
    ):
        convert.convert(src, tmp_path / "x.pth", "timm", model="base")


# The published target layouts, written out for the tiny encoder (4 blocks).
def expected_detectron2() -> set:
    """detectron2 ViTDet: `backbone.net.` + patch_embed.proj, pos_embed (with the cls entry), blocks with
    timm names; no cls_token, no final norm (rel_pos_h/w are ViTDet's own, zero-initialised)."""
    keys = {"patch_embed.proj.weight", "patch_embed.proj.bias", "pos_embed"}
    for i in range(DEPTH):
        keys |= set(block_keys(f"blocks.{i}.", D))
    return {f"backbone.net.{k}" for k in keys}


def expected_mmseg_mae() -> set:
    """mmsegmentation `MAE` (mmseg/models/backbones/mae.py on beit.py; the block names of its beit2mmseg.py):
    layers.N.{gamma_1, gamma_2, ln1, attn.qkv, attn.proj, ln2, ffn.layers.0.0, ffn.layers.1},
    patch_embed.projection, cls_token, pos_embed; the final norm as ln1 (used only with final_norm=True)."""
    keys = {"cls_token", "pos_embed", "patch_embed.projection.weight", "patch_embed.projection.bias"}
    keys |= {"ln1.weight", "ln1.bias"}
    for i in range(DEPTH):
        for part in ("ln1", "ln2", "attn.qkv", "attn.proj", "ffn.layers.0.0", "ffn.layers.1"):
            keys |= {f"layers.{i}.{part}.weight", f"layers.{i}.{part}.bias"}
        keys |= {f"layers.{i}.gamma_1", f"layers.{i}.gamma_2"}
    return keys


def expected_mmseg_vit() -> set:
    """mmsegmentation VisionTransformer (vit2mmseg): layers.N.{ln1, attn.attn.in_proj_*, attn.attn.out_proj,
    ln2, ffn.layers.0.0, ffn.layers.1}, patch_embed.projection, cls_token, pos_embed, final ln1."""
    keys = {"cls_token", "pos_embed", "patch_embed.projection.weight", "patch_embed.projection.bias"}
    keys |= {"ln1.weight", "ln1.bias"}
    for i in range(DEPTH):
        for part in ("ln1", "ln2", "attn.attn.out_proj", "ffn.layers.0.0", "ffn.layers.1"):
            keys |= {f"layers.{i}.{part}.weight", f"layers.{i}.{part}.bias"}
        keys |= {f"layers.{i}.attn.attn.in_proj_weight", f"layers.{i}.attn.attn.in_proj_bias"}
    return keys


def expected_mmpretrain() -> set:
    """mmpretrain VisionTransformer: as mmseg but its MultiheadAttention holds `qkv` and `proj` Linears."""
    keys = {"cls_token", "pos_embed", "patch_embed.projection.weight", "patch_embed.projection.bias"}
    keys |= {"ln1.weight", "ln1.bias"}
    for i in range(DEPTH):
        for part in ("ln1", "ln2", "attn.qkv", "attn.proj", "ffn.layers.0.0", "ffn.layers.1"):
            keys |= {f"layers.{i}.{part}.weight", f"layers.{i}.{part}.bias"}
    return keys


@pytest.mark.parametrize(
    "layout, container, expected",
    [
        ("detectron2", "model", expected_detectron2),
        ("mmdet", "model", lambda: {k[len("backbone.net.") :] for k in expected_detectron2()}),
        ("mmseg", "state_dict", expected_mmseg_mae),
        ("mmseg-vit", "state_dict", expected_mmseg_vit),
        ("mmpretrain", "state_dict", expected_mmpretrain),
    ],
)
def test_target_layouts_match_the_published_key_lists(tmp_path, layout, container, expected):
    model = build_vit("tiny")
    sd = model.state_dict()
    path = convert.write(sd, tmp_path / f"{layout}.pth", layout)
    written = ckpt.load(path)[container]
    assert set(written) == expected()
    qkv = {"detectron2": "backbone.net.blocks.1.attn.qkv.weight", "mmdet": "blocks.1.attn.qkv.weight"}
    qkv |= {"mmseg": "layers.1.attn.qkv.weight", "mmseg-vit": "layers.1.attn.attn.in_proj_weight"}
    qkv |= {"mmpretrain": "layers.1.attn.qkv.weight"}
    assert torch.equal(written[qkv[layout]], sd["blocks.1.attn.qkv.weight"])


def test_command_line_report_and_safetensors_output(tmp_path, capsys):
    path, _, _ = released_file(tmp_path)
    convert.main([str(path), str(tmp_path / "out.safetensors"), "--to", "timm", "--img-size", "64"])
    out = capsys.readouterr().out
    assert "dbot-released/pretrain" in out and "dropped 20 pretraining/head tensors: " in out
    assert "adapted: pos_embed (1, 65, 96) -> (1, 257, 96)" in out and "wrote" in out
    assert "consumer: timm.create_model(model_name='vit_base_patch16_224', patch_size=4, " in out
    assert f"img_size=64, checkpoint_path='{tmp_path / 'out.safetensors'}')" in out and "WARNING" not in out
    sd = ckpt.read_state_dict(tmp_path / "out.safetensors")
    assert sd["pos_embed"].shape == (1, 257, 96) and "decoder_embed.weight" not in sd
    with pytest.raises(ckpt.CheckpointError, match="does not fit a ViT-small"):  # python -m: one error line
        convert.main([str(path), str(tmp_path / "x.pth"), "--model", "small"])


def test_the_teacher_inside_checkpoint_last_reads_with_key_target(tmp_path):
    teacher = build_vit("tiny")
    state = {"model": {}, "target": {f"teacher.{k}": v for k, v in teacher.state_dict().items()}}
    path = ckpt.save(state, tmp_path / "last.pth")
    sd, _ = weights.read_backbone(path, key="target")
    assert sd.keys() == teacher.state_dict().keys()
    cnn = ckpt.save({"model": {"conv.weight": torch.ones(1)}}, tmp_path / "cnn.pth")
    with pytest.raises(
        ckpt.CheckpointError, match="not a ViT checkpoint in a known layout.*found e.g. \\['conv.weight'\\]"
    ):
        weights.read_backbone(cnn)


# ------------------------------------------------------------------------- consumers: what they load
def random_vit(init_values=None, seed=0):
    vit = build_vit("tiny", **({"init_values": init_values} if init_values else {})).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in vit.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2 + (1.0 if p.ndim == 1 else 0.0))
    return vit


@pytest.mark.parametrize(
    "layout, new, unused",
    [
        ("timm", set(), set()),
        ("detectron2", {f"backbone.net.blocks.{i}.attn.rel_pos_{a}" for i in range(DEPTH) for a in "hw"}, set()),
        ("mmdet", {f"blocks.{i}.attn.rel_pos_{a}" for i in range(DEPTH) for a in "hw"}, set()),
        (
            "mmseg",
            {f"layers.{i}.attn.relative_position_{t}" for i in range(DEPTH) for t in ("bias_table", "index")},
            {"ln1.weight", "ln1.bias"},  # MAE(final_norm=False), as mmseg's MAE config and this suite's recipe
        ),
        ("mmseg-vit", set(), set()),
        ("mmpretrain", set(), set()),
    ],
)
def test_each_consumer_loads_every_tensor_and_only_its_own_new_parts_are_not_in_the_file(layout, new, unused):
    sd = build_vit("tiny").state_dict()
    report = convert.consumer_report(convert.layout_weights(sd, layout), convert.consumer(layout, sd))
    assert not report.at_init and not report.mismatched and report.ok
    assert set(report.new) == new and set(report.unused) == unused
    assert len(report.loaded) == len(convert.layout_weights(sd, layout)) - len(unused)


def test_a_file_in_names_the_consumer_does_not_have_is_reported_not_silent():
    sd = build_vit("tiny").state_dict()
    # the pre-fix `--to mmseg` (VisionTransformer names) read by mmseg's MAE backbone: every attention layer and
    # every layer scale would keep its random initialisation: 4 blocks x (qkv, proj: weight and bias; gamma_1, gamma_2)
    report = convert.consumer_report(convert.to_mmseg_vit(sd), convert.consumer("mmseg", sd))
    assert {f"layers.{i}.attn.qkv.weight" for i in range(DEPTH)} <= set(report.at_init)
    assert {f"layers.{i}.gamma_2" for i in range(DEPTH)} <= set(report.at_init) and not report.ok
    assert "layers.0.attn.attn.in_proj_weight" in report.unused
    assert "WARNING left at random init (24)" in report.summary()


def test_layer_scale_is_folded_exactly_for_consumers_without_it():
    beit = random_vit(init_values=0.1)
    folded = convert.fold_layer_scale(beit.state_dict())
    assert not any(".ls" in k for k in folded)
    plain = build_vit("tiny").eval()
    plain.load_state_dict(folded)  # strict: a plain ViT's keys exactly
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.allclose(plain.forward_features(x), beit.forward_features(x), atol=1e-5)
    d2 = convert.to_detectron2(beit.state_dict())
    assert torch.equal(d2["backbone.net.blocks.2.mlp.fc2.bias"], folded["blocks.2.mlp.fc2.bias"])


def test_a_beit_style_student_exported_to_timm_loads_strictly_with_the_printed_arguments(tmp_path, capsys):
    from pretrain.beit import SymmetricStudent

    student = SymmetricStudent(target_dim=10, **preset("tiny")).eval()
    with torch.no_grad():
        for i, blk in enumerate(student.blocks):
            blk.ls1.gamma.uniform_(0.05, 0.5, generator=torch.Generator().manual_seed(i))
            blk.ls2.gamma.uniform_(0.05, 0.5, generator=torch.Generator().manual_seed(10 + i))
    src = ckpt.save({"model": student.state_dict()}, tmp_path / "beit.pth")
    convert.main([str(src), str(tmp_path / "beit_timm.pth"), "--to", "timm"])
    out = capsys.readouterr().out
    assert "init_values=0.1" in out and "WARNING" not in out
    done = convert.convert(src, tmp_path / "beit_timm.pth", "timm")
    kw = done.load.consumer.kwargs
    assert kw["init_values"] == 0.1 and kw["model_name"] == "vit_base_patch16_224"
    with pytest.raises(RuntimeError, match="Unexpected key.*ls1.gamma"):  # what a plain ViT does with the file
        timm.create_model(**{k: v for k, v in kw.items() if k != "init_values"}, checkpoint_path=str(done.path))
    theirs = timm.create_model(**kw, checkpoint_path=str(done.path)).eval()  # timm's strict load
    student.rel_pos_bias = None  # the shared bias is the student's own (dropped: read_backbone lists it)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert torch.allclose(theirs.forward_features(x), student.forward_tokens(x, final_norm=True), atol=1e-5)
