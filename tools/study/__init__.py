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

One module per job:
- `scales`: the two scales (`cpu`, `gpu`), the first targets and protocols, the study data layout;
- `runs`: the study set, one pretraining run, one fine-tuning run, the evaluation of one encoder (cached);
- `studies`: what one seed of each study runs, every seed (in `--jobs` processes), study.json / wider.json;
- `claims`: the claims from the seed means; `report`: study.md, wider.md, the wall time;
- `plots`: study.png and the online-probe curves; `cli`: the command line.
"""

from tools.study.claims import claims, spread, summarize, verdict
from tools.study.cli import check_args, check_settings, main, parser, recipe_text, resolve, run_curves
from tools.study.plots import plot, plot_curves, probe_curve
from tools.study.report import fmt, markdown, record_wall_time, wall_time, wider_markdown
from tools.study.runs import (
    Evaluator,
    ensure_data,
    load_encoder,
    pretrain,
    random_encoder,
    run_finetune,
    target_overrides,
)
from tools.study.scales import PROTOCOLS, REPO, SCALES, TARGETS, labelled_root, pool_root, protocols, slug
from tools.study.studies import PER_SEED, run_seeds, run_targets, run_wider, targets_seed, wider_seed

__all__ = [
    "PER_SEED", "PROTOCOLS", "REPO", "SCALES", "TARGETS", "Evaluator", "check_args", "check_settings", "claims",
    "ensure_data", "fmt", "labelled_root", "load_encoder", "main", "markdown", "parser", "plot", "plot_curves",
    "pool_root", "pretrain", "probe_curve", "protocols", "random_encoder", "recipe_text", "record_wall_time",
    "resolve", "run_curves", "run_finetune", "run_seeds", "run_targets", "run_wider", "slug", "spread",
    "summarize", "target_overrides", "targets_seed", "verdict", "wall_time", "wider_markdown", "wider_seed",
]  # fmt: skip
