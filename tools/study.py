"""Does dBOT learn? The paper's claims checked with numbers on generated data, as two commands.

    python -m tools.study targets            # claims (a)-(c): make study
    python -m tools.study wider              # claim (d): make study-wider
    python -m tools.study targets --scale gpu --device cuda     # the larger version (ViT-S/8 at 64 px)
    python -m tools.study curves RUN [RUN ...] --out curves.png    # online-probe curves of any pretraining runs

`targets`: for every seed and every first target (default: the random teacher and pixels) one dBOT run of
`--stages` stages with bootstrapped teachers; then random initialisation and every stage's student are
evaluated by three protocols on the labelled split: `linprobe` (MAE's BatchNorm-without-affine linear head
on frozen features, `core.probe`), `finetune` (the suite's fine-tuning pipeline with its tiny recipe, unchanged)
and `knn` (DINO's weighted k-NN on the same frozen features). It checks
(a) the final student beats random initialisation, (b) no bootstrapped stage loses to the stage before,
(c) the spread between first targets shrinks over the stages.

`wider`: claim (d). A wider ViT (`tiny_wide`, 192-d, at the CPU scale) is pretrained with the same dBOT
chain as the same-size one; then one student of the study's size distils for one stage from each (both
teachers fixed, same epochs), and both students are evaluated as above.

Everything is an ordinary run folder under `--out` (pretraining runs under `pretrain/`, fine-tuning runs
under `finetune/`), so an interrupted study resumes where it stopped when started again with the same
command, and `make table` can read the runs. SIGTERM / SIGINT stop the seed processes of `--jobs N` with the
driver (`core.interrupt.run_in_processes`), each writing its run's checkpoint-last first.
Outputs: `study.json` (`{"protocols": {"linprobe": {"random_init": {"mean", "seeds"},
"targets": {"teacher": [{"mean", "seeds"} per stage], ...}}, ...}}`),
`study.md`, `study.png` (score against stage, one line per first target, random init as a horizontal line,
bars = min..max over seeds), `curves.png` (every run's online probe against pretraining epoch);
`wider.json`, `wider.md` for claim (d). Every checkpoint the study loads prints
and records its load report. Extra `key=value` options after `--` go to every pretraining run.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from core import checkpoint as ckpt
from core import errors, interrupt
from core import probe as probes
from core.config import ConfigError, load_config
from core.vit import PRESETS, ViT, preset

REPO = Path(__file__).resolve().parents[1]
PROTOCOLS = ("linprobe", "finetune", "knn")
TARGETS = ("teacher", "pixels", "hog", "ema")

# The two sizes of the study. `data`: the tools.datasets study preset; `model` / `wide`: core.vit presets of
# the student and of claim (d)'s wider teacher; recipes: pretrain/configs/<pretrain>.yaml and
# finetune/configs/<finetune>.yaml.
SCALES = {
    "cpu": dict(
        data="cpu",
        model="tiny",
        wide="tiny_wide",
        pretrain="study",
        finetune="tiny",
        stages=2,
        epochs=3,
        workers=1,
        jobs=2,  # the two seeds side by side, one core each
    ),
    "gpu": dict(
        data="gpu",
        model="small64",
        wide="base64",
        pretrain="study_gpu",
        finetune="study_gpu",
        stages=2,
        epochs=4,
        workers=12,
        jobs=1,
    ),
}


# ------------------------------------------------------------------------------------------- arguments
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


def ensure_data(args) -> Path:
    """The study set: `--data`, or generated once into data/study-<scale> (a `.done` marker)."""
    if args.data is not None:
        return Path(args.data)
    from tools.datasets import STUDY_PRESETS, make_study

    root = REPO / "data" / f"study-{args.scale}"
    if not (root / ".done").exists():
        t0 = time.time()
        make_study(root, seed=0, **STUDY_PRESETS[SCALES[args.scale]["data"]], workers=args.data_workers)
        (root / ".done").write_text("ok\n")
        print(f"study data: generated {root} in {time.time() - t0:.0f}s")
    return root


# ------------------------------------------------------------------------------------------------ runs
def pretrain(args, data: Path, name: str, overrides: list[str], stages: int | None = None) -> Path:
    """One pretraining run folder under <out>/pretrain/<name> through `pretrain.train.run`; skipped when its
    results.json exists (a partial run resumes from its checkpoint-last.pth)."""
    from pretrain.train import run as pretrain_run

    run_dir = Path(args.out) / "pretrain" / name
    if not (run_dir / "results.json").exists():
        n = args.stages if stages is None else stages
        cfg = load_config(
            REPO / "pretrain" / "configs",
            args.pretrain_recipe,
            [
                f"data.root={pool_root(data)}",
                f"out={run_dir}",
                f"device={args.device}",
                f"data.workers={args.workers}",
                f"model.size={args.model}",
                f"stages.epochs=[{','.join(str(i * args.epochs) for i in range(n + 1))}]",
                # the online probe on the labelled split after every epoch: the learning curve in metrics.jsonl
                "probe.every=1",
                f"probe.root={labelled_root(data)}",
                f"probe.epochs={args.probe_epochs}",
                *overrides,
                *args.overrides,
            ],
        )
        pretrain_run(cfg)
    return run_dir


def run_finetune(args, data: Path, name: str, checkpoint: Path | None, seed: int) -> float:
    """Top-1 after the last epoch of the study's fine-tuning recipe (no selection on the validation set)."""
    from finetune.train import run as finetune_run

    run_dir = Path(args.out) / "finetune" / name
    done = run_dir / "results.json"
    if not done.exists():
        cfg = load_config(
            REPO / "finetune" / "configs",
            args.finetune_recipe,
            [
                f"data.root={labelled_root(data)}",
                f"out={run_dir}",
                f"device={args.device}",
                f"data.workers={args.workers}",
                f"model.size={args.model}",
                f"seed={seed}",
                f"checkpoint={checkpoint if checkpoint is not None else 'null'}",
            ],
        )
        finetune_run(cfg)
    return float(json.loads(done.read_text())["metrics"]["last_top1"])


def load_encoder(path: Path, loads: dict) -> ViT:
    """The encoder of any checkpoint the converters read, in a ViT of the architecture the checkpoint's
    metadata (or its weights) give; the load report is printed and kept in `loads`. Nothing may be missing
    (the final norm included); the decoder and mask token are dropped by `read_backbone`."""
    from core.weights import arch_of, read_backbone

    meta = ckpt.load(path).get("meta") or {}
    sd, info = read_backbone(path)
    arch = meta.get("student_arch")
    if arch is None:
        a = arch_of(sd)
        same = [p for p in PRESETS.values() if p["embed_dim"] == a["embed_dim"] and p["patch_size"] == a["patch_size"]]
        heads = same[0]["num_heads"] if same else max(a["embed_dim"] // 64, 1)
        arch = dict(
            img_size=a["grid"] * a["patch_size"],
            patch_size=a["patch_size"],
            embed_dim=a["embed_dim"],
            depth=a["depth"],
            num_heads=heads,
        )
    model = ViT(**arch, fixed_pos_embed=True)
    report = ckpt.load_weights(model, sd, source=str(path))
    report.unexpected += info.dropped
    summary = report.summary()
    print(f"load {path}: {summary}")
    loads[str(path)] = summary
    return model


def random_encoder(model_size: str, seed: int) -> ViT:
    """Random initialisation as the pretraining starts: the student's architecture with MAE's initialisation
    and fixed sin-cos positions (the kind of network dBOT's stage-0 teacher is), seeded by `seed`."""
    model = ViT(**preset(model_size), fixed_pos_embed=True)
    model.initialize_weights(torch.Generator().manual_seed(10_000 + seed))
    return model


class Evaluator:
    """The three protocols for one encoder; results (and the load report) cached in <out>/evals/<name>.json,
    so a rerun, or the parent of `--jobs` workers, reads them instead of recomputing."""

    def __init__(self, args, data: Path):
        self.args, self.data = args, data
        self.loads: dict[str, str] = {}
        self.cache = Path(args.out) / "evals"
        self.cache.mkdir(parents=True, exist_ok=True)
        self._loaders = None

    def loaders(self):
        if self._loaders is None:
            img = preset(self.args.model)["img_size"]
            self._loaders = probes.eval_loaders(labelled_root(self.data), img, batch=256, workers=0)
        return self._loaders

    def __call__(self, name: str, checkpoint: Path | None, seed: int, finetune: bool = True) -> dict:
        path = self.cache / f"{name}.json"
        if path.exists():
            scores = json.loads(path.read_text())
        else:
            device = torch.device(self.args.device)
            loads: dict[str, str] = {}
            encoder = random_encoder(self.args.model, seed) if checkpoint is None else load_encoder(checkpoint, loads)
            train, val = self.loaders()
            scores = probes.probe(encoder.to(device), train, val, device, epochs=self.args.probe_epochs, seed=seed)
            del encoder
            if self.args.finetune and finetune:
                scores["finetune"] = run_finetune(self.args, self.data, name, checkpoint, seed)
            print(f"{name}: " + ", ".join(f"{k} {v:.2f}" for k, v in scores.items()))
            scores["load"] = loads
            path.write_text(json.dumps(scores) + "\n")
        self.loads.update(scores.pop("load", {}))
        return scores


def run_seeds(args, per_seed) -> list:
    """`per_seed(args, data, evaluate, seed)` for every seed; with `--jobs N` first in N processes (each with
    its share of the CPU threads) that fill the run folders and the evaluation cache, then here from them."""
    data = ensure_data(args)
    if args.jobs > 1 and len(args.seeds) > 1:  # SIGTERM / SIGINT stop them with this process (core.interrupt)
        calls = [(vars(args), per_seed.__name__, s) for s in args.seeds]
        interrupt.run_in_processes(_seed_job, calls, jobs=min(args.jobs, len(args.seeds)))
    evaluate = Evaluator(args, data)
    return [per_seed(args, data, evaluate, seed) for seed in args.seeds], evaluate.loads


def _seed_job(arg_dict: dict, fn: str, seed: int) -> None:
    args = argparse.Namespace(**arg_dict)
    torch.set_num_threads(max(1, torch.get_num_threads() // args.jobs))
    data = ensure_data(args)
    globals()[fn](args, data, Evaluator(args, data), seed)


def target_overrides(spec: str, seed: int) -> list[str]:
    """`teacher` | `pixels` | `hog` | `ema` | `timm:NAME=WEIGHTS` -> the overrides of its bootstrapped run."""
    if spec.startswith("timm:"):
        name, _, weights = spec[5:].partition("=")
        kind = ["target.kind=timm", f"target.timm.name={name}", f"target.timm.checkpoint={weights}"]
    else:
        kind = [f"target.kind={spec}"]
    return [f"seed={seed}", *kind, "teacher.bootstrap=true"]


def slug(spec: str) -> str:
    """A folder-safe name of a target spec (`timm:vit_b=/w.pth` -> `timm-vit_b`)."""
    return spec.split("=")[0].replace(":", "-").replace("/", "-")


def pool_root(data: Path) -> Path:
    """Pretraining data: the study layout's unlabeled pool, or an ImageNet-layout root itself."""
    return data / "pool" if (data / "pool" / "train").is_dir() else data


def labelled_root(data: Path) -> Path:
    """Evaluation data (train/ and val/): the study layout's labelled split, or an ImageNet-layout root."""
    return data / "labelled" if (data / "labelled" / "train").is_dir() else data


# ------------------------------------------------------------------------------------------ the studies
def protocols(args) -> tuple[str, ...]:
    return PROTOCOLS if args.finetune else tuple(p for p in PROTOCOLS if p != "finetune")


def summarize(values: list[float]) -> dict:
    return {"mean": sum(values) / len(values), "seeds": list(values)}


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


def run_targets(args) -> dict:
    """Claims (a)-(c): see the module docstring. Returns the study.json content."""
    t0 = time.time()
    data = ensure_data(args)
    per_seed, loads = run_seeds(args, targets_seed)
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


def spread(protocol: dict, stage: int) -> float:
    means = [stages[stage]["mean"] for stages in protocol["targets"].values()]
    return max(means) - min(means)


def claims(summary: dict) -> dict:
    """(a) final student - random init per target; (b) stage k - stage k-1 per target; (c) spread between
    first targets at the first and the last stage. Differences of seed means, per protocol."""
    out = {}
    for name, p in summary["protocols"].items():
        rand = p["random_init"]["mean"]
        gain = {t: s[-1]["mean"] - rand for t, s in p["targets"].items()}
        steps = {t: [s[k]["mean"] - s[k - 1]["mean"] for k in range(1, len(s))] for t, s in p["targets"].items()}
        n = len(next(iter(p["targets"].values())))
        entry = {
            "a_final_minus_random": gain,
            "a": all(g > 0 for g in gain.values()),
            "b_stage_minus_previous": steps,
            "b": all(d >= 0 for v in steps.values() for d in v) if n > 1 else None,
        }
        if len(p["targets"]) > 1 and n > 1:
            entry["c_spread_first_last"] = [spread(p, 0), spread(p, n - 1)]
            entry["c"] = spread(p, n - 1) < spread(p, 0)
        out[name] = entry
    return out


def fmt(s: dict) -> str:
    seeds = s["seeds"]
    if len(seeds) == 1:
        return f"{s['mean']:.1f}"
    return f"{s['mean']:.1f} ({min(seeds):.1f}-{max(seeds):.1f})"


def markdown(summary: dict) -> str:
    n = summary["stages"]
    lines = [
        f"Top-1 (%) on the labelled split, mean over seeds {summary['seeds']} (min-max in brackets); "
        f"{summary['model']} student, {n} stage(s) x {summary['epochs_per_stage']} epochs.",
        "",
        "| protocol | start | " + " | ".join(f"stage {i}" for i in range(n)) + " |",
        "|---|---|" + "---|" * n,
    ]
    for name, p in summary["protocols"].items():
        lines.append(f"| {name} | random init | {fmt(p['random_init'])} |" + " |" * (n - 1))
        for t, stages in p["targets"].items():
            lines.append(f"| {name} | first target: {t} | " + " | ".join(fmt(s) for s in stages) + " |")
        if len(p["targets"]) > 1:
            lines.append(
                f"| {name} | spread between targets | " + " | ".join(f"{spread(p, i):.1f}" for i in range(n)) + " |"
            )
    lines += ["", "Claims (differences of seed means):", ""]
    for name, c in summary["claims"].items():
        gains = ", ".join(f"{t} {g:+.1f}" for t, g in c["a_final_minus_random"].items())
        lines.append(f"- {name}: (a) final student - random init: {gains} -> {verdict(c['a'])}")
        if c["b"] is not None:
            steps = ", ".join(
                f"{t} " + "/".join(f"{d:+.1f}" for d in v) for t, v in c["b_stage_minus_previous"].items()
            )
            lines.append(f"- {name}: (b) each stage - the stage before: {steps} -> {verdict(c['b'])}")
        if "c" in c:
            first, last = c["c_spread_first_last"]
            lines.append(
                f"- {name}: (c) spread between first targets: stage 0 {first:.1f} -> last stage {last:.1f} "
                f"-> {verdict(c['c'])}"
            )
    lines.append("\n" + wall_time(summary))
    return "\n".join(lines)


def verdict(ok) -> str:
    return "holds" if ok else "does not hold"


def record_wall_time(out: Path, command: str, seconds: float) -> float:
    """Add this invocation's wall time to `<out>/invocations.json` and return the total over every
    invocation that filled the folder (an interrupted study, resumed, costs all its invocations)."""
    path = Path(out) / "invocations.json"
    past = json.loads(path.read_text()) if path.exists() else []
    past.append({"command": command, "seconds": round(seconds, 1)})
    path.write_text(json.dumps(past, indent=2) + "\n")
    return round(sum(p["seconds"] for p in past if p["command"] == command), 1)


def wall_time(summary: dict) -> str:
    total, now = summary.get("seconds_total", summary["seconds"]), summary["seconds"]
    if abs(total - now) < 1:
        return f"Wall time {now / 60:.1f} min."
    return (
        f"Wall time {now / 60:.1f} min in this invocation (runs and evaluations already in the folder are reused); "
        f"{total / 60:.1f} min over all invocations into it."
    )


def plot(summary: dict, path: Path) -> None:
    """One panel per protocol: score against stage, one line per first target (bars: min..max over seeds),
    random init as a horizontal line with its min..max band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    protocols = summary["protocols"]
    fig, axes = plt.subplots(1, len(protocols), figsize=(4.2 * len(protocols), 3.4), squeeze=False)
    for ax, (name, p) in zip(axes[0], protocols.items(), strict=True):
        r = p["random_init"]
        ax.axhline(r["mean"], color="grey", ls="--", label="random init")
        ax.axhspan(min(r["seeds"]), max(r["seeds"]), color="grey", alpha=0.15)
        for t, stages in p["targets"].items():
            x = list(range(len(stages)))
            m = [s["mean"] for s in stages]
            lo = [s["mean"] - min(s["seeds"]) for s in stages]
            hi = [max(s["seeds"]) - s["mean"] for s in stages]
            ax.errorbar(x, m, yerr=[lo, hi], marker="o", capsize=3, label=f"first target: {t}")
        ax.set_xticks(range(summary["stages"]))
        ax.set_xlabel("stage")
        ax.set_ylabel("top-1 (%)")
        ax.set_title(name)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"dBOT study: {summary['model']}, seeds {summary['seeds']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def probe_curve(run_dir: Path) -> dict:
    """The online probe's learning curve of a pretraining run folder (finished or not), read from its
    metrics.jsonl and config.yaml: `{"epoch": [...], "linprobe": [...], "knn": [...], "stages": [0, ..]}`."""
    from omegaconf import OmegaConf

    run_dir = Path(run_dir)
    for f in ("config.yaml", "metrics.jsonl"):
        if not (run_dir / f).is_file():
            raise ConfigError(f"curves: {run_dir} has no {f} (expected a pretraining run folder)")
    cfg = OmegaConf.load(run_dir / "config.yaml")
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if '"linprobe"' in x]
    if cfg.probe.every is None or not lines:
        raise ConfigError(f"{run_dir}: no online-probe lines in metrics.jsonl (probe.every=null, or no probe yet)")
    per_epoch = lines[0]["step"] / int(cfg.probe.every)  # the first probe follows epoch `every`
    return {
        "epoch": [round(x["step"] / per_epoch, 2) for x in lines],
        "linprobe": [x["linprobe"] for x in lines],
        "knn": [x["knn"] for x in lines],
        "stages": [int(e) for e in cfg.stages.epochs],
    }


def plot_curves(runs: dict[str, Path], path: Path, random_init: dict | None = None) -> None:
    """Linear probe and k-NN of every run's online probe against pretraining epoch (one line per run,
    stage boundaries as ticks on the line), random init as a horizontal band from a study.json's
    `protocols`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = {label: probe_curve(run_dir) for label, run_dir in runs.items()}  # every file checked before drawing
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for ax, name in zip(axes, ("linprobe", "knn"), strict=True):
        if random_init is not None and name in random_init:
            r = random_init[name]["random_init"]
            ax.axhline(r["mean"], color="grey", ls="--", label="random init")
            ax.axhspan(min(r["seeds"]), max(r["seeds"]), color="grey", alpha=0.15)
        for label, c in curves.items():
            (line,) = ax.plot(c["epoch"], c[name], marker=".", label=label)
            for b in c["stages"][1:-1]:
                ax.axvline(b, color=line.get_color(), ls=":", lw=0.8)
        ax.set_xlabel("pretraining epoch (dotted: stage switch)")
        ax.set_ylabel("top-1 (%)")
        ax.set_title(f"online probe: {name}")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


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


def run_wider(args) -> dict:
    """Claim (d): a student distilled from a wider dBOT teacher vs one distilled from a same-size dBOT teacher,
    both teachers pretrained here with the same chain (random first teacher, `--stages` bootstrapped stages)."""
    t0 = time.time()
    per_seed, loads = run_seeds(args, wider_seed)
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
    lines = [
        f"Claim (d): a {args.model} student distilled for one stage of {args.epochs} epochs from a dBOT teacher "
        f"({args.stages} stages x {args.epochs} epochs) of the same size or wider ({args.wide}); top-1 (%), mean over "
        f"seeds {args.seeds} (min-max).",
        "",
        "| protocol | student of the same-size teacher | student of the wider teacher | wider - same "
        "| same-size teacher itself | wider teacher itself |",
        "|---|---|---|---|---|---|",
    ]
    for p, v in summary["protocols"].items():
        d = summary["claims"][p]["d_wider_minus_same"]
        wide = fmt(v["teacher_wider"]) if "teacher_wider" in v else "-"
        lines.append(f"| {p} | {fmt(v['same'])} | {fmt(v['wider'])} | {d:+.1f} | {fmt(v['teacher_same'])} | {wide} |")
    for p, c in summary["claims"].items():
        lines.append(f"\n(d) {p}: wider - same {c['d_wider_minus_same']:+.1f} -> {verdict(c['d'])}")
    lines.append("\n" + wall_time(summary))
    table = "\n".join(lines)
    (out / "wider.md").write_text(table + "\n")
    print(table)
    return summary


# ------------------------------------------------------------------------------------------------- CLI
def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tools.study", description=__doc__.split("\n\n")[0])
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


def main(argv=None) -> dict:
    args = parser().parse_args(argv)
    if args.command == "curves":
        return run_curves(args)
    args.out = args.out or str(REPO / "runs" / f"study-{args.scale}")
    resolve(args)
    check_settings(args)
    return run_targets(args) if args.command == "targets" else run_wider(args)


if __name__ == "__main__":  # a user error: one line `error: ...`, exit 2 (--debug: the traceback)
    sys.exit(errors.main(main))
