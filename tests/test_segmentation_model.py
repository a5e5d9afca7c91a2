"""Segmentation model: pyramid pooling and head shapes, the backbone's taps and adapters, relative position
bias (BEiT's index, zero at start), the authors' layer-decay groups, loading a pretrained checkpoint."""

import pytest
import torch

from core import checkpoint as ckpt
from core.optim import param_groups
from core.vit import ViT, build_vit, relative_position_index, resize_pos_embed
from segmentation.backbone import SegViT
from segmentation.model import load_pretrained
from segmentation.train import build_optimizer
from segmentation.upernet import PPM, FCNHead, UPerHead

SMALL16 = dict(img_size=64, patch_size=16, embed_dim=32, depth=4, num_heads=2)


def test_pyramid_pooling_shapes_and_global_branch():
    torch.manual_seed(0)
    ppm = PPM((1, 2, 3, 6), 16, 8).eval()
    x = torch.randn(2, 16, 7, 9)
    outs = ppm(x)
    assert [tuple(o.shape) for o in outs] == [(2, 8, 7, 9)] * 4
    # the 1 x 1 branch pools globally: its upsampled output is constant over the map
    assert torch.allclose(outs[0], outs[0][:, :, :1, :1].expand_as(outs[0]))
    # the 6 x 6 branch is not
    assert not torch.allclose(outs[3], outs[3][:, :, :1, :1].expand_as(outs[3]))


def test_uperhead_and_fcn_head_shapes():
    maps = [torch.randn(2, 32, s, s) for s in (16, 8, 4, 2)]
    head = UPerHead([32] * 4, 24, 5)
    assert head(maps).shape == (2, 5, 16, 16)
    assert head.bottleneck.conv.in_channels == 32 + 4 * 24 and head.fpn_bottleneck.conv.in_channels == 4 * 24
    assert FCNHead(32, 16, 5)(maps[2]).shape == (2, 5, 4, 4)


def test_backbone_taps_reach_strides_4_to_32():
    vit16 = SegViT(**SMALL16, out_indices=(0, 1, 2, 3))
    maps = vit16(torch.randn(2, 3, 64, 64))
    assert [tuple(m.shape) for m in maps] == [(2, 32, 16, 16), (2, 32, 8, 8), (2, 32, 4, 4), (2, 32, 2, 2)]
    assert vit16.strides == [4, 8, 16, 32] and isinstance(vit16.fpn1[1], torch.nn.BatchNorm2d)
    tiny = SegViT(img_size=48, patch_size=4, embed_dim=96, depth=4, num_heads=3, out_indices=(0, 1, 2, 3))
    assert [m.shape[-1] for m in tiny(torch.randn(1, 3, 48, 48))] == [12, 6, 3, 1]
    assert tiny.strides == [4, 8, 16, 32]
    with pytest.raises(ValueError, match="out_indices"):
        SegViT(**SMALL16, out_indices=(3, 5, 7, 11))


def test_relative_position_index_is_beits():
    idx = relative_position_index((2, 2))  # table of 3 x 3 offsets + 3 cls entries = 12 rows
    assert idx[1, 2] == (0 + 1) * 3 + (-1 + 1)  # patch (0,0) -> patch (0,1): dy 0, dx -1
    assert idx[1, 4] == (-1 + 1) * 3 + (-1 + 1)  # (0,0) -> (1,1)
    assert (idx[0, 1], idx[1, 0], idx[0, 0]) == (9, 10, 11)


def test_zero_bias_and_unit_layer_scale_leave_the_pretrained_encoder_unchanged():
    torch.manual_seed(0)
    seg = SegViT(**SMALL16, out_indices=(0, 1, 2, 3)).eval()
    plain = ViT(**SMALL16).eval()
    plain.load_state_dict(seg.state_dict(), strict=False)  # same encoder weights
    x = torch.randn(1, 3, 64, 64)
    tokens = plain.forward_tokens(x, final_norm=False)  # after the last block
    last = seg(x)[3]  # block 3's tap after the 2 x 2 max pool
    grid = tokens[:, 1:].transpose(1, 2).reshape(1, 32, 4, 4)
    assert torch.allclose(torch.nn.functional.max_pool2d(grid, 2), last, atol=1e-5)
    with torch.no_grad():
        seg.blocks[3].attn.relative_position_bias_table.normal_()
    assert not torch.allclose(seg(x)[3], last, atol=1e-3)  # the bias is really added


def test_layer_decay_groups_follow_the_authors_constructor(tiny_segmentor):
    # mmcv_custom/layer_decay_optimizer_constructor.py: num_layers = depth + 2, cls/pos/patch-embed id 0,
    # block i id i + 1, everything else (adapters, heads) depth + 1; scale = decay ** (depth + 1 - id);
    # no decay on 1-D params and biases only (pos_embed, cls_token and the rel-pos tables are decayed)
    model, decay = tiny_segmentor, 0.75
    groups = param_groups(model, 0.05, layer_decay=decay, layer_id=model.layer_id, num_layers=model.num_layers)
    by_name = {n: g for g in groups for n in g["names"]}
    assert len(by_name) == sum(1 for _ in model.parameters())
    depth = 4
    for name, p in model.named_parameters():
        if name.startswith(("backbone.cls_token", "backbone.pos_embed", "backbone.patch_embed")):
            lid = 0
        elif name.startswith("backbone.blocks."):
            lid = int(name.split(".")[2]) + 1
        else:
            lid = depth + 1
        assert by_name[name]["lr_scale"] == pytest.approx(decay ** (depth + 1 - lid)), name
        assert by_name[name]["weight_decay"] == (0.0 if p.ndim == 1 or name.endswith(".bias") else 0.05), name
    assert by_name["backbone.blocks.2.attn.relative_position_bias_table"]["lr_scale"] == pytest.approx(decay**2)
    assert by_name["backbone.pos_embed"]["weight_decay"] == 0.05
    assert by_name["decode_head.conv_seg.weight"]["lr_scale"] == 1.0
    assert by_name["backbone.blocks.0.ls1.gamma"]["weight_decay"] == 0.0


def test_vit_b_recipe_groups():
    from conftest import REPO

    from core.config import load_config
    from segmentation.model import build_segmentor

    cfg = load_config(REPO / "segmentation" / "configs", "base")
    with torch.device("meta"):
        model = build_segmentor(cfg.model, 150)
    opt = build_optimizer(cfg, model)
    scales = {g["layer_id"]: g["lr_scale"] for g in opt.param_groups}
    assert scales[0] == pytest.approx(0.65**13) and scales[12] == pytest.approx(0.65) and scales[13] == 1.0
    assert model.backbone.grid_size == (32, 32) and model.backbone.out_indices == (3, 5, 7, 11)
    assert model.decode_head.conv_seg.out_channels == 150 and model.auxiliary_head.convs[0].conv.out_channels == 256


def test_load_pretrained_resizes_pos_embed_and_reports_the_new_parts(tiny_segmentor, tmp_path):
    torch.manual_seed(1)
    vit = build_vit("tiny")  # 32 px: 8 x 8 grid
    path = ckpt.save({"model": vit.state_dict()}, tmp_path / "pre.pth")
    report = load_pretrained(tiny_segmentor, str(path))
    sd = tiny_segmentor.backbone.state_dict()
    assert torch.equal(sd["pos_embed"], resize_pos_embed(vit.pos_embed.detach(), (12, 12)))
    assert torch.equal(sd["blocks.3.mlp.fc2.weight"], vit.state_dict()["blocks.3.mlp.fc2.weight"])
    assert "pos_embed" in report.adapted and "norm.weight" in report.unexpected
    assert "backbone.blocks.0.attn.relative_position_bias_table" in report.missing
    assert "backbone.blocks.3.ls2.gamma" in report.missing
    assert torch.all(sd["blocks.1.attn.relative_position_bias_table"] == 0)
    assert torch.all(sd["blocks.1.ls1.gamma"] == 1)


def test_a_checkpoint_of_another_size_is_an_error(tiny_segmentor, tmp_path):
    path = ckpt.save({"model": build_vit("tiny", embed_dim=48, num_heads=3).state_dict()}, tmp_path / "w.pth")
    with pytest.raises(ckpt.CheckpointError, match="do not fit the model"):
        load_pretrained(tiny_segmentor, str(path))
