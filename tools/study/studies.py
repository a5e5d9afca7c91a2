"""The two studies: what one seed runs (`targets_seed`, `wider_seed`), every seed (in `--jobs` processes first),
and the assembled study.json / wider.json with their claims, Markdown and pictures."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from core import interrupt
from core.config import ConfigError
from tools.study.claims import claims, summarize
from tools.study.plots import plot, plot_curves
from tools.study.report import markdown, record_wall_time, wider_markdown
from tools.study.runs import Evaluator, ensure_data, pretrain, target_overrides
from tools.study.scales import protocols, slug


def targets_seed(args, data: Path, evaluate: Evaluator, seed: int) -> dict:
    """One seed of claims (a)-(c): random init, then every first target's bootstrapped run, every stage."""
    out = {"random_init": evaluate(f"random-s{seed}", None, seed), "targets": {}}
    for spec in args.targets:
        name = slug(spec)
        run_dir = pretrain(args, data, f"{name}-s{seed}", target_overrides(spec, seed))
        out["targets"][name] = [
            evaluate(f"{name}-s{seed}-stage{k}", run_dir / f"checkpoint-stage{k}-student.pth", seed)
            for k in range(args.stages)
        ]
    return out


def wider_seed(args, data: Path, evaluate: Evaluator, seed: int) -> dict:
    """One seed of claim (d): both teacher chains, a student from each, the evaluations."""
    final = f"checkpoint-stage{args.stages - 1}-student.pth"
    same = pretrain(args, data, f"teacher-s{seed}", target_overrides("teacher", seed)) / final
    wide = (
        pretrain(args, data, f"wide-s{seed}", [*target_overrides("teacher", seed), f"model.size={args.wide}"]) / final
    )
    out = {}
    for key, teacher, size in (("same", same, args.model), ("wider", wide, args.wide)):
        student = pretrain(
            args,
            data,
            f"from-{key}-s{seed}",
            [
                f"seed={seed}",
                "target.kind=teacher",
                f"teacher.checkpoint={teacher}",
                f"teacher.size={size}",
                "teacher.bootstrap=false",
            ],
            stages=1,
        )
        out[key] = evaluate(f"from-{key}-s{seed}", student / "checkpoint-stage0-student.pth", seed)
    # the teachers themselves, for reference (the wider one by the frozen-feature protocols only)
    out["teacher_same"] = evaluate(f"teacher-s{seed}-stage{args.stages - 1}", same, seed)
    out["teacher_wider"] = evaluate(f"wide-s{seed}-stage{args.stages - 1}", wide, seed, finetune=False)
    return out


# The per-seed function of each study by name: the name is what a `--jobs` worker process receives.
PER_SEED = {"targets": targets_seed, "wider": wider_seed}


def run_seeds(args, study: str) -> list:
    """`PER_SEED[study](args, data, evaluate, seed)` for every seed; with `--jobs N` first in N processes (each
    with its share of the CPU threads) that fill the run folders and the evaluation cache, then here from them."""
    per_seed = PER_SEED[study]
    data = ensure_data(args)
    if args.jobs > 1 and len(args.seeds) > 1:  # SIGTERM / SIGINT stop them with this process (core.interrupt)
        calls = [(vars(args), study, s) for s in args.seeds]
        interrupt.run_in_processes(_seed_job, calls, jobs=min(args.jobs, len(args.seeds)))
    evaluate = Evaluator(args, data)
    return [per_seed(args, data, evaluate, seed) for seed in args.seeds], evaluate.loads


def _seed_job(arg_dict: dict, study: str, seed: int) -> None:
    args = argparse.Namespace(**arg_dict)
    torch.set_num_threads(max(1, torch.get_num_threads() // args.jobs))
    data = ensure_data(args)
    PER_SEED[study](args, data, Evaluator(args, data), seed)


def run_targets(args) -> dict:
    """Claims (a)-(c): see the package docstring (`tools/study/__init__.py`). Returns the study.json content."""
    t0 = time.time()
    data = ensure_data(args)
    per_seed, loads = run_seeds(args, "targets")
    raw: dict = {
        "random_init": [r["random_init"] for r in per_seed],
        "targets": {
            slug(t): [[r["targets"][slug(t)][k] for r in per_seed] for k in range(args.stages)] for t in args.targets
        },
    }
    summary = {
        "protocols": {
            p: {
                "random_init": summarize([r[p] for r in raw["random_init"]]),
                "targets": {
                    t: [summarize([r[p] for r in st]) for st in stages] for t, stages in raw["targets"].items()
                },
            }
            for p in protocols(args)
        },
        "seeds": list(args.seeds),
        "stages": args.stages,
        "epochs_per_stage": args.epochs,
        "model": args.model,
        "scale": args.scale,
        "data": str(data),
        "pretrain_recipe": args.pretrain_recipe,
        "finetune_recipe": args.finetune_recipe,
        "pretrain_overrides": list(args.overrides),
        "probe_epochs": args.probe_epochs,
        "loads": loads,
        "seconds": round(time.time() - t0, 1),
    }
    summary["seconds_total"] = record_wall_time(args.out, "targets", summary["seconds"])
    summary["claims"] = claims(summary)
    out = Path(args.out)
    (out / "study.json").write_text(json.dumps(summary, indent=2) + "\n")
    table = markdown(summary)
    (out / "study.md").write_text(table + "\n")
    plot(summary, out / "study.png")
    runs = {f"{slug(t)}, seed {s}": out / "pretrain" / f"{slug(t)}-s{s}" for t in args.targets for s in args.seeds}
    try:
        plot_curves(runs, out / "curves.png", summary["protocols"])
    except ConfigError as e:  # a run without the online probe (probe.every=null after --)
        print(f"curves.png not written: {e}")
    print(table)
    return summary


def run_wider(args) -> dict:
    """Claim (d): a student distilled from a wider dBOT teacher vs one distilled from a same-size dBOT teacher,
    both teachers pretrained here with the same chain (random first teacher, `--stages` bootstrapped stages)."""
    t0 = time.time()
    per_seed, loads = run_seeds(args, "wider")
    raw = {k: [r[k] for r in per_seed] for k in ("same", "wider", "teacher_same", "teacher_wider")}
    summary = {
        "protocols": {
            p: {k: summarize([r[p] for r in v]) for k, v in raw.items() if p in v[0]} for p in protocols(args)
        },
        "seeds": list(args.seeds),
        "model": args.model,
        "wide": args.wide,
        "stages": args.stages,
        "epochs_per_stage": args.epochs,
        "loads": loads,
        "seconds": round(time.time() - t0, 1),
    }
    summary["seconds_total"] = record_wall_time(args.out, "wider", summary["seconds"])
    summary["claims"] = {
        p: {"d_wider_minus_same": v["wider"]["mean"] - v["same"]["mean"], "d": v["wider"]["mean"] > v["same"]["mean"]}
        for p, v in summary["protocols"].items()
    }
    out = Path(args.out)
    (out / "wider.json").write_text(json.dumps(summary, indent=2) + "\n")
    table = wider_markdown(summary)
    (out / "wider.md").write_text(table + "\n")
    print(table)
    return summary
