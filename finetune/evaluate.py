"""Top-k accuracy, accumulated over the whole validation set and over processes (no sample counted twice)."""

from __future__ import annotations

import torch

from core import dist


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, ks=(1, 5)) -> list[int]:
    """Number of samples whose label is among the k highest logits, for each k (k capped at #classes)."""
    maxk = min(max(ks), logits.shape[1])
    top = logits.topk(maxk, dim=1).indices  # [N, maxk]
    hit = top.eq(labels.unsqueeze(1))
    return [int(hit[:, : min(k, maxk)].any(1).sum()) for k in ks]


@torch.no_grad()
def evaluate(model, loader, device, autocast) -> dict:
    """{'top1', 'top5' (percent), 'loss', 'count'} over the loader's shard, summed across ranks."""
    model.eval()
    stats = torch.zeros(4, dtype=torch.float64, device=device)  # correct@1, correct@5, loss sum, count
    for batch in loader:
        if batch is None:
            continue
        images, labels = batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True)
        with autocast:
            logits = model(images)
        logits = logits.float()
        c1, c5 = topk_correct(logits, labels)
        loss = torch.nn.functional.cross_entropy(logits, labels, reduction="sum")
        stats += torch.tensor([c1, c5, loss.item(), len(labels)], dtype=torch.float64, device=device)
    stats = dist.all_reduce_sum(stats)
    n = max(stats[3].item(), 1)
    return {
        "top1": 100 * stats[0].item() / n,
        "top5": 100 * stats[1].item() / n,
        "loss": stats[2].item() / n,
        "count": int(stats[3].item()),
    }
