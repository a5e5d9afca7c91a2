"""Layered, typed run configuration (OmegaConf structured configs).

A task's options are declared once, with their types and ranges, in a schema: a dataclass per section
(`<task>/schema.py`). Their values and the comment a user reads about each come from the task's
`configs/default.yaml`; a recipe file holds only its differences; `key=value` overrides from the command
line come last:

    schema (types, ranges, rules) <- default.yaml (every value) <- recipe <- key=value overrides

Every layer is checked as it is merged, before any compute, and every error is a one-line `ConfigError`
naming the layer, the option, the value and what is expected:

- an unknown option (with the valid keys of its section), a section given a scalar or a scalar a list;
- a value of the wrong type (OmegaConf converts and checks: `int`, `float`, `bool`, `str`, `list[...]`,
  `Optional[...]` for the options that accept null, `Union[bool, str]`);
- an option without a value (`???`): default.yaml must give every option of the schema, and cannot give one
  that the schema does not declare (so the two cannot drift apart);
- a value out of its range or not among its choices (`option(ge=..., choices=...)` in the schema);
- a rule between options (the schema's `check(cfg)` static method).

The resolved config is written into every run folder.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import tempfile
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from core.errors import ConfigError

__all__ = [
    "MISSING",
    "ConfigError",
    "Rule",
    "option",
    "section",
    "RunOptions",
    "RunLog",
    "EpochRunOptions",
    "IterRunOptions",
    "load_config",
    "validate",
    "check_file",
    "check_folder",
    "check_output_folder",
    "positive_int",
    "save_config",
    "to_dict",
    "cli",
]


# ----------------------------------------------------------------------------------------- the schema
@dataclass(frozen=True)
class Rule:
    """What an option accepts beyond its type (for a list: each element, plus its length and order).

    ge / gt / le / lt: bounds; choices: the accepted values; length / min_length: of a list; order:
    "increasing" (strictly) or "sorted" (non-decreasing) for a list."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    choices: tuple | None = None
    length: int | None = None
    min_length: int | None = None
    order: str | None = None

    def bounds(self) -> str:
        low = f"{'[' if self.ge is not None else '('}{_num(self.ge if self.ge is not None else self.gt)}"
        high = f"{_num(self.le if self.le is not None else self.lt)}{']' if self.le is not None else ')'}"
        has_low, has_high = self.ge is not None or self.gt is not None, self.le is not None or self.lt is not None
        if has_low and has_high:
            return f"in {low}, {high}"
        if has_low:
            return f">= {_num(self.ge)}" if self.ge is not None else f"> {_num(self.gt)}"
        if has_high:
            return f"<= {_num(self.le)}" if self.le is not None else f"< {_num(self.lt)}"
        return ""

    def accepts(self, v) -> bool:
        if self.choices is not None and v not in self.choices:
            return False
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            return True
        if isinstance(v, float) and not math.isfinite(v):
            return False  # nan, inf: never a meaningful setting
        return not (
            (self.ge is not None and v < self.ge)
            or (self.gt is not None and v <= self.gt)
            or (self.le is not None and v > self.le)
            or (self.lt is not None and v >= self.lt)
        )


def option(**rule) -> typing.Any:
    """A schema field whose value comes from default.yaml, with a `Rule` (e.g. `option(ge=1)`,
    `option(choices=("auto", "cpu"))`, `option(length=2, ge=0, lt=1)` for a list)."""
    return field(default=MISSING, metadata={"rule": Rule(**rule)})


def section(cls: type) -> typing.Any:
    """A nested section of the schema."""
    return field(default_factory=cls)


DEVICES = ("auto", "cuda", "cpu")
AMPS = ("auto", "bf16", "fp16", "none")
NONFINITE = ("stop", "skip")  # core.engine.NONFINITE: the policy for a step whose loss is not finite
COMPILE_MODES = (True, False, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
SEED_MAX = 2**32 - 1


@dataclass
class RunLog:
    """`log.*`, the same keys in every task: what the engine logs and how often it writes checkpoint-last."""

    every: int = option(ge=1)  # optimizer steps between metrics lines (and at every epoch end)
    save_every: int | None = option(ge=1)  # checkpoint-last.pth every this many units (epochs or iterations)
    tensorboard: bool = option()


@dataclass
class RunOptions:
    """The options of the engine every task has (`core.trainer` reads these and nothing else of the config);
    a task's schema derives from `EpochRunOptions` or `IterRunOptions` (its unit) and adds its own sections."""

    out: str = option()
    seed: int = option(ge=0, le=SEED_MAX)
    device: str = option(choices=DEVICES)
    amp: str = option(choices=AMPS)
    compile: bool | str = option(choices=COMPILE_MODES)
    resume: str | None = option()
    nonfinite: str = option(choices=NONFINITE)
    nonfinite_max_skips: int = option(ge=0)
    log: RunLog = section(RunLog)


@dataclass
class EpochRunOptions(RunOptions):
    """The engine's options of a task counted in epochs (`Task.unit = "epoch"`)."""

    max_epochs: int | None = option(ge=1)  # stop after this many epochs in one invocation


@dataclass
class IterRunOptions(RunOptions):
    """The engine's options of a task counted in iterations (`Task.unit = "iter"`)."""

    max_iters: int | None = option(ge=1)  # stop after this many iterations in one invocation


def _num(v) -> str:
    return "inf" if v is None else (f"{v:g}" if isinstance(v, float) else str(v))


def _show(v) -> str:
    """A value as a user typed it (YAML spelling)."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return repr(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_show(x) for x in v) + "]"
    if isinstance(v, Mapping):
        return "{" + ", ".join(f"{k}: {_show(x)}" for k, x in v.items()) + "}"
    return str(v)


def _hints(cls: type) -> dict[str, typing.Any]:
    return typing.get_type_hints(cls)


def _unwrap_optional(tp) -> tuple[typing.Any, bool]:
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in args:
        rest = tuple(a for a in args if a is not type(None))
        return (rest[0] if len(rest) == 1 else typing.Union[rest]), True  # noqa: UP007
    return tp, False


def _is_list(tp) -> bool:
    return typing.get_origin(tp) in (list, tuple, Sequence)


_NOUNS = {int: ("an integer", "integers"), float: ("a number", "numbers"), str: ("a string", "strings")}
_NOUNS[bool] = ("true or false", "booleans")


def _describe(tp, rule: Rule | None = None) -> str:
    """What an option of type `tp` with `rule` accepts, in words."""
    tp, optional = _unwrap_optional(tp)
    rule = rule or Rule()
    if dataclasses.is_dataclass(tp):
        text = f"a section with the keys {', '.join(f.name for f in dataclasses.fields(tp))}"
    elif _is_list(tp):
        (item,) = typing.get_args(tp)[:1] or (typing.Any,)
        plural = _NOUNS.get(item, ("a value", "values"))[1]
        count = f"{rule.length} " if rule.length is not None else ""
        if rule.min_length is not None:
            count = f"at least {rule.min_length} " if rule.min_length > 1 else ""
        text = f"a {'non-empty ' if rule.min_length == 1 else ''}list of {count}{plural}"
        if rule.choices is not None:
            text += f" from {', '.join(map(_show_choice, rule.choices))}"
        if rule.bounds():
            text += f", each {rule.bounds()}"
        if rule.order:
            text += ", in increasing order" if rule.order == "increasing" else ", in non-decreasing order"
    elif rule.choices is not None:
        text = "one of " + ", ".join(map(_show_choice, rule.choices))
    elif typing.get_origin(tp) in (typing.Union, types.UnionType):
        text = " or ".join(_NOUNS.get(a, ("a value",))[0] for a in typing.get_args(tp))
    else:
        text = _NOUNS.get(tp, ("a value",))[0]
        if rule.bounds():
            text += f" {rule.bounds()}"
    return text + (" or null" if optional else "")


def _show_choice(v) -> str:
    return _show(v) if not isinstance(v, str) else v


# --------------------------------------------------------------------------------------- checking
@dataclass
class _Layer:
    source: str  # "default.yaml", a recipe path, "command line"
    data: dict  # plain containers, interpolations unresolved


def _field_of(schema: type, key: str):
    """(type, Rule or None) of a dotted key (list indices dropped), or None if the schema has no such key."""
    cls, tp, rule = schema, None, None
    parts = key.split("[")[0].split(".")
    for i, name in enumerate(parts):
        if cls is None or not dataclasses.is_dataclass(cls):
            return None
        fields = {f.name: f for f in dataclasses.fields(cls)}
        if name not in fields:
            return None
        tp, rule = _hints(cls)[name], fields[name].metadata.get("rule")
        inner, _ = _unwrap_optional(tp)
        cls = inner if dataclasses.is_dataclass(inner) else None
        if i < len(parts) - 1 and cls is None:
            return None
    return tp, rule


def _check_shape(schema: type, data, source: str, prefix: str = "") -> None:
    """Keys known, sections given as sections, lists as lists, scalars as scalars (OmegaConf then converts
    and checks the scalar types)."""
    if not isinstance(data, Mapping):
        where = f"section '{prefix[:-1]}'" if prefix else "the file"
        raise ConfigError(f"{source}: {where} must be a mapping of options, got {_show(data)}")
    fields = {f.name: f for f in dataclasses.fields(schema)}
    hints = _hints(schema)
    for key, value in data.items():
        name = f"{prefix}{key}"
        if key not in fields:
            valid = ", ".join(sorted(fields))
            raise ConfigError(f"{source}: unknown option '{name}'; valid keys here: {valid}")
        if _is_interpolation(value):
            continue
        tp, optional = _unwrap_optional(hints[key])
        rule = fields[key].metadata.get("rule")
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, Mapping):
                raise ConfigError(f"{source}: {name}={_show(value)}: expected {_describe(tp)}")
            _check_shape(tp, value, source, f"{name}.")
        elif value is None:
            if not optional:
                raise ConfigError(f"{source}: {name}=null: expected {_describe(hints[key], rule)} (not null)")
        elif _is_list(tp):
            if not isinstance(value, (list, tuple)):
                raise ConfigError(f"{source}: {name}={_show(value)}: expected {_describe(hints[key], rule)}")
            if any(isinstance(v, (list, tuple, Mapping)) for v in value):
                raise ConfigError(f"{source}: {name}={_show(value)}: expected {_describe(hints[key], rule)}")
        elif isinstance(value, (list, tuple, Mapping)):
            raise ConfigError(f"{source}: {name}={_show(value)}: expected {_describe(hints[key], rule)}")


def _is_interpolation(v) -> bool:
    return isinstance(v, str) and "${" in v


def _origin(layers: Sequence[_Layer], key: str, value):
    """(source, value as written there) of the last layer that sets `key` (`value` if none does)."""
    for layer in reversed(layers):
        node = layer.data
        for part in key.split("."):
            if not isinstance(node, Mapping) or part not in node:
                break
            node = node[part]
        else:
            return layer.source, node
    return "config", value


def _merge(cfg: DictConfig, layer: _Layer, schema: type | None) -> DictConfig:
    if schema is not None:
        _check_shape(schema, layer.data, layer.source)
    try:
        return OmegaConf.merge(cfg, OmegaConf.create(layer.data))
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None)
        if key and schema is not None and _field_of(schema, key) is not None:
            tp, rule = _field_of(schema, key)
            base = key.split("[")[0]
            value = OmegaConf.select(OmegaConf.create(layer.data), base, default=None)
            value = OmegaConf.to_container(value) if isinstance(value, (DictConfig, ListConfig)) else value
            raise ConfigError(f"{layer.source}: {base}={_show(value)}: expected {_describe(tp, rule)}") from None
        if key:
            parent = key.rsplit(".", 1)[0] if "." in key else ""
            node = OmegaConf.select(cfg, parent) if parent else cfg
            valid = sorted(node.keys()) if isinstance(node, DictConfig) else []
            if "not in" in str(e) or "Key" in type(e).__name__:
                raise ConfigError(
                    f"{layer.source}: unknown option '{key}'; valid keys here: {', '.join(valid)}"
                ) from None
        msg = getattr(e, "msg", None) or str(e).splitlines()[0]
        raise ConfigError(f"{layer.source}: {msg}") from None


def _check_rules(cfg: DictConfig, schema: type, layers: Sequence[_Layer], prefix: str = "") -> None:
    hints = _hints(schema)
    for f in dataclasses.fields(schema):
        key, tp = f"{prefix}{f.name}", hints[f.name]
        inner, optional = _unwrap_optional(tp)
        value = cfg[f.name]
        if dataclasses.is_dataclass(inner):
            if value is not None:
                _check_rules(value, inner, layers, f"{key}.")
            continue
        rule: Rule | None = f.metadata.get("rule")
        if rule is None or value is None:
            continue
        plain = OmegaConf.to_container(value) if isinstance(value, ListConfig) else value
        ok = _list_ok(plain, rule) if _is_list(inner) else rule.accepts(plain)
        if not ok:
            source, written = _origin(layers, key, plain)
            raise ConfigError(f"{source}: {key}={_show(written)}: expected {_describe(tp, rule)}")


def _list_ok(values: list, rule: Rule) -> bool:
    if rule.length is not None and len(values) != rule.length:
        return False
    if rule.min_length is not None and len(values) < rule.min_length:
        return False
    if not all(rule.accepts(v) for v in values):
        return False
    pairs = list(zip(values, values[1:]))
    if rule.order == "increasing":
        return all(a < b for a, b in pairs)
    if rule.order == "sorted":
        return all(a <= b for a, b in pairs)
    return True


def _typed(schema: type, layers: Sequence[_Layer]) -> DictConfig:
    """The schema with every layer merged, then checked: no option left without a value, every rule of
    every option, then the schema's cross-option rules (`schema.check(cfg)`)."""
    cfg = OmegaConf.structured(schema)
    OmegaConf.set_struct(cfg, True)
    for layer in layers:
        cfg = _merge(cfg, layer, schema)
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ConfigError(
            f"option(s) without a value: {', '.join(missing)}; give them as key=value (default.yaml must set "
            "every option of the schema)"
        )
    _check_rules(cfg, schema, layers)
    check: Callable[[DictConfig], None] | None = getattr(schema, "check", None)
    if check is not None:
        check(cfg)
    return cfg


def validate(cfg: DictConfig | Mapping, schema: type, source: str = "config") -> DictConfig:
    """`cfg` merged into `schema` and checked as `load_config` checks its layers (a config built some other
    way gets the same checks; an already checked one comes back equal)."""
    data = OmegaConf.to_container(cfg, resolve=False) if isinstance(cfg, DictConfig) else dict(cfg)
    return _typed(schema, [_Layer(source, data)])


# ------------------------------------------------------------------------------ paths (the environment)
def _not_empty(name: str, path) -> None:
    if not str(path).strip():
        raise ConfigError(f"{name}={str(path)!r}: expected a path")


def check_file(name: str, path: str | Path | None) -> None:
    """An option naming a file (None: not given) must name an existing file."""
    if path is None:
        return
    _not_empty(name, path)
    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"{name}={path}: is a folder, expected a file")
    if not p.is_file():
        raise ConfigError(f"{name}={path}: no such file")


def check_folder(name: str, path: str | Path, layout: str = "") -> None:
    """An option naming an input folder must name an existing folder."""
    _not_empty(name, path)
    p, expected = Path(path), f" (expected {layout})" if layout else ""
    if p.exists() and not p.is_dir():
        raise ConfigError(f"{name}={path}: is a file, expected a folder{expected}")
    if not p.is_dir():
        raise ConfigError(f"{name}={path}: no such folder{expected}")


def check_output_folder(name: str, path: str | Path) -> None:
    """An output folder must be a folder, or creatable, and writable: tried for real (folders created and a
    file written, then removed again), so nothing is left behind."""
    _not_empty(name, path)
    p = Path(path).absolute()
    if p.exists() and not p.is_dir():
        raise ConfigError(f"{name}={path}: is a file, expected a folder for the run's output")
    missing, q = [], p
    while not q.exists():
        missing.append(q)
        q = q.parent
    if not q.is_dir():
        raise ConfigError(f"{name}={path}: cannot be created, {q} is a file")
    created = []
    try:
        for folder in reversed(missing):
            folder.mkdir()
            created.append(folder)
        with tempfile.TemporaryFile(dir=p):
            pass
    except OSError as e:
        what = "cannot be created" if missing and len(created) < len(missing) else "the folder is not writable"
        raise ConfigError(f"{name}={path}: {what} ({e.strerror or e})") from None
    finally:
        for folder in reversed(created):
            with contextlib.suppress(OSError):
                folder.rmdir()


def positive_int(text: str) -> int:
    """argparse type of a count or a size: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


# ----------------------------------------------------------------------------------------- loading
def recipe_path(config_dir: Path, name_or_path: str) -> Path:
    """A recipe given by name (`base` -> `<config_dir>/base.yaml`) or by path."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml"):
        if not p.is_file():
            raise ConfigError(f"config file {p} " + ("is not a file" if p.exists() else "does not exist"))
        return p
    candidate = config_dir / f"{name_or_path}.yaml"
    if not candidate.is_file():
        names = sorted(f.stem for f in config_dir.glob("*.yaml") if f.stem != "default")
        raise ConfigError(f"no recipe named {name_or_path!r} in {config_dir}; available: {', '.join(names)}")
    return candidate


def _read_yaml(path: Path) -> dict:
    try:
        data = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({' '.join(str(e).split())})") from None
    except (OSError, UnicodeDecodeError, OmegaConfBaseException) as e:
        raise ConfigError(f"{path}: cannot be read ({' '.join(str(e).split())})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of options, got {_show(data)}")
    return data


def _overrides(overrides: Sequence[str]) -> dict:
    bad = [o for o in overrides if "=" not in o or o.startswith("=")]
    if bad:
        raise ConfigError(f"command line: overrides must look like key=value, got {bad}")
    try:
        return OmegaConf.to_container(OmegaConf.from_dotlist(list(overrides)), resolve=False)
    except (OmegaConfBaseException, yaml.YAMLError, ValueError) as e:
        raise ConfigError(f"command line: cannot parse the overrides {list(overrides)} ({e})") from None


def load_config(
    config_dir: str | Path, recipe: str | None = None, overrides: Sequence[str] = (), schema: type | None = None
) -> DictConfig:
    """defaults <- recipe <- overrides. With `schema` (the task's dataclass) the result is typed and checked
    (see the module doc); without, only unknown keys are refused (struct mode)."""
    config_dir = Path(config_dir)
    layers = [_Layer(str(config_dir / "default.yaml"), _read_yaml(config_dir / "default.yaml"))]
    if recipe:
        path = recipe_path(config_dir, recipe)
        layers.append(_Layer(str(path), _read_yaml(path)))
    if overrides:
        layers.append(_Layer("command line", _overrides(overrides)))
    if schema is not None:
        return _typed(schema, layers)
    cfg = OmegaConf.create(layers[0].data)
    OmegaConf.set_struct(cfg, True)
    for layer in layers[1:]:
        cfg = _merge(cfg, layer, None)
    return cfg


def save_config(cfg: DictConfig, path: str | Path) -> None:
    Path(path).write_text(OmegaConf.to_yaml(cfg, resolve=True))


def to_dict(cfg: DictConfig | ListConfig) -> dict:
    """Plain python containers (for checkpoints, which must load with weights_only)."""
    return OmegaConf.to_container(cfg, resolve=True)


def cli(task: str, config_dir: str | Path, argv: Sequence[str] | None = None, schema: type | None = None) -> DictConfig:
    """Parse `[-c RECIPE] [key=value ...]` for a task's entry point and return the layered, checked config."""
    parser = argparse.ArgumentParser(
        prog=f"python -m {task}",
        description=f"{task}: layered config = {config_dir}/default.yaml <- recipe <- key=value overrides",
    )
    parser.add_argument("-c", "--config", default=None, help="recipe name (tiny, base, ...) or a .yaml path")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. optim.blr=1e-4")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument(
        "--debug", action="store_true", help="show the traceback of a configuration, data or checkpoint error"
    )
    args = parser.parse_intermixed_args(argv)  # flags may come between the overrides (make ... ARGS=--debug)
    cfg = load_config(config_dir, args.config, args.overrides, schema=schema)
    if args.print_config:
        print(OmegaConf.to_yaml(cfg, resolve=True))
        raise SystemExit(0)
    return cfg
