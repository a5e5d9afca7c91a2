"""COCO Mask R-CNN (ViTDet) training and evaluation: `python -m detection -c RECIPE [key=value ...]`.

Iteration-based like detectron2: AdamW with layer-wise lr decay over the ViT (everything else at scale 1) and
detectron2's weight-decay exceptions, a multi-step schedule with linear warmup, the global batch split over
processes and accumulation steps, `checkpoint-last.pth` every `log.save_every` iterations for exact resume
(mid-epoch included), COCO bbox/segm evaluation at the end (and every `eval.every`), results.json.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch
from omegaconf import DictConfig

from core import checkpoint as ckpt
from core import dist, engine
from core.config import ConfigError, save_config, to_dict
from core.data import DataError, ShardedSampler, make_loader, train_eval_samplers
from core.monitor import RunLogger, file_sha256, write_results
from core.optim import detectron2_groups, warmup_step
from detection.data import CocoInstances, collate
from detection.evaluate import BACKENDS, evaluate
from detection.model import build_detector, load_pretrained

FORMAT = "dbot-suite/coco/v1"
NO_DECAY_KINDS = ("norm", "pos_embed")


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
    return torch.optim.AdamW(groups, lr=0.0, betas=tuple(o.betas))


def check(cfg: DictConfig, env: dist.DistEnv) -> dict:
    """Derived settings; every problem is reported with its option before any compute."""
    o = cfg.optim
    steps = list(o.steps)
    if steps != sorted(steps) or any(not 0 < k < o.iters for k in steps):
        raise ConfigError(f"optim.steps {steps} must increase within (0, optim.iters={o.iters})")
    bad = [k for k in o.no_decay if k not in NO_DECAY_KINDS]
    if bad:
        raise ConfigError(f"optim.no_decay: unknown kind(s) {bad}; expected a subset of {list(NO_DECAY_KINDS)}")
    if cfg.eval.backend not in BACKENDS:
        raise ConfigError(f"eval.backend must be one of {BACKENDS}, got {cfg.eval.backend!r}")
    if cfg.eval.backend == "faster":
        try:
            import faster_coco_eval  # noqa: F401
        except ImportError:
            raise ConfigError("eval.backend=faster needs faster-coco-eval (pip install faster-coco-eval)") from None
    scales = list(cfg.data.scale_range)
    if len(scales) != 2 or not 0 < scales[0] <= scales[1]:
        raise ConfigError(f"data.scale_range must be 0 < low <= high, got {list(cfg.data.scale_range)}")
    if cfg.checkpoint is not None and not Path(cfg.checkpoint).is_file():
        raise ConfigError(f"checkpoint: {cfg.checkpoint} does not exist")
    try:
        amp = engine.resolve_amp(cfg.amp, env.device)
        accum = engine.accumulation_steps(o.global_batch, cfg.data.batch_per_gpu, env.world_size)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return {"accum": accum, "amp": amp}


def datasets(cfg) -> tuple[CocoInstances, CocoInstances]:
    d = cfg.data
    try:
        train = CocoInstances(
            d.root,
            "train",
            train=True,
            img_size=d.img_size,
            scale_range=d.scale_range,
            seed=cfg.seed,
            skip_corrupt=d.skip_corrupt,
        )
        val = CocoInstances(d.root, "val", train=False, img_size=d.img_size)
    except DataError as e:
        raise ConfigError(str(e)) from None
    if [c["id"] for c in train.categories] != [c["id"] for c in val.categories]:
        raise ConfigError(f"{d.root}: the train and val annotation files list different categories")
    return train, val


def micro_batches(loader, sampler: ShardedSampler, start: int):
    """Micro-batches from global micro-batch index `start` on, across epochs. The sampler's order is a function
    of the epoch, so a resumed run continues with exactly the batches an uninterrupted one would see."""
    epoch, skip = divmod(start, sampler.batches_per_epoch)
    while True:
        sampler.set_epoch(epoch, start_batch=skip)
        yield from loader
        epoch, skip = epoch + 1, 0


def run(cfg: DictConfig) -> dict:
    return engine.run_distributed(_run, cfg)


def _run(cfg: DictConfig, env: dist.DistEnv) -> dict:
    plan = check(cfg, env)
    o, device, out = cfg.optim, env.device, Path(cfg.out)
    train_set, val_set = datasets(cfg)
    _, state = ckpt.load_resume(out, cfg.resume, FORMAT, config=to_dict(cfg))
    engine.seed_everything(cfg.seed, env.rank)

    # ---- model, optimiser, schedule
    model = build_detector(cfg, train_set.num_classes)
    loaded = load_pretrained(model, cfg.checkpoint) if cfg.checkpoint is not None and state is None else None
    model.to(device)
    if cfg.compile:
        model.backbone.compile()
    ddp_model = engine.ddp(model, env)
    schedule = warmup_step(o.lr, o.iters, o.warmup_iters, list(o.steps), gamma=0.1, warmup_factor=o.warmup_factor)
    stepper = engine.Stepper(
        ddp_model,
        build_optimizer(cfg, model),
        schedule,
        amp=plan["amp"],
        clip_grad=o.clip_grad,
        accum=plan["accum"],
        device=device,
    )
    if state:
        model.load_state_dict(state["model"])
        stepper.load_state_dict(state["stepper"])
        engine.restore_rng_states(state["rng"], env.rank, env.world_size, cfg.seed + 7919 * stepper.step_count)
    del state

    # ---- data (make_loader gives each loader its own generator: starting an iterator leaves the global RNG alone)
    train_sampler, val_sampler = train_eval_samplers(
        len(train_set), len(val_set), cfg.data.batch_per_gpu, cfg.data.eval_batch_per_gpu, env, cfg.seed
    )
    if train_sampler.batches_per_epoch == 0:
        raise ConfigError(
            f"data: {len(train_set)} training images give no batch of {cfg.data.batch_per_gpu} on {env.world_size} "
            "process(es)"
        )
    train_loader, val_loader = (
        make_loader(
            ds,
            sampler,
            workers=cfg.data.workers,
            device=device,
            drop_last=False,
            collate_fn=collate,
        )
        for ds, sampler in ((train_set, train_sampler), (val_set, val_sampler))
    )

    log = RunLogger(out, enabled=env.is_main, tensorboard=cfg.log.tensorboard)
    accum, amp = plan["accum"], plan["amp"]
    if env.is_main:
        save_config(cfg, out / "config.yaml")
        dropped = ", ".join(f"{v} {k}" for k, v in sorted(train_set.dropped.items()) if v) or "nothing"
        log.write(
            f"COCO Mask R-CNN, ViTDet-{cfg.model.size} at {cfg.data.img_size}: {len(train_set)} train / "
            f"{len(val_set)} val images, {train_set.num_classes} classes (dropped for training: {dropped}); "
            f"{o.iters} iterations x batch {o.global_batch} = {cfg.data.batch_per_gpu} x {env.world_size} x "
            f"{accum} accum, lr {o.lr}, amp {amp}\nstart: {cfg.checkpoint or 'random init'}"
            + (f"\n{loaded.summary()}" if loaded else "")
        )
    batches = micro_batches(train_loader, train_sampler, stepper.step_count * accum)
    log.progress(o.iters, initial=stepper.step_count, desc="coco")
    sums, micro, seen, t0, t_train = {}, 0, 0, time.time(), []
    while stepper.step_count < o.iters:
        ddp_model.train()
        for a in range(accum):
            group = stepper.group(a, accum)
            images, targets, metas = next(batches)
            targets = [{k: v.to(device, non_blocking=True) for k, v in t.items()} for t in targets]
            with stepper.autocast():
                losses = ddp_model(images.to(device, non_blocking=True), [m["size"] for m in metas], targets)
            stepper.backward(sum(losses.values()), group)
            for k, v in losses.items():
                sums[k] = sums.get(k, 0.0) + v.detach().float()
            seen += len(images)
            micro += 1
        grad_norm = stepper.step()
        it = stepper.step_count
        log.update(1)
        if it % cfg.log.every == 0 or it == o.iters:
            vals = {k: dist.all_reduce_mean(v / micro).item() for k, v in sums.items()}
            total = sum(vals.values())
            if not math.isfinite(total):
                raise FloatingPointError(f"loss is {total} at iteration {it}: {vals}")
            dt, iters = time.time() - t0, micro / accum
            t_train.append(dt / iters)
            log.log(
                it,
                loss=total,
                **vals,
                lr=stepper.lr(it - 1),
                grad_norm=grad_norm.item(),
                s_per_iter=dt / iters,
                images_per_s=seen * env.world_size / dt,
            )
            log.update(0, loss=total, lr=stepper.lr(it - 1))
            sums, micro, seen, t0 = {}, 0, 0, time.time()
        if cfg.eval.every and it % cfg.eval.every == 0 and it < o.iters:
            metrics = evaluate(model, val_loader, val_set, device, engine.autocast(amp, device), cfg.eval.backend)
            log.log(it, **ap_scalars(metrics))
            log.write(f"iteration {it}: box AP {metrics['bbox']['AP']:.2f}, mask AP {metrics['segm']['AP']:.2f}")
            t0 = time.time()
        stopping = cfg.max_iters is not None and it >= cfg.max_iters and it < o.iters
        if it % cfg.log.save_every == 0 or it == o.iters or stopping:
            save_last(cfg, model, stepper, train_set, out, env)
        if stopping:
            log.write(f"stopping at iteration {it} (max_iters); run the same command again to resume")
            log.close()
            return {"stopped_at_iteration": it}

    t_eval = time.time()
    metrics = evaluate(model, val_loader, val_set, device, engine.autocast(amp, device), cfg.eval.backend)
    eval_ips = metrics["images"] / max(time.time() - t_eval, 1e-9)
    log.log(stepper.step_count, **ap_scalars(metrics))
    log.close()
    results = {
        "model": cfg.model.size,
        "dataset": f"coco:{cfg.data.root}",
        "checkpoint": cfg.checkpoint,
        "checkpoint_sha256": file_sha256(cfg.checkpoint) if cfg.checkpoint else None,
        "bbox": metrics["bbox"],
        "segm": metrics["segm"],
        "iterations": o.iters,
        "global_batch": o.global_batch,
        "epochs": o.iters * o.global_batch / len(train_set),
        "img_size": cfg.data.img_size,
        "eval_images": metrics["images"],
        "train_s_per_iter": sum(t_train) / len(t_train) if t_train else None,
        "eval_images_per_s": eval_ips,
        "dropped_annotations": dict(train_set.dropped),
        "config": str(out / "config.yaml"),
    }
    if env.is_main:
        write_results(out, "coco", **results)
        b, s = metrics["bbox"], metrics["segm"]
        print(
            f"COCO ({metrics['images']} val images): box AP {b['AP']:.1f} (AP50 {b['AP50']:.1f}, "
            f"AP75 {b['AP75']:.1f}), mask AP {s['AP']:.1f} (AP50 {s['AP50']:.1f}, AP75 {s['AP75']:.1f}); "
            f"results in {out / 'results.json'}"
        )
    return results


def ap_scalars(metrics: dict) -> dict:
    return {f"{t}_{k}": v for t in ("bbox", "segm") for k, v in metrics[t].items() if v is not None}


def save_last(cfg, model, stepper, train_set, out: Path, env) -> None:
    """checkpoint-last.pth: weights, optimiser/scaler/step, every rank's RNG (collective: call on all ranks)."""
    rngs = engine.gather_rng_states()
    if env.is_main:
        meta = {
            "format": FORMAT,
            "model": cfg.model.size,
            "num_classes": train_set.num_classes,
            "categories": [c["name"] for c in train_set.categories],
        }
        state = {"model": model.state_dict(), "stepper": stepper.state_dict(), "rng": rngs, "meta": meta}
        ckpt.save({**state, "config": to_dict(cfg)}, out / "checkpoint-last.pth")
    dist.barrier()
