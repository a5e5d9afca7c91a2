"""Layered configs: defaults <- recipe <- overrides, errors that name the key and its source."""

import pytest
from conftest import REPO

from core.config import ConfigError, load_config

PRETRAIN = REPO / "pretrain" / "configs"


def test_recipes_layer_over_defaults():
    base = load_config(PRETRAIN, "base")
    assert base.model.size == "base" and base.model.drop_path == 0.2 and base.optim.clip_grad == 3.0
    assert base.optim.global_batch == 4096 and base.optim.blr == 1.5e-4 and list(base.optim.betas) == [0.9, 0.95]
    assert list(base.stages.epochs) == [0, 800, 1600] and base.teacher.init_depth == 12
    large = load_config(PRETRAIN, "large")
    assert large.teacher.init_depth == 0 and large.optim.clip_grad is None and large.model.drop_path == 0.2
    huge = load_config(PRETRAIN, "huge")
    assert huge.model.drop_path == 0.3 and huge.teacher.init_depth == 0


def test_overrides_and_errors():
    cfg = load_config(PRETRAIN, "tiny", ["optim.blr=0.01", "stages.epochs=[0,3,6,9]"])
    assert cfg.optim.blr == 0.01 and list(cfg.stages.epochs) == [0, 3, 6, 9]
    with pytest.raises(ConfigError, match="command line: unknown option 'optim.blrr'"):
        load_config(PRETRAIN, "tiny", ["optim.blrr=1"])
    with pytest.raises(ConfigError, match="no recipe named 'gigantic'.*base"):
        load_config(PRETRAIN, "gigantic")
    with pytest.raises(ConfigError, match="key=value"):
        load_config(PRETRAIN, "tiny", ["optim.blr"])


@pytest.mark.parametrize("recipe", ["tiny", "small", "base", "large", "huge"])
def test_every_recipe_starts_with_the_command_that_runs_it(recipe):
    first = (PRETRAIN / f"{recipe}.yaml").read_text().splitlines()[0]
    assert first.startswith("#") and ("make pretrain" in first or "python -m pretrain" in first)


def leaves(d, prefix=""):
    for k, v in d.items():
        if isinstance(v, dict):
            yield from leaves(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


@pytest.mark.parametrize("task", ["pretrain", "finetune", "detection", "segmentation"])
def test_recipes_hold_only_their_differences_from_the_defaults(task):
    """README: each recipe holds only its differences from default.yaml, which documents every option."""
    from omegaconf import OmegaConf

    configs = REPO / task / "configs"
    defaults = dict(leaves(OmegaConf.to_container(OmegaConf.load(configs / "default.yaml"))))
    for path in sorted(configs.glob("*.yaml")):
        if path.name == "default.yaml":
            continue
        recipe = OmegaConf.to_container(OmegaConf.load(path)) or {}
        restated = [k for k, v in leaves(recipe) if k in defaults and defaults[k] == v]
        assert not restated, f"{path.relative_to(REPO)} restates defaults: {restated}"
