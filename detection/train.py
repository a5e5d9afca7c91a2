"""COCO Mask R-CNN (ViTDet) training and evaluation: `python -m detection -c RECIPE [key=value ...]`.

Iteration-based like detectron2: AdamW with layer-wise lr decay, a step schedule with linear warmup, the
batch split over processes (and accumulation steps), checkpoint-last every `log.save_every` iterations for
exact resume (mid-epoch included), COCO bbox/segm evaluation at the end (and every `eval.every`).
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch
from omegaconf import DictConfig
from torch import nn

from core import checkpoint as ckpt
from core import dist, engine
from core.config import ConfigError, save_config, to_dict
from core.data import DataError, make_loader, train_eval_samplers
from core.monitor import RunLogger, file_sha256, write_results
from core.optim import param_groups, warmup_step
from detection.data import CocoInstances, collate
from detection.evaluate import evaluate
from detection.model import build_detector, load_pretrained
from detection.pyramid import LayerNorm2d

FORMAT = "dbot-suite/coco/v1"


def no_decay_names(model: nn.Module) -> set[str]:
    """ViTDet's weight-decay exceptions: every normalisation parameter and the absolute position embedding
    (biases and the relative-position tables are decayed, as in detectron2)."""
    names = {"backbone.net.pos_embed"}
    for mod_name, mod in model.named_modules():
        if isinstance(mod, (nn.LayerNorm, LayerNorm2d, nn.BatchNorm2d, nn.GroupNorm)):
            names.update(f"{mod_name}.{p}" for p, _ in mod.named_parameters(recurse=False))
    return names


def build_optimizer(cfg, model) -> torch.optim.Optimizer:
    o = cfg.optim
    skip = no_decay_names(model)
    groups = param_groups(
        model,
        o.weight_decay,
        layer_decay=o.layer_decay,
        layer_id=model.layer_id,
        num_layers=model.num_layers,
        skip_decay=lambda n, p: n in skip,
    )
    return torch.optim.AdamW(groups, lr=0.0, betas=tuple(o.betas))


def micro_batches(loader, sampler, start: int):
    """Micro-batches from global micro-batch index `start` on, across epochs (the sampler is a function of
    the epoch, so resuming mid-epoch continues with the same batches)."""
    per_epoch = sampler.batches_per_epoch
    epoch, skip = divmod(start, per_epoch)
    while True:
        sampler.set_epoch(epoch, start_batch=skip)
        yield from loader
        epoch, skip = epoch + 1, 0


def run(cfg: DictConfig) -> dict:
    return engine.run_distributed(_run, cfg)


def _run(cfg: DictConfig, env: dist.DistEnv) -> dict:
    o, device, out = cfg.optim, env.device, Path(cfg.out)
    try:
        accum = engine.accumulation_steps(o.global_batch, cfg.data.batch_per_gpu, env.world_size)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if list(o.steps) != sorted(o.steps) or (o.steps and o.steps[-1] >= o.iters):
        raise ConfigError(f"optim.steps {list(o.steps)} must increase and stay below optim.iters={o.iters}")
    if cfg.checkpoint is not None and not Path(cfg.checkpoint).is_file():
        raise ConfigError(f"checkpoint: {cfg.checkpoint} does not exist")
    try:
        amp = engine.resolve_amp(cfg.amp, device)
        train_set = CocoInstances(
            cfg.data.root,
            "train",
            train=True,
            img_size=cfg.data.img_size,
            scale_range=cfg.data.scale_range,
            seed=cfg.seed,
        )
        val_set = CocoInstances(cfg.data.root, "val", train=False, img_size=cfg.data.img_size)
    except (ValueError, DataError) as e:
        raise ConfigError(str(e)) from None
    if train_set.categories != val_set.categories:
        raise ConfigError(f"{cfg.data.root}: train and val annotation files list different categories")
    engine.seed_everything(cfg.seed, env.rank)
    _, state = ckpt.load_resume(out, cfg.resume, FORMAT)

    model = build_detector(cfg, train_set.num_classes)
    report = load_pretrained(model, cfg.checkpoint) if cfg.checkpoint is not None and state is None else None
    model.to(device)
    ddp_model = engine.ddp(model, env)
    schedule = warmup_step(o.lr, o.iters, o.warmup_iters, list(o.steps), gamma=0.1, warmup_factor=o.warmup_factor)
    stepper = engine.Stepper(
        ddp_model, build_optimizer(cfg, model), schedule, amp=amp, clip_grad=o.clip_grad, accum=accum, device=device
    )
    train_sampler, val_sampler = train_eval_samplers(
        len(train_set), len(val_set), cfg.data.batch_per_gpu, cfg.data.eval_batch_per_gpu, env, cfg.seed
    )
    if train_sampler.batches_per_epoch == 0:
        raise ConfigError(f"data: {len(train_set)} training images give no batch of {cfg.data.batch_per_gpu}")

    train_loader, val_loader = (
        make_loader(ds, sampler, workers=cfg.data.workers, device=device, drop_last=False, collate_fn=collate)
        for ds, sampler in ((train_set, train_sampler), (val_set, val_sampler))
    )
    if state:
        model.load_state_dict(state["model"])
        stepper.load_state_dict(state["stepper"])
        engine.restore_rng_states(state["rng"], env.rank, env.world_size, cfg.seed + 7919 * stepper.step_count)
    del state

    log = RunLogger(out, enabled=env.is_main, tensorboard=cfg.log.tensorboard)
    if env.is_main:
        save_config(cfg, out / "config.yaml")
        dropped = ", ".join(f"{v} {k}" for k, v in train_set.dropped.items() if v) or "nothing"
        log.write(
            f"COCO Mask R-CNN ViTDet-{cfg.model.size} at {cfg.data.img_size}: {len(train_set)} train / "
            f"{len(val_set)} val images, {train_set.num_classes} classes (dropped: {dropped}); "
            f"{o.iters} iterations x batch {o.global_batch} = {cfg.data.batch_per_gpu} x {env.world_size} "
            f"x {accum} accum, lr {o.lr}, amp {amp}\nstart: {cfg.checkpoint or 'random init'}"
            + (f"\n{report.summary()}" if report else "")
        )
    fwd = torch.compile(ddp_model) if cfg.compile else ddp_model
    batches = micro_batches(train_loader, train_sampler, stepper.step_count * accum)
    log.progress(o.iters, initial=stepper.step_count, desc="coco")
    sums, t0, seen = {}, time.time(), 0
    metrics = None
    while stepper.step_count < o.iters:
        ddp_model.train()
        for a in range(accum):
            group = stepper.group(a, accum)
            images, targets, metas = next(batches)
            targets = [{k: v.to(device) for k, v in t.items()} for t in targets]
            with stepper.autocast():
                losses = fwd(images.to(device, non_blocking=True), [m["size"] for m in metas], targets)
            loss = sum(losses.values())
            stepper.backward(loss, group)
            for k, v in losses.items():
                sums[k] = sums.get(k, 0.0) + v.detach()
            seen += len(images)
        grad_norm = stepper.step()
        it = stepper.step_count
        if it % cfg.log.every == 0 or it == o.iters:
            vals = {k: dist.all_reduce_mean(v / (cfg.log.every * accum)).item() for k, v in sums.items()}
            total = sum(vals.values())
            if not math.isfinite(total):
                raise FloatingPointError(f"loss is {total} at iteration {it}: {vals}")
            dt = time.time() - t0
            log.log(
                it,
                loss=total,
                **vals,
                lr=stepper.lr(it - 1),
                grad_norm=grad_norm.item(),
                s_per_iter=dt / cfg.log.every,
                images_per_s=seen * env.world_size / dt,
            )
            log.update(0, loss=total, lr=stepper.lr(it - 1))
            sums, t0, seen = {}, time.time(), 0
        log.update(1)
        if cfg.eval.every and it % cfg.eval.every == 0 and it < o.iters:
            metrics = evaluate(model, val_loader, val_set, device, engine.autocast(amp, device), cfg.eval.backend)
            log.log(it, **{f"{t}_{k}": v for t in ("bbox", "segm") for k, v in metrics[t].items()})
        stopping = cfg.max_iters is not None and it >= cfg.max_iters and it < o.iters
        if it % cfg.log.save_every == 0 or it == o.iters or stopping:
            rngs = engine.gather_rng_states()
            if env.is_main:
                ckpt.save(
                    {
                        "model": model.state_dict(),
                        "stepper": stepper.state_dict(),
                        "rng": rngs,
                        "meta": {"format": FORMAT, "model": cfg.model.size, "classes": train_set.num_classes},
                        "config": to_dict(cfg),
                    },
                    out / "checkpoint-last.pth",
                )
            dist.barrier()
        if stopping:
            log.write(f"stopping at iteration {it} (max_iters); run again to resume")
            log.close()
            return {"stopped_at_iteration": it}

    t_eval = time.time()
    metrics = evaluate(model, val_loader, val_set, device, engine.autocast(amp, device), cfg.eval.backend)
    eval_ips = metrics["images"] / max(time.time() - t_eval, 1e-9)
    log.log(
        stepper.step_count,
        **{f"{t}_{k}": v for t in ("bbox", "segm") for k, v in metrics[t].items()},
        eval_images_per_s=eval_ips,
    )
    log.close()
    results = {
        "model": cfg.model.size,
        "dataset": str(cfg.data.root),
        "checkpoint": cfg.checkpoint,
        "checkpoint_sha256": file_sha256(cfg.checkpoint) if cfg.checkpoint else None,
        "bbox": metrics["bbox"],
        "segm": metrics["segm"],
        "iterations": o.iters,
        "global_batch": o.global_batch,
        "img_size": cfg.data.img_size,
        "eval_images": metrics["images"],
        "eval_images_per_s": eval_ips,
        "dropped_annotations": dict(train_set.dropped),
        "config": str(out / "config.yaml"),
    }
    if env.is_main:
        write_results(out, "coco", **results)
        print(
            f"COCO: box AP {metrics['bbox']['AP']:.1f} (AP50 {metrics['bbox']['AP50']:.1f}), mask AP "
            f"{metrics['segm']['AP']:.1f} (AP50 {metrics['segm']['AP50']:.1f}); results in {out / 'results.json'}"
        )
    return results
