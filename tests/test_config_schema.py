"""Typed, range-checked configs: every bad value a one-line ConfigError naming the layer, the option,
the value and what is expected, before any compute, for the four tasks; default.yaml and the schema cannot drift."""

import shutil

import pytest
from conftest import REPO
from omegaconf import OmegaConf

from core.config import ConfigError, load_config, validate
from detection.schema import DetectionConfig
from finetune.schema import FinetuneConfig
from pretrain.schema import PretrainConfig
from segmentation.schema import SegmentationConfig

SCHEMAS = {
    "pretrain": PretrainConfig,
    "finetune": FinetuneConfig,
    "detection": DetectionConfig,
    "segmentation": SegmentationConfig,
}


def leaves(d, prefix=""):
    for k, v in d.items():
        if isinstance(v, dict):
            yield from leaves(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}"


@pytest.mark.parametrize("task", SCHEMAS)
def test_default_yaml_sets_exactly_the_options_of_the_schema(task):
    defaults = OmegaConf.to_container(OmegaConf.load(REPO / task / "configs" / "default.yaml"))
    schema = OmegaConf.to_container(OmegaConf.structured(SCHEMAS[task]))  # every value ??? (MISSING)
    only_yaml, only_schema = set(leaves(defaults)) - set(leaves(schema)), set(leaves(schema)) - set(leaves(defaults))
    assert not only_yaml and not only_schema, f"only in default.yaml: {only_yaml}; only in the schema: {only_schema}"
    for path in sorted((REPO / task / "configs").glob("*.yaml")):  # every recipe is valid under the schema
        load_config(REPO / task / "configs", None if path.stem == "default" else path.stem, schema=SCHEMAS[task])


def test_a_default_yaml_that_drifted_from_the_schema_is_refused(tmp_path):
    configs = tmp_path / "configs"
    shutil.copytree(REPO / "pretrain" / "configs", configs)
    text = (configs / "default.yaml").read_text()
    (configs / "default.yaml").write_text(text.replace("  mask_ratio: 0.75\n", ""))
    with pytest.raises(ConfigError, match="option\\(s\\) without a value: model.mask_ratio"):
        load_config(configs, "tiny", schema=PretrainConfig)
    (configs / "default.yaml").write_text(text.replace("  mask_ratio: 0.75\n", "  mask_ratio: 0.75\n  new_knob: 1\n"))
    with pytest.raises(ConfigError, match="default.yaml: unknown option 'model.new_knob'"):
        load_config(configs, "tiny", schema=PretrainConfig)
    (configs / "default.yaml").write_text(text.replace("  mask_ratio: 0.75\n", "  mask_ratio: three quarters\n"))
    with pytest.raises(ConfigError, match="default.yaml: model.mask_ratio='three quarters': expected a number"):
        load_config(configs, "tiny", schema=PretrainConfig)


# (override, the message expected after "command line: " or as a rule's message); several classes per task:
# wrong types, scalars for lists and back, sections, zero / negative counts and intervals, reversed ranges,
# null for numbers, unknown choices, non-finite numbers, unknown keys, rules between options
HOSTILE = {
    "pretrain": [
        ("seed=abc", "command line: seed='abc': expected an integer in \\[0, 4294967295\\]"),
        ("seed=-1", "command line: seed=-1: expected an integer in \\[0, 4294967295\\]"),
        ("seed=99999999999", "seed=99999999999: expected an integer in"),
        ("optim.blr=fast", "command line: optim.blr='fast': expected a number > 0"),
        ("data.workers=1.5", "command line: data.workers=1.5: expected an integer >= 0"),
        ("model.rel_pos_bias=maybe", "command line: model.rel_pos_bias='maybe': expected true or false"),
        ("optim.betas=0.9", "command line: optim.betas=0.9: expected a list of 2 numbers, each in \\[0, 1\\)"),
        ("optim.betas=[0.9]", "optim.betas=\\[0.9\\]: expected a list of 2 numbers"),
        ("stages.epochs=800", "command line: stages.epochs=800: expected a list of at least 2 integers"),
        ("optim.global_batch=[1,2]", "command line: optim.global_batch=\\[1, 2\\]: expected an integer >= 1"),
        ("model=base", "command line: model='base': expected a section with the keys kind, size"),
        ("optim.lr={a: 1}", "command line: optim.lr={a: 1}: expected a number > 0 or null"),
        ("data.batch_per_gpu=0", "command line: data.batch_per_gpu=0: expected an integer >= 1"),
        ("log.every=0", "command line: log.every=0: expected an integer >= 1"),
        ("log.save_every=-2", "log.save_every=-2: expected an integer >= 1 or null"),
        ("log.save_every_epochs=2", "command line: unknown option 'log.save_every_epochs'; valid keys here: every, "),
        ("max_epochs=0", "command line: max_epochs=0: expected an integer >= 1 or null"),
        ("model.mask_ratio=1.0", "command line: model.mask_ratio=1.0: expected a number in \\(0, 1\\)"),
        ("data.crop_scale=[1.0,0.2]", "data.crop_scale=\\[1.0, 0.2\\]: expected .* in non-decreasing order"),
        ("stages.epochs=[0,6,3]", "stages.epochs=\\[0, 6, 3\\]: expected .* in increasing order"),
        ("model.depth_per_stage=[4,0]", "model.depth_per_stage=\\[4, 0\\]: expected .* each >= 1 or null"),
        ("optim.global_batch=null", "command line: optim.global_batch=null: expected an integer >= 1 \\(not null\\)"),
        ("model.mask_ratio=null", "model.mask_ratio=null: expected a number in \\(0, 1\\) \\(not null\\)"),
        ("amp=fp32", "command line: amp='fp32': expected one of auto, bf16, fp16, none"),
        ("device=gpu", "command line: device='gpu': expected one of auto, cuda, cpu"),
        ("compile=fast", "command line: compile='fast': expected one of true, false, default, reduce-overhead"),
        ("target.kind=clip", "command line: target.kind='clip': expected one of teacher, timm, pixels, hog, ema"),
        ("model.size=giant", "command line: model.size='giant': expected one of tiny, tiny_wide, small64"),
        ("loss.kind=l1", "command line: loss.kind='l1': expected one of smooth_l1, mse, cosine or null"),
        ("optim.lr=nan", "command line: optim.lr='nan': expected a number > 0 or null"),
        ("optim.weight_decay=inf", "command line: optim.weight_decay='inf': expected a number >= 0"),
        ("optim.blrr=1", "command line: unknown option 'optim.blrr'; valid keys here: betas, blr"),
        ("data.backend=dali", "command line: data.backend='dali': expected one of pil, uint8, gpu"),
        ("data.jpeg_draft=true", "data.jpeg_draft=true needs data.backend=uint8 \\(got data.backend=pil\\)"),
        ("stages.epochs=[1,6]", "stages.epochs must start at 0"),
        ("model.masking=block", "model.masking=block needs model.kind=beit"),
        ("model.depth_per_stage=[2]", "model.depth_per_stage has 1 entries but stages.epochs .* defines 2 stages"),
        ("model.num_heads=5", "model.embed_dim=96 must be a multiple of model.num_heads=5"),
        ("model.img_size=30", "model.img_size=30 must be a multiple of the patch size 4"),
        ("teacher.init_depth=9", "teacher.init_depth=9 exceeds the student's 4 blocks"),
        ("target.kind=timm", "target.kind=timm needs target.timm.name"),
        ("optim.min_lr=1.0", "optim.min_lr=1 is above the peak lr 0.0005"),
        ("teacher.size=huge", "teacher.size differs from model.size: give teacher.checkpoint or teacher.seed"),
    ],
    "finetune": [
        ("epochs=ten", "command line: epochs='ten': expected an integer >= 1"),
        ("epochs=0", "command line: epochs=0: expected an integer >= 1"),
        ("log.save_every=0", "command line: log.save_every=0: expected an integer >= 1 or null"),
        ("aug.crop_scale=0.5", "command line: aug.crop_scale=0.5: expected a list of 2 numbers"),
        ("aug.crop_scale=[0.9,0.1]", "aug.crop_scale=\\[0.9, 0.1\\]: expected .* in non-decreasing order"),
        ("aug.mixup=-0.1", "command line: aug.mixup=-0.1: expected a number >= 0"),
        ("aug.reprob=1.5", "command line: aug.reprob=1.5: expected a number in \\[0, 1\\]"),
        ("data.eval_batch_per_gpu=0", "data.eval_batch_per_gpu=0: expected an integer >= 1"),
        ("data.num_classes=1", "data.num_classes=1: expected an integer >= 2 or null"),
        ("optim.layer_decay=0", "optim.layer_decay=0: expected a number in \\(0, 1\\]"),
        ("optim.blr=null", "command line: optim.blr=null: expected a number > 0 \\(not null\\)"),
        ("task=pretrain", "command line: task='pretrain': expected one of finetune, linprobe, transfer"),
        ("data.kind=mnist", "command line: data.kind='mnist': expected one of imagenet, folder, cifar10"),
        ("model.global_pool=max", "command line: model.global_pool='max': expected one of avg, token"),
        ("optim.name=sgd", "command line: optim.name='sgd': expected one of adamw, lars"),
        ("aug.eval_crop_pct=0", "aug.eval_crop_pct=0: expected a number in \\(0, 1\\] or null"),
        ("optim.name=lars", "optim.weight_decay=0.05 with optim.name=lars"),
        ("aug.auto_augment=bogus", "aug.auto_augment='bogus': not a timm augmentation policy"),
        ("model.img_size=30", "model.img_size=30 must be a multiple of the patch size 4"),
    ],
    "detection": [
        ("optim.iters=1e3x", "command line: optim.iters='1e3x': expected an integer >= 1"),
        ("optim.iters=0", "command line: optim.iters=0: expected an integer >= 1"),
        ("det.anchor_sizes=32", "command line: det.anchor_sizes=32: expected a list of 5 integers"),
        ("det.anchor_sizes=[8,16,32,64]", "det.anchor_sizes=\\[8, 16, 32, 64\\]: expected a list of 5 integers"),
        ("det.rpn_pre_nms_top_n=[0,10]", "det.rpn_pre_nms_top_n=\\[0, 10\\]: expected .* each >= 1"),
        ("data.scale_range=[1.5,0.5]", "data.scale_range=\\[1.5, 0.5\\]: expected .* in non-decreasing order"),
        ("optim.steps=[740,640]", "optim.steps=\\[740, 640\\]: expected .* in non-decreasing order"),
        ("optim.steps=640", "command line: optim.steps=640: expected a list of integers"),
        ("optim.lr=null", "command line: optim.lr=null: expected a number > 0 \\(not null\\)"),
        ("eval.every=0", "command line: eval.every=0: expected an integer >= 1 or null"),
        ("log.save_every=0", "command line: log.save_every=0: expected an integer >= 1 or null"),
        ("max_iters=-1", "command line: max_iters=-1: expected an integer >= 1 or null"),
        ("det.nms_thresh=0", "det.nms_thresh=0: expected a number in \\(0, 1\\]"),
        ("eval.backend=lvis", "command line: eval.backend='lvis': expected one of pycocotools, faster"),
        ("optim.no_decay=[bias]", "optim.no_decay=\\['bias'\\]: expected a list of strings from norm, pos_embed"),
        ("optim.steps=[640,900]", "optim.steps \\[640, 900\\] must lie within \\(0, optim.iters=800\\)"),
        ("data.img_size=66", "data.img_size=66 must be a multiple of the patch size 4"),
        ("model.patch_size=6", "model.patch_size=6 .* needs a power of two >= 4"),
        ("model.global_blocks=[1,4]", "model.global_blocks=\\[1, 4\\]: block indices must be below the depth 4"),
    ],
    "segmentation": [
        ("iters=many", "command line: iters='many': expected an integer >= 1"),
        ("iters=0", "command line: iters=0: expected an integer >= 1"),
        ("data.scale=192", "command line: data.scale=192: expected a list of 2 integers"),
        ("data.ratio_range=[2.0,0.5]", "data.ratio_range=\\[2.0, 0.5\\]: expected .* in non-decreasing order"),
        ("model.out_indices=[0,1,2]", "model.out_indices=\\[0, 1, 2\\]: expected a list of 4 integers"),
        ("eval.ratios=[]", "command line: eval.ratios=\\[\\]: expected a non-empty list of numbers"),
        ("eval.stride=0", "command line: eval.stride=0: expected an integer >= 1"),
        ("eval.window_batch=-4", "eval.window_batch=-4: expected an integer >= 1"),
        ("data.flip=2", "command line: data.flip=2: expected a number in \\[0, 1\\]"),
        ("data.crop=null", "command line: data.crop=null: expected an integer >= 1 \\(not null\\)"),
        ("eval_only=sometimes", "command line: eval_only='sometimes': expected true or false"),
        ("data.num_classes=300", "data.num_classes=300: expected an integer in \\[1, 254\\] or null"),
        ("model.size=vit_b", "command line: model.size='vit_b': expected one of tiny, tiny_wide, small64"),
        ("data.crop=64", "model.img_size=48 must equal data.crop=64"),
        ("eval.stride=64", "eval.stride=64 must be in \\(0, data.crop=48\\]"),
        ("eval_only=true", "eval_only=true needs weights="),
        ("model.out_indices=[0,1,2,5]", "model.out_indices=\\[0, 1, 2, 5\\]: block indices must be below the depth 4"),
    ],
}


@pytest.mark.parametrize(("task", "override", "match"), [(t, o, m) for t, cases in HOSTILE.items() for o, m in cases])
def test_hostile_option_values_are_named(task, override, match):
    with pytest.raises(ConfigError, match=match) as e:
        load_config(REPO / task / "configs", "tiny", [override], schema=SCHEMAS[task])
    assert "\n" not in str(e.value)


def test_a_recipe_file_is_named_as_the_source(tmp_path):
    (tmp_path / "bad.yaml").write_text("optim:\n  global_batch: lots\n")
    with pytest.raises(ConfigError, match="bad.yaml: optim.global_batch='lots': expected an integer >= 1"):
        load_config(REPO / "pretrain" / "configs", str(tmp_path / "bad.yaml"), schema=PretrainConfig)
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="list.yaml: expected a mapping of options"):
        load_config(REPO / "pretrain" / "configs", str(tmp_path / "list.yaml"), schema=PretrainConfig)
    (tmp_path / "broken.yaml").write_text("optim: [unclosed\n")
    with pytest.raises(ConfigError, match="broken.yaml: not valid YAML"):
        load_config(REPO / "pretrain" / "configs", str(tmp_path / "broken.yaml"), schema=PretrainConfig)
    (tmp_path / "range.yaml").write_text("data:\n  batch_per_gpu: 0\n")  # a range error names its layer too
    with pytest.raises(ConfigError, match="range.yaml: data.batch_per_gpu=0: expected an integer >= 1"):
        load_config(REPO / "pretrain" / "configs", str(tmp_path / "range.yaml"), schema=PretrainConfig)
    with pytest.raises(ConfigError, match="config file .*missing.yaml does not exist"):
        load_config(REPO / "pretrain" / "configs", str(tmp_path / "missing.yaml"), schema=PretrainConfig)


def test_values_are_typed_and_a_checked_config_checks_again_unchanged():
    cfg = load_config(
        REPO / "detection" / "configs", "tiny", ["optim.warmup_iters=40", "optim.lr=1e-3"], schema=DetectionConfig
    )
    assert isinstance(cfg.optim.warmup_iters, float) and cfg.optim.lr == 1e-3  # "1e-3": YAML 1.1 reads a string
    assert validate(cfg, DetectionConfig) == cfg
    plain = load_config(REPO / "detection" / "configs", "tiny", ["optim.iters=0"])  # built without the schema
    with pytest.raises(ConfigError, match="config: optim.iters=0: expected an integer >= 1"):
        validate(plain, DetectionConfig)


@pytest.mark.parametrize(
    ("task", "override", "warning"),
    [
        ("pretrain", "optim.warmup_epochs=7", "optim.warmup_epochs=7 is longer than the shortest stage (6 epochs"),
        ("finetune", "optim.warmup_epochs=20", "optim.warmup_epochs=20 is longer than the run (epochs=15)"),
        ("detection", "optim.warmup_iters=900", "optim.warmup_iters=900 is longer than the run (optim.iters=800)"),
        ("segmentation", "optim.warmup_iters=900", "optim.warmup_iters=900 is longer than the run (iters=800)"),
    ],
)
def test_legal_but_doubtful_settings_are_warned_about(task, override, warning):
    """A warmup longer than the run is what a shortened smoke run has: said when the run starts, not refused."""
    schema = SCHEMAS[task]
    assert schema.warnings(load_config(REPO / task / "configs", "tiny", schema=schema)) == []
    (found,) = schema.warnings(load_config(REPO / task / "configs", "tiny", [override], schema=schema))
    assert found.startswith(warning) and found.endswith("the lr never reaches its peak")
