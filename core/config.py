"""Layered run configuration (OmegaConf): a task's `default.yaml`, a recipe file holding only the
differences, then `key=value` overrides from the command line. Unknown keys are errors that name the key
and where it came from; the resolved config is written into every run folder.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException


class ConfigError(ValueError):
    """A configuration value or key that cannot be used; the message names the key and the source."""


def _merge(base: DictConfig, layer: DictConfig, source: str) -> DictConfig:
    try:
        return OmegaConf.merge(base, layer)
    except ConfigKeyError as e:
        key = getattr(e, "full_key", None) or str(e)
        parent = key.rsplit(".", 1)[0] if "." in key else ""
        node = OmegaConf.select(base, parent) if parent else base
        valid = sorted(node.keys()) if isinstance(node, DictConfig) else []
        raise ConfigError(f"{source}: unknown option '{key}'; valid keys here: {', '.join(valid)}") from None
    except OmegaConfBaseException as e:
        raise ConfigError(f"{source}: {e}") from None


def recipe_path(config_dir: Path, name_or_path: str) -> Path:
    """A recipe given by name (`base` -> `<config_dir>/base.yaml`) or by path."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml"):
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist")
        return p
    candidate = config_dir / f"{name_or_path}.yaml"
    if not candidate.is_file():
        names = sorted(f.stem for f in config_dir.glob("*.yaml") if f.stem != "default")
        raise ConfigError(f"no recipe named {name_or_path!r} in {config_dir}; available: {', '.join(names)}")
    return candidate


def load_config(config_dir: str | Path, recipe: str | None, overrides: Sequence[str] = ()) -> DictConfig:
    """defaults <- recipe <- overrides, in struct mode (no new keys)."""
    config_dir = Path(config_dir)
    cfg = OmegaConf.load(config_dir / "default.yaml")
    OmegaConf.set_struct(cfg, True)
    if recipe:
        path = recipe_path(config_dir, recipe)
        cfg = _merge(cfg, OmegaConf.load(path), str(path))
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise ConfigError(f"command line: overrides must look like key=value, got {bad}")
    if overrides:
        cfg = _merge(cfg, OmegaConf.from_dotlist(list(overrides)), "command line")
    return cfg


def save_config(cfg: DictConfig, path: str | Path) -> None:
    Path(path).write_text(OmegaConf.to_yaml(cfg, resolve=True))


def to_dict(cfg: DictConfig | ListConfig) -> dict:
    """Plain python containers (for checkpoints, which must load with weights_only)."""
    return OmegaConf.to_container(cfg, resolve=True)


def cli(task: str, config_dir: str | Path, argv: Sequence[str] | None = None) -> DictConfig:
    """Parse `[-c RECIPE] [key=value ...]` for a task's entry point and return the layered config."""
    parser = argparse.ArgumentParser(
        prog=f"python -m {task}",
        description=f"{task}: layered config = {config_dir}/default.yaml <- recipe <- key=value overrides",
    )
    parser.add_argument("-c", "--config", default=None, help="recipe name (tiny, base, ...) or a .yaml path")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. optim.blr=1e-4")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    args = parser.parse_args(argv)
    cfg = load_config(config_dir, args.config, args.overrides)
    if args.print_config:
        print(OmegaConf.to_yaml(cfg, resolve=True))
        raise SystemExit(0)
    return cfg
