"""The published numbers (`tools/published.yaml`, every value with its source) put beside ours."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

from tools.table.labels import Setting
from tools.table.records import METRICS

PUBLISHED = Path(__file__).resolve().parents[1] / "published.yaml"


@dataclass
class Published:
    setting: Setting
    method: str
    values: dict[str, float]
    sources: dict[str, str]


def load_published(path: str | Path = PUBLISHED) -> tuple[list[Published], dict, dict, list[dict]]:
    """(rows, sources, notes, other figures) from the published-numbers file."""
    doc = yaml.safe_load(Path(path).read_text())
    sources = doc.get("sources", {})
    rows = []
    keys = {m.key for m in METRICS}
    for i, r in enumerate(doc.get("rows", [])):
        values, srcs = {}, {}
        for k in keys:
            v = r.get(k)
            if v is None:
                continue
            src = r.get("source")
            if isinstance(v, dict):
                v, src = v["value"], v.get("source", src)
            if src not in sources:
                raise ValueError(f"{path}: rows[{i}].{k}: source {src!r} is not a key of 'sources'")
            values[k], srcs[k] = float(v), src
        rows.append(Published(Setting(r["student"], r["teacher"], r.get("asym")), r.get("method", ""), values, srcs))
    return rows, sources, doc.get("notes", {}), doc.get("other", [])
