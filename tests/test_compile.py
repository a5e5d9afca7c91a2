"""The compiled training step (`compile=true`): teacher forward, student forward and the loss trace as one graph
(no breaks), and in bf16 its loss follows the eager fp32 step on the same batch and the same mask."""

import pytest
import torch
from conftest import pretrain_config

from core.dist import DistEnv
from core.trainer import micro_batches
from pretrain.train import Pretrain


def one_batch(tiny_imagenet, tmp_path):
    task = Pretrain(pretrain_config(tiny_imagenet, tmp_path / "o", "amp=bf16"), DistEnv())
    run = task.build(None)
    task.train_mode(run.model)
    _, _, batch = next(micro_batches(run.train_loader, run.train_sampler, 4, 0))
    return task, task.prepare(batch, 0, 0)


def mask_noise(task, images, spec) -> float:
    """How much the fp32 loss of this batch moves when only the mask is drawn again."""
    g = torch.Generator().manual_seed(1)
    return torch.tensor([task.forward(task.student, images, torch.rand(spec.shape, generator=g)).get("loss").item()
                         for _ in range(6)]).std().item()  # fmt: skip


BF16_RTOL = 0.02  # bf16 keeps 8 bits of mantissa: the loss of one batch and mask moves by well under 2 %
SAME_RTOL = 1e-3  # compiled bf16 vs eager bf16: the same roundings up to fusion and reduction order


def test_the_step_is_one_graph_and_bf16_follows_fp32_on_the_same_mask(tiny_imagenet, tmp_path):
    """On one fixed mask: the compiled bf16 loss equals the eager bf16 loss (same precision, tight) and the eager
    fp32 loss within bf16 rounding; another mask moves the compiled loss by more than that tolerance, so a
    compiled step that ignored the mask it is given would fail."""
    task, (images, spec) = one_batch(tiny_imagenet, tmp_path)
    other = torch.rand(spec.shape, generator=torch.Generator().manual_seed(7))
    eager = task.forward(task.student, images, spec)["loss"]
    eager.backward()
    grads = [p.grad.clone() for p in task.student.parameters() if p.grad is not None]
    task.student.zero_grad(set_to_none=True)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        eager_bf16 = task.forward(task.student, images, spec)["loss"].item()
    step = torch.compile(task.forward, backend="aot_eager", fullgraph=True)  # a graph break would raise here
    with torch.autocast("cpu", dtype=torch.bfloat16):
        compiled = step(task.student, images, spec)["loss"]
        with torch.no_grad():
            compiled_other = step(task.student, images, other)["loss"].item()
    compiled.backward()
    same = SAME_RTOL * eager_bf16
    assert abs(compiled.item() - eager_bf16) < same, (compiled.item(), eager_bf16)
    assert abs(compiled.item() - eager.item()) < BF16_RTOL * eager.item(), (compiled.item(), eager.item())
    assert abs(compiled_other - compiled.item()) > 3 * same, (compiled_other, compiled.item(), same)
    # the gradient of the bf16 graph points the same way as the fp32 one
    new = torch.cat([p.grad.flatten() for p in task.student.parameters() if p.grad is not None])
    assert torch.nn.functional.cosine_similarity(new, torch.cat([g.flatten() for g in grads]), dim=0) > 0.99


@pytest.mark.slow
def test_inductor_compiled_bf16_run_follows_the_eager_fp32_run(tiny_imagenet, tmp_path):
    """The engine's own path (`compile=true amp=bf16`, inductor on CPU): per-step losses of two stages within
    the mask noise of the eager fp32 run's."""
    import json

    from pretrain.train import run

    def losses(out, *extra):
        run(pretrain_config(tiny_imagenet, out, "stages.epochs=[0,1,2]", *extra))
        return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]

    eager = losses(tmp_path / "eager")
    compiled = losses(tmp_path / "compiled", "compile=true", "amp=bf16")
    task, (images, spec) = one_batch(tiny_imagenet, tmp_path)
    noise = mask_noise(task, images, spec)
    assert len(eager) == len(compiled) == 8
    assert max(abs(a - b) for a, b in zip(eager, compiled)) < 3 * noise, (eager, compiled, noise)
