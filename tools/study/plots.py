"""The study's pictures: study.png (score against stage per protocol) and the online-probe curves of
pretraining run folders (curves.png, `python -m tools.study curves`)."""

from __future__ import annotations

import json
from pathlib import Path

from core.config import ConfigError


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
