"""ADE20K UperNet training and evaluation: `python -m segmentation -c RECIPE [key=value ...]`.

The recipe files in segmentation/configs/ hold the numbers (RECIPES.md section 5); this file is the loop:
data, the segmentor started from a pretrained backbone, layer-decayed AdamW, per-iteration poly schedule with
linear warmup, evaluation every `eval.every` iterations and at the end, `checkpoint-last.pth` for an exact
resume, results.json. Iteration-based: micro-batch m of the run is batch m mod B of epoch m div B (B
batches per epoch), so a resumed run restarts the sampler mid-epoch where it stopped.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch
from omegaconf import DictConfig
from torch import nn
from torch.utils.data import DataLoader

from core import checkpoint as ckpt
from core import dist, engine
from core.config import ConfigError, save_config, to_dict
from core.data import DataError, ShardedSampler, eval_sampler, make_loader
from core.monitor import RunLogger, file_sha256, write_results
from core.optim import mmseg_groups, warmup_poly
from core.vit import preset
from segmentation.data import ADE20K, TrainPipeline, check_labels, class_names
from segmentation.evaluate import class_table, evaluate
from segmentation.model import build_segmentor, load_pretrained

FORMAT = "dbot-suite/segmentation/v1"
TASK = "ade20k"


def check(cfg: DictConfig, env: dist.DistEnv) -> dict:
    """Derived settings; each problem is reported with its option before any compute."""
    accum = 1
    if not cfg.eval_only:
        try:
            accum = engine.accumulation_steps(cfg.optim.global_batch, cfg.data.batch_per_gpu, env.world_size)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    if cfg.data.batch_per_gpu < 2 and not cfg.eval_only and not (env.distributed and env.device.type == "cuda"):
        raise ConfigError(
            "data.batch_per_gpu=1 needs BatchNorm synchronised across several GPUs: the pyramid pooling's 1 x 1 "
            "branch has a single value per channel otherwise"
        )
    if cfg.model.img_size != cfg.data.crop:
        raise ConfigError(f"model.img_size={cfg.model.img_size} must equal data.crop={cfg.data.crop}")
    patch = preset(cfg.model.size)["patch_size"]
    if cfg.data.crop % patch or cfg.data.crop // patch % 2:
        raise ConfigError(f"data.crop={cfg.data.crop} must be an even multiple of the patch size {patch}")
    if not 0 < cfg.eval.stride <= cfg.data.crop:
        raise ConfigError(f"eval.stride={cfg.eval.stride} must be in (0, data.crop={cfg.data.crop}]")
    for key in ("checkpoint", "weights"):
        if cfg[key] is not None and not Path(cfg[key]).is_file():
            raise ConfigError(f"{key}: {cfg[key]} does not exist")
    if cfg.eval_only and cfg.weights is None:
        raise ConfigError("eval_only=true needs weights=<a checkpoint of this task>")
    try:
        amp = engine.resolve_amp(cfg.amp, env.device)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return {"accum": accum, "amp": amp}


def build_optimizer(cfg: DictConfig, model) -> torch.optim.Optimizer:
    o = cfg.optim
    groups = mmseg_groups(model, o.weight_decay, o.layer_decay)
    return torch.optim.AdamW(groups, lr=0.0, betas=tuple(o.betas))


def lr_schedule(cfg: DictConfig):
    o = cfg.optim
    return warmup_poly(o.lr, cfg.iters, o.warmup_iters, power=o.power, final=o.min_lr, warmup_ratio=o.warmup_ratio)


def inference_settings(cfg: DictConfig) -> dict:
    return {
        "scale": tuple(cfg.data.scale),
        "crop": cfg.data.crop,
        "stride": cfg.eval.stride,
        "ratios": tuple(cfg.eval.ratios),
        "flip": bool(cfg.eval.flip),
        "batch": cfg.eval.window_batch,
    }


def run(cfg: DictConfig) -> dict:
    return engine.run_distributed(_run, cfg)


def _run(cfg: DictConfig, env: dist.DistEnv) -> dict:
    plan = check(cfg, env)
    device, out = env.device, Path(cfg.out)
    engine.seed_everything(cfg.seed, env.rank)
    state = None if cfg.eval_only else ckpt.load_resume(out, cfg.resume, FORMAT, config=to_dict(cfg))[1]

    # ---- data: layout and labels checked before the model is built
    names = class_names(cfg.data.root, cfg.data.num_classes)
    num_classes = len(names)
    d = cfg.data
    pipeline = TrainPipeline(d.scale, d.ratio_range, d.crop, d.cat_max_ratio, d.flip, d.photometric)
    val_set = ADE20K(d.root, "val", num_classes, skip_corrupt=d.skip_corrupt)
    train_set = None
    if not cfg.eval_only:
        train_set = ADE20K(d.root, "train", num_classes, pipeline, seed=cfg.seed, skip_corrupt=d.skip_corrupt)
    if d.check_labels and state is None:
        pairs = (train_set.pairs if train_set is not None else []) + val_set.pairs
        found = dist.all_gather_object(check_labels(pairs, num_classes, env.rank, env.world_size, max(d.workers, 1)))
        problems = [p for rank_problems in found for p in rank_problems]
        if problems:
            raise DataError(f"{len(problems)} bad label map(s): " + "; ".join(problems[:5]))
    val_sampler = eval_sampler(len(val_set), 1, env)
    val_loader = DataLoader(
        val_set, batch_size=None, sampler=val_sampler, num_workers=cfg.eval.workers, pin_memory=device.type == "cuda"
    )

    # ---- model
    try:
        model = build_segmentor(cfg.model, num_classes)
    except ValueError as e:
        raise ConfigError(f"model: {e}") from None
    report = None
    if cfg.eval_only:
        weights = ckpt.load(cfg.weights)
        if weights.get("meta", {}).get("format") != FORMAT:
            raise ckpt.CheckpointError(f"weights: {cfg.weights} is not a segmentation checkpoint of this suite")
        model.load_state_dict(weights["model"])
        del weights
    elif state is None and cfg.checkpoint is not None:
        report = load_pretrained(model, cfg.checkpoint)
    if env.distributed and device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model.to(device)
    log = RunLogger(out, enabled=env.is_main, tensorboard=cfg.log.tensorboard)
    if env.is_main:
        save_config(cfg, out / "config.yaml")
    infer = inference_settings(cfg)
    sha = file_sha256(cfg.checkpoint) if cfg.checkpoint else None

    def run_eval(step: int) -> dict:
        t0 = time.time()
        sync_buffers(model)  # BatchNorm statistics of rank 0 everywhere (plain BN drifts apart across ranks)
        log.write(f"evaluating {len(val_set)} images (sliding window {cfg.data.crop}/{cfg.eval.stride}) ...")
        metrics = evaluate(
            model,
            val_loader,
            num_classes=num_classes,
            device=device,
            autocast=engine.autocast(plan["amp"], device),
            **infer,
        )
        metrics["eval_images_per_s"] = metrics["images"] / max(time.time() - t0, 1e-9)
        metrics["iteration"] = step
        log.write(
            f"iteration {step}: mIoU {metrics['mIoU']:.2f}  mAcc {metrics['mAcc']:.2f}  aAcc {metrics['aAcc']:.2f}"
            f"  ({metrics['images']} images, {metrics['eval_images_per_s']:.1f} img/s)"
        )
        log.log(step, prefix="val/", **{k: metrics[k] for k in ("mIoU", "mAcc", "aAcc", "eval_images_per_s")})
        return metrics

    if cfg.eval_only:
        metrics = run_eval(0)
        log.write(class_table(names, metrics["iou"], metrics["acc"]))
        log.close()
        results = results_record(cfg, metrics, names, iterations=None, sha=sha, extra={"weights": cfg.weights})
        if env.is_main:
            write_results(out, TASK, **results)
        return results

    # ---- training
    train_sampler = ShardedSampler(len(train_set), d.batch_per_gpu, rank=env.rank, world=env.world_size, seed=cfg.seed)
    batches = train_sampler.batches_per_epoch
    if batches == 0:
        raise ConfigError(
            f"data: {len(train_set)} training images give no full batch of {d.batch_per_gpu} "
            f"on {env.world_size} process(es)"
        )
    train_loader = make_loader(train_set, train_sampler, workers=d.workers, device=device, drop_last=True)
    ddp_model = engine.ddp(model, env)
    stepper = engine.Stepper(
        ddp_model,
        build_optimizer(cfg, model),
        lr_schedule(cfg),
        amp=plan["amp"],
        clip_grad=cfg.optim.clip_grad,
        accum=plan["accum"],
        device=device,
    )
    history = []
    if state:
        model.load_state_dict(state["model"])
        stepper.load_state_dict(state["stepper"])
        history = list(state["history"])
        engine.restore_rng_states(state["rng"], env.rank, env.world_size, cfg.seed + 7919 * stepper.step_count)
    del state

    if env.is_main:
        log.write(
            f"ade20k: UperNet on ViT-{cfg.model.size} ({num_classes} classes, {len(train_set)} train / "
            f"{len(val_set)} val, crop {d.crop}), {cfg.iters} iterations, batch {cfg.optim.global_batch} = "
            f"{d.batch_per_gpu} x {env.world_size} x {plan['accum']} accum, lr {cfg.optim.lr:.3g}, "
            f"layer decay {cfg.optim.layer_decay}, amp {plan['amp']}, device {device}\n"
            f"start: {cfg.checkpoint or 'random init'}"
            + (f"\n{report.summary()}" if report else "")
            + (f"\nresuming at iteration {stepper.step_count}" if stepper.step_count else "")
        )
    fwd = torch.compile(ddp_model) if cfg.compile else ddp_model
    accum, start_iter = plan["accum"], stepper.step_count
    total_micro = cfg.iters * accum
    micro = start_iter * accum
    log.progress(cfg.iters, initial=start_iter, desc=TASK)
    sums = torch.zeros(3, device=device)  # loss, decode, aux since the last log line
    seen, train_time, t_mark, log_images = 0, 0.0, time.time(), 0
    metrics = None

    while stepper.step_count < cfg.iters:
        epoch, start = divmod(micro, batches)
        train_sampler.set_epoch(epoch, start)
        ddp_model.train()
        with torch.random.fork_rng(devices=[]):  # creating the iterator must not move the global RNG (resume)
            it = iter(train_loader)
        stop = False
        for batch in it:
            group = stepper.group(micro, total_micro)
            micro += 1
            if batch is None:
                raise RuntimeError(f"epoch {epoch}: every image of a batch failed to decode; check data.root")
            images, labels = batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True)
            with stepper.autocast():
                losses = fwd(images, labels)
            stepper.backward(losses["loss"], group)
            sums += torch.stack(
                [
                    losses["loss"].detach(),
                    losses["loss_decode"].detach(),
                    losses.get("loss_aux", losses["loss"]).detach(),
                ]
            )
            seen += 1
            log_images += images.shape[0]
            if not group.last:
                continue
            grad_norm = stepper.step()
            step = stepper.step_count
            log.update(1)
            if step % cfg.log.every == 0 or step == cfg.iters:
                mean = dist.all_reduce_mean(sums / max(seen, 1)).tolist()
                if not math.isfinite(mean[0]):
                    raise FloatingPointError(
                        f"loss is {mean[0]} at iteration {step}"
                        + (" (fp16: try amp=bf16)" if plan["amp"] == "fp16" else "")
                    )
                now = time.time()
                train_time += now - t_mark
                s_per_iter = (now - t_mark) / max(seen / accum, 1e-9)
                lr = stepper.lr(step - 1)
                log.log(
                    step,
                    loss=mean[0],
                    loss_decode=mean[1],
                    loss_aux=mean[2],
                    lr=lr,
                    s_per_iter=s_per_iter,
                    images_per_s=log_images * env.world_size / max(now - t_mark, 1e-9),
                    grad_norm=grad_norm.item(),
                )
                log.update(0, loss=mean[0], lr=lr, s_it=s_per_iter)
                sums.zero_()
                seen, log_images, t_mark = 0, 0, now
            if step % cfg.eval.every == 0 or step == cfg.iters:
                metrics = run_eval(step)
                history.append({k: v for k, v in metrics.items() if k not in ("iou", "acc")})
                ddp_model.train()
                t_mark = time.time()
            done = step == cfg.iters
            stop = cfg.max_iters is not None and step - start_iter >= cfg.max_iters and not done
            if step % cfg.log.save_every == 0 or done or stop:
                save_last(cfg, env, model, stepper, history, num_classes, names)
            if done or stop:
                break
        if stop:
            log.write(f"stopping after {cfg.max_iters} iteration(s) (max_iters); run again to resume")
            log.close()
            return {"stopped_at_iteration": stepper.step_count}

    if metrics is None:  # a finished run started again: evaluate its final weights
        metrics = run_eval(stepper.step_count)
    log.write(class_table(names, metrics["iou"], metrics["acc"]))
    log.close()
    done_iters = stepper.step_count - start_iter
    extra = {"train_s_per_iter": train_time / done_iters if done_iters and train_time else None, "history": history}
    results = results_record(cfg, metrics, names, iterations=cfg.iters, sha=sha, extra=extra)
    if env.is_main:
        write_results(out, TASK, **results)
        print(
            f"ade20k done: mIoU {metrics['mIoU']:.2f}  mAcc {metrics['mAcc']:.2f}  aAcc {metrics['aAcc']:.2f} "
            f"after {cfg.iters} iterations; results in {out / 'results.json'}"
        )
    return results


def results_record(cfg: DictConfig, metrics: dict, names, *, iterations, sha, extra: dict) -> dict:
    def clean(v):
        return None if v is None or (isinstance(v, float) and math.isnan(v)) else round(v, 4)

    return {
        "model": cfg.model.size,
        "dataset": f"ade20k:{cfg.data.root}",
        "checkpoint": cfg.checkpoint,
        "checkpoint_sha256": sha,
        "mIoU": clean(metrics["mIoU"]),
        "mAcc": clean(metrics["mAcc"]),
        "aAcc": clean(metrics["aAcc"]),
        "per_class_iou": {n: clean(v) for n, v in zip(names, metrics["iou"])},
        "per_class_acc": {n: clean(v) for n, v in zip(names, metrics["acc"])},
        "iterations": iterations,
        "num_classes": len(names),
        "eval": {
            "ratios": list(cfg.eval.ratios),
            "flip": bool(cfg.eval.flip),
            "crop": cfg.data.crop,
            "stride": cfg.eval.stride,
            "images": metrics["images"],
            "skipped": metrics["skipped"],
        },
        "eval_images_per_s": metrics.get("eval_images_per_s"),
        "config": str(Path(cfg.out) / "config.yaml"),
        **extra,
    }


def sync_buffers(model: nn.Module) -> None:
    """Copy rank 0's buffers (BatchNorm running statistics) to every rank."""
    if torch.distributed.is_initialized():
        for b in model.buffers():
            torch.distributed.broadcast(b, src=0)


def save_last(cfg: DictConfig, env, model, stepper, history, num_classes: int, names) -> None:
    """checkpoint-last.pth: everything a resumed run needs to continue exactly (every rank's RNG state)."""
    rngs = engine.gather_rng_states()
    if env.is_main:
        ckpt.save(
            {
                "model": model.state_dict(),
                "stepper": stepper.state_dict(),
                "iteration": stepper.step_count,
                "history": history,
                "rng": rngs,
                "meta": {"format": FORMAT, "model": cfg.model.size, "num_classes": num_classes, "classes": list(names)},
                "config": to_dict(cfg),
            },
            Path(cfg.out) / "checkpoint-last.pth",
        )
    dist.barrier()
