"""COCO Mask R-CNN (ViTDet) training and evaluation: `python -m detection -c RECIPE [key=value ...]`.

Iteration-based like detectron2, on the shared engine (`core/trainer.py`): every optimizer step takes the
global batch split over processes and accumulation steps; `checkpoint-last.pth` every `log.save_every`
iterations resumes exactly, mid-epoch included. What is detection's own: AdamW with layer-wise lr decay over
the ViT (everything else at scale 1) and detectron2's weight-decay exceptions, its multi-step schedule with
linear warmup, COCO box / mask AP at the end (and every `eval.every`).
"""

from __future__ import annotations

import contextlib
import time

import torch
from omegaconf import DictConfig

from core import trainer
from core.config import ConfigError, check_file, check_folder
from core.data import DataError, make_loader, train_eval_samplers
from core.monitor import file_sha256
from core.optim import adamw, detectron2_groups, warmup_step
from detection.data import CocoInstances, collate
from detection.evaluate import STATS, evaluate
from detection.model import build_detector, load_pretrained
from detection.schema import DetectionConfig

FORMAT = "dbot-suite/coco/v1"


def build_optimizer(cfg, model) -> torch.optim.Optimizer:
    """AdamW over detectron2's ViTDet groups (`core.optim.detectron2_groups`): optim.no_decay `norm` = torch
    norm layers (the ViT's LayerNorms; the pyramid's and heads' LayerNorms decay, as in detectron2), `pos_embed`."""
    o = cfg.optim
    groups = detectron2_groups(
        model,
        o.weight_decay,
        o.layer_decay,
        norms="norm" in o.no_decay,
        names=("pos_embed",) if "pos_embed" in o.no_decay else (),
    )
    return adamw(groups, lr=0.0, betas=o.betas, device=next(model.parameters()).device)


def check(cfg: DictConfig, env) -> dict:
    """Derived settings and what needs the environment (processes, device, files, an optional package), before
    any compute; the options themselves and the rules between them are checked by the schema
    (`detection.schema`)."""
    if cfg.eval.backend == "faster":
        try:
            import faster_coco_eval  # noqa: F401
        except ImportError:
            raise ConfigError("eval.backend=faster needs faster-coco-eval (pip install faster-coco-eval)") from None
    check_file("checkpoint", cfg.checkpoint)
    check_folder("data.root", cfg.data.root, "the COCO 2017 layout")
    accum, amp = trainer.batching(cfg, env)
    return {"accum": accum, "amp": amp}


def datasets(cfg) -> tuple[CocoInstances, CocoInstances]:
    d = cfg.data
    train = CocoInstances(
        d.root,
        "train",
        train=True,
        img_size=d.img_size,
        scale_range=d.scale_range,
        seed=cfg.seed,
        skip_corrupt=d.skip_corrupt,
    )
    val = CocoInstances(d.root, "val", train=False, img_size=d.img_size, skip_corrupt=d.skip_corrupt)
    if [c["id"] for c in train.categories] != [c["id"] for c in val.categories]:
        raise DataError(f"{d.root}: the train and val annotation files list different categories")
    return train, val


class Detection(trainer.Task):
    name, format, unit = "coco", FORMAT, "iter"
    schema = DetectionConfig

    def __init__(self, cfg, env):
        super().__init__(cfg, env)
        plan = check(cfg, env)
        self.accum, self.amp = plan["accum"], plan["amp"]
        self.loaded = None

    def build(self, state) -> trainer.Run:
        cfg, o, d = self.cfg, self.cfg.optim, self.cfg.data
        self.train_set, self.val_set = datasets(cfg)
        model = build_detector(cfg, self.train_set.num_classes)
        if state is not None:
            model.load_state_dict(state["model"])
        elif cfg.checkpoint is not None:
            self.loaded = load_pretrained(model, cfg.checkpoint)
        self.model = model.to(self.device)
        schedule = warmup_step(o.lr, o.iters, o.warmup_iters, list(o.steps), gamma=0.1, warmup_factor=o.warmup_factor)
        optimizer = build_optimizer(cfg, model)
        train_sampler, val_sampler = train_eval_samplers(
            len(self.train_set), len(self.val_set), d.batch_per_gpu, d.eval_batch_per_gpu, self.env, cfg.seed
        )
        self.check_batches(train_sampler)
        train_loader, self.val_loader = (
            make_loader(
                ds, sampler, workers=d.workers, device=self.device, drop_last=False, collate_fn=collate, split=s
            )
            for ds, sampler, s in ((self.train_set, train_sampler, "train"), (self.val_set, val_sampler, "val"))
        )
        return trainer.Run(
            model=self.model,
            optimizer=optimizer,
            schedule=schedule,
            train_loader=train_loader,
            train_sampler=train_sampler,
            accum=self.accum,
            amp=self.amp,
            clip_grad=o.clip_grad,
            eval_every=cfg.eval.every,
            val_loader=self.val_loader,
        )

    def compile(self, mode):
        """Only the backbone: the RPN and RoI heads run on a varying number of boxes."""
        self.model.backbone.compile(**({} if mode is True else {"mode": str(mode)}))
        return self.forward

    def prepare(self, batch, epoch, index):
        images, targets, metas = batch
        targets = [{k: v.to(self.device, non_blocking=True) for k, v in t.items()} for t in targets]
        return images.to(self.device, non_blocking=True), [m["size"] for m in metas], targets

    def forward(self, model, images, sizes, targets):
        losses = model(images, sizes, targets)
        return {"loss": sum(losses.values()), **losses}

    def evaluate(self, step: int) -> dict:
        t0 = time.time()
        # float32, whatever amp says: detectron2 evaluates outside autocast (AMPTrainer wraps training steps only)
        fp32 = contextlib.nullcontext()
        m = evaluate(self.model, self.val_loader, self.val_set, self.device, fp32, self.cfg.eval.backend)
        flat = {f"{t}_{k}": m[t][k] for t in ("bbox", "segm") for k in STATS}
        flat = {k: v for k, v in flat.items() if v is not None}
        skipped = len(self.val_set) - m["images"]  # corrupt ones (data.skip_corrupt)
        self.write(
            f"iteration {step}: box AP {m['bbox']['AP']:.2f}, mask AP {m['segm']['AP']:.2f} over {m['images']} val "
            f"images" + (f" ({skipped} corrupt skipped)" if skipped else "")
        )
        rate = m["images"] / max(time.time() - t0, 1e-9)
        return {**flat, "images": m["images"], "skipped": skipped, "eval_images_per_s": rate}

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict()}

    def meta(self) -> dict:
        categories = [c["name"] for c in self.train_set.categories]
        return {"model": self.cfg.model.size, "num_classes": self.train_set.num_classes, "categories": categories}

    def describe(self) -> str:
        cfg, o = self.cfg, self.cfg.optim
        dropped = ", ".join(f"{v} {k}" for k, v in sorted(self.train_set.dropped.items()) if v) or "nothing"
        return (
            f"COCO Mask R-CNN, ViTDet-{cfg.model.size} at {cfg.data.img_size}: {len(self.train_set)} train / "
            f"{len(self.val_set)} val images, {self.train_set.num_classes} classes (dropped for training: "
            f"{dropped}); {o.iters} iterations x batch {o.global_batch} = {cfg.data.batch_per_gpu} x "
            f"{self.env.world_size} x {self.accum} accum, lr {o.lr}, amp {self.amp}\n"
            f"start: {cfg.checkpoint or 'random init'}" + (f"\n{self.loaded.summary()}" if self.loaded else "")
        )

    def results(self, last_eval) -> dict:
        cfg, m = self.cfg, last_eval
        self.write(
            f"COCO ({m['images']} val images): box AP {m['bbox_AP']:.1f} (AP50 {m['bbox_AP50']:.1f}, AP75 "
            f"{m['bbox_AP75']:.1f}), mask AP {m['segm_AP']:.1f} (AP50 {m['segm_AP50']:.1f}, AP75 {m['segm_AP75']:.1f})"
        )
        return {
            "model": cfg.model.size,
            "dataset": f"coco:{cfg.data.root}",
            "checkpoint": cfg.checkpoint,
            "checkpoint_sha256": file_sha256(cfg.checkpoint) if cfg.checkpoint else None,
            "metrics": {k: v for k, v in m.items() if k.startswith(("bbox_", "segm_"))},
            "eval_images": m["images"],
            "iterations": cfg.optim.iters,
            "global_batch": cfg.optim.global_batch,
            "epochs": cfg.optim.iters * cfg.optim.global_batch / len(self.train_set),
            "img_size": cfg.data.img_size,
            "eval_images_per_s": m["eval_images_per_s"],
            "dropped_annotations": dict(self.train_set.dropped),
        }


def run(cfg: DictConfig) -> dict:
    return trainer.run(Detection, cfg)
