"""The shared ViT backbone: MAE's sin-cos table, position-embedding resizing, the layer-decay rule."""

import math

import pytest
import torch
import torch.nn.functional as F

from core.optim import param_groups
from core.vit import PRESETS, ViT, build_vit, resize_pos_embed, sincos_pos_embed_2d


def test_sincos_matches_mae_formula_by_hand():
    # D=8: per axis 4 channels = [sin(p*w0), sin(p*w1), cos(p*w0), cos(p*w1)], w_i = 1/10000**(i/2);
    # the first half encodes the column (w) index, the second the row (h) index; cls row is zero.
    emb = sincos_pos_embed_2d(8, 2, cls_token=True)[0]
    assert emb.shape == (5, 8)
    assert torch.all(emb[0] == 0)
    w = [1.0, 1.0 / 100.0]
    # token for (row 1, col 0) is index 1 + 1*2 + 0 = 3
    col, row = 0.0, 1.0
    expect = [
        math.sin(col * w[0]),
        math.sin(col * w[1]),
        math.cos(col * w[0]),
        math.cos(col * w[1]),
        math.sin(row * w[0]),
        math.sin(row * w[1]),
        math.cos(row * w[0]),
        math.cos(row * w[1]),
    ]
    assert torch.allclose(emb[3], torch.tensor(expect), atol=1e-7)


def test_resize_pos_embed_is_bicubic_align_corners_false_and_keeps_cls():
    pe = torch.randn(1, 1 + 4 * 4, 6)
    out = resize_pos_embed(pe, (6, 6))
    grid = pe[:, 1:].reshape(1, 4, 4, 6).permute(0, 3, 1, 2)
    ref = F.interpolate(grid, size=(6, 6), mode="bicubic", align_corners=False).permute(0, 2, 3, 1).reshape(1, 36, 6)
    assert torch.equal(out[:, :1], pe[:, :1])
    assert torch.allclose(out[:, 1:], ref)
    assert resize_pos_embed(pe, (4, 4)) is pe


def test_timm_parameter_names():
    names = set(build_vit("tiny").state_dict())
    for key in (
        "cls_token",
        "pos_embed",
        "patch_embed.proj.weight",
        "blocks.0.attn.qkv.weight",
        "blocks.3.mlp.fc2.bias",
        "norm.weight",
    ):
        assert key in names


@pytest.mark.parametrize("size", ["base", "large", "huge"])
def test_presets_have_published_sizes(size):
    # parameter counts of timm's vit_{base,large}_patch16_224 / vit_huge_patch14_224 without a head
    expected = {"base": 85.80, "large": 303.30, "huge": 630.76}[size]
    with torch.device("meta"):
        model = ViT(**PRESETS[size])
    assert sum(p.numel() for p in model.parameters()) / 1e6 == pytest.approx(expected, abs=0.01)


def test_layer_ids_and_decay_scales_follow_the_published_rule():
    model = build_vit("tiny", num_classes=5, global_pool="avg")
    depth = len(model.blocks)
    assert model.num_layers == depth + 1
    groups = param_groups(model, 0.05, layer_decay=0.5, layer_id=model.layer_id, num_layers=model.num_layers)
    seen = {}
    for g in groups:
        for n in g["names"]:
            seen[n] = (g["layer_id"], g["lr_scale"], g["weight_decay"])
    assert seen["cls_token"][0] == seen["pos_embed"][0] == seen["patch_embed.proj.weight"][0] == 0
    for i in range(depth):
        assert seen[f"blocks.{i}.attn.qkv.weight"][0] == i + 1
        assert seen[f"blocks.{i}.attn.qkv.weight"][1] == pytest.approx(0.5 ** (depth - i))
    assert seen["head.weight"][:2] == (depth + 1, 1.0)
    assert seen["fc_norm.weight"][0] == depth + 1
    assert seen["patch_embed.proj.weight"][1] == pytest.approx(0.5 ** (depth + 1))
    # no weight decay on 1-D parameters and biases, weight decay on matrices
    assert seen["blocks.0.norm1.weight"][2] == 0 and seen["blocks.0.attn.qkv.bias"][2] == 0
    assert seen["blocks.0.attn.qkv.weight"][2] == 0.05


def test_initialize_weights_is_reproducible_from_a_generator():
    a, b = build_vit("tiny"), build_vit("tiny")
    a.initialize_weights(torch.Generator().manual_seed(3))
    b.initialize_weights(torch.Generator().manual_seed(3))
    for (k, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), k
    assert torch.allclose(a.cls_token.std(), torch.tensor(0.02), rtol=0.5)


def test_arch_rebuilds_the_same_encoder():
    model = build_vit("tiny", depth=2)
    again = ViT(**model.arch)
    assert {k: v.shape for k, v in again.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}


def test_forward_tokens_equals_timm_forward_features():
    model = build_vit("tiny").eval()
    x = torch.randn(2, 3, 32, 32)
    assert torch.allclose(model.forward_tokens(x), model.forward_features(x), atol=1e-6)
    keep = torch.arange(10).expand(2, 10)
    assert model.forward_tokens(x, keep_ids=keep).shape == (2, 11, 96)


def test_counted_vit_b_forward_flops_match_the_published_figure():
    # RECIPES.md 8: ViT-B/16 at 224 is 17.6 GMACs (fvcore, which also counts norms and activations);
    # FlopCounterMode counts matrix products and attention only, so it lands a few percent below.
    from torch.utils.flop_counter import FlopCounterMode

    model = build_vit("base").eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model.forward_features(torch.randn(1, 3, 224, 224))
    gmacs = counter.get_total_flops() / 2e9
    assert 0.93 * 17.6 < gmacs < 17.6
