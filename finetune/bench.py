"""Fine-tuning / linear-probe / transfer throughput: what the classifier's benchmark adds to the driver.

    python -m tools.bench finetune -c tiny --batch 64 --steps 20 --classes 10
    python -m tools.bench finetune -c linprobe_base device=cuda amp=bf16 --batch 512

Training is timed by `core.bench.StepBench`: the recipe's task as `python -m finetune` builds it (its Mixup /
CutMix probabilities and label smoothing, the linear probe's frozen encoder, BatchNorm head, LARS and plain
cross-entropy, clipping, accumulation, amp, compile). Added here: evaluation, the classifier's forward under
no_grad on the same images.
"""

from __future__ import annotations

import torch

from core import speed
from core.bench import StepBench

DATA = "imagenet"  # the layout of the synthetic set tools.bench writes when no data.root is given


def add_flags(p) -> None:
    p.add_argument("--classes", type=int, default=1000, help="classes of the synthetic set (the head's outputs)")


def measure(bench: StepBench, args) -> dict:
    """Evaluation images/s of the model training just stepped."""
    task, model = bench.task, bench.run.model
    images = task.prepare(bench.batches[0][2], 0, 0)[0]
    model.eval()

    def eval_step():
        with torch.no_grad(), task.autocast():
            model(images)

    t_eval = speed.seconds_per_call(eval_step, args.steps, bench.device, warmup=args.warmup)
    task.train_mode(model)
    return {
        "model": bench.cfg.model.size,
        "img_size": model.patch_embed.img_size[0],
        "finetune_task": bench.cfg.task,
        "classes": len(task.classes),
        "eval_images_per_s": round(len(images) / t_eval, 1),
    }
