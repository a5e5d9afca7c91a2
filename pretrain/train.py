"""dBOT pretraining loop: `python -m pretrain -c RECIPE [key=value ...]` (or under torchrun).

The method itself is in `pretrain/dbot.py`; this file is plumbing: config checks, data, optimiser,
mixed precision, accumulation, DDP, checkpoints, resume and logging.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch
from omegaconf import DictConfig
from torchvision import transforms

from core import checkpoint as ckpt
from core import dist, engine
from core.config import ConfigError, save_config, to_dict
from core.data import IMAGENET_MEAN, IMAGENET_STD, ImageFolder, ShardedSampler, make_loader
from core.monitor import RunLogger, write_results
from core.optim import mae_pretrain_groups, warmup_cosine
from core.vit import preset
from core.weights import read_backbone
from pretrain import dbot, targets
from pretrain.beit import SymmetricStudent
from pretrain.masking import BlockMasking, RandomMasking
from pretrain.model import MaskedStudent

FORMAT = "dbot-suite/pretrain/v1"


# ------------------------------------------------------------------------------------------------ plan
class Plan:
    """Everything derived from the config, checked before any compute (each error names the option)."""

    def __init__(self, cfg: DictConfig, env: dist.DistEnv):
        self.cfg = cfg
        try:
            self.stages = dbot.Stages(cfg.stages.epochs)
        except ValueError as e:
            raise ConfigError(f"stages.epochs: {e}") from None
        overrides = {k: cfg.model[k] for k in ("img_size", "embed_dim", "num_heads") if cfg.model[k] is not None}
        self.arch = preset(cfg.model.size, **overrides)
        depths = cfg.model.depth_per_stage
        if depths is None:
            depths = [self.arch["depth"]] * len(self.stages)
        depths = [int(d) for d in depths]
        if len(depths) != len(self.stages):
            raise ConfigError(
                f"model.depth_per_stage has {len(depths)} entries but stages.epochs {list(self.stages.boundaries)} "
                f"defines {len(self.stages)} stages; give one depth per stage"
            )
        if any(d < 1 for d in depths):
            raise ConfigError(f"model.depth_per_stage: student depths must be >= 1, got {depths}")
        self.depths = depths
        if not 0.0 < cfg.model.mask_ratio < 1.0:
            raise ConfigError(f"model.mask_ratio must be in (0, 1), got {cfg.model.mask_ratio}")
        if cfg.model.kind not in ("mae", "beit"):
            raise ConfigError(f"model.kind must be mae or beit, got {cfg.model.kind!r}")
        if cfg.model.masking not in ("random", "block"):
            raise ConfigError(f"model.masking must be random or block, got {cfg.model.masking!r}")
        if cfg.model.masking == "block" and cfg.model.kind == "mae":
            raise ConfigError("model.masking=block needs model.kind=beit (the asymmetric encoder needs equal counts)")
        try:
            targets.check_kind(cfg.target.kind)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        if cfg.target.kind == "ema" and (cfg.model.kind != "mae" or cfg.model.masking != "random"):
            raise ConfigError("target.kind=ema (multi-fold teacher) needs model.kind=mae with random masking")
        # teacher of stage 0
        tsize = cfg.teacher.size or cfg.model.size
        tdepth = cfg.teacher.init_depth
        self.teacher0_arch = preset(tsize, img_size=self.arch["img_size"])
        if cfg.teacher.checkpoint is None:
            if cfg.teacher.size not in (None, cfg.model.size) and cfg.teacher.seed is None:
                raise ConfigError("teacher.size differs from model.size: give teacher.checkpoint or teacher.seed")
            if tdepth is not None:
                if tdepth < 0:
                    raise ConfigError(f"teacher.init_depth must be >= 0, got {tdepth}")
                self.teacher0_arch["depth"] = int(tdepth)
        elif tdepth is not None:
            raise ConfigError("teacher.init_depth applies to a random first teacher, not with teacher.checkpoint")
        if self.teacher0_arch["patch_size"] != self.arch["patch_size"]:
            raise ConfigError(
                f"teacher patch size {self.teacher0_arch['patch_size']} differs from the student's "
                f"{self.arch['patch_size']}; the teacher must give one token per student patch"
            )
        # batch and accumulation
        try:
            self.accum = engine.accumulation_steps(cfg.optim.global_batch, cfg.data.batch_per_gpu, env.world_size)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        self.lr = cfg.optim.lr if cfg.optim.lr is not None else cfg.optim.blr * cfg.optim.global_batch / 256
        # data
        self.train_root = Path(cfg.data.root) / "train"
        if not Path(cfg.data.root).is_dir():
            raise ConfigError(
                f"data.root: folder {cfg.data.root} does not exist (expected ImageNet layout "
                f"<root>/train/<class>/*.jpg)"
            )
        try:
            self.amp = engine.resolve_amp(cfg.amp, env.device)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        self.out = Path(cfg.out)

    def student_arch(self, stage: int) -> dict:
        return {**self.arch, "depth": self.depths[stage]}

    def stage_seed(self, stage: int) -> int:
        return 1_000_003 * int(self.cfg.seed) + 7919 * stage + 1


# ---------------------------------------------------------------------------------------------- builders
def build_student(plan: Plan, stage: int, target_dim: int):
    """The student of a stage, initialised from the stage seed (identical on every rank)."""
    c = plan.cfg.model
    if c.kind == "beit":
        student = SymmetricStudent(
            target_dim=target_dim,
            layer_scale=c.layer_scale,
            rel_pos_bias=c.rel_pos_bias,
            drop_path_rate=c.drop_path,
            **plan.student_arch(stage),
        )
    else:
        student = MaskedStudent(
            target_dim=target_dim,
            decoder_dim=c.decoder.dim,
            decoder_depth=c.decoder.depth,
            decoder_heads=c.decoder.heads,
            drop_path_rate=c.drop_path,
            **plan.student_arch(stage),
        )
    student.initialize_weights(torch.Generator().manual_seed(plan.stage_seed(stage)))
    return student


def build_masker(plan: Plan):
    grid = tuple(plan.arch["img_size"] // plan.arch["patch_size"] for _ in range(2))
    if plan.cfg.model.masking == "block":
        return BlockMasking(grid, plan.cfg.model.mask_ratio)
    return RandomMasking(grid[0] * grid[1], plan.cfg.model.mask_ratio)


def teacher_loss(plan: Plan) -> dict:
    c = plan.cfg.loss
    return dict(norm=c.norm, loss=c.kind, beta=c.beta, include_cls=c.include_cls)


def frozen_copy(student, plan: Plan, stage: int):
    """The bootstrapped teacher: the student's encoder, frozen (the whole symmetric student for beit)."""
    if isinstance(student, SymmetricStudent):
        teacher = build_student(plan, stage, target_dim=student.decoder_pred.out_features)
        teacher.load_state_dict(student.state_dict())
        return teacher.requires_grad_(False).eval()
    return dbot.make_teacher(student.arch, dbot.encoder_state(student))


def first_teacher(plan: Plan, student):
    """Stage-0 ViT teacher: an external checkpoint, an independently seeded random ViT, or (released) the
    student's initial encoder truncated to `teacher.init_depth` blocks. Returns (teacher, description)."""
    t = plan.cfg.teacher
    if t.checkpoint is not None:
        teacher = dbot.make_teacher(plan.teacher0_arch)
        sd, info = read_backbone(t.checkpoint)
        report = ckpt.load_weights(
            teacher, sd, source=str(t.checkpoint), allow_missing=lambda k: k.startswith("norm.") and not t.final_norm
        )
        return teacher, f"checkpoint {t.checkpoint} ({info.layout}; {report.summary().splitlines()[0]})"
    if t.seed is not None:
        teacher = dbot.make_teacher(plan.teacher0_arch)
        teacher.initialize_weights(torch.Generator().manual_seed(int(t.seed)))
        return teacher.requires_grad_(False), f"random, seed {t.seed}"
    if plan.cfg.model.kind == "beit" and plan.cfg.teacher.init_depth is None:
        return frozen_copy(student, plan, 0), f"random = student's initial encoder (seed {plan.stage_seed(0)})"
    teacher = dbot.make_teacher(plan.teacher0_arch, dbot.encoder_state(student))
    return teacher, f"random = student's initial encoder (seed {plan.stage_seed(0)}), depth {len(teacher.blocks)}"


def build_models(plan: Plan, stage: int, state: dict | None):
    """(student, target) for `stage`; from `state` (checkpoint-last) when resuming."""
    cfg = plan.cfg
    grid = (plan.arch["img_size"] // plan.arch["patch_size"],) * 2
    first = stage == 0 or not cfg.teacher.bootstrap
    independent = first and cfg.target.kind not in targets.NEEDS_STUDENT
    try:
        if independent:
            target = targets.build_independent(cfg.target, plan.arch["patch_size"], grid)
            student = build_student(plan, stage, target.dim)
        elif first and cfg.target.kind == "ema":
            student = build_student(plan, stage, plan.arch["embed_dim"])
            target = targets.build_ema(cfg.target, student)
        else:  # a ViT teacher: the first one, or a bootstrapped one rebuilt from the checkpoint
            if state is not None:
                t_meta = state["meta"]
                student = build_student(plan, stage, t_meta["target_dim"])
                if t_meta["teacher_kind"] == "beit":
                    teacher = build_student(plan, stage - 1 if stage else 0, t_meta["target_dim"]).requires_grad_(False)
                else:
                    teacher = dbot.make_teacher(t_meta["teacher_arch"])
                target = targets.TeacherTarget(
                    teacher,
                    final_norm=cfg.teacher.final_norm,
                    **teacher_loss(plan),
                    description=t_meta["target"],
                )
            else:
                student = build_student(plan, stage, plan.teacher0_arch["embed_dim"])
                teacher, desc = first_teacher(plan, student)
                target = targets.TeacherTarget(
                    teacher, final_norm=cfg.teacher.final_norm, **teacher_loss(plan), description=desc
                )
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if state is not None:
        student.load_state_dict(state["model"])
        target.load_state_dict(state["target"], strict=False)
    return student, target


def build_optimizer(plan: Plan, student) -> torch.optim.Optimizer:
    o = plan.cfg.optim
    groups = mae_pretrain_groups(student, o.weight_decay)
    return torch.optim.AdamW(groups, lr=plan.lr, betas=tuple(o.betas))


def lr_schedule(plan: Plan, steps_per_epoch: int, batches_per_epoch: int):
    """One lr per optimizer step over the whole run; warmup + cosine restart in each stage.

    Step s of an epoch sits at fractional epoch s * accum / batches_per_epoch (the released per-iteration
    schedule).
    """
    import numpy as np

    o = plan.cfg.optim
    out = []
    for stage in range(len(plan.stages)):
        length = plan.stages.length(stage)
        t = np.array([e + s * plan.accum / batches_per_epoch for e in range(length) for s in range(steps_per_epoch)])
        out.append(warmup_cosine(plan.lr, o.min_lr, length, o.warmup_epochs, positions=t))
    return np.concatenate(out)


def build_data(plan: Plan, env: dist.DistEnv, masker):
    c = plan.cfg.data
    tf = transforms.Compose(
        [
            transforms.RandomResizedCrop(
                plan.arch["img_size"], scale=tuple(c.crop_scale), interpolation=transforms.InterpolationMode.BICUBIC
            ),
            transforms.RandomHorizontalFlip(),
            *([transforms.ColorJitter(c.color_jitter, c.color_jitter, c.color_jitter)] if c.color_jitter else []),
            transforms.ToTensor(),
            transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )
    dataset = ImageFolder(
        plan.train_root,
        tf,
        seed=plan.cfg.seed,
        skip_corrupt=c.skip_corrupt,
        extra=masker.sample,
        what="data.root (train split)",
    )
    sampler = ShardedSampler(len(dataset), c.batch_per_gpu, rank=env.rank, world=env.world_size, seed=plan.cfg.seed)
    if sampler.batches_per_epoch == 0:
        raise ConfigError(
            f"data.root: {len(dataset)} training images give no full batch of data.batch_per_gpu="
            f"{c.batch_per_gpu} on {env.world_size} process(es)"
        )
    loader = make_loader(dataset, sampler, workers=c.workers, device=env.device, drop_last=True)
    return dataset, sampler, loader


# ------------------------------------------------------------------------------------------ checkpoints
def meta(plan: Plan, stage: int, target) -> dict:
    teacher = getattr(target, "teacher", None)
    kind = None if teacher is None else "beit" if isinstance(teacher, SymmetricStudent) else "vit"
    return {
        "format": FORMAT,
        "stage": stage,
        "student_kind": plan.cfg.model.kind,
        "student_arch": plan.student_arch(stage),
        "target": target.describe(),
        "target_kind": target.name,
        "target_dim": target.dim,
        "teacher_kind": kind,
        "teacher_arch": teacher.arch if teacher is not None else None,
    }


def check_resume(path: Path, state: dict, plan: Plan) -> None:
    m = state.get("meta", {})
    if m.get("format") != FORMAT:
        raise ckpt.CheckpointError(
            f"{path}: not a dBOT pretraining checkpoint of this suite (format "
            f"{m.get('format')!r}); start a fresh run folder or set resume=none"
        )
    stage = int(state["stage"])
    want = plan.student_arch(stage)
    have = m["student_arch"]
    diff = {k: (have.get(k), v) for k, v in want.items() if have.get(k) != v}
    if diff:
        raise ckpt.CheckpointError(
            f"{path}: saved for another model; differences (checkpoint, config): {diff}. Use another `out` "
            "folder or resume=none"
        )
    ckpt.check_same_config(path, state.get("config"), to_dict(plan.cfg))


# ---------------------------------------------------------------------------------------------- training
def run(cfg: DictConfig) -> dict:
    return engine.run_distributed(_run, cfg)


def _run(cfg: DictConfig, env: dist.DistEnv) -> dict:
    plan = Plan(cfg, env)
    device = env.device
    engine.seed_everything(cfg.seed, env.rank)  # drop path; data, masks and inits are seeded explicitly

    # the resume state is read first, so that a mismatch fails before data or models are built
    resume_path = ckpt.resume_path(plan.out, cfg.resume)
    state = ckpt.load(resume_path) if resume_path else None
    if state:
        check_resume(resume_path, state, plan)
    stage = int(state["stage"]) if state else 0
    student, target = build_models(plan, stage, state)
    masker = build_masker(plan)
    dataset, sampler, loader = build_data(plan, env, masker)
    batches = sampler.batches_per_epoch
    schedule = lr_schedule(plan, engine.steps_per_epoch(batches, plan.accum), batches)

    def wrap(model):
        return engine.ddp(model, env)

    student.to(device)
    target.to(device)
    ddp_student = wrap(student)
    stepper = engine.Stepper(
        ddp_student,
        build_optimizer(plan, student),
        schedule,
        amp=plan.amp,
        clip_grad=cfg.optim.clip_grad,
        accum=plan.accum,
        device=device,
    )
    start_epoch, stage_losses, skipped = 0, {}, 0
    if state:
        stepper.load_state_dict(state["stepper"])
        start_epoch = int(state["epoch"])
        stage_losses = dict(state.get("stage_losses", {}))
        skipped = int(state.get("skipped", 0)) if env.is_main else 0  # the saved count is the all-rank total
        engine.restore_rng_states(state["rng"], env.rank, env.world_size, cfg.seed + 7919 * start_epoch)
    first_target = target.describe() if not state else state["meta"].get("first_target", target.describe())
    del state

    log = RunLogger(plan.out, enabled=env.is_main, tensorboard=cfg.log.tensorboard)
    if env.is_main:
        save_config(cfg, plan.out / "config.yaml")
        log.write(
            f"dBOT pretraining: {cfg.model.size} {cfg.model.kind} student {plan.depths} blocks/stage, stages "
            f"{plan.stages.boundaries}, {len(dataset)} images, global batch {cfg.optim.global_batch} = "
            f"{cfg.data.batch_per_gpu} x {env.world_size} proc x {plan.accum} accum, lr {plan.lr:.3g}, amp {plan.amp}, "
            f"device {device}\ntarget: {target.describe()}"
            + (f"\nresuming at epoch {start_epoch}" if start_epoch else "")
        )

    def compiled(student_fwd, target_fwd):
        return (torch.compile(student_fwd), torch.compile(target_fwd)) if cfg.compile else (student_fwd, target_fwd)

    fwd_student, fwd_target = compiled(ddp_student, target)
    total_steps = len(schedule)
    log.progress(total_steps, initial=stepper.step_count, desc="pretrain")
    t_last, imgs_since = time.time(), 0
    loss_sum, loss_count = torch.zeros((), device=device), 0
    epoch_loss = torch.zeros((), device=device)
    checkpoints = {}

    for epoch in range(start_epoch, plan.stages.total_epochs):
        stage = plan.stages.stage_of(epoch)
        sampler.set_epoch(epoch)
        ddp_student.train()
        epoch_loss.zero_()
        for i, batch in enumerate(loader):
            group = stepper.group(i, batches)
            if batch is None:
                raise RuntimeError(f"epoch {epoch}: every image of batch {i} failed to decode; check data.root")
            images, _, spec = batch
            skipped += cfg.data.batch_per_gpu - images.shape[0]
            images = images.to(device, non_blocking=True)
            mask = masker(spec.to(device, non_blocking=True))
            with stepper.autocast():
                goal = fwd_target(images, mask)
                pred = fwd_student(images, mask)
            loss = target.loss(pred, goal, mask)
            stepper.backward(loss, group)
            loss_sum += loss.detach()
            epoch_loss += loss.detach()
            loss_count += 1
            imgs_since += images.shape[0]
            if not group.last:
                continue
            grad_norm = stepper.step()
            step = stepper.step_count
            target.after_step(student, step / total_steps)
            if step % cfg.log.every == 0 or i == batches - 1:
                mean_loss = dist.all_reduce_mean(loss_sum / max(loss_count, 1)).item()
                if not math.isfinite(mean_loss):
                    raise FloatingPointError(
                        f"loss is {mean_loss} at epoch {epoch}, step {step}"
                        + (" (fp16: try amp=bf16)" if plan.amp == "fp16" else "")
                    )
                now = time.time()
                ips = imgs_since * env.world_size / max(now - t_last, 1e-9)
                lr = stepper.lr(step - 1)
                log.log(
                    step, epoch=epoch, stage=stage, loss=mean_loss, lr=lr, images_per_s=ips, grad_norm=grad_norm.item()
                )
                log.update(0, loss=mean_loss, lr=lr, img_s=ips, stage=stage)
                loss_sum.zero_()
                loss_count, imgs_since, t_last = 0, 0, now
            log.update(1)
        target.after_epoch(student, (epoch + 1) / plan.stages.total_epochs)

        # ---- end of epoch: at a stage end the stage checkpoints, then the switch; "last" for resume
        stage_end = plan.stages.is_last_epoch_of_stage(epoch)
        if stage_end:
            stage_losses[str(stage)] = dist.all_reduce_mean(epoch_loss / batches).item()
            if env.is_main:
                checkpoints.update(save_stage(plan, stage, epoch, student, target, stepper))
                log.write(f"stage {stage} done at epoch {epoch + 1}: loss {stage_losses[str(stage)]:.4f}")
            if stage + 1 < len(plan.stages):
                student, target, ddp_student = next_stage(plan, stage + 1, student, target, stepper, wrap, device)
                dist.assert_replicas_equal(student, "re-initialised student")
                dist.assert_replicas_equal(target, "new target")
                fwd_student, fwd_target = compiled(ddp_student, target)
        done = epoch + 1 == plan.stages.total_epochs
        stopping = cfg.max_epochs is not None and epoch + 1 - start_epoch >= cfg.max_epochs
        if stage_end or done or stopping or (epoch + 1) % cfg.log.save_every_epochs == 0:
            save_last(plan, env, epoch + 1, student, target, stepper, stage_losses, skipped, first_target)
        dist.barrier()
        if stopping and not done:
            log.write(f"stopping after {cfg.max_epochs} epoch(s) (max_epochs); run again to resume")
            log.close()
            return {"stopped_at_epoch": epoch + 1}

    log.close()
    final = len(plan.stages) - 1
    results = {
        "model": cfg.model.size,
        "student": cfg.model.kind,
        "dataset": str(cfg.data.root),
        "stages": plan.stages.boundaries,
        "stage_final_loss": stage_losses,
        "target": first_target,
        "target_kind": cfg.target.kind,
        "bootstrap": bool(cfg.teacher.bootstrap),
        "teacher": first_target,
        "teacher_seed": cfg.teacher.seed if cfg.teacher.seed is not None else plan.stage_seed(0),
        "skipped_images": int(dist.all_reduce_sum(torch.tensor(skipped, device=device)).item()),
        "checkpoint": str(plan.out / f"checkpoint-stage{final}-student.pth"),
        "checkpoints": checkpoints
        or {p.stem.removeprefix("checkpoint-"): str(p) for p in sorted(plan.out.glob("checkpoint-stage*.pth"))},
        "global_batch": cfg.optim.global_batch,
        "lr": plan.lr,
    }
    if env.is_main:
        write_results(plan.out, "pretrain", **results)
        print(f"pretraining done: per-stage final loss {stage_losses}; results in {plan.out / 'results.json'}")
    return results


def save_stage(plan: Plan, stage: int, epoch: int, student, target, stepper) -> dict:
    """The per-stage pair: the student (with decoder, optimiser, scaler) and the ViT teacher it learnt from
    (none for pixel / HOG / external timm targets)."""
    m = meta(plan, stage, target)
    name = f"checkpoint-stage{stage}"
    student_state = {
        "model": student.state_dict(),
        **stepper.state_dict(),
        "epoch": epoch,
        "config": to_dict(plan.cfg),
        "meta": m,
    }
    paths = {f"stage{stage}_student": ckpt.save(student_state, plan.out / f"{name}-student.pth")}
    teacher = getattr(target, "teacher", None)
    if teacher is not None:
        paths[f"stage{stage}_teacher"] = ckpt.save(
            {"model": teacher.state_dict(), "meta": m}, plan.out / f"{name}-teacher.pth"
        )
    return {k: str(v) for k, v in paths.items()}


def save_last(plan: Plan, env, next_epoch: int, student, target, stepper, stage_losses, skipped, first_target):
    """checkpoint-last.pth: everything a resumed run needs to continue exactly (every rank's RNG state)."""
    rngs = engine.gather_rng_states()
    total_skipped = int(dist.all_reduce_sum(torch.tensor(skipped, device=env.device)).item())
    if not env.is_main:
        return
    stage = plan.stages.stage_of(min(next_epoch, plan.stages.total_epochs - 1))
    ckpt.save(
        {
            "model": student.state_dict(),
            "target": target.resume_state(),
            "stepper": stepper.state_dict(),
            "epoch": next_epoch,
            "stage": stage,
            "stage_losses": stage_losses,
            "skipped": total_skipped,
            "rng": rngs,
            "config": to_dict(plan.cfg),
            "meta": {**meta(plan, stage, target), "first_target": first_target},
        },
        plan.out / "checkpoint-last.pth",
    )


def next_stage(plan: Plan, stage: int, student, target, stepper, wrap, device):
    """The stage switch. With teacher.bootstrap the target becomes the current student's encoder (frozen);
    otherwise the target is kept. The student is re-initialised from the stage seed; optimiser moments and
    loss scaler carry over (released behaviour) unless stages.reset_optimizer. A student whose shape changes
    (depth, target width) is rebuilt with a new optimiser."""
    if plan.cfg.teacher.bootstrap:
        teacher = frozen_copy(student, plan, stage - 1).to(device)
        target = targets.TeacherTarget(
            teacher,
            final_norm=plan.cfg.teacher.final_norm,
            **teacher_loss(plan),
            description=f"bootstrapped: stage-{stage - 1} student",
        ).to(device)
    same_shape = plan.depths[stage] == plan.depths[stage - 1] and target.dim == student.decoder_pred.out_features
    if same_shape:
        dbot.reinitialize(student, plan.stage_seed(stage))
    else:
        student = build_student(plan, stage, target.dim).to(device)
    ddp_student = wrap(student)
    stepper.model = ddp_student
    if not same_shape or plan.cfg.stages.reset_optimizer:
        stepper.optimizer = build_optimizer(plan, student)
        stepper.scaler = torch.amp.GradScaler("cuda", enabled=plan.amp == "fp16")
    return student, target, ddp_student
