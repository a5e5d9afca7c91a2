"""ViTDet Mask R-CNN: backbone conventions (windows, decomposed relative position, interpolated absolute position),
pyramid, anchors and pooler levels as detectron2 computes them, layer decay, COCO evaluation, LSJ, the generated
data, training, resume and bad input."""

import json
import math
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import REPO, detection_config, run_module
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from timm.models.vision_transformer_sam import Block, get_decomposed_rel_pos_bias, window_partition, window_unpartition

from core import checkpoint as ckpt
from core.config import ConfigError, load_config, save_config
from core.data import CorruptImageError, DataError, Skipped
from core.optim import warmup_step
from core.vit import build_vit
from detection.backbone import ViTDetBackbone, abs_pos
from detection.data import CocoInstances, lsj, masks_to_boxes
from detection.evaluate import coco_eval, to_coco_results
from detection.heads import Anchors, LevelRoIAlign, assign_levels
from detection.model import build_detector, load_pretrained, to_original
from detection.pyramid import SimpleFeaturePyramid
from detection.train import build_optimizer, run
from tools.datasets import make_coco, rle_counts


# ------------------------------------------------------------------------------------------- backbone
@pytest.mark.parametrize("hw", [(14, 14), (13, 17), (5, 3)])
def test_window_partition_then_unpartition_is_the_identity(hw):
    x = torch.randn(2, *hw, 8)
    windows, pad_hw = window_partition(x, 7)
    assert windows.shape == (2 * math.ceil(hw[0] / 7) * math.ceil(hw[1] / 7), 7, 7, 8)
    assert pad_hw == (math.ceil(hw[0] / 7) * 7, math.ceil(hw[1] / 7) * 7)
    assert torch.equal(window_unpartition(windows, 7, hw, pad_hw), x)
    # the padding is zeros, placed after the tokens (bottom / right)
    if hw[1] % 7:
        assert torch.all(windows[math.ceil(hw[1] / 7) - 1, :, hw[1] % 7 :] == 0)


def test_relative_position_attention_with_zero_tables_equals_plain_attention():
    torch.manual_seed(0)
    with_rel = Block(32, 4, use_rel_pos=True, window_size=0, input_size=(6, 6))
    plain = Block(32, 4, use_rel_pos=False, window_size=0, input_size=(6, 6))
    plain.load_state_dict({k: v for k, v in with_rel.state_dict().items() if "rel_pos" not in k})
    x = torch.randn(2, 6, 6, 32)
    assert torch.allclose(with_rel(x), plain(x), atol=1e-6)
    backbone = ViTDetBackbone(img_size=32, patch_size=4, pos_grid=4, embed_dim=32, depth=2, num_heads=2, window_size=4)
    tables = [p for n, p in backbone.named_parameters() if "rel_pos" in n]
    assert len(tables) == 4 and all(torch.all(t == 0) for t in tables)


def test_decomposed_relative_position_bias_by_hand():
    """bias[(i, j), (k, l)] = q_ij . Rh[i - k + H - 1] + q_ij . Rw[j - l + W - 1] (MViTv2 / ViTDet)."""
    torch.manual_seed(0)
    h, w, d = 3, 4, 5
    q = torch.randn(1, h * w, d)
    rh, rw = torch.randn(2 * h - 1, d), torch.randn(2 * w - 1, d)
    bias = get_decomposed_rel_pos_bias(q, rh, rw, (h, w), (h, w))[0]
    qq = q[0].reshape(h, w, d)
    expect = torch.zeros(h * w, h * w)
    for i in range(h):
        for j in range(w):
            for k in range(h):
                for m in range(w):
                    expect[i * w + j, k * w + m] = qq[i, j] @ rh[i - k + h - 1] + qq[i, j] @ rw[j - m + w - 1]
    assert torch.allclose(bias, expect, atol=1e-5)


def test_window_blocks_have_window_tables_and_global_blocks_grid_tables():
    b = ViTDetBackbone(img_size=64, patch_size=4, pos_grid=8, embed_dim=32, depth=4, num_heads=2, window_size=6)
    assert b.global_blocks == (2, 5, 8, 11)  # the ViT-B default; of these only block 2 exists here
    shapes = [tuple(blk.attn.rel_pos_h.shape) for blk in b.blocks]
    assert shapes == [(11, 16), (11, 16), (31, 16), (11, 16)]  # window 6 -> 2*6-1; global 16x16 grid -> 31
    out = b(torch.randn(1, 3, 64, 64))  # 16 tokens per side, windows of 6 padded to 18
    assert out.shape == (1, 32, 16, 16)


def test_gradient_checkpointing_gives_the_same_gradients():
    kw = dict(img_size=32, patch_size=4, pos_grid=4, embed_dim=32, depth=2, num_heads=2, window_size=4)
    plain, ckpt_ = ViTDetBackbone(**kw), ViTDetBackbone(**kw, grad_checkpointing=True)
    ckpt_.load_state_dict(plain.state_dict())
    x = torch.randn(2, 3, 32, 32)
    for m in (plain, ckpt_):  # drop path 0.1: the recomputation must redraw the same masks
        torch.manual_seed(0)
        m(x).square().sum().backward()
    for (name, a), b in zip(plain.named_parameters(), ckpt_.parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-6), name


def test_abs_pos_is_the_pretraining_grid_interpolated_bicubically():
    pe = torch.randn(1, 1 + 14 * 14, 8)
    assert torch.equal(abs_pos(pe, (14, 14)).reshape(1, -1, 8), pe[:, 1:])  # cls entry dropped
    ref = F.interpolate(
        pe[:, 1:].reshape(1, 14, 14, 8).permute(0, 3, 1, 2), size=(64, 48), mode="bicubic", align_corners=False
    ).permute(0, 2, 3, 1)
    assert torch.allclose(abs_pos(pe, (64, 48)), ref)
    # the backbone keeps the parameter at the pretraining grid whatever the input size
    b = ViTDetBackbone(img_size=64, patch_size=4, pos_grid=8, embed_dim=32, depth=1, num_heads=2, global_blocks=(0,))
    assert b.pos_embed.shape == (1, 65, 32)


# ------------------------------------------------------------------------------------------- pyramid, heads
def test_pyramid_strides_and_channels():
    with torch.device("meta"):
        maps = SimpleFeaturePyramid(768, patch_size=16)(torch.empty(1, 768, 64, 64))
    assert list(maps) == ["p2", "p3", "p4", "p5", "p6"]
    assert [1024 // m.shape[-1] for m in maps.values()] == [4, 8, 16, 32, 64]
    assert all(m.shape[1] == 256 for m in maps.values())
    tiny = SimpleFeaturePyramid(96, patch_size=4, out_channels=32)
    maps = tiny(torch.randn(2, 96, 16, 16))  # a /4 backbone at 64 px
    assert tiny.strides == (1, 2, 4, 8, 16) and [m.shape[-1] for m in maps.values()] == [64, 32, 16, 8, 4]
    assert not any(m.bias is not None for m in tiny.modules() if isinstance(m, torch.nn.Conv2d))
    with pytest.raises(ValueError, match="power-of-two patch size"):
        SimpleFeaturePyramid(1280, patch_size=14)


@pytest.mark.parametrize("recipe,published", [("base", 111), ("large", 331), ("huge", 662)])
def test_parameter_counts_match_the_vitdet_paper(recipe, published):
    """Mask R-CNN with 80 classes: 111M / 331M / 662M parameters (ViTDet paper, B / L / H)."""
    cfg = load_config(REPO / "detection" / "configs", recipe)
    with torch.device("meta"):
        model = build_detector(cfg, num_classes=80)
    assert sum(p.numel() for p in model.parameters()) / 1e6 == pytest.approx(published, rel=0.005)


def test_pooler_level_assignment_follows_the_canonical_rule():
    def level(side, pool):
        return int(pool.levels([torch.tensor([[0.0, 0.0, side, side]])])[0]) + pool.min_level

    pool = LevelRoIAlign(7, ["p2", "p3", "p4", "p5"], (4, 8, 16, 32))  # k = floor(4 + log2(sqrt(area) / 224))
    sides = [10, 111, 112, 223, 224, 447, 448, 2000]
    assert [level(s, pool) for s in sides] == [2, 2, 3, 3, 4, 4, 5, 5]
    tiny = LevelRoIAlign(7, ["p0", "p1", "p2", "p3"], (1, 2, 4, 8), canonical_stride=4)  # scaled by 1/4
    assert [level(s / 4, tiny) for s in sides] == [0, 0, 1, 1, 2, 2, 3, 3]
    boxes = torch.tensor([[10.0, 20.0, 10.0 + 100, 20.0 + 25]])  # sqrt(area) = 50 -> floor(4 + log2(50/224)) = 1 -> 2
    assert int(assign_levels(boxes, 2, 5, 224, 4)[0]) == 0


def test_pooler_reads_each_level_at_its_stride_with_aligned_roi_align():
    # a map whose value is the x coordinate of each pixel centre: a box pooled at the right scale averages to
    # its own centre x, whichever level it lands on
    feats = {}
    for name, stride in zip(["p2", "p3", "p4", "p5"], (4, 8, 16, 32)):
        n = 512 // stride
        xs = (torch.arange(n, dtype=torch.float32) + 0.5) * stride
        feats[name] = xs.view(1, 1, 1, n).expand(1, 1, n, n).contiguous()
    pool = LevelRoIAlign(7, list(feats), (4, 8, 16, 32))
    boxes = torch.tensor([[40.0, 40.0, 72.0, 72.0], [100.0, 0.0, 400.0, 300.0]])  # levels 2 and 4
    out = pool(feats, [boxes])
    centres = (boxes[:, 0] + boxes[:, 2]) / 2
    assert torch.allclose(out.mean(dim=(1, 2, 3)), centres, atol=0.5)


def test_anchors_are_detectron2s_unrounded_cell_anchors():
    cell = Anchors(sizes=((32,),), aspect_ratios=((0.5, 1.0, 2.0),), strides=(16,)).cell_anchors[0]
    w, h = 32 / math.sqrt(0.5), 32 * math.sqrt(0.5)  # ratio = h / w, area 32^2
    assert torch.allclose(cell[0], torch.tensor([-w / 2, -h / 2, w / 2, h / 2]))
    assert torch.allclose(cell[1], torch.tensor([-16.0, -16.0, 16.0, 16.0]))


def tiny_detector(tmp_path, *overrides):
    return build_detector(detection_config(tmp_path, tmp_path / "o", *overrides), num_classes=4)


def test_layer_decay_and_weight_decay_follow_detectron2(tmp_path):
    cfg = detection_config(tmp_path, tmp_path / "o", "optim.layer_decay=0.7")
    model = build_detector(cfg, 4)
    groups = build_optimizer(cfg, model).param_groups
    depth = len(model.backbone.net.blocks)

    def vitdet_rate(name):  # detectron2's get_vit_lr_decay_rate, written out
        layer = depth + 1
        if name.startswith("backbone"):
            if ".pos_embed" in name or ".patch_embed" in name:
                layer = 0
            elif ".blocks." in name:
                layer = int(name[name.find(".blocks.") :].split(".")[2]) + 1
        return 0.7 ** (depth + 1 - layer)

    by_name = {n: g for g in groups for n in g["names"]}
    assert len(by_name) == sum(1 for _ in model.parameters())
    for name, g in by_name.items():
        assert g["lr_scale"] == pytest.approx(vitdet_rate(name)), name
    no_decay = {n for n, g in by_name.items() if g["weight_decay"] == 0.0}
    for name in ("backbone.net.pos_embed", "backbone.net.blocks.0.norm1.weight", "backbone.net.blocks.3.norm2.bias"):
        assert name in no_decay, name
    for name in (
        "backbone.pyramid.stages.0.1.weight",  # the LN between the two transposed convs
        "backbone.pyramid.stages.3.2.bias",  # the LN after the 1x1 conv
        "roi_heads.box_head.0.1.weight",
        "roi_heads.mask_head.3.1.bias",
        "backbone.net.blocks.0.attn.rel_pos_h",
        "backbone.net.blocks.0.attn.qkv.bias",
        "backbone.net.patch_embed.proj.weight",
        "rpn.head.cls_logits.bias",
        "roi_heads.box_predictor.bbox_pred.bias",
    ):
        assert by_name[name]["weight_decay"] == 0.1, name
    # detectron2's get_default_optimizer_params(weight_decay_norm=0.0, overrides={"pos_embed": {"weight_decay": 0}}),
    # written out: a parameter skips decay if its module is one of torch's norm classes or its own name is
    # pos_embed. ViTDet's ViT blocks use torch's nn.LayerNorm; the pyramid and the RoI heads use get_norm("LN"),
    # detectron2's own layers.LayerNorm (an nn.Module, not a torch norm class), here timm's LayerNorm2d.
    torch_norms = (torch.nn.BatchNorm2d, torch.nn.GroupNorm, torch.nn.LayerNorm)  # those that could occur here
    detectron2_module_is_torch_norm = {
        mod_name: isinstance(mod, torch_norms) and mod_name.startswith("backbone.net.")
        for mod_name, mod in model.named_modules()
    }
    expect = {
        f"{mod_name}.{p}"
        for mod_name, mod in model.named_modules()
        for p, _ in mod.named_parameters(recurse=False)
        if detectron2_module_is_torch_norm[mod_name] or p == "pos_embed"
    }
    assert no_decay == expect
    # 2 LNs x 4 blocks, weight and bias each, + pos_embed
    assert len(no_decay) == 2 * 2 * depth + 1
    huge_like = detection_config(tmp_path, tmp_path / "o", "optim.no_decay=[]")
    assert all(g["weight_decay"] == 0.1 for g in build_optimizer(huge_like, model).param_groups)


def test_schedule_matches_detectron2_warmup_multistep():
    lr = warmup_step(1e-4, 184375, 250, [163889, 177546], gamma=0.1, warmup_factor=0.001)
    assert lr[0] == pytest.approx(1e-7)
    assert lr[125] == pytest.approx(1e-4 * (0.001 * 0.5 + 0.5))
    assert lr[250] == pytest.approx(1e-4) and lr[163888] == pytest.approx(1e-4)
    assert lr[163889] == pytest.approx(1e-5) and lr[177546] == pytest.approx(1e-6) and len(lr) == 184375


# ------------------------------------------------------------------------------------------- weights
def test_load_pretrained_reports_expected_new_tensors_and_rejects_missing_ones(tmp_path):
    model = tiny_detector(tmp_path)
    vit = build_vit("tiny")
    loaded = load_pretrained(model, str(ckpt.save({"model": vit.state_dict()}, tmp_path / "vit.pth")))
    assert not loaded.report.missing and not loaded.report.unexpected
    assert set(loaded.dropped) == {"cls_token", "norm.weight", "norm.bias"}
    assert sum(k.endswith("rel_pos_h") for k in loaded.new) == 4 and any("roi_heads" in k for k in loaded.new)
    assert torch.equal(model.backbone.net.blocks[2].attn.qkv.weight, vit.blocks[2].attn.qkv.weight)
    assert torch.equal(model.backbone.net.pos_embed, vit.pos_embed)  # kept at the 8x8 pretraining grid
    broken = {k: v for k, v in vit.state_dict().items() if k != "blocks.1.attn.qkv.weight"}
    with pytest.raises(ckpt.CheckpointError, match="blocks.1.attn.qkv.weight"):
        load_pretrained(model, str(ckpt.save({"model": broken}, tmp_path / "broken.pth")))


def test_patch_14_checkpoint_runs_at_patch_16_like_vitdet_h(tmp_path):
    vit = build_vit("tiny", patch_size=2, img_size=16)  # an 8x8 grid with a 2x2 patch kernel
    path = ckpt.save({"model": vit.state_dict()}, tmp_path / "p2.pth")
    model = tiny_detector(tmp_path, "model.patch_size=4")  # the detector's tiny preset: 8x8 grid, patch 4
    loaded = load_pretrained(model, str(path))
    assert set(loaded.report.adapted) == {"patch_embed.proj.weight"}
    assert model.backbone.net.patch_embed.proj.weight.shape[-2:] == (4, 4)


# ------------------------------------------------------------------------------------------- evaluation
def test_ground_truth_fed_back_as_detections_gives_ap_100(tiny_coco):
    gt = COCO(str(tiny_coco / "annotations" / "instances_val2017.json"))
    label_to_cat = {c: c for c in gt.cats}
    results = []
    for image_id in gt.imgs:
        anns = [a for a in gt.imgToAnns[image_id] if not a["iscrowd"]]
        masks = torch.stack([torch.from_numpy(gt.annToMask(a)).bool() for a in anns]) if anns else None
        det = {
            "boxes": torch.tensor([[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in anns)]).reshape(-1, 4),
            "scores": torch.ones(len(anns)),
            "labels": torch.tensor([a["category_id"] for a in anns], dtype=torch.int64),
            "masks": masks if anns else torch.zeros(0, 1, 1, dtype=torch.bool),
        }
        results += to_coco_results(det, image_id, label_to_cat)  # through our encoding
    for iou_type in ("bbox", "segm"):
        stats = coco_eval(gt, results, iou_type)
        assert stats["AP"] == pytest.approx(100.0) and stats["AP50"] == pytest.approx(100.0), iou_type
    shifted = [{**r, "bbox": [r["bbox"][0] + r["bbox"][2], *r["bbox"][1:]]} for r in results]
    assert coco_eval(gt, shifted, "bbox")["AP"] < 10.0
    relabelled = [{**r, "category_id": r["category_id"] % 4 + 1} for r in results]
    assert coco_eval(gt, relabelled, "segm")["AP"] == pytest.approx(0.0)


def test_faster_coco_eval_gives_the_pycocotools_numbers(tiny_coco):
    pytest.importorskip("faster_coco_eval")
    gt = COCO(str(tiny_coco / "annotations" / "instances_val2017.json"))
    g = torch.Generator().manual_seed(0)
    results = []
    for a in gt.dataset["annotations"]:  # ground truth, jittered and scored at random
        x, y, w, h = (v + 2 * float(torch.randn((), generator=g)) for v in a["bbox"])
        rle = gt.annToRLE(a)
        rle["counts"] = rle["counts"].decode() if isinstance(rle["counts"], bytes) else rle["counts"]
        score = float(torch.rand((), generator=g))
        results.append({"image_id": a["image_id"], "category_id": a["category_id"], "bbox": [x, y, w, h]})
        results[-1].update(score=score, segmentation=rle)
    for iou_type in ("bbox", "segm"):
        assert coco_eval(gt, results, iou_type, "faster") == pytest.approx(coco_eval(gt, results, iou_type))


def test_detections_are_mapped_back_to_the_original_image():
    det = {
        "boxes": torch.tensor([[10.0, 20.0, 30.0, 28.0]]),
        "scores": torch.tensor([0.9]),
        "labels": torch.tensor([1]),
        "masks": torch.ones(1, 1, 28, 28),
    }
    meta = {"orig_size": (100, 200), "size": (32, 64)}  # resized by 0.32 / 0.32 (long side 64)
    out = to_original([det], [meta])[0]
    assert torch.allclose(out["boxes"], torch.tensor([[10 * 200 / 64, 20 * 100 / 32, 30 * 200 / 64, 28 * 100 / 32]]))
    m = out["masks"][0]
    assert m.shape == (100, 200) and m[70, 60] and not m[10, 10]


# ------------------------------------------------------------------------------------------- data
def test_generated_coco_is_deterministic_and_uses_every_encoding(tiny_coco, tmp_path):
    again = make_coco(tmp_path / "again", seed=0, train_images=24, val_images=8)
    for f in ("annotations/instances_train2017.json", "train2017/000000000003.jpg"):
        assert (again / f).read_bytes() == (tiny_coco / f).read_bytes()
    d = json.loads((tiny_coco / "annotations" / "instances_train2017.json").read_text())
    segs = [a["segmentation"] for a in d["annotations"]]
    assert any(isinstance(s, list) for s in segs)
    assert any(isinstance(s, dict) and isinstance(s["counts"], list) for s in segs)
    assert any(isinstance(s, dict) and isinstance(s["counts"], str) for s in segs)
    assert any(a["iscrowd"] for a in d["annotations"])
    gt = COCO(str(tiny_coco / "annotations" / "instances_train2017.json"))
    for a in d["annotations"]:  # areas agree with the decoded masks, boxes are the masks' tight boxes
        m = gt.annToMask(a)
        assert m.sum() == a["area"]
        ys, xs = np.nonzero(m)
        assert a["bbox"] == pytest.approx([xs.min(), ys.min(), xs.max() + 1 - xs.min(), ys.max() + 1 - ys.min()])


def test_uncompressed_rle_counts_round_trip():
    m = np.zeros((5, 4), dtype=np.uint8)
    m[1:3, 1] = m[0, 3] = m[4, 3] = 1
    counts = rle_counts(m)
    assert counts == [6, 2, 7, 1, 3, 1]  # column-major runs, starting with zeros
    assert np.array_equal(mask_utils.decode(mask_utils.frPyObjects({"size": [5, 4], "counts": counts}, 5, 4)), m)
    assert rle_counts(np.ones((2, 2), np.uint8)) == [0, 4]


def square_annotation(kind: str, h: int, w: int) -> dict:
    poly = [10.0, 6.0, 30.0, 6.0, 30.0, 22.0, 10.0, 22.0]  # x 10-30, y 6-22 (pixel edges)
    if kind == "polygon":
        return {"segmentation": [poly]}
    rle = mask_utils.merge(mask_utils.frPyObjects([poly], h, w))
    return {"segmentation": {"size": [h, w], "counts": rle_counts(mask_utils.decode(rle))}}


def test_lsj_keeps_boxes_masks_and_pixels_consistent():
    h, w = 40, 50
    pixels = np.zeros((h, w, 3), np.uint8)
    pixels[6:22, 10:30] = 255  # the annotated square is the only bright region
    img = Image.fromarray(pixels)
    for seed in range(12):
        outs = {}
        for kind in ("polygon", "rle"):
            torch.manual_seed(seed)
            out_img, masks = lsj(img, [square_annotation(kind, h, w)], 32, (0.3, 2.0))
            outs[kind] = (np.asarray(out_img), masks)
        (a, ma), (b, mb) = outs["polygon"], outs["rle"]
        assert np.array_equal(a, b) and a.shape[:2] == ma.shape[1:] and max(a.shape[:2]) <= 32
        for m in (ma, mb):
            box = masks_to_boxes(m)[0]
            ys, xs = torch.where(m[0] > 0)
            if len(xs):
                assert box.tolist() == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
                assert a[ys, xs].mean() > 200  # the mask covers the bright square
            else:
                assert box.tolist() == [0, 0, 0, 0]
        inter, union = (ma & mb).sum().item(), (ma | mb).sum().item()
        if union >= 60:  # polygon vs nearest-resampled RLE: the same region up to edge pixels
            assert inter / union > 0.8, (seed, inter, union)


def test_training_targets_match_their_masks(tiny_coco):
    ds = CocoInstances(tiny_coco, "train", train=True, img_size=64)
    assert ds.dropped["crowd"] >= 1 and len(ds) < 24  # crowds and images without instances are out
    x, t, meta = ds[(1, 3)]
    assert x.shape == (3, 64, 64) and t["masks"].shape[1:] == meta["size"]
    assert torch.all(x[:, meta["size"][0] :] == 0) and torch.all(x[:, :, meta["size"][1] :] == 0)  # zero padding
    assert torch.equal(t["boxes"], masks_to_boxes(t["masks"]))
    assert torch.all(t["labels"] >= 1) and torch.all(t["labels"] <= ds.num_classes)
    assert torch.equal(ds[(1, 3)][0], x) and not torch.equal(ds[(2, 3)][0], x)  # seeded by (epoch, index)


# ------------------------------------------------------------------------------------------- training
def metric_rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]


def test_training_steps_reduce_the_loss_and_write_results(tiny_coco, tiny_pretrained, tmp_path):
    out = tmp_path / "run"
    res = run(
        detection_config(
            tiny_coco, out, f"checkpoint={tiny_pretrained}", "optim.iters=12", "optim.steps=[10,11]", "optim.lr=1e-3"
        )
    )
    rows = metric_rows(out)
    first, last = rows[0]["loss"], sum(r["loss"] for r in rows[-3:]) / 3
    assert last < 0.8 * first, (first, last)
    saved = json.loads((out / "results.json").read_text())
    stats = {"AP", "AP50", "AP75", "APs", "APm", "APl"}
    assert saved["task"] == "coco" and set(saved["metrics"]) <= {f"{t}_{k}" for t in ("bbox", "segm") for k in stats}
    assert {"bbox_AP", "bbox_AP50", "bbox_AP75", "segm_AP", "segm_AP50", "segm_AP75"} <= set(saved["metrics"])
    assert saved["checkpoint_sha256"] and saved["iterations"] == 12 and res["eval_images"] == 8


def test_resume_mid_epoch_equals_uninterrupted(tiny_coco, tmp_path):
    run(detection_config(tiny_coco, tmp_path / "a", "eval.every=100"))
    assert run(detection_config(tiny_coco, tmp_path / "b", "max_iters=4")) == {"stopped_at_iteration": 4}
    run(detection_config(tiny_coco, tmp_path / "b"))
    a, b = ckpt.load(tmp_path / "a" / "checkpoint-last.pth"), ckpt.load(tmp_path / "b" / "checkpoint-last.pth")
    assert a["stepper"]["step"] == b["stepper"]["step"] == 6
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    assert [r["loss"] for r in metric_rows(tmp_path / "a")][4:] == [r["loss"] for r in metric_rows(tmp_path / "b")][4:]


@pytest.mark.dist
def test_two_processes_with_accumulation_train_and_score_every_image_once(tiny_coco, tmp_path):
    out = tmp_path / "ddp"
    cfg = detection_config(tiny_coco, out, "data.batch_per_gpu=2", "optim.global_batch=8", "eval.every=3")
    save_config(cfg, tmp_path / "recipe.yaml")  # 2 processes x 2 images x 2 accumulation steps
    run_module("detection", "-c", str(tmp_path / "recipe.yaml"), processes=2)
    saved = json.loads((out / "results.json").read_text())
    assert saved["eval_images"] == 8 and saved["iterations"] == 6
    assert ckpt.load(out / "checkpoint-last.pth")["stepper"]["step"] == 6
    assert any("bbox_AP" in line for line in (out / "metrics.jsonl").read_text().splitlines()[:-1])  # eval.every


# ------------------------------------------------------------------------------------------- bad input
def copy_coco(src, dst):
    return shutil.copytree(src, dst)


def edit_json(root, split, fn):
    path = root / "annotations" / f"instances_{split}2017.json"
    d = json.loads(path.read_text())
    fn(d)
    path.write_text(json.dumps(d))


def test_missing_and_malformed_annotation_files(tiny_coco, tmp_path):
    root = copy_coco(tiny_coco, tmp_path / "c")
    (root / "annotations" / "instances_val2017.json").unlink()
    with pytest.raises(DataError, match="instances_val2017.json: annotation file does not exist"):
        run(detection_config(root, tmp_path / "o"))
    (root / "annotations" / "instances_val2017.json").write_text("{not json")
    with pytest.raises(DataError, match="instances_val2017.json: not valid JSON"):
        run(detection_config(root, tmp_path / "o"))
    edit_json(root, "train", lambda d: d["annotations"][0].pop("bbox"))
    with pytest.raises(DataError, match=r"instances_train2017.json: annotations\[0\] has no 'bbox'"):
        run(detection_config(root, tmp_path / "o"))
    root = copy_coco(tiny_coco, tmp_path / "c2")
    edit_json(root, "train", lambda d: d.pop("categories"))
    with pytest.raises(DataError, match="instances_train2017.json: field 'categories' is missing"):
        run(detection_config(root, tmp_path / "o"))


def test_annotations_referring_to_missing_images(tiny_coco, tmp_path):
    root = copy_coco(tiny_coco, tmp_path / "c")
    edit_json(root, "train", lambda d: d["annotations"][0].update(image_id=999999))
    with pytest.raises(DataError, match="'image_id' 999999, which is not in 'images'"):
        run(detection_config(root, tmp_path / "o"))
    edit_json(root, "train", lambda d: d["annotations"][0].update(image_id=d["images"][0]["id"]))
    name = json.loads((root / "annotations" / "instances_train2017.json").read_text())["images"][1]["file_name"]
    (root / "train2017" / name).unlink()
    with pytest.raises(DataError, match=f"1 image\\(s\\) listed in 'images' are missing .*{name}"):
        run(detection_config(root, tmp_path / "o"))


def test_degenerate_boxes_polygons_and_rles_are_dropped_and_counted(tiny_coco, tmp_path):
    root = copy_coco(tiny_coco, tmp_path / "c")
    before = CocoInstances(root, "train", train=True)

    def damage(d):
        polys = [a for a in d["annotations"] if isinstance(a["segmentation"], list) and not a["iscrowd"]]
        rles = [a for a in d["annotations"] if isinstance(a["segmentation"], dict) and not a["iscrowd"]]
        polys[0]["bbox"][2] = 0.0
        polys[1]["segmentation"] = [[1.0, 2.0, 3.0, 4.0]]
        rles[0]["segmentation"]["size"] = [1, 1]

    edit_json(root, "train", damage)
    ds = CocoInstances(root, "train", train=True, img_size=32)
    assert ds.dropped["degenerate box"] == 1 and ds.dropped["degenerate polygon"] == 1
    assert ds.dropped["missing or malformed segmentation"] == 1
    assert sum(map(len, ds.anns)) == sum(map(len, before.anns)) - 3
    for i in range(len(ds)):  # every remaining sample loads
        ds[(0, i)]


def test_undecodable_image_is_named_or_skipped(tiny_coco, tmp_path):
    root = copy_coco(tiny_coco, tmp_path / "c")
    ds = CocoInstances(root, "train", train=True, img_size=32)
    (root / "train2017" / ds.images[0]["file_name"]).write_bytes(b"not an image")
    with pytest.raises(CorruptImageError, match=ds.images[0]["file_name"]):
        ds[0]
    skipping = CocoInstances(root, "train", train=True, img_size=32, skip_corrupt=True)
    item = skipping[0]  # training: replaced by the next image, the corrupt one named
    assert isinstance(item, Skipped) and item.files[0][0] == str(root / "train2017" / ds.images[0]["file_name"])
    x, _, meta = item.sample
    assert meta["image_id"] == ds.images[1]["id"]
    val = CocoInstances(root, "train", train=False, img_size=32, skip_corrupt=True)  # evaluation: left out
    assert val[0].sample is None and val[0].files == item.files


def test_image_whose_size_disagrees_with_the_annotations_is_named(tiny_coco, tmp_path):
    root = copy_coco(tiny_coco, tmp_path / "c")
    ds = CocoInstances(root, "train", train=True, img_size=32)
    name = ds.images[0]["file_name"]
    Image.new("RGB", (7, 5)).save(root / "train2017" / name)
    with pytest.raises(DataError, match=f"{name}: decoded size 7x5 differs"):
        ds[0]


def test_bad_options_are_named(tiny_coco, tmp_path):
    with pytest.raises(ConfigError, match="optim.steps"):
        run(detection_config(tiny_coco, tmp_path / "o", "optim.steps=[5,4]"))
    with pytest.raises(ConfigError, match="optim.no_decay"):
        run(detection_config(tiny_coco, tmp_path / "o", "optim.no_decay=[bias]"))
    with pytest.raises(ConfigError, match="optim.global_batch"):
        run(detection_config(tiny_coco, tmp_path / "o", "optim.global_batch=6"))
