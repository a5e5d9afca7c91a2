"""The study's written outputs: the Markdown tables of study.md and wider.md, and the wall time over every
invocation that filled an output folder."""

from __future__ import annotations

import json
from pathlib import Path

from tools.study.claims import spread, verdict


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


def wider_markdown(summary: dict) -> str:
    """wider.md: claim (d)'s table (students of the same-size and the wider teacher, the teachers themselves)."""
    model, wide, stages, epochs = summary["model"], summary["wide"], summary["stages"], summary["epochs_per_stage"]
    lines = [
        f"Claim (d): a {model} student distilled for one stage of {epochs} epochs from a dBOT teacher "
        f"({stages} stages x {epochs} epochs) of the same size or wider ({wide}); top-1 (%), mean over "
        f"seeds {summary['seeds']} (min-max).",
        "",
        "| protocol | student of the same-size teacher | student of the wider teacher | wider - same "
        "| same-size teacher itself | wider teacher itself |",
        "|---|---|---|---|---|---|",
    ]
    for p, v in summary["protocols"].items():
        d = summary["claims"][p]["d_wider_minus_same"]
        teacher = fmt(v["teacher_wider"]) if "teacher_wider" in v else "-"
        lines.append(
            f"| {p} | {fmt(v['same'])} | {fmt(v['wider'])} | {d:+.1f} | {fmt(v['teacher_same'])} | {teacher} |"
        )
    for p, c in summary["claims"].items():
        lines.append(f"\n(d) {p}: wider - same {c['d_wider_minus_same']:+.1f} -> {verdict(c['d'])}")
    lines.append("\n" + wall_time(summary))
    return "\n".join(lines)
