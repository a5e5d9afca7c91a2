"""ADE20K UperNet training and evaluation: `python -m segmentation -c RECIPE [key=value ...]`.

The recipe files in segmentation/configs/ hold the numbers (docs/RECIPES.md section 5); the loop is the shared
engine (`core/trainer.py`, iteration unit: micro-batch m of the run is batch m mod B of epoch m div B, so a
resumed run restarts the sampler mid-epoch where it stopped). What is segmentation's own: data with the
label check, the segmentor started from a pretrained backbone, layer-decayed AdamW, the per-iteration poly
schedule with linear warmup, sliding-window mIoU every `eval.every` iterations and at the end, and
`eval_only=true` to score a trained model.
"""

from __future__ import annotations

import math
import time

import torch
from omegaconf import DictConfig
from torch import nn

from core import checkpoint as ckpt
from core import dist, trainer
from core.config import ConfigError, check_file, check_folder
from core.data import DataError, ShardedSampler, eval_sampler, make_loader
from core.monitor import file_sha256
from core.optim import adamw, mmseg_groups, warmup_poly
from segmentation.data import ADE20K, TrainPipeline, check_labels, class_names
from segmentation.evaluate import class_table, evaluate
from segmentation.model import build_segmentor, load_pretrained
from segmentation.schema import SegmentationConfig

FORMAT = "dbot-suite/segmentation/v1"


def check(cfg: DictConfig, env) -> dict:
    """Derived settings and what needs the environment (processes, device, files), before any compute; the
    options themselves and the rules between them are checked by the schema (`segmentation.schema`)."""
    accum, amp = trainer.batching(cfg, env, train=not cfg.eval_only)
    if cfg.data.batch_per_gpu < 2 and not cfg.eval_only and not (env.distributed and env.device.type == "cuda"):
        raise ConfigError(
            "data.batch_per_gpu=1 needs BatchNorm synchronised across several GPUs: the pyramid pooling's 1 x 1 "
            "branch has a single value per channel otherwise"
        )
    for key in ("checkpoint", "weights"):
        check_file(key, cfg[key])
    check_folder("data.root", cfg.data.root, "the ADEChallengeData2016 layout")
    return {"accum": accum, "amp": amp}


def build_optimizer(cfg: DictConfig, model) -> torch.optim.Optimizer:
    o = cfg.optim
    groups = mmseg_groups(model, o.weight_decay, o.layer_decay)
    return adamw(groups, lr=0.0, betas=o.betas, device=next(model.parameters()).device)


def sync_buffers(model: nn.Module) -> None:
    """Copy rank 0's buffers (BatchNorm running statistics) to every rank."""
    if torch.distributed.is_initialized():
        for b in model.buffers():
            torch.distributed.broadcast(b, src=0)


class Segmentation(trainer.Task):
    name, format, unit = "ade20k", FORMAT, "iter"
    schema = SegmentationConfig

    def __init__(self, cfg, env):
        super().__init__(cfg, env)
        plan = check(cfg, env)
        self.accum, self.amp = plan["accum"], plan["amp"]
        self.report, self.history = None, []

    def build(self, state) -> trainer.Run:
        """Data (layout and labels checked before the model is built), the segmentor, optimizer, schedule."""
        cfg, d = self.cfg, self.cfg.data
        self.names = class_names(d.root, d.num_classes)
        n = len(self.names)
        self.val_set = ADE20K(d.root, "val", n, skip_corrupt=d.skip_corrupt)
        self.train_set = None
        if not cfg.eval_only:
            pipeline = TrainPipeline(d.scale, d.ratio_range, d.crop, d.cat_max_ratio, d.flip, d.photometric)
            self.train_set = ADE20K(d.root, "train", n, pipeline, seed=cfg.seed, skip_corrupt=d.skip_corrupt)
        if d.check_labels and state is None:
            pairs = (self.train_set.pairs if self.train_set is not None else []) + self.val_set.pairs
            found = dist.all_gather_object(
                check_labels(pairs, n, self.env.rank, self.env.world_size, max(d.workers, 1), d.skip_corrupt)
            )
            problems = [p for rank_problems in found for p in rank_problems]
            if problems:
                raise DataError(f"{len(problems)} bad label map(s): " + "; ".join(problems[:5]))
        self.val_loader = make_loader(
            self.val_set,
            eval_sampler(len(self.val_set), 1, self.env),
            workers=cfg.eval.workers,
            device=self.device,
            drop_last=False,
            split="val",
            batched=False,
        )
        try:
            model = build_segmentor(cfg.model, n)
        except ValueError as e:
            raise ConfigError(f"model: {e}") from None
        if cfg.eval_only:
            weights = ckpt.load(cfg.weights)
            if weights.get("meta", {}).get("format") != FORMAT:
                raise ckpt.CheckpointError(f"weights: {cfg.weights} is not a segmentation checkpoint of this suite")
            model.load_state_dict(weights["model"])
        elif state is not None:
            model.load_state_dict(state["model"])
        elif cfg.checkpoint is not None:
            self.report = load_pretrained(model, cfg.checkpoint)
        if self.env.distributed and self.device.type == "cuda":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        self.model = model.to(self.device)
        if cfg.eval_only:
            return trainer.Run(model=self.model, amp=self.amp, val_loader=self.val_loader)
        train_sampler = ShardedSampler(
            len(self.train_set), d.batch_per_gpu, rank=self.env.rank, world=self.env.world_size, seed=cfg.seed
        )
        self.check_batches(train_sampler)
        o = cfg.optim
        return trainer.Run(
            model=self.model,
            optimizer=build_optimizer(cfg, model),
            schedule=warmup_poly(
                o.lr, cfg.iters, o.warmup_iters, power=o.power, final=o.min_lr, warmup_ratio=o.warmup_ratio
            ),
            train_loader=make_loader(
                self.train_set, train_sampler, workers=d.workers, device=self.device, drop_last=True
            ),
            train_sampler=train_sampler,
            accum=self.accum,
            amp=self.amp,
            clip_grad=o.clip_grad,
            eval_every=cfg.eval.every,
            val_loader=self.val_loader,
        )

    def load_state_dict(self, state) -> None:
        self.history = list(state["history"])

    def forward(self, model, images, labels):
        return model(images, labels)

    def evaluate(self, step: int) -> dict:
        cfg, t0 = self.cfg, time.time()
        sync_buffers(self.model)  # BatchNorm statistics of rank 0 everywhere (plain BN drifts apart across ranks)
        self.write(f"evaluating {len(self.val_set)} images (sliding window {cfg.data.crop}/{cfg.eval.stride}) ...")
        m = evaluate(
            self.model,
            self.val_loader,
            num_classes=len(self.names),
            device=self.device,
            autocast=self.autocast(),
            scale=tuple(cfg.data.scale),
            crop=cfg.data.crop,
            stride=cfg.eval.stride,
            ratios=tuple(cfg.eval.ratios),
            flip=bool(cfg.eval.flip),
            batch=cfg.eval.window_batch,
        )
        m["eval_images_per_s"] = m["images"] / max(time.time() - t0, 1e-9)
        self.write(
            f"iteration {step}: mIoU {m['mIoU']:.2f}  mAcc {m['mAcc']:.2f}  aAcc {m['aAcc']:.2f}"
            f"  ({m['images']} images, {m['eval_images_per_s']:.1f} img/s)"
        )
        self.history.append({"iteration": step, **{k: v for k, v in m.items() if k not in ("iou", "acc")}})
        return m

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "history": self.history}

    def meta(self) -> dict:
        return {"model": self.cfg.model.size, "num_classes": len(self.names), "classes": list(self.names)}

    def describe(self) -> str:
        cfg, d = self.cfg, self.cfg.data
        return (
            f"ade20k: UperNet on ViT-{cfg.model.size} ({len(self.names)} classes, {len(self.train_set)} train / "
            f"{len(self.val_set)} val, crop {d.crop}), {cfg.iters} iterations, batch {cfg.optim.global_batch} = "
            f"{d.batch_per_gpu} x {self.env.world_size} x {self.accum} accum, lr {cfg.optim.lr:.3g}, "
            f"layer decay {cfg.optim.layer_decay}, amp {self.amp}, device {self.device}\n"
            f"start: {cfg.checkpoint or 'random init'}" + (f"\n{self.report.summary()}" if self.report else "")
        )

    def results(self, last_eval) -> dict:
        cfg, m = self.cfg, last_eval

        def clean(v):
            return None if v is None or (isinstance(v, float) and math.isnan(v)) else round(v, 4)

        self.write(class_table(self.names, m["iou"], m["acc"]))
        self.write(f"ade20k: mIoU {m['mIoU']:.2f}  mAcc {m['mAcc']:.2f}  aAcc {m['aAcc']:.2f}")
        return {
            "model": cfg.model.size,
            "dataset": f"ade20k:{cfg.data.root}",
            "checkpoint": cfg.checkpoint,
            "checkpoint_sha256": file_sha256(cfg.checkpoint) if cfg.checkpoint else None,
            "metrics": {k: clean(m[k]) for k in ("mIoU", "mAcc", "aAcc")},
            "eval_images": m["images"],
            "per_class_iou": {n: clean(v) for n, v in zip(self.names, m["iou"])},
            "per_class_acc": {n: clean(v) for n, v in zip(self.names, m["acc"])},
            "iterations": None if cfg.eval_only else cfg.iters,
            "num_classes": len(self.names),
            "eval": {
                "ratios": list(cfg.eval.ratios),
                "flip": bool(cfg.eval.flip),
                "crop": cfg.data.crop,
                "stride": cfg.eval.stride,
                "images": m["images"],
                "skipped": m["skipped"],
            },
            "eval_images_per_s": m.get("eval_images_per_s"),
            "history": self.history,
            **({"weights": cfg.weights} if cfg.eval_only else {}),
        }


def run(cfg: DictConfig) -> dict:
    if cfg.eval_only:
        return trainer.run_evaluation(Segmentation, cfg)
    return trainer.run(Segmentation, cfg)
