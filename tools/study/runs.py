"""The runs a study is made of: its data set, one pretraining run, one fine-tuning run, the evaluation of one
encoder by the three protocols (cached per encoder), the overrides of a bootstrapped run from a first target."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from core import checkpoint as ckpt
from core import probe as probes
from core.config import load_config
from core.vit import PRESETS, ViT, preset
from tools.study.scales import REPO, SCALES, labelled_root, pool_root


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


def target_overrides(spec: str, seed: int) -> list[str]:
    """`teacher` | `pixels` | `hog` | `ema` | `timm:NAME=WEIGHTS` -> the overrides of its bootstrapped run."""
    if spec.startswith("timm:"):
        name, _, weights = spec[5:].partition("=")
        kind = ["target.kind=timm", f"target.timm.name={name}", f"target.timm.checkpoint={weights}"]
    else:
        kind = [f"target.kind={spec}"]
    return [f"seed={seed}", *kind, "teacher.bootstrap=true"]
