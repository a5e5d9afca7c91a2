"""core.weights: what a checkpoint of this suite records about its pretraining, read from real pretraining files
(and from files of older versions, which record nothing); the run setting `pretrain.setting` records."""

import pytest
import torch

from core import checkpoint as ckpt
from core import weights
from core.vit import build_vit
from pretrain import setting


def test_stage_files_of_a_real_run_say_how_they_were_made(tiny_pretrained):
    run = tiny_pretrained.parent  # the micro tiny recipe: random ViT-tiny teacher, 2 stages, bootstrapped
    s1 = weights.pretraining_setting(run / "checkpoint-stage1-student.pth")
    assert s1["weights"] == "student" and s1["stage"] == 1 and s1["bootstrap"] is True
    assert s1["student"] == {"size": "tiny", "kind": "mae", "patch_size": 4, "embed_dim": 96, "depth": 4}
    assert s1["first_target"] == {"kind": "teacher", "random": True, "timm_name": None, "norm_pix": None}
    assert s1["teacher"] == {"size": "tiny", "kind": "vit"}
    # the stage-1 teacher is the stage-0 student (bootstrapping); the stage-0 teacher is the random ViT itself
    t1 = weights.pretraining_setting(run / "checkpoint-stage1-teacher.pth")
    assert (t1["weights"], t1["stage"]) == ("student", 0)
    assert weights.pretraining_setting(run / "checkpoint-stage0-student.pth") == {**s1, "stage": 0}
    t0 = weights.pretraining_setting(run / "checkpoint-stage0-teacher.pth")
    assert (t0["weights"], t0["stage"]) == ("teacher", 0)
    last = weights.pretraining_setting(run / "checkpoint-last.pth")
    assert (last["weights"], last["stage"]) == ("student", 1)
    # teacher files carry no config: it comes from the run folder's config.yaml
    assert "config" not in ckpt.load(run / "checkpoint-stage1-teacher.pth")


def test_foreign_files_have_no_setting_and_downstream_files_lead_back(tiny_pretrained, tmp_path):
    plain = ckpt.save(build_vit("tiny").state_dict(), tmp_path / "timm.pth")
    mae = ckpt.save({"model": build_vit("tiny").state_dict(), "epoch": 3}, tmp_path / "mae.pth")
    assert weights.pretraining_setting(plain) is None and weights.pretraining_setting(mae) is None
    s1 = weights.pretraining_setting(tiny_pretrained)
    # a fine-tuned file that records the setting gives that record; one that does not leads to its start
    recorded = {"model": {}, "meta": {"format": "dbot-suite/finetune/v1", "pretraining": s1}}
    assert weights.pretraining_setting(ckpt.save(recorded, tmp_path / "a" / "best.pth")) == s1
    chained = {
        "model": {},
        "meta": {"format": "dbot-suite/finetune/v1"},
        "config": {"checkpoint": str(tiny_pretrained)},
    }
    assert weights.pretraining_setting(ckpt.save(chained, tmp_path / "b" / "best.pth")) == s1
    scratch = {"model": {}, "meta": {"format": "dbot-suite/finetune/v1"}, "config": {"checkpoint": None}}
    assert weights.pretraining_setting(ckpt.save(scratch, tmp_path / "c" / "best.pth")) is None


def test_real_files_record_their_entries_and_encoder_and_older_files_are_unknown(tiny_pretrained, tmp_path):
    run = tiny_pretrained.parent
    s1 = weights.pretraining_setting(tiny_pretrained)
    # checkpoint-last's `target` entry is the last stage's teacher: the stage-0 student (bootstrapping), as
    # the stage-1 teacher file says; a stage file holds no such entry
    last = run / "checkpoint-last.pth"
    t1 = weights.pretraining_setting(run / "checkpoint-stage1-teacher.pth")
    assert weights.pretraining_setting(last, key="target") == t1 == {**s1, "stage": 0}
    assert weights.pretraining_setting(tiny_pretrained, key="target") is None
    # the encoder read from a stage file has exactly a plain ViT's keys: the recorded pretraining-only parts go
    obj = ckpt.load(tiny_pretrained)
    sd, info = weights.read_backbone(tiny_pretrained)
    assert set(sd) == set(build_vit("tiny").state_dict())
    assert {k.split(".")[0] for k in info.dropped} >= {"mask_token", "decoder_embed", "decoder_norm"}
    assert all(k.startswith(tuple(obj["meta"]["not_encoder"])) for k in info.dropped)
    # the same file as an older version wrote it (no records): unknown, not guessed; its setting is read
    # back from the config it saved by pretrain.setting.read_setting, and its encoder as before
    records = ("pretraining", "pretraining_entries", "not_encoder")
    older_meta = {k: v for k, v in obj["meta"].items() if k not in records}
    older = ckpt.save({**obj, "meta": older_meta}, tmp_path / "old" / "checkpoint-stage1-student.pth")
    found = weights.pretraining_setting(older)
    assert weights.is_unknown(found) and "dbot-suite/pretrain/v1" in found["unknown"]
    assert setting.read_setting(older) == s1
    assert set(weights.read_backbone(older)[0]) == set(sd)
    # a downstream file of an older version leads to it: unknown for core, read back by pretrain.setting
    chained = {"model": {}, "meta": {"format": "dbot-suite/finetune/v1"}, "config": {"checkpoint": str(older)}}
    ft = ckpt.save(chained, tmp_path / "ft" / "best.pth")
    assert weights.is_unknown(weights.pretraining_setting(ft)) and setting.read_setting(ft) == s1


CONFIG = {
    "model": {"kind": "mae", "size": "base"},
    "target": {"kind": "teacher", "pixels": {"norm_pix": True}, "timm": {"name": None}},
    "teacher": {"checkpoint": None, "size": None, "bootstrap": True},
}


def with_(**over):
    import copy

    c = copy.deepcopy(CONFIG)
    for k, v in over.items():
        node = c
        *parents, last = k.split("__")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = v
    return c


@pytest.mark.parametrize(
    "over, first, teacher",
    [
        ({}, {"kind": "teacher", "random": True}, {"size": "base", "kind": "vit"}),
        (
            {"teacher__checkpoint": "/w/dbot_large.pth", "teacher__size": "large"},
            {"kind": "teacher", "random": False},
            {"size": "large", "kind": "vit"},
        ),
        ({"model__kind": "beit"}, {"kind": "teacher", "random": True}, {"size": "base", "kind": "beit"}),
        ({"target__kind": "pixels", "target__pixels__norm_pix": False}, {"kind": "pixels", "norm_pix": False}, None),
        ({"target__kind": "hog"}, {"kind": "hog", "norm_pix": None}, None),
        ({"target__kind": "ema"}, {"kind": "ema", "random": False}, {"size": "base", "kind": "ema"}),
        (
            {"target__kind": "timm", "target__timm__name": "vit_base_patch16_clip_224.openai"},
            {"kind": "timm", "timm_name": "vit_base_patch16_clip_224.openai"},
            {"size": None, "kind": "timm"},
        ),
    ],
)
def test_setting_from_config_names_the_first_target_and_teacher(over, first, teacher):
    s = setting.setting_from_config(with_(**over), stage=1)
    assert {k: s["first_target"][k] for k in first} == first
    assert s["teacher"] == teacher and s["stage"] == 1 and s["weights"] == "student"
    assert s["student"]["size"] == "base" and s["student"]["patch_size"] == 16


def test_setting_uses_the_width_the_run_overrode_and_refuses_unknown_roles():
    s = setting.setting_from_config(with_(model__embed_dim=384, model__num_heads=6), stage=0)
    assert s["student"]["embed_dim"] == 384
    no_bootstrap = setting.setting_from_config(with_(teacher__bootstrap=False), stage=0)
    assert no_bootstrap["bootstrap"] is False
    with pytest.raises(ValueError, match="weights"):
        setting.setting_from_config(CONFIG, 0, weights="decoder")
    assert weights.size_of_arch({"embed_dim": 768, "depth": 12, "patch_size": 16}) == "base"
    assert weights.size_of_arch({"embed_dim": 80, "depth": 2, "patch_size": 4}) is None


def test_reading_moved_to_core_is_what_the_converter_uses():
    from tools import convert

    assert convert.read_backbone is weights.read_backbone and convert.fit_to_model is weights.fit_to_model
    sd = build_vit("tiny").state_dict()
    assert weights.guess_size(sd) == "tiny" and weights.arch_of(sd)["grid"] == 8
    assert torch.equal(weights.resize_patch_embed(sd["patch_embed.proj.weight"], 4), sd["patch_embed.proj.weight"])
