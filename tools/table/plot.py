"""The table as a dot plot (ours against the paper, one panel per column)."""

from __future__ import annotations

from pathlib import Path

from tools.table.rows import Table


def plot(table: Table, path: str | Path) -> Path:
    """A dot plot, one panel per column and one line per row (shared across panels): ours (blue dot), the
    paper (grey diamond), joined by a line labelled with the difference."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in table.rows if r.cells or r.published]
    n = max(len(rows), 1)
    seen: set[str] = set()

    def legend(name: str) -> str | None:
        if name in seen:
            return None
        seen.add(name)
        return name

    fig, axes = plt.subplots(
        1, len(table.metrics), figsize=(2.6 * len(table.metrics) + 2.4, 0.3 * n + 1.4), sharey=True, squeeze=False
    )
    for ax, m in zip(axes[0], table.metrics):
        xs = []
        for y, r in enumerate(rows):
            ours = r.ours(m.key).value if r.ours(m.key) else None
            pub = r.published.values.get(m.key) if r.published else None
            if ours is not None and pub is not None:
                ax.plot([pub, ours], [y, y], color="0.6", lw=1, zorder=1)
                ax.annotate(
                    f"{ours - pub:+.1f}",
                    (max(ours, pub), y),
                    xytext=(4, 0),
                    textcoords="offset points",
                    va="center",
                    fontsize=7,
                )
            if pub is not None:
                ax.scatter(
                    [pub],
                    [y],
                    marker="D",
                    s=22,
                    facecolors="none",
                    edgecolors="0.4",
                    zorder=2,
                    label=legend("paper"),
                )
            if ours is not None:
                ax.scatter([ours], [y], marker="o", s=22, color="tab:blue", zorder=3, label=legend("ours"))
            xs += [v for v in (ours, pub) if v is not None]
        if xs:
            span = max(max(xs) - min(xs), 2.0)
            ax.set_xlim(min(xs) - 0.15 * span, max(xs) + 0.3 * span)
        else:
            ax.text(0.5, 0.5, "no runs", ha="center", va="center", transform=ax.transAxes, color="0.5")
        ax.set_title(m.title, fontsize=9)
        ax.set_xlabel("%", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(axis="both", linestyle=":", alpha=0.6)
    axes[0][0].set_yticks(range(n), [f"{r.setting.student} / {r.setting.teacher}" for r in rows] or [""])
    axes[0][0].set_ylim(n - 0.5, -0.5)
    handles = {h.get_label(): h for ax in axes[0] for h in ax.collections if not h.get_label().startswith("_")}
    if handles:
        fig.legend(handles.values(), handles.keys(), loc="upper right", fontsize=7, ncol=2)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
