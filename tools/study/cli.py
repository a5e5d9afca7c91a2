"""`python -m tools.study`: the arguments (checked before any compute, filled from the scale), the settings an
output folder is bound to, and the three commands."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from core.config import ConfigError
from core.vit import PRESETS
from tools.study.plots import plot_curves
from tools.study.scales import REPO, SCALES, TARGETS, slug
from tools.study.studies import run_targets, run_wider

DESCRIPTION = "Does dBOT learn? The paper's claims checked with numbers on generated data, as two commands."


def check_args(args) -> None:
    """Every argument problem as one ConfigError naming the option, before any compute."""
    if args.stages < 1:
        raise ConfigError(f"--stages must be >= 1, got {args.stages}")
    if args.epochs < 1:
        raise ConfigError(f"--epochs must be >= 1 (epochs per stage), got {args.epochs}")
    if len(args.seeds) < 1 or len(set(args.seeds)) != len(args.seeds):
        raise ConfigError(f"--seeds must be one or more distinct integers, got {args.seeds}")
    if args.jobs < 1:
        raise ConfigError(f"--jobs must be >= 1, got {args.jobs}")
    if args.probe_epochs < 1:
        raise ConfigError(f"--probe-epochs must be >= 1, got {args.probe_epochs}")
    if args.command == "targets":
        for t in args.targets:
            if t.startswith("timm:") and not t.partition("=")[2]:
                raise ConfigError(f"--targets {t}: write timm:<timm model name>=<weights file>")
        bad = [t for t in args.targets if t not in TARGETS and not t.startswith("timm:")]
        if bad or not args.targets or len({slug(t) for t in args.targets}) != len(args.targets):
            raise ConfigError(
                f"--targets: distinct first targets from {', '.join(TARGETS)} or timm:NAME=WEIGHTS; got {args.targets}"
            )
    for opt, size in (("--model", args.model), ("--wide", getattr(args, "wide", None))):
        if size is not None and size not in PRESETS:
            raise ConfigError(f"{opt}: unknown model size {size!r}; expected one of {', '.join(sorted(PRESETS))}")
    bad = [o for o in args.overrides if "=" not in o]
    if bad:
        raise ConfigError(f"pretraining overrides after -- must look like key=value, got {bad}")
    if args.data is not None:
        for sub in ("pool/train", "labelled/train", "labelled/val"):
            if not (Path(args.data) / sub).is_dir():
                raise ConfigError(
                    f"--data: {args.data} has no {sub}/ (expected the study layout of `python -m tools.datasets "
                    "study`: pool/train/<folder>/*.jpg, labelled/{train,val}/<class>/*.jpg)"
                )


def resolve(args) -> argparse.Namespace:
    """Fill the scale's defaults into the arguments left unset."""
    scale = SCALES[args.scale]
    for key in ("model", "stages", "epochs", "workers", "jobs"):
        if getattr(args, key) is None:
            setattr(args, key, scale[key])
    if getattr(args, "wide", "unset") is None:
        args.wide = scale["wide"]
    args.pretrain_recipe = args.pretrain_recipe or scale["pretrain"]
    args.finetune_recipe = args.finetune_recipe or scale["finetune"]
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    check_args(args)
    return args


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tools.study", description=DESCRIPTION)
    sub = p.add_subparsers(dest="command", required=True)
    for name, help_ in (("targets", "claims (a)-(c): first targets x bootstrapped stages"), ("wider", "claim (d)")):
        s = sub.add_parser(name, help=help_)
        s.add_argument(
            "--scale", choices=sorted(SCALES), default="cpu", help="cpu (2-core, tiny) or gpu (ViT-S/8, 64 px)"
        )
        s.add_argument("--data", default=None, help="study-layout root (default: generated into data/study-<scale>)")
        s.add_argument("--out", default=None, help="output folder (default: runs/study-<scale>)")
        s.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
        s.add_argument("--stages", type=int, default=None, help="stages per dBOT run (default: the scale's)")
        s.add_argument("--epochs", type=int, default=None, help="epochs per stage (default: the scale's)")
        s.add_argument("--model", default=None, help="student size, a core.vit preset (default: the scale's)")
        s.add_argument("--pretrain-recipe", default=None, help="pretrain/configs recipe (default: the scale's)")
        s.add_argument("--finetune-recipe", default=None, help="finetune/configs recipe (default: the scale's)")
        s.add_argument("--probe-epochs", type=int, default=100, help="linear-probe epochs on frozen features")
        s.add_argument("--device", default="auto", help="auto | cpu | cuda")
        s.add_argument("--workers", type=int, default=None, help="data-loader workers per run")
        s.add_argument("--data-workers", type=int, default=0, help="processes generating the study set")
        s.add_argument(
            "--jobs",
            type=int,
            default=None,
            help="seeds in parallel processes, threads shared out (default: the scale's)",
        )
        s.add_argument(
            "--no-finetune", dest="finetune", action="store_false", help="frozen-feature protocols only (cheap)"
        )
        s.add_argument("--debug", action="store_true", help="show the traceback of a user error")
        s.add_argument("overrides", nargs="*", help="key=value options for every pretraining run (after --)")
        if name == "targets":
            s.add_argument(
                "--targets",
                nargs="+",
                default=["teacher", "pixels"],
                help=f"first targets: {TARGETS}, timm:NAME=WEIGHTS",
            )
        else:
            s.add_argument("--wide", default=None, help="preset of the wider teacher (default: the scale's)")
    c = sub.add_parser("curves", help="the online-probe curves of pretraining run folders in one picture")
    c.add_argument("runs", nargs="+", help="pretraining run folders (config.yaml + metrics.jsonl, probe.every set)")
    c.add_argument("--out", required=True, help="the picture to write (.png)")
    c.add_argument("--labels", nargs="+", default=None, help="one legend label per run (default: folder names)")
    c.add_argument("--study", default=None, help="a study.json whose random-init rows are drawn as bands")
    c.add_argument("--debug", action="store_true", help="show the traceback of a user error")
    return p


def recipe_text(folder: str, recipe: str) -> str:
    path = Path(recipe) if recipe.endswith(".yaml") else REPO / folder / "configs" / f"{recipe}.yaml"
    return path.read_text() if path.is_file() else recipe


def check_settings(args) -> None:
    """The run folders and evaluations under --out are reused by a rerun, so a rerun must be the same study:
    `<out>/settings.json` records what decides their content, and other settings are refused."""
    settings = {
        "model": args.model,
        "stages": args.stages,
        "epochs_per_stage": args.epochs,
        "pretrain_recipe": recipe_text("pretrain", args.pretrain_recipe),
        "finetune_recipe": recipe_text("finetune", args.finetune_recipe),
        "pretrain_overrides": list(args.overrides),
        "probe_epochs": args.probe_epochs,
        "finetune": args.finetune,
        "data": str(args.data),
        "wide": getattr(args, "wide", None),
    }
    path = Path(args.out) / "settings.json"
    if path.exists():
        old = json.loads(path.read_text())
        diff = sorted(
            k for k in settings if old.get(k) is not None and settings[k] is not None and old[k] != settings[k]
        )
        if diff:
            raise ConfigError(
                f"--out {args.out} holds a study with other settings ({', '.join(diff)} differ; see {path}): its runs "
                "would be reused; give another --out or remove that folder"
            )
        settings = {**old, **{k: v for k, v in settings.items() if v is not None}}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(settings, indent=2) + "\n")


def run_curves(args) -> None:
    """`curves`: the online-probe curves of the given pretraining run folders in one picture."""
    labels = args.labels or [Path(r).name for r in args.runs]
    if len(labels) != len(args.runs):
        raise ConfigError(f"--labels: {len(args.runs)} run folders need {len(args.runs)} labels, got {len(labels)}")
    random_init = None
    if args.study:
        path = Path(args.study)
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            record = None
        random_init = record.get("protocols") if isinstance(record, dict) else None
        if not isinstance(random_init, dict):
            raise ConfigError(f"--study {path}: expected the study.json (with 'protocols') of tools.study targets")
    plot_curves(dict(zip(labels, map(Path, args.runs), strict=True)), Path(args.out), random_init)
    print(f"wrote {args.out}")


def main(argv=None) -> dict:
    args = parser().parse_args(argv)
    if args.command == "curves":
        return run_curves(args)
    args.out = args.out or str(REPO / "runs" / f"study-{args.scale}")
    resolve(args)
    check_settings(args)
    return run_targets(args) if args.command == "targets" else run_wider(args)
