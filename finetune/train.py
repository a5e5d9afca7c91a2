"""Fine-tuning, linear probing and transfer classification: `python -m finetune -c RECIPE [key=value ...]`.

The recipe files in finetune/configs/ hold the numbers (RECIPES.md section 3); this file is the loop:
data, the classifier started from a pretrained checkpoint, layer-decayed AdamW (or LARS for the linear
probe), Mixup/CutMix with label smoothing, per-step warmup + cosine, evaluation every epoch, best and last
checkpoints, exact resume, results.json.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch
from omegaconf import DictConfig
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import Lars

from core import checkpoint as ckpt
from core import dist, engine
from core.config import ConfigError, save_config, to_dict
from core.data import Augmented, DataError, make_loader, sample_seed, seeded, train_eval_samplers
from core.monitor import RunLogger, file_sha256, write_results
from core.optim import mae_finetune_groups, warmup_cosine
from finetune.data import base_datasets, eval_transform, train_transform
from finetune.evaluate import evaluate
from finetune.model import build_classifier, freeze_for_linprobe, init_head, load_pretrained, read_pretrained

FORMAT = "dbot-suite/finetune/v1"
TASKS = ("finetune", "linprobe", "transfer")


def check(cfg: DictConfig, env: dist.DistEnv) -> dict:
    """Derived settings, each problem reported with its option before any compute."""
    if cfg.task not in TASKS:
        raise ConfigError(f"task must be one of {TASKS}, got {cfg.task!r}")
    if cfg.optim.name not in ("adamw", "lars"):
        raise ConfigError(f"optim.name must be adamw or lars, got {cfg.optim.name!r}")
    if cfg.optim.name == "lars" and cfg.optim.weight_decay:
        raise ConfigError(
            f"optim.weight_decay={cfg.optim.weight_decay} with optim.name=lars: timm's LARS folds weight decay "
            "into the trust ratio differently from MAE's; the MAE linear probe uses 0"
        )
    if cfg.optim.skip_decay not in ("standard", "none"):
        raise ConfigError(f"optim.skip_decay must be standard or none, got {cfg.optim.skip_decay!r}")
    if cfg.model.global_pool not in ("avg", "token"):
        raise ConfigError(f"model.global_pool must be avg or token, got {cfg.model.global_pool!r}")
    if cfg.checkpoint is not None and not Path(cfg.checkpoint).is_file():
        raise ConfigError(f"checkpoint: {cfg.checkpoint} does not exist")
    try:
        amp = engine.resolve_amp(cfg.amp, env.device)
        accum = engine.accumulation_steps(cfg.optim.global_batch, cfg.data.batch_per_gpu, env.world_size)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    lr = cfg.optim.lr if cfg.optim.lr is not None else cfg.optim.blr * cfg.optim.global_batch / 256
    return {"accum": accum, "lr": lr, "amp": amp}


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
    return torch.optim.AdamW(groups, lr=0.0, betas=tuple(o.betas))


def run(cfg: DictConfig) -> dict:
    return engine.run_distributed(_run, cfg)


def _run(cfg: DictConfig, env: dist.DistEnv) -> dict:
    plan = check(cfg, env)
    device, out = env.device, Path(cfg.out)
    engine.seed_everything(cfg.seed, env.rank)
    _, state = ckpt.load_resume(out, cfg.resume, FORMAT, config=to_dict(cfg))
    # pretrained weights first: a file of the wrong size fails before the dataset is listed
    pretrained = None
    if cfg.checkpoint is not None and state is None:
        pretrained = read_pretrained(cfg.checkpoint, cfg.model.size, cfg.model.img_size)

    # ---- data
    try:
        train_base, val_base, classes = base_datasets(cfg.data.kind, cfg.data.root, cfg.data.skip_corrupt)
    except DataError as e:
        raise ConfigError(str(e)) from None
    num_classes = len(classes)
    if cfg.data.num_classes is not None and cfg.data.num_classes != num_classes:
        raise ConfigError(f"data.num_classes={cfg.data.num_classes} but {cfg.data.root} has {num_classes} classes")
    model = build_classifier(cfg, num_classes)
    img_size = model.patch_embed.img_size[0]
    train_set = Augmented(train_base, train_transform(cfg, img_size), seed=cfg.seed)
    val_set = Augmented(val_base, eval_transform(cfg, img_size), seed=cfg.seed)
    train_sampler, val_sampler = train_eval_samplers(
        len(train_set), len(val_set), cfg.data.batch_per_gpu, cfg.data.eval_batch_per_gpu, env, cfg.seed
    )
    batches = train_sampler.batches_per_epoch
    if batches == 0:
        raise ConfigError(
            f"data: {len(train_set)} training images give no full batch of {cfg.data.batch_per_gpu} "
            f"on {env.world_size} process(es)"
        )
    train_loader = make_loader(train_set, train_sampler, workers=cfg.data.workers, device=device, drop_last=True)
    val_loader = make_loader(val_set, val_sampler, workers=cfg.data.workers, device=device, drop_last=False)

    # ---- model, optimiser, schedule
    report = None
    if pretrained is not None:
        report = load_pretrained(model, pretrained, str(cfg.checkpoint), cfg.model.head_init_std)
        del pretrained
    elif state is None:
        init_head(model, cfg.model.head_init_std)
    if cfg.task == "linprobe":
        freeze_for_linprobe(model)
    model.to(device)
    ddp_model = engine.ddp(model, env)
    o = cfg.optim
    steps_per_epoch = engine.steps_per_epoch(batches, plan["accum"])
    t = [e + s * plan["accum"] / batches for e in range(cfg.epochs) for s in range(steps_per_epoch)]
    schedule = warmup_cosine(plan["lr"], o.min_lr, cfg.epochs, o.warmup_epochs, positions=t)
    stepper = engine.Stepper(
        ddp_model,
        build_optimizer(cfg, model),
        schedule,
        amp=plan["amp"],
        clip_grad=o.clip_grad,
        accum=plan["accum"],
        device=device,
    )
    a = cfg.aug
    mixup = None
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
        criterion = SoftTargetCrossEntropy()
    elif a.smoothing > 0 and cfg.task != "linprobe":
        criterion = LabelSmoothingCrossEntropy(smoothing=a.smoothing)
    else:
        criterion = torch.nn.CrossEntropyLoss()

    start_epoch, best, history = 0, {"top1": -1.0}, []
    if state:
        model.load_state_dict(state["model"])
        stepper.load_state_dict(state["stepper"])
        start_epoch, best, history = int(state["epoch"]), dict(state["best"]), list(state["history"])
        engine.restore_rng_states(state["rng"], env.rank, env.world_size, cfg.seed + 7919 * start_epoch)
    del state

    log = RunLogger(out, enabled=env.is_main, tensorboard=cfg.log.tensorboard)
    if env.is_main:
        save_config(cfg, out / "config.yaml")
        log.write(
            f"{cfg.task}: {cfg.model.size} on {cfg.data.kind} ({num_classes} classes, {len(train_set)} train / "
            f"{len(val_set)} val), {cfg.epochs} epochs, global batch {o.global_batch} = {cfg.data.batch_per_gpu} x "
            f"{env.world_size} x {plan['accum']} accum, lr {plan['lr']:.3g}, amp {plan['amp']}\n"
            f"start: {cfg.checkpoint or 'random init'}" + (f"\n{report.summary()}" if report else "")
        )
    fwd = torch.compile(ddp_model) if cfg.compile else ddp_model
    log.progress(len(schedule), initial=stepper.step_count, desc=cfg.task)
    sha = file_sha256(cfg.checkpoint) if cfg.checkpoint else None

    for epoch in range(start_epoch, cfg.epochs):
        train_sampler.set_epoch(epoch)
        ddp_model.train()
        if cfg.task == "linprobe":
            model.eval()  # frozen encoder (no drop path); the BatchNorm of the head trains
            model.head.train()
        loss_sum, seen, t0 = torch.zeros((), device=device), 0, time.time()
        for i, batch in enumerate(train_loader):
            group = stepper.group(i, batches)
            if batch is None:
                raise RuntimeError(f"epoch {epoch}: every image of batch {i} failed to decode")
            images, labels = batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True)
            if mixup is not None:
                if len(images) % 2:  # timm's batch mixing pairs samples
                    images, labels = images[:-1], labels[:-1]
                with seeded(sample_seed(cfg.seed, epoch, 10**9 + env.rank * 10**6 + i)):
                    images, labels = mixup(images, labels)
            with stepper.autocast():
                loss = criterion(fwd(images), labels)
            stepper.backward(loss, group)
            loss_sum += loss.detach()
            seen += len(images)
            if group.last:
                stepper.step()
                log.update(1)
        train_loss = dist.all_reduce_mean(loss_sum / batches).item()
        if not math.isfinite(train_loss):
            raise FloatingPointError(f"training loss is {train_loss} in epoch {epoch}")
        train_ips = seen * env.world_size / (time.time() - t0)
        t1 = time.time()
        metrics = evaluate(ddp_model, val_loader, device, engine.autocast(plan["amp"], device))
        eval_ips = metrics["count"] / max(time.time() - t1, 1e-9)
        record = {
            "epoch": epoch,
            "train_loss": train_loss,
            **metrics,
            "lr": stepper.lr(stepper.step_count - 1),
            "train_images_per_s": train_ips,
            "eval_images_per_s": eval_ips,
        }
        history.append(record)
        log.log(stepper.step_count, **record)
        log.update(0, loss=train_loss, top1=metrics["top1"], img_s=train_ips)
        log.write(
            f"epoch {epoch}: train loss {train_loss:.4f}, top-1 {metrics['top1']:.2f}, top-5 {metrics['top5']:.2f}"
        )
        is_best = metrics["top1"] > best["top1"]
        if is_best:
            best = {"top1": metrics["top1"], "top5": metrics["top5"], "epoch": epoch}
        rngs = engine.gather_rng_states()
        if env.is_main:
            meta = {
                "format": FORMAT,
                "task": cfg.task,
                "model": cfg.model.size,
                "num_classes": num_classes,
                "classes": list(map(str, classes))[:10000],
            }
            if is_best:
                ckpt.save(
                    {
                        "model": model.state_dict(),
                        "epoch": epoch,
                        "top1": metrics["top1"],
                        "meta": meta,
                        "config": to_dict(cfg),
                    },
                    out / "checkpoint-best.pth",
                )
            ckpt.save(
                {
                    "model": model.state_dict(),
                    "stepper": stepper.state_dict(),
                    "epoch": epoch + 1,
                    "best": best,
                    "history": history,
                    "rng": rngs,
                    "meta": meta,
                    "config": to_dict(cfg),
                },
                out / "checkpoint-last.pth",
            )
        dist.barrier()
        if cfg.max_epochs is not None and epoch + 1 - start_epoch >= cfg.max_epochs and epoch + 1 < cfg.epochs:
            log.write(f"stopping after {cfg.max_epochs} epoch(s) (max_epochs); run again to resume")
            log.close()
            return {"stopped_at_epoch": epoch + 1}

    log.close()
    last = history[-1] if history else {}
    results = {
        "model": cfg.model.size,
        "dataset": f"{cfg.data.kind}:{cfg.data.root}",
        "checkpoint": cfg.checkpoint,
        "checkpoint_sha256": sha,
        "top1": best["top1"],
        "top5": best.get("top5"),
        "best_epoch": best.get("epoch"),
        "last_top1": last.get("top1"),
        "last_top5": last.get("top5"),
        "epochs": cfg.epochs,
        "num_classes": num_classes,
        "config": str(out / "config.yaml"),
        "train_images_per_s": last.get("train_images_per_s"),
        "eval_images_per_s": last.get("eval_images_per_s"),
    }
    if env.is_main:
        write_results(out, cfg.task, **results)
        print(
            f"{cfg.task} done: best top-1 {best['top1']:.2f} (epoch {best.get('epoch')}), "
            f"last top-1 {last.get('top1', float('nan')):.2f}; results in {out / 'results.json'}"
        )
    return results
