"""The paper's study of target representations, as one command.

Several first-stage targets (a random teacher, pixels, HOG, a pretrained network, ...) are each followed by
the same number of bootstrapping stages; every stage's student is evaluated the same way downstream; the
result is a table and a plot of downstream score against stage, one line per starting target. The paper's
claim is that the lines converge: after a few stages of masked distillation the first target stops
mattering.

    python -m pretrain.study --data data/tiny/imagenet --model tiny --stages 3 --epochs 4 --out runs/study
    python -m pretrain.study --data /imagenet --model base --stages 3 --epochs 800 --eval finetune \\
        --targets teacher pixels hog timm:vit_base_patch16_clip_224.openai=/path/clip_b16.pth --out runs/study-b

Each pretraining run is an ordinary `python -m pretrain` run folder (so it resumes if interrupted, and
`make table` picks it up); extra `key=value` options after `--` go to every pretraining run.

Downstream evaluation (`--eval`): `knn` (cosine k-NN top-1 on frozen, mean-pooled features of the
train/val split; no training, the cheap default), `finetune` or `linprobe` (the fine-tuning pipeline's
tiny or given recipe).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from torchvision import transforms

from core import checkpoint as ckpt
from core.config import load_config
from core.data import IMAGENET_MEAN, IMAGENET_STD, ImageFolder
from core.vit import ViT
from core.weights import read_backbone

REPO = Path(__file__).resolve().parents[1]


def target_overrides(spec: str) -> list[str]:
    """`teacher` | `pixels` | `hog` | `ema` | `timm:NAME=WEIGHTS` -> pretraining overrides."""
    if spec.startswith("timm:"):
        name, _, weights = spec[5:].partition("=")
        if not weights:
            raise ValueError(f"--targets {spec}: write timm:<timm model name>=<weights file>")
        return ["target.kind=timm", f"target.timm.name={name}", f"target.timm.checkpoint={weights}"]
    return [f"target.kind={spec}"]


def slug(spec: str) -> str:
    return spec.split("=")[0].replace(":", "-").replace("/", "-")


@torch.no_grad()
def features(model: ViT, loader, device) -> tuple[torch.Tensor, torch.Tensor]:
    feats, labels = [], []
    for images, y in loader:
        tokens = model.forward_tokens(images.to(device), final_norm=True)
        feats.append(F.normalize(tokens[:, 1:].mean(1), dim=-1).cpu())
        labels.append(y)
    return torch.cat(feats), torch.cat(labels)


def knn_top1(train_f, train_y, val_f, val_y, k: int = 20, temperature: float = 0.07) -> float:
    """Weighted cosine k-NN (DINO's protocol): each of the k nearest neighbours votes exp(sim / T)."""
    k = min(k, len(train_f))
    sims, idx = (val_f @ train_f.T).topk(k, dim=1)
    votes = torch.zeros(len(val_f), int(train_y.max()) + 1)
    votes.scatter_add_(1, train_y[idx], (sims / temperature).exp())
    return 100.0 * (votes.argmax(1) == val_y).float().mean().item()


def knn_eval(checkpoint: str | Path, data_root: Path, arch: dict, device="cpu", batch: int = 256) -> float:
    model = ViT(**arch)
    sd, _ = read_backbone(checkpoint)
    model.load_state_dict(sd, strict=False)
    model.eval().to(device)
    size = arch["img_size"]
    tf = transforms.Compose(
        [
            transforms.Resize(size, interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.CenterCrop(size),
            transforms.ToTensor(),
            transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )
    loaders = [DataLoader(ImageFolder(data_root / split, tf), batch_size=batch) for split in ("train", "val")]
    (tf_, ty), (vf, vy) = (features(model, dl, device) for dl in loaders)
    return knn_top1(tf_, ty, vf, vy)


def run_study(args) -> dict:
    from pretrain.train import run as pretrain_run

    out = Path(args.out)
    boundaries = [i * args.epochs for i in range(args.stages + 1)]
    results: dict[str, list[float]] = {}
    for spec in args.targets:
        run_dir = out / slug(spec)
        overrides = [
            f"data.root={args.data}",
            f"out={run_dir}",
            f"stages.epochs=[{','.join(map(str, boundaries))}]",
            "teacher.bootstrap=true",
            *target_overrides(spec),
            *args.overrides,
        ]
        cfg = load_config(REPO / "pretrain" / "configs", args.model, overrides)
        pretrain_run(cfg)
        scores = []
        for stage in range(args.stages):
            student = run_dir / f"checkpoint-stage{stage}-student.pth"
            arch = ckpt.load(student)["meta"]["student_arch"]
            scores.append(evaluate(args, student, arch, out / "eval" / f"{slug(spec)}-stage{stage}"))
            print(f"{spec}: stage {stage} -> {args.eval} top-1 {scores[-1]:.2f}")
        results[spec] = scores
    summary = {"eval": args.eval, "model": args.model, "epochs_per_stage": args.epochs, "scores": results}
    (out / "study.json").write_text(json.dumps(summary, indent=2) + "\n")
    table = markdown(summary)
    (out / "study.md").write_text(table + "\n")
    plot(summary, out / "study.png")
    print(table)
    return summary


def evaluate(args, checkpoint: Path, arch: dict, eval_dir: Path) -> float:
    if args.eval == "knn":
        return knn_eval(checkpoint, Path(args.data), arch)
    from finetune.train import run as finetune_run  # the fine-tuning pipeline

    recipe = args.eval_recipe or ("tiny" if args.model == "tiny" else args.model)
    overrides = [f"data.root={args.data}", f"checkpoint={checkpoint}", f"out={eval_dir}"]
    if args.eval == "linprobe":
        overrides.append("task=linprobe")
    cfg = load_config(REPO / "finetune" / "configs", recipe, overrides)
    return float(finetune_run(cfg)["metrics"]["top1"])


def markdown(summary: dict) -> str:
    scores = summary["scores"]
    n = max(len(v) for v in scores.values())
    head = "| first target | " + " | ".join(f"stage {i}" for i in range(n)) + " |"
    rule = "|---|" + "---|" * n
    rows = [f"| {t} | " + " | ".join(f"{s:.2f}" for s in v) + " |" for t, v in scores.items()]
    spread = [max(v[i] for v in scores.values()) - min(v[i] for v in scores.values()) for i in range(n)]
    rows.append("| spread (max - min) | " + " | ".join(f"{s:.2f}" for s in spread) + " |")
    return f"{summary['eval']} top-1 (%) of each stage's student\n\n" + "\n".join([head, rule, *rows])


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for target, scores in summary["scores"].items():
        ax.plot(range(len(scores)), scores, marker="o", label=target)
    ax.set_xlabel("stage")
    ax.set_ylabel(f"{summary['eval']} top-1 (%)")
    ax.set_title(f"first target vs stage ({summary['model']})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m pretrain.study", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="ImageNet-layout root with train/ and val/")
    p.add_argument("--model", default="tiny", help="pretraining recipe (tiny, small, base, ...)")
    p.add_argument(
        "--targets",
        nargs="+",
        default=["teacher", "pixels", "hog"],
        help="first-stage targets: teacher pixels hog ema timm:NAME=WEIGHTS",
    )
    p.add_argument("--stages", type=int, default=3)
    p.add_argument("--epochs", type=int, default=4, help="epochs per stage")
    p.add_argument("--eval", choices=("knn", "finetune", "linprobe"), default="knn")
    p.add_argument("--eval-recipe", default=None, help="fine-tuning recipe for --eval finetune/linprobe")
    p.add_argument("--out", default="runs/study")
    p.add_argument("overrides", nargs="*", help="key=value options for every pretraining run (after --)")
    run_study(p.parse_args(argv))


if __name__ == "__main__":
    main()
