"""ViTDet Mask R-CNN: backbone invariants, pyramid, pooler levels, COCO evaluation, LSJ, training, resume, input."""

import json
import shutil

import pytest
import torch
import torch.nn.functional as F
from conftest import detection_config
from pycocotools.coco import COCO
from timm.models.vision_transformer_sam import Block, window_partition, window_unpartition

from core import checkpoint as ckpt
from core.config import ConfigError
from core.data import CorruptImageError
from core.vit import build_vit
from detection.backbone import ViTDetBackbone, abs_pos
from detection.data import CocoInstances, lsj, masks_to_boxes
from detection.evaluate import coco_eval
from detection.heads import LevelRoIAlign
from detection.model import build_detector, load_pretrained
from detection.pyramid import SimpleFeaturePyramid
from detection.train import run


@pytest.mark.parametrize("hw", [(14, 14), (13, 17), (5, 3)])
def test_window_partition_then_unpartition_is_the_identity(hw):
    x = torch.randn(2, *hw, 8)
    windows, pad_hw = window_partition(x, 7)
    assert windows.shape[1:3] == (7, 7) and pad_hw == (-(-hw[0] // 7) * 7, -(-hw[1] // 7) * 7)
    assert torch.equal(window_unpartition(windows, 7, hw, pad_hw), x)


def test_relative_position_attention_with_zero_tables_equals_plain_attention():
    torch.manual_seed(0)
    with_rel = Block(32, 4, use_rel_pos=True, window_size=0, input_size=(6, 6))
    plain = Block(32, 4, use_rel_pos=False, window_size=0, input_size=(6, 6))
    plain.load_state_dict({k: v for k, v in with_rel.state_dict().items() if "rel_pos" not in k})
    assert torch.all(with_rel.attn.rel_pos_h == 0) and torch.all(with_rel.attn.rel_pos_w == 0)
    x = torch.randn(2, 6, 6, 32)
    assert torch.allclose(with_rel(x), plain(x), atol=1e-6)
    with torch.no_grad():
        with_rel.attn.rel_pos_h.normal_()
    assert not torch.allclose(with_rel(x), plain(x), atol=1e-3)


def test_abs_pos_is_interpolated_bicubically_from_the_pretraining_grid():
    pe = torch.randn(1, 1 + 14 * 14, 8)
    same = abs_pos(pe, (14, 14))
    assert torch.equal(same.reshape(1, -1, 8), pe[:, 1:])
    up = abs_pos(pe, (64, 64))
    ref = F.interpolate(
        pe[:, 1:].reshape(1, 14, 14, 8).permute(0, 3, 1, 2), size=(64, 64), mode="bicubic", align_corners=False
    ).permute(0, 2, 3, 1)
    assert torch.allclose(up, ref)


def test_pyramid_strides_and_channels():
    backbone = ViTDetBackbone(
        img_size=64,
        pretrain_img_size=32,
        patch_size=4,
        embed_dim=32,
        depth=2,
        num_heads=2,
        window_size=4,
        global_blocks=(1,),
    )
    pyramid = SimpleFeaturePyramid(32, 24)
    feats = pyramid(backbone(torch.randn(1, 3, 64, 64)))  # backbone stride 4 -> pyramid strides 1..16
    assert list(feats) == ["p2", "p3", "p4", "p5", "p6"]
    assert [f.shape[-1] for f in feats.values()] == [64, 32, 16, 8, 4]
    assert all(f.shape[1] == 24 for f in feats.values())
    # for a /16 ViT at 1024 (64 x 64 map) the same module gives strides 4, 8, 16, 32, 64
    with torch.device("meta"):
        big = SimpleFeaturePyramid(768)(torch.empty(1, 768, 64, 64, device="meta"))
    assert [1024 // f.shape[-1] for f in big.values()] == [4, 8, 16, 32, 64]
    assert all(f.shape[1] == 256 for f in big.values())


def test_pooler_level_assignment_follows_the_canonical_rule():
    pool = LevelRoIAlign(7)

    def box(side):
        return torch.tensor([[0.0, 0.0, side, side]])

    # k = floor(4 + log2(sqrt(area) / 224)), clamped to [2, 5]; index 0 is P2
    sides = [10, 111, 112, 223, 224, 447, 448, 2000]
    levels = [int(pool.levels([box(s)])[0]) + 2 for s in sides]
    assert levels == [2, 2, 3, 3, 4, 4, 5, 5]


def gt_as_detections(gt: COCO) -> list[dict]:
    out = []
    for a in gt.anns.values():
        if a.get("iscrowd", 0):
            continue
        rle = gt.annToRLE(a)
        rle["counts"] = rle["counts"].decode() if isinstance(rle["counts"], bytes) else rle["counts"]
        out.append(
            {
                "image_id": a["image_id"],
                "category_id": a["category_id"],
                "bbox": a["bbox"],
                "score": 1.0,
                "segmentation": rle,
            }
        )
    return out


def test_ground_truth_fed_back_as_detections_gives_ap_1(tiny_coco):
    gt = COCO(str(tiny_coco / "annotations" / "instances_val2017.json"))
    results = gt_as_detections(gt)
    for iou_type in ("bbox", "segm"):
        stats = coco_eval(gt, results, iou_type)
        assert stats["AP"] == pytest.approx(100.0) and stats["AP50"] == pytest.approx(100.0)
    shifted = [{**r, "bbox": [r["bbox"][0] + r["bbox"][2], *r["bbox"][1:]]} for r in results]
    assert coco_eval(gt, shifted, "bbox")["AP"] < 10.0


def test_lsj_keeps_boxes_consistent_with_masks():
    masks = torch.zeros(2, 40, 60, dtype=torch.uint8)
    masks[0, 5:15, 10:30] = 1
    masks[1, 20:38, 40:58] = 1
    img = torch.randint(0, 255, (3, 40, 60), dtype=torch.uint8)
    for seed in range(10):
        torch.manual_seed(seed)
        out_img, out_masks, scale = lsj(img, masks, 32, (0.1, 2.0))
        assert out_img.shape[1:] == out_masks.shape[1:] and max(out_img.shape[1:]) <= 32
        boxes = masks_to_boxes(out_masks)
        for b, m in zip(boxes, out_masks):
            ys, xs = torch.where(m > 0)
            if len(xs):
                assert b.tolist() == [xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1]
            else:
                assert b.tolist() == [0, 0, 0, 0]


def test_dataset_targets_match_their_masks(tiny_coco):
    ds = CocoInstances(tiny_coco, "train", train=True, img_size=64)
    assert ds.dropped["crowd"] >= 0 and len(ds) > 0
    x, t, meta = ds[(1, 3)]
    assert x.shape == (3, 64, 64) and t["masks"].shape[1:] == meta["size"]
    assert torch.equal(t["boxes"], masks_to_boxes(t["masks"]))
    assert torch.all(t["labels"] >= 1) and torch.all(t["labels"] <= ds.num_classes)


def test_load_pretrained_reports_expected_new_tensors(tmp_path):
    cfg = detection_config(tmp_path, tmp_path / "o")
    model = build_detector(cfg, 4)
    path = ckpt.save({"model": build_vit("tiny").state_dict()}, tmp_path / "vit.pth")
    report = load_pretrained(model, str(path))
    assert not report.missing and "cls_token" in report.unexpected and "norm.weight" in report.unexpected
    broken = {k: v for k, v in build_vit("tiny").state_dict().items() if k != "blocks.1.attn.qkv.weight"}
    with pytest.raises(ckpt.CheckpointError, match="blocks.1.attn.qkv.weight"):
        load_pretrained(model, str(ckpt.save({"model": broken}, tmp_path / "broken.pth")))


def test_training_steps_reduce_the_loss_and_write_results(tiny_coco, tiny_pretrained, tmp_path):
    out = tmp_path / "run"
    res = run(
        detection_config(
            tiny_coco,
            out,
            f"checkpoint={tiny_pretrained}",
            "optim.iters=12",
            "optim.steps=[10,11]",
            "log.save_every=12",
        )
    )
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    first, last = rows[0]["loss"], sum(r["loss"] for r in rows[-3:]) / 3
    assert last < 0.8 * first, (first, last)
    saved = json.loads((out / "results.json").read_text())
    assert saved["task"] == "coco" and set(saved["bbox"]) == {"AP", "AP50", "AP75", "APs", "APm", "APl"}
    assert saved["checkpoint_sha256"] and res["eval_images"] == 8


def test_resume_mid_epoch_equals_uninterrupted(tiny_coco, tmp_path):
    run(detection_config(tiny_coco, tmp_path / "a"))
    run(detection_config(tiny_coco, tmp_path / "b", "max_iters=3"))
    run(detection_config(tiny_coco, tmp_path / "b"))
    a, b = ckpt.load(tmp_path / "a" / "checkpoint-last.pth"), ckpt.load(tmp_path / "b" / "checkpoint-last.pth")
    assert a["stepper"]["step"] == b["stepper"]["step"] == 6
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k


# ------------------------------------------------------------------------------------------- bad input
def copy_coco(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_missing_and_malformed_annotation_files(tiny_coco, tmp_path):
    root = copy_coco(tiny_coco, tmp_path / "c")
    (root / "annotations" / "instances_val2017.json").unlink()
    with pytest.raises(ConfigError, match="instances_val2017.json: annotation file does not exist"):
        run(detection_config(root, tmp_path / "o"))
    path = root / "annotations" / "instances_train2017.json"
    d = json.loads(path.read_text())
    del d["annotations"][0]["bbox"]
    path.write_text(json.dumps(d))
    with pytest.raises(ConfigError, match="instances_train2017.json: annotations\\[0\\] has no 'bbox'"):
        run(detection_config(root, tmp_path / "o"))


def test_annotation_referring_to_a_missing_image(tiny_coco, tmp_path):
    root = copy_coco(tiny_coco, tmp_path / "c")
    path = root / "annotations" / "instances_train2017.json"
    d = json.loads(path.read_text())
    d["annotations"][0]["image_id"] = 999999
    path.write_text(json.dumps(d))
    with pytest.raises(ConfigError, match="refers to image_id 999999"):
        run(detection_config(root, tmp_path / "o"))
    d["annotations"][0]["image_id"] = d["images"][0]["id"]
    path.write_text(json.dumps(d))
    (root / "train2017" / d["images"][1]["file_name"]).unlink()
    with pytest.raises(ConfigError, match="1 images listed in the annotations are missing"):
        run(detection_config(root, tmp_path / "o"))


def test_degenerate_boxes_and_polygons_are_dropped_and_counted(tiny_coco, tmp_path):
    root = copy_coco(tiny_coco, tmp_path / "c")
    path = root / "annotations" / "instances_train2017.json"
    d = json.loads(path.read_text())
    polys = [a for a in d["annotations"] if isinstance(a["segmentation"], list) and not a["iscrowd"]]
    polys[0]["bbox"][2] = 0.0
    polys[1]["segmentation"] = [[1.0, 2.0, 3.0, 4.0]]
    path.write_text(json.dumps(d))
    ds = CocoInstances(root, "train", train=True, img_size=64)
    assert ds.dropped["degenerate box"] == 1 and ds.dropped["degenerate polygon"] == 1


def test_undecodable_image_is_named(tiny_coco, tmp_path):
    root = copy_coco(tiny_coco, tmp_path / "c")
    ds = CocoInstances(root, "val", train=False, img_size=64)
    (root / "val2017" / ds.images[0]["file_name"]).write_bytes(b"not an image")
    with pytest.raises(CorruptImageError, match=ds.images[0]["file_name"]):
        ds[0]
