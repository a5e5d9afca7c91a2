"""Rendering a Table: Markdown (printed), LaTeX (booktabs), CSV, per-cell provenance CSV, JSON, and all of them
(plus the plot) into an output folder."""

from __future__ import annotations

import csv
import io
import json
import time
from pathlib import Path

from tools.table.records import Metric
from tools.table.rows import Row, Table

DASH = "-"


def fmt(v: float | None, spec: str = ".2f") -> str:
    return DASH if v is None else format(v, spec)


def cell_texts(table: Table, row: Row, m: Metric) -> tuple[str, str | None, str | None]:
    """(ours, paper, diff) as displayed; paper/diff None for columns without published numbers."""
    cells = row.cells.get(m.key, [])
    if not cells:
        ours = DASH
    elif table.duplicates == "all":
        ours = " / ".join(fmt(c.value) for c in cells)
    else:
        ours = fmt(cells[0].value) + ("†" if len(cells) > 1 else "")
    if m.key not in table.published_metrics:
        return ours, None, None
    pub = row.published.values.get(m.key) if row.published else None
    diff = cells[0].value - pub if cells and pub is not None else None
    return ours, fmt(pub, ".1f"), fmt(diff, "+.2f")


def header(table: Table) -> list[str]:
    cols = ["student", "teacher", "asym."]
    for m in table.metrics:
        if m.key in table.published_metrics:
            cols += [f"{m.title} ours", f"{m.short} paper", f"{m.short} Δ"]
        else:
            cols.append(m.title)
    return cols


def body(table: Table) -> list[list[str]]:
    out = []
    for r in table.rows:
        line = [r.setting.student, r.setting.teacher, r.setting.asym_text()]
        for m in table.metrics:
            ours, pub, diff = cell_texts(table, r, m)
            line += [ours] if pub is None else [ours, pub, diff]
        out.append(line)
    return out


def provenance_rows(table: Table) -> list[dict]:
    out = []
    for r in table.rows:
        for m in table.metrics:
            for rank, c in enumerate(r.cells.get(m.key, [])):
                out.append(
                    {
                        "student": r.setting.student,
                        "teacher": r.setting.teacher,
                        "asym": r.setting.asym_text(),
                        "column": m.title,
                        "value": round(c.value, 4),
                        "shown": rank == 0 or table.duplicates == "all",
                        **c.provenance(),
                    }
                )
    return out


def to_markdown(table: Table, full: bool = True) -> str:
    """The table, its legend and notes; with `full` also the warnings, per-cell provenance and sources."""

    def line(cells):
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"

    cols = header(table)
    marked = table.duplicates == "newest" and any(len(c) > 1 for r in table.rows for c in r.cells.values())
    lines = ["# Results", "", line(cols), "|" + "---|" * len(cols)]
    lines += [line(b) for b in body(table)]
    lines += [
        "",
        "Ours: this suite's runs (percent); paper: published (`tools/published.yaml`); Δ = ours - paper; "
        f"{DASH} = no run / not published."
        + (" † = several runs claim the cell, the newest is shown." if marked else ""),
    ]
    if table.notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in table.notes]
    if not full:
        return "\n".join(lines) + "\n"
    if table.warnings:
        lines += ["", "## Warnings", ""] + [f"- {w}" for w in table.warnings]
    prov = provenance_rows(table)
    if prov:
        lines += [
            "",
            "## Provenance",
            "",
            line(["row", "column", "value", "run", "checkpoint sha256", "config", "commit", "row from"]),
            "|---|---|---|---|---|---|---|---|",
        ]
        for p in prov:
            lines.append(
                line(
                    [
                        f"{p['student']} / {p['teacher']}",
                        p["column"] + ("" if p["shown"] else " (not shown)"),
                        fmt(p["value"]),
                        p["run"],
                        p["checkpoint_sha256"] or DASH,
                        p["config"] or DASH,
                        p["commit"] or DASH,
                        p["row_from"],
                    ]
                )
            )
    if table.sources:
        lines += ["", "## Published sources", ""] + [
            f"- `{k}`: {' '.join(v.split())}" for k, v in table.sources.items()
        ]
    return "\n".join(lines) + "\n"


def latex_escape(s: str) -> str:
    repl = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{"}
    repl |= {"}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "Δ": r"$\Delta$", "†": r"$^\dagger$"}
    return "".join(repl.get(ch, ch) for ch in s)


def to_latex(table: Table) -> str:
    """A booktabs table: one column group (ours / paper / Δ) per metric; missing entries are `--`."""
    spec = "lll" + "".join("rrr" if m.key in table.published_metrics else "r" for m in table.metrics)
    groups, rules, sub = [], [], ["Student", "Teacher", "Asym."]
    col = 4
    for m in table.metrics:
        width = 3 if m.key in table.published_metrics else 1
        groups.append(rf"\multicolumn{{{width}}}{{c}}{{{latex_escape(m.title)}}}")
        rules.append(rf"\cmidrule(lr){{{col}-{col + width - 1}}}")
        sub += ["ours", "paper", r"$\Delta$"] if width == 3 else ["ours"]
        col += width
    lines = [
        "% generated by tools/table; cell provenance in provenance.csv; -- = no run / not published",
        "% needs \\usepackage{booktabs}",
        rf"\begin{{tabular}}{{{spec}}}",
        r"\toprule",
        " & & & " + " & ".join(groups) + r" \\",
        " ".join(rules),
        " & ".join(sub) + r" \\",
        r"\midrule",
    ]
    for b in body(table):
        lines.append(" & ".join("--" if c == DASH else latex_escape(c) for c in b) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines) + "\n"


def to_csv(table: Table) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header(table))
    w.writerows(body(table))
    return buf.getvalue()


def provenance_csv(table: Table) -> str:
    prov = provenance_rows(table)
    buf = io.StringIO()
    cols = list(prov[0]) if prov else ["student", "teacher", "column", "value", "run"]
    w = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n")
    w.writeheader()
    for p in prov:
        w.writerow({k: DASH if v is None else v for k, v in p.items()})
    return buf.getvalue()


def to_json(table: Table) -> dict:
    rows = []
    for r in table.rows:
        entry = {"student": r.setting.student, "teacher": r.setting.teacher, "asym": r.setting.asym, "method": r.method}
        for m in table.metrics:
            cells = r.cells.get(m.key, [])
            pub = r.published.values.get(m.key) if r.published else None
            entry[m.key] = {
                "ours": cells[0].value if cells else None,
                "all": [c.value for c in cells],
                "paper": pub,
                "paper_source": r.published.sources.get(m.key) if r.published else None,
                "diff": cells[0].value - pub if cells and pub is not None else None,
            }
        rows.append(entry)
    return {
        "columns": {m.key: m.title for m in table.metrics},
        "rows": rows,
        "provenance": provenance_rows(table),
        "notes": table.notes,
        "warnings": table.warnings,
        "sources": table.sources,
        "generated_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def write_all(table: Table, out: str | Path, with_plot: bool = True) -> dict[str, Path]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files = {
        "markdown": out / "table.md",
        "latex": out / "table.tex",
        "csv": out / "table.csv",
        "provenance": out / "provenance.csv",
        "json": out / "table.json",
    }
    files["markdown"].write_text(to_markdown(table))
    files["latex"].write_text(to_latex(table))
    files["csv"].write_text(to_csv(table))
    files["provenance"].write_text(provenance_csv(table))
    files["json"].write_text(json.dumps(to_json(table), indent=2, default=str) + "\n")
    if with_plot:
        from tools.table.plot import plot

        files["plot"] = plot(table, out / "table.png")
    return files
