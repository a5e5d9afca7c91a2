"""Fine-tuning, linear probing and transfer classification: `python -m finetune -c RECIPE [key=value ...]`.

The recipe files in finetune/configs/ hold the numbers (docs/RECIPES.md section 3); the loop is the shared engine
(`core/trainer.py`). This file is what is the task's own: the classifier started from a pretrained
checkpoint, layer-decayed AdamW (or LARS for the linear probe), Mixup/CutMix with label smoothing, the
per-step warmup + cosine schedule, top-1/top-5 after every epoch and the best checkpoint.
"""

from __future__ import annotations

import time

import torch
from omegaconf import DictConfig
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import Lars

from core import checkpoint as ckpt
from core import engine, trainer
from core.config import ConfigError, check_file, check_folder, to_dict
from core.data import Augmented, make_loader, sample_seed, seeded, train_eval_samplers
from core.monitor import file_sha256
from core.optim import adamw, mae_finetune_groups, peak_lr, warmup_cosine
from finetune.data import base_datasets, eval_transform, train_transform
from finetune.evaluate import evaluate
from finetune.model import build_classifier, freeze_for_linprobe, init_head, load_pretrained, read_pretrained
from finetune.schema import FinetuneConfig

FORMAT = "dbot-suite/finetune/v1"


def check(cfg: DictConfig, env) -> dict:
    """Derived settings and what needs the environment (processes, device, files), before any compute; the
    options themselves and the rules between them are checked by the schema (`finetune.schema`)."""
    check_file("checkpoint", cfg.checkpoint)
    check_folder("data.root", cfg.data.root)
    accum, amp = trainer.batching(cfg, env)
    return {"accum": accum, "lr": peak_lr(cfg.optim), "amp": amp}


def build_optimizer(cfg: DictConfig, model) -> torch.optim.Optimizer:
    """AdamW over layer-decayed groups (MAE/dBOT `param_groups_lrd`: no weight decay on 1-D parameters nor on
    `model.no_weight_decay()` = cls_token, pos_embed; `optim.skip_decay=none` decays everything, as the
    authors' transfer script does by default), or LARS over the trainable head for the linear probe."""
    o = cfg.optim
    if o.name == "lars":  # MAE's LARS: trust-ratio adaptation and weight decay on matrices only
        matrices = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
        vectors = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
        return Lars(
            [
                {"params": matrices, "always_adapt": True, "weight_decay": o.weight_decay},
                {"params": vectors, "always_adapt": False, "weight_decay": 0.0},
            ],
            lr=0.0,
            momentum=0.9,
            trust_coeff=0.001,
        )
    groups = mae_finetune_groups(model, o.weight_decay, o.layer_decay, exempt=o.skip_decay == "standard")
    return adamw(groups, lr=0.0, betas=o.betas, device=next(model.parameters()).device)


def criterion_and_mixup(cfg: DictConfig, num_classes: int):
    """Soft-target cross-entropy after timm's Mixup/CutMix (label smoothing inside), or label smoothing alone,
    or plain cross-entropy (the linear probe)."""
    a = cfg.aug
    if cfg.task != "linprobe" and (a.mixup > 0 or a.cutmix > 0):
        mixup = Mixup(
            mixup_alpha=a.mixup,
            cutmix_alpha=a.cutmix,
            prob=a.mixup_prob,
            switch_prob=a.mixup_switch_prob,
            mode="batch",
            label_smoothing=a.smoothing,
            num_classes=num_classes,
        )
        return SoftTargetCrossEntropy(), mixup
    if a.smoothing > 0 and cfg.task != "linprobe":
        return LabelSmoothingCrossEntropy(smoothing=a.smoothing), None
    return torch.nn.CrossEntropyLoss(), None


class Finetune(trainer.Task):
    format, unit = FORMAT, "epoch"
    schema = FinetuneConfig

    def __init__(self, cfg, env):
        super().__init__(cfg, env)
        self.name = cfg.task
        plan = check(cfg, env)
        self.accum, self.lr, self.amp = plan["accum"], plan["lr"], plan["amp"]
        self.best, self.history, self.report = {"top1": -1.0}, [], None

    def build(self, state) -> trainer.Run:
        cfg, env, d = self.cfg, self.env, self.cfg.data
        # pretrained weights first: a file of the wrong size fails before the dataset is listed
        pretrained = None
        if cfg.checkpoint is not None and state is None:
            pretrained = read_pretrained(cfg.checkpoint, cfg.model.size, cfg.model.img_size)
        train_base, val_base, self.classes = base_datasets(d.kind, d.root)
        num_classes = len(self.classes)
        if d.num_classes is not None and d.num_classes != num_classes:
            raise ConfigError(f"data.num_classes={d.num_classes} but {d.root} has {num_classes} classes")
        model = build_classifier(cfg, num_classes)
        img_size = model.patch_embed.img_size[0]
        skip = d.skip_corrupt
        self.train_set = Augmented(train_base, train_transform(cfg, img_size), seed=cfg.seed, skip_corrupt=skip)
        self.val_set = Augmented(val_base, eval_transform(cfg, img_size), seed=cfg.seed, skip_corrupt=skip, train=False)
        train_sampler, val_sampler = train_eval_samplers(
            len(self.train_set), len(self.val_set), d.batch_per_gpu, d.eval_batch_per_gpu, env, cfg.seed
        )
        batches = self.check_batches(train_sampler)
        train_loader = make_loader(self.train_set, train_sampler, workers=d.workers, device=self.device, drop_last=True)
        self.val_loader = make_loader(
            self.val_set, val_sampler, workers=d.workers, device=self.device, drop_last=False, split="val"
        )
        if pretrained is not None:
            self.report = load_pretrained(model, pretrained, str(cfg.checkpoint), cfg.model.head_init_std)
            del pretrained
        elif state is None:
            init_head(model, cfg.model.head_init_std)
        else:
            model.load_state_dict(state["model"])
        if cfg.task == "linprobe":
            freeze_for_linprobe(model)
        self.model = model.to(self.device)
        o, spe = cfg.optim, engine.steps_per_epoch(batches, self.accum)
        t = [e + s * self.accum / batches for e in range(cfg.epochs) for s in range(spe)]
        schedule = warmup_cosine(self.lr, o.min_lr, cfg.epochs, o.warmup_epochs, positions=t)
        optimizer = build_optimizer(cfg, model)
        self.criterion, self.mixup = criterion_and_mixup(cfg, num_classes)
        return trainer.Run(
            model=self.model,
            optimizer=optimizer,
            schedule=schedule,
            train_loader=train_loader,
            train_sampler=train_sampler,
            accum=self.accum,
            amp=self.amp,
            clip_grad=o.clip_grad,
            eval_every=1,  # top-1 / top-5 after every epoch, and the best checkpoint
            val_loader=self.val_loader,
        )

    def load_state_dict(self, state) -> None:
        self.best, self.history = dict(state["best"]), list(state["history"])

    def train_mode(self, model) -> None:
        model.train()
        if self.cfg.task == "linprobe":
            model.eval()  # frozen encoder (no drop path); the BatchNorm of the head trains
            model.head.train()

    def prepare(self, batch, epoch, index):
        images, labels = batch[0].to(self.device, non_blocking=True), batch[1].to(self.device, non_blocking=True)
        if self.mixup is not None:
            if len(images) % 2:  # timm's batch mixing pairs samples
                images, labels = images[:-1], labels[:-1]
            with seeded(sample_seed(self.cfg.seed, epoch, 10**9 + self.env.rank * 10**6 + index)):
                images, labels = self.mixup(images, labels)
        return images, labels

    def forward(self, model, images, labels):
        return {"loss": self.criterion(model(images), labels)}

    def evaluate(self, step: int) -> dict:
        t0 = time.time()
        metrics = evaluate(self.model, self.val_loader, self.device, self.autocast())
        metrics["eval_images_per_s"] = metrics["count"] / max(time.time() - t0, 1e-9)
        metrics["skipped"] = len(self.val_set) - metrics["count"]  # corrupt ones (data.skip_corrupt)
        epoch = len(self.history)
        self.history.append({"epoch": epoch, **metrics})
        skipped = f", {metrics['skipped']} corrupt skipped" if metrics["skipped"] else ""
        self.write(
            f"epoch {epoch}: top-1 {metrics['top1']:.2f}, top-5 {metrics['top5']:.2f} over {metrics['count']} "
            f"val images{skipped}"
        )
        if metrics["top1"] > self.best["top1"]:
            self.best = {"top1": metrics["top1"], "top5": metrics["top5"], "epoch": epoch}
            if self.env.is_main:
                state = {
                    "model": self.model.state_dict(),
                    "epoch": epoch,
                    "top1": metrics["top1"],
                    "meta": {"format": FORMAT, **self.meta()},
                    "config": to_dict(self.cfg),
                }
                self.saved("best", ckpt.save(state, self.out / "checkpoint-best.pth"))
        return metrics

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "best": self.best, "history": self.history}

    def meta(self) -> dict:
        classes = list(map(str, self.classes))[:10000]
        return {
            "task": self.cfg.task,
            "model": self.cfg.model.size,
            "num_classes": len(self.classes),
            "classes": classes,
            "pretraining": self.trainer.pretraining if self.trainer else None,  # so a later fine-tune can place it
        }

    def describe(self) -> str:
        cfg, o = self.cfg, self.cfg.optim
        return (
            f"{cfg.task}: {cfg.model.size} on {cfg.data.kind} ({len(self.classes)} classes, {len(self.train_set)} "
            f"train / {len(self.val_set)} val), {cfg.epochs} epochs, global batch {o.global_batch} = "
            f"{cfg.data.batch_per_gpu} x {self.env.world_size} x {self.accum} accum, lr {self.lr:.3g}, amp "
            f"{self.amp}\nstart: {cfg.checkpoint or 'random init'}"
            + (f"\n{self.report.summary()}" if self.report else "")
        )

    def results(self, last_eval) -> dict:
        cfg, last = self.cfg, self.history[-1] if self.history else {}
        self.write(
            f"{cfg.task} done: best top-1 {self.best['top1']:.2f} (epoch {self.best.get('epoch')}), "
            f"last top-1 {last.get('top1', float('nan')):.2f}"
        )
        return {
            "model": cfg.model.size,
            "dataset": f"{cfg.data.kind}:{cfg.data.root}",
            "checkpoint": cfg.checkpoint,
            "checkpoint_sha256": file_sha256(cfg.checkpoint) if cfg.checkpoint else None,
            "metrics": {
                "top1": self.best["top1"],
                "top5": self.best.get("top5"),
                "last_top1": last.get("top1"),
                "last_top5": last.get("top5"),
            },
            "eval_images": last.get("count"),
            "best_epoch": self.best.get("epoch"),
            "epochs": cfg.epochs,
            "num_classes": len(self.classes),
            "history": self.history,
        }


def run(cfg: DictConfig) -> dict:
    return trainer.run(Finetune, cfg)
