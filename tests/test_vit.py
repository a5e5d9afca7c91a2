"""The shared ViT backbone: MAE's sin-cos table, position-embedding resizing, the layer-decay rule, and the one
backbone interface (block loop with per-block bias and checkpointing, feature taps, no-weight-decay names) that
every task's model runs on, pinned bit for bit against the loops the tasks wrote out before it and against timm."""

import math

import pytest
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer

from core.optim import param_groups
from core.vit import (
    PRESETS,
    RelativePositionBias,
    ViT,
    build_vit,
    relative_position_bias,
    relative_position_index,
    resize_pos_embed,
    sincos_pos_embed_2d,
    take_indices,
)
from detection.backbone import ViTDetBackbone, abs_pos
from pretrain.beit import SymmetricStudent
from segmentation.backbone import SegViT


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


def test_forward_features_and_taps_equal_timms_own_code():
    model = build_vit("tiny", num_classes=5, global_pool="avg").eval()
    x = torch.randn(2, 3, 32, 32)
    ours = model.forward_features(x)  # what the classifier runs: the shared loop
    assert torch.equal(ours, VisionTransformer.forward_features(model, x))  # timm's own implementation
    assert torch.equal(model(x), VisionTransformer.forward(model, x))
    assert torch.equal(model.forward_tokens(x), ours)
    keep = torch.arange(10).expand(2, 10)
    assert model.forward_tokens(x, keep_ids=keep).shape == (2, 11, 96)
    for kw in ({"indices": 2}, {"indices": [0, 2], "norm": True}, {"output_fmt": "NLC", "return_prefix_tokens": True}):
        last, feats = model.forward_intermediates(x, **kw)
        t_last, t_feats = VisionTransformer.forward_intermediates(model, x, **kw)
        assert torch.equal(last, t_last) and len(feats) == len(t_feats)
        for a, b in zip(feats, t_feats):
            for u, v in zip(a, b) if isinstance(a, tuple) else [(a, b)]:
                assert torch.equal(u, v)
    assert take_indices(4, None) == [0, 1, 2, 3] and take_indices(4, 1) == [3] and take_indices(4, (-1, 0)) == [3, 0]
    with pytest.raises(ValueError, match="out of range"):
        take_indices(4, (4,))
    with pytest.raises(ValueError, match="attn_mask"):
        model.forward_features(x, attn_mask=torch.zeros(1))


def test_relative_position_bias_is_beits_table_lookup_by_hand():
    gh, gw, heads = 2, 3, 2
    rpb = RelativePositionBias((gh, gw), heads)
    assert torch.equal(rpb(), torch.zeros(1, heads, 7, 7))  # zero-initialised
    with torch.no_grad():
        rpb.table.copy_(torch.randn_like(rpb.table))
    bias = rpb()
    n_rel = (2 * gh - 1) * (2 * gw - 1)
    coords = [(y, x) for y in range(gh) for x in range(gw)]
    for i in range(7):
        for j in range(7):
            if i and j:  # BEiT: (dy + gh - 1) * (2 gw - 1) + (dx + gw - 1), dy = y_i - y_j
                (yi, xi), (yj, xj) = coords[i - 1], coords[j - 1]
                row = (yi - yj + gh - 1) * (2 * gw - 1) + (xi - xj + gw - 1)
            else:
                row = n_rel + 2 if i == j == 0 else n_rel if i == 0 else n_rel + 1
            assert torch.equal(bias[0, :, i, j], rpb.table[row]), (i, j)
    assert torch.equal(relative_position_index((gh, gw)), rpb.index)


def test_the_table_gradient_is_the_sum_over_the_positions_that_read_it():
    table = torch.randn(12, 1, requires_grad=True)
    index = relative_position_index((2, 2))
    relative_position_bias(table, index).sum().backward()
    counts = torch.bincount(index.flatten(), minlength=12).float()
    assert torch.equal(table.grad[:, 0], counts)


def run_with_grads(model, x, seed=5):
    torch.manual_seed(seed)
    out = model(x)
    outs = out if isinstance(out, list) else [out]
    sum((o * (i + 1)).square().mean() for i, o in enumerate(outs)).backward()
    return [o.detach() for o in outs], {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def seg_reference(seg, x):
    """The segmentation backbone's forward as it was written before the shared loop (kept here to pin it)."""
    n, (gh, gw) = x.shape[0], seg.grid_size
    tokens = seg.patch_embed(x) + seg.pos_embed[:, 1:]
    cls = (seg.cls_token + seg.pos_embed[:, :1]).expand(n, -1, -1)
    tokens = seg.pos_drop(torch.cat([cls, tokens], dim=1))
    maps = []
    for i, blk in enumerate(seg.blocks):
        t = seg.relative_position_index.shape[0]
        table = blk.attn.relative_position_bias_table
        bias = table.index_select(0, seg.relative_position_index.flatten()).reshape(t, t, -1).permute(2, 0, 1)[None]
        if seg.grad_checkpointing:
            tokens = torch.utils.checkpoint.checkpoint(blk, tokens, bias, use_reentrant=False)
        else:
            tokens = blk(tokens, attn_mask=bias)
        if i in seg.out_indices:
            maps.append(tokens[:, 1:].transpose(1, 2).reshape(n, -1, gh, gw))
    return [adapt(m) for adapt, m in zip((seg.fpn1, seg.fpn2, seg.fpn3, seg.fpn4), maps)]


@pytest.mark.parametrize("checkpointing", [False, True])
def test_segmentation_backbone_is_bit_identical_to_its_written_out_loop(checkpointing):
    torch.manual_seed(0)
    kw = dict(img_size=32, patch_size=4, embed_dim=32, depth=4, num_heads=2, out_indices=(0, 1, 2, 3))
    seg = SegViT(**kw, drop_path_rate=0.2, grad_checkpointing=checkpointing).train()
    with torch.no_grad():
        for blk in seg.blocks:
            blk.attn.relative_position_bias_table.normal_()
    x = torch.randn(2, 3, 32, 32)
    outs, grads = run_with_grads(seg, x)
    seg.zero_grad(set_to_none=True)
    seg.forward = lambda images: seg_reference(seg, images)
    ref_outs, ref_grads = run_with_grads(seg, x)
    assert all(torch.equal(a, b) for a, b in zip(outs, ref_outs))
    assert grads.keys() == ref_grads.keys() and all(torch.equal(grads[k], ref_grads[k]) for k in grads), [
        k for k in grads if not torch.equal(grads[k], ref_grads[k])
    ]


def test_symmetric_student_and_vitdet_are_bit_identical_to_their_written_out_loops():
    torch.manual_seed(0)
    s = SymmetricStudent(
        target_dim=8, img_size=32, patch_size=4, embed_dim=32, depth=3, num_heads=2, drop_path_rate=0.1
    )
    with torch.no_grad():
        s.rel_pos_bias.table.normal_()
    x, mask = torch.randn(2, 3, 32, 32), (torch.rand(2, 64) < 0.4)

    def beit_reference(images):  # mask tokens in, one bias computed once for all blocks
        t = s.patch_embed(images)
        w = mask.unsqueeze(-1).to(t.dtype)
        t = t * (1 - w) + s.mask_token * w
        t = t + s.pos_embed[:, 1:]
        t = torch.cat([(s.cls_token + s.pos_embed[:, :1]).expand(t.shape[0], -1, -1), t], dim=1)
        bias = s.rel_pos_bias.table.index_select(0, s.rel_pos_bias.index.flatten()).reshape(65, 65, -1)
        bias = bias.permute(2, 0, 1)[None]
        for blk in s.blocks:
            t = blk(t, attn_mask=bias)
        return s.decoder_pred(s.norm(t))

    torch.manual_seed(5)
    ours = s.decoder_pred(s.encode(x, mask))
    ours.square().mean().backward()
    grads = {n: p.grad.clone() for n, p in s.named_parameters() if p.grad is not None}
    s.zero_grad(set_to_none=True)
    torch.manual_seed(5)
    ref = beit_reference(x)
    ref.square().mean().backward()
    assert torch.equal(ours, ref)
    assert all(torch.equal(grads[n], p.grad) for n, p in s.named_parameters() if p.grad is not None)

    torch.manual_seed(0)
    kw = dict(img_size=32, patch_size=4, pos_grid=4, embed_dim=32, depth=4, num_heads=2, window_size=4)
    det = ViTDetBackbone(**kw, global_blocks=(1, 3), drop_path_rate=0.2).train()
    outs, grads = run_with_grads(det, x)
    det.zero_grad(set_to_none=True)

    def vitdet_reference(images):
        t = det.patch_embed(images)
        t = t + abs_pos(det.pos_embed, t.shape[1:3])
        for blk in det.blocks:
            t = blk(t)
        return t.permute(0, 3, 1, 2)

    det.forward = vitdet_reference
    ref_outs, ref_grads = run_with_grads(det, x)
    assert torch.equal(outs[0], ref_outs[0]) and all(torch.equal(grads[k], ref_grads[k]) for k in grads)


def test_every_backbone_shares_the_interface():
    vit, det = (
        build_vit("tiny"),
        ViTDetBackbone(img_size=32, patch_size=4, pos_grid=8, embed_dim=32, depth=2, num_heads=2),
    )
    assert vit.no_weight_decay() == {"cls_token", "pos_embed"} and det.no_weight_decay() == {"pos_embed"}
    for m in (vit, det):
        assert m.num_layers == len(m.blocks) + 1
        assert m.layer_id("pos_embed") == m.layer_id("patch_embed.proj.weight") == 0
        assert m.layer_id("blocks.1.attn.qkv.weight") == 2 and m.layer_id("anything.else") == m.num_layers
        assert m.grad_checkpointing is False
        m.set_grad_checkpointing()
        assert m.grad_checkpointing is True
    assert ViT(grad_checkpointing=True, **PRESETS["tiny"]).grad_checkpointing


def test_counted_vit_b_forward_flops_match_the_published_figure():
    # docs/RECIPES.md 8: ViT-B/16 at 224 is 17.6 GMACs (fvcore, which also counts norms and activations);
    # FlopCounterMode counts matrix products and attention only, so it lands a few percent below.
    from torch.utils.flop_counter import FlopCounterMode

    model = build_vit("base").eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model.forward_features(torch.randn(1, 3, 224, 224))
    gmacs = counter.get_total_flops() / 2e9
    assert 0.93 * 17.6 < gmacs < 17.6
