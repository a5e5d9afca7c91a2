"""The paper's main results table, built from every `results.json` under a runs folder.

    python -m tools.table --runs runs [--out runs/table] [--labels labels.yaml] [--duplicates newest|all]

One row per student/teacher setting; columns IN-1K top-1, COCO box AP and mask AP, ADE20K mIoU (plus linear
probe and transfer columns when such runs exist), each with the published number (`tools/published.yaml`)
and the difference. Writes `table.md` (also printed), `table.tex`, `table.csv`, `provenance.csv` (run folder,
checkpoint sha256, config and commit of every cell), `table.json` and `table.png`. Missing entries are a dash.

One module per job:
- `records`: the results.json contract (`metrics.top1`, `metrics.bbox_AP`, ...), collecting the files;
- `published`: the published numbers and their sources;
- `labels`: row names from a run's `pretraining` setting (`core.weights.pretraining_setting`: what the
  checkpoint records, written by `pretrain.setting`), `--labels`;
- `rows`: each run's row and cells with provenance, the Table;
- `render`: Markdown, LaTeX, CSV, provenance, JSON; `plot`: the figure; `cli`: the command line.

A downstream run's row is the `pretraining` setting its results.json records (student size and kind, first
target, bootstrapping, stage); a run without one has it read from its checkpoint when this suite's pretraining
made it. Checkpoints made elsewhere (the authors' or MAE's released files) take their row from `--labels`
(YAML: checkpoint path, file name or sha256 prefix -> {student, teacher, asym}) or from a `label` field in
results.json.

Bad input: a malformed results.json is named in a warning and skipped; two runs claiming the same cell are
never merged: the newest is shown (marked, the others listed in the notes) or, with `--duplicates all`,
every value is shown.
"""

from tools.table.cli import main
from tools.table.labels import (
    Setting,
    first_target_label,
    load_labels,
    setting_row,
    teacher_label,
    timm_label,
    vit_name,
)
from tools.table.published import PUBLISHED, Published, load_published
from tools.table.records import KNOWN_TASKS, LINPROBE, METRICS, Metric, Run, collect, metric_value, metrics_of
from tools.table.render import (
    DASH,
    body,
    fmt,
    header,
    provenance_csv,
    provenance_rows,
    to_csv,
    to_json,
    to_latex,
    to_markdown,
    write_all,
)
from tools.table.rows import Cell, Origin, Resolver, Row, Table, build, make_table

__all__ = [
    "DASH", "KNOWN_TASKS", "LINPROBE", "METRICS", "PUBLISHED", "Cell", "Metric", "Origin", "Published", "Resolver",
    "Row", "Run", "Setting", "Table", "body", "build", "collect", "first_target_label", "fmt", "header",
    "load_labels", "load_published", "main", "make_table", "metric_value", "metrics_of", "provenance_csv",
    "provenance_rows", "setting_row", "teacher_label", "timm_label", "to_csv", "to_json", "to_latex", "to_markdown",
    "vit_name", "write_all",
]  # fmt: skip
