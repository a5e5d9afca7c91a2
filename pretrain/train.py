"""dBOT pretraining: `python -m pretrain -c RECIPE [key=value ...]` (or under torchrun).

The method is `pretrain/dbot.py`; the loop is the shared engine (`core/trainer.py`). This file is what is
pretraining's own: the config checks, the student and first target of a stage, data with the mask noise
drawn per sample, the stage-restarting lr schedule, and the stage end (its checkpoints and the switch).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig

from core import checkpoint as ckpt
from core import dist, engine, probe, trainer
from core.config import ConfigError, check_file, check_folder, to_dict
from core.optim import adamw, mae_pretrain_groups, warmup_cosine
from pretrain import datapath, dbot, targets
from pretrain import setting as recorded
from pretrain.beit import SymmetricStudent
from pretrain.masking import BlockMasking, RandomMasking
from pretrain.model import MaskedStudent
from pretrain.schema import PretrainConfig, derive


# ------------------------------------------------------------------------------------------------ plan
class Plan:
    """Everything derived from the config. The options and the rules between them are checked by the schema
    (`pretrain.schema`) before this is built; here what needs the environment: the number of processes,
    the device, the files and folders named."""

    def __init__(self, cfg: DictConfig, env: dist.DistEnv):
        self.cfg = cfg
        d = derive(cfg)  # the same values the schema checked
        self.stages, self.arch, self.depths = d.stages, d.arch, d.depths
        self.teacher0_arch, self.lr = d.teacher0_arch, d.lr
        self.accum, self.amp = trainer.batching(cfg, env)
        t = cfg.teacher
        check_folder("data.root", cfg.data.root, "ImageNet layout <root>/train/<class>/*.jpg")
        self.train_root = Path(cfg.data.root) / "train"
        check_file("teacher.checkpoint", t.checkpoint)
        if cfg.target.kind == "timm":
            check_file("target.timm.checkpoint", cfg.target.timm.checkpoint)
        self.probe_root = None
        if cfg.probe.every is not None:
            name, self.probe_root = ("probe.root", cfg.probe.root) if cfg.probe.root else ("data.root", cfg.data.root)
            missing = [s for s in ("train", "val") if not (Path(self.probe_root) / s).is_dir()]
            if missing:
                raise ConfigError(
                    f"probe.every={cfg.probe.every}: {name}={self.probe_root} has no {'/, '.join(missing)}/ (the "
                    "online probe needs a labelled ImageNet layout <root>/{train,val}/<class>/*.jpg); set probe.root "
                    "or probe.every=null"
                )

    def student_arch(self, stage: int) -> dict:
        return {**self.arch, "depth": self.depths[stage]}

    def stage_seed(self, stage: int) -> int:
        return 1_000_003 * int(self.cfg.seed) + 7919 * stage + 1

    def loss_options(self) -> dict:
        """`loss.*` overrides (None: each target's own default)."""
        c = self.cfg.loss
        return dict(norm=c.norm, loss=c.kind, beta=c.beta, include_cls=c.include_cls)

    def teacher_options(self) -> dict:
        return dict(final_norm=self.cfg.teacher.final_norm, **self.loss_options())


# ---------------------------------------------------------------------------------------------- builders
def build_student(plan: Plan, stage: int, target_dim: int, depth: int | None = None):
    """The student of a stage, initialised from the stage seed (identical on every rank)."""
    c = plan.cfg.model
    arch = {**plan.student_arch(stage), **({"depth": depth} if depth is not None else {})}
    if c.kind == "beit":
        student = SymmetricStudent(
            target_dim=target_dim,
            layer_scale=c.layer_scale,
            rel_pos_bias=c.rel_pos_bias,
            drop_path_rate=c.drop_path,
            **arch,
        )
    else:
        student = MaskedStudent(
            target_dim=target_dim,
            decoder_dim=c.decoder.dim,
            decoder_depth=c.decoder.depth,
            decoder_heads=c.decoder.heads,
            drop_path_rate=c.drop_path,
            **arch,
        )
    student.initialize_weights(torch.Generator().manual_seed(plan.stage_seed(stage)))
    student.set_grad_checkpointing(c.grad_checkpointing)  # encoder blocks (timm's switch)
    return student


def first_target(plan: Plan, stage: int):
    """(student, target) of a fresh run's first stage: an independent target (pixels, HOG, a timm network),
    an EMA of the student, or a frozen ViT teacher (a checkpoint, an independently seeded random ViT, or
    the student's own initial encoder: dBOT as released)."""
    cfg, t = plan.cfg, plan.cfg.teacher
    kind = cfg.target.kind
    options = plan.loss_options()
    grid = (plan.arch["img_size"] // plan.arch["patch_size"],) * 2
    if kind not in targets.NEEDS_STUDENT:
        target = targets.build_independent(cfg.target, options, plan.arch["patch_size"], grid)
        return build_student(plan, stage, target.dim), target
    if kind == "ema":
        student = build_student(plan, stage, plan.arch["embed_dim"])
        return student, targets.build_ema(cfg.target, options, student)
    student = build_student(plan, stage, plan.teacher0_arch["embed_dim"])
    teacher, desc = dbot.first_teacher(
        student, plan.teacher0_arch, checkpoint=t.checkpoint, seed=t.seed, final_norm=t.final_norm
    )
    return student, dbot.TeacherTarget(teacher, description=desc, **plan.teacher_options())


def resumed_models(plan: Plan, stage: int, state: dict):
    """(student, target) of checkpoint-last.pth: the target rebuilt from its recorded architecture (a ViT
    teacher) or from the config (the other first-stage targets), then both loaded."""
    meta = state["meta"]
    if meta["teacher"] is not None and (stage > 0 and plan.cfg.teacher.bootstrap or plan.cfg.target.kind == "teacher"):
        target = dbot.TeacherTarget(
            dbot.build_teacher(meta["teacher"]), description=meta["target"], **plan.teacher_options()
        )
        student = build_student(plan, stage, target.dim)
    else:
        student, target = first_target(plan, stage)
    student.load_state_dict(state["model"])
    target.load_state_dict(state["target"], strict=False)  # timm teachers store nothing: rebuilt from config
    return student, target


def build_masker(plan: Plan):
    grid = tuple(plan.arch["img_size"] // plan.arch["patch_size"] for _ in range(2))
    if plan.cfg.model.masking == "block":
        return BlockMasking(grid, plan.cfg.model.mask_ratio)
    return RandomMasking(grid[0] * grid[1], plan.cfg.model.mask_ratio)


def lr_schedule(plan: Plan, batches_per_epoch: int) -> np.ndarray:
    """One lr per optimizer step over the whole run; warmup + cosine restart in each stage. Step s of an
    epoch sits at fractional epoch s * accum / batches_per_epoch (the released per-iteration schedule)."""
    o = plan.cfg.optim
    spe = engine.steps_per_epoch(batches_per_epoch, plan.accum)
    out = []
    for stage in range(len(plan.stages)):
        length = plan.stages.length(stage)
        t = np.array([e + s * plan.accum / batches_per_epoch for e in range(length) for s in range(spe)])
        out.append(warmup_cosine(plan.lr, o.min_lr, length, o.warmup_epochs, positions=t))
    return np.concatenate(out)


# ------------------------------------------------------------------------------------------------ task
class Pretrain(trainer.Task):
    name, format, unit = "pretrain", recorded.FORMAT, "epoch"
    schema = PretrainConfig

    def __init__(self, cfg, env):
        super().__init__(cfg, env)
        self.plan = Plan(cfg, env)
        self.amp = self.plan.amp
        self.stage_losses = {}

    def evaluate(self, step: int) -> dict | None:
        """The online probe of the student's frozen encoder (probe.every epochs, and at the end): k-NN and a
        linear head on a labelled split (metrics.jsonl `knn`, `linprobe`; TensorBoard val/*), on the main
        process (the others go on to wait at the next step)."""
        if self.plan.probe_root is None or not self.env.is_main:
            return None
        if getattr(self, "online_probe", None) is None:
            p = self.cfg.probe
            self.online_probe = probe.OnlineProbe(
                self.plan.probe_root,
                self.plan.arch["img_size"],
                epochs=p.epochs,
                pool=p.pool,
                max_train=p.train_images,
                max_val=p.val_images,
                workers=min(self.cfg.data.workers, 4),
                seed=self.cfg.seed,
            )
        scores = self.online_probe(self.student, self.device)
        self.write(
            f"probe at step {step} (stage {self.stage}): k-NN {scores['knn']:.2f}, linear {scores['linprobe']:.2f} "
            f"top-1 on {self.plan.probe_root}/val"
        )
        return scores

    def check_resume(self, path, state) -> None:
        want, have = self.plan.student_arch(int(state["stage"])), state["meta"]["student_arch"]
        diff = {k: (have.get(k), v) for k, v in want.items() if have.get(k) != v}
        if diff:
            raise ckpt.CheckpointError(
                f"{path}: saved for another model; differences (checkpoint, config): {diff}. Use another `out` "
                "folder or resume=none"
            )

    def build(self, state) -> trainer.Run:
        plan, c = self.plan, self.cfg.data
        self.stage = int(state["stage"]) if state else 0
        try:
            self.student, self.target = resumed_models(plan, self.stage, state) if state else first_target(plan, 0)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        self.first = state["meta"]["first_target"] if state else self.target.describe()
        self.masker = build_masker(plan)
        self.data = datapath.pretrain_data(
            c, plan.train_root, plan.arch["img_size"], seed=self.cfg.seed, env=self.env, extra=self.masker.sample
        )  # data.backend: pil (reference) | uint8 (normalised on the device) | gpu (decode + augment there)
        self.dataset = self.data.dataset
        batches = self.check_batches(self.data.sampler, "data.root")
        self.student.to(self.device)
        self.target.to(self.device)
        return trainer.Run(
            model=self.student,
            optimizer=self.optimizer_for(self.student),
            schedule=lr_schedule(plan, batches),
            train_loader=self.data.loader,
            train_sampler=self.data.sampler,
            accum=plan.accum,
            amp=plan.amp,
            clip_grad=self.cfg.optim.clip_grad,
            eval_every=self.cfg.probe.every,  # None: no online probe
        )

    def optimizer_for(self, student) -> torch.optim.Optimizer:
        o = self.cfg.optim
        return adamw(mae_pretrain_groups(student, o.weight_decay), lr=self.plan.lr, betas=o.betas, device=self.device)

    def load_state_dict(self, state) -> None:
        self.stage_losses = dict(state.get("stage_losses", {}))

    def prepare(self, batch, epoch, index):
        out = self.data.to_device(batch, self.device)  # None: every image of the batch failed to decode
        if out is None:
            return None
        images, _, spec = out
        return images, spec

    def forward(self, model, images, spec):
        return {"loss": dbot.distill(model, self.target, images, self.masker(spec))}

    def after_step(self, step: int, epoch: int) -> None:
        stages = self.plan.stages
        self.target.after_step(self.student, epoch - stages.start(self.stage), stages.length(self.stage))

    def log_fields(self) -> dict:
        return {"stage": self.stage}

    def end_of_epoch(self, epoch: int, losses: dict, stepper) -> trainer.Switch | None:
        """At a stage end: the stage's checkpoints (with the optimizer state `stepper` holds), then the switch
        to the next stage, returned to the loop (which writes checkpoint-last). The last stage ends the run."""
        stages = self.plan.stages
        self.target.after_epoch(self.student, epoch - stages.start(self.stage), stages.length(self.stage))
        if not stages.is_last_epoch_of_stage(epoch):
            return None
        self.stage_losses[str(self.stage)] = losses["loss"]
        if self.env.is_main:
            self.save_stage(epoch, stepper.state_dict())
        self.write(f"stage {self.stage} done at epoch {epoch + 1}: loss {losses['loss']:.4f}")
        if self.stage + 1 < len(stages):
            return self.switch(self.stage + 1)
        return None

    def switch(self, stage: int) -> trainer.Switch:
        """The student and target of `stage` (`dbot.next_stage`); what changed for the loop: the student when
        it was rebuilt, a new optimizer when it was rebuilt or `stages.reset_optimizer` is set."""
        plan = self.plan
        student, target, rebuilt = dbot.next_stage(
            self.student,
            self.target,
            stage,
            seed=plan.stage_seed(stage),
            depth=plan.depths[stage],
            bootstrap=self.cfg.teacher.bootstrap,
            build_student=lambda d, dim: build_student(plan, stage, dim, d),
            **plan.teacher_options(),
        )
        self.student, self.target, self.stage = student.to(self.device), target.to(self.device), stage
        optimizer = self.optimizer_for(self.student) if rebuilt or self.cfg.stages.reset_optimizer else None
        dist.assert_replicas_equal(self.student, "re-initialised student")
        dist.assert_replicas_equal(self.target, "new target")
        return trainer.Switch(model=self.student if rebuilt else None, optimizer=optimizer)

    def save_stage(self, epoch: int, optimizer_state: dict) -> None:
        """The stage's pair: the student (with decoder, and `optimizer_state`: the Stepper's optimiser, scaler,
        step) and the teacher it learnt from (none for pixel / HOG / timm targets)."""
        meta, name = {"format": recorded.FORMAT, **self.meta(target_entry=False)}, f"checkpoint-stage{self.stage}"
        state = {
            "model": self.student.state_dict(),
            **optimizer_state,
            "epoch": epoch,
            "config": to_dict(self.cfg),
            "meta": meta,
        }
        self.saved(f"stage{self.stage}_student", ckpt.save(state, self.out / f"{name}-student.pth"))
        teacher = getattr(self.target, "teacher", None)
        if teacher is not None:
            meta = {"format": recorded.FORMAT, **self.meta(teacher_file=True)}
            path = ckpt.save({"model": teacher.state_dict(), "meta": meta}, self.out / f"{name}-teacher.pth")
            self.saved(f"stage{self.stage}_teacher", path)

    def state_dict(self) -> dict:
        return {
            "model": self.student.state_dict(),
            "target": self.target.resume_state(),
            "stage": self.stage,
            "stage_losses": self.stage_losses,
        }

    def meta(self, teacher_file: bool = False, target_entry: bool = True) -> dict:
        """What a checkpoint of this stage records, with the records `core.weights` reads (`pretrain.setting`):
        the pretraining setting of its weights (the student's, or for a teacher file the teacher's), of the
        teacher in checkpoint-last's `target` (`target_entry`: the container has that entry), and the
        student's pretraining-only key prefixes."""
        teacher = getattr(self.target, "teacher", None)
        meta = {
            "stage": self.stage,
            "student_kind": self.cfg.model.kind,
            "student_arch": self.plan.student_arch(self.stage),
            "target": self.target.describe(),
            "target_kind": self.target.name,
            "target_dim": self.target.dim,
            "teacher": dbot.teacher_spec(teacher) if teacher is not None else None,
            "first_target": self.first,
        }
        meta.update(
            recorded.records(
                to_dict(self.cfg),
                self.stage,
                meta,
                teacher_file=teacher_file,
                has_teacher=target_entry and teacher is not None,
            )
        )
        return meta

    def describe(self) -> str:
        cfg, plan = self.cfg, self.plan
        return (
            f"dBOT pretraining: {cfg.model.size} {cfg.model.kind} student {plan.depths} blocks/stage, stages "
            f"{plan.stages.boundaries}, {len(self.dataset)} images, global batch {cfg.optim.global_batch} = "
            f"{cfg.data.batch_per_gpu} x {self.env.world_size} proc x {plan.accum} accum, lr {plan.lr:.3g}, "
            f"amp {plan.amp}, device {self.device}\ntarget: {self.target.describe()}"
        )

    def results(self, last_eval) -> dict:
        cfg, final = self.cfg, len(self.plan.stages) - 1
        self.write(f"pretraining done: per-stage final loss {self.stage_losses}")
        return {
            "model": cfg.model.size,
            "dataset": str(cfg.data.root),
            "checkpoint": cfg.teacher.checkpoint,
            "metrics": {
                **{f"stage{k}_loss": v for k, v in self.stage_losses.items()},
                **{f"probe_{k}": last_eval[k] for k in ("knn", "linprobe") if last_eval and k in last_eval},
            },
            "eval_images": None,
            "student": cfg.model.kind,
            "stages": self.plan.stages.boundaries,
            "stage_final_loss": self.stage_losses,
            "target": self.first,
            "target_kind": cfg.target.kind,
            "bootstrap": bool(cfg.teacher.bootstrap),
            "teacher_seed": cfg.teacher.seed if cfg.teacher.seed is not None else self.plan.stage_seed(0),
            "final_student": str(self.out / f"checkpoint-stage{final}-student.pth"),
            "global_batch": cfg.optim.global_batch,
            "lr": self.plan.lr,
            "pretraining": self.meta()["pretraining"],  # what the final student is
        }


def run(cfg: DictConfig) -> dict:
    return trainer.run(Pretrain, cfg)
