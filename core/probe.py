"""Frozen-feature probes: does an encoder's representation separate the classes of a labelled set?

The pieces every study and the pretraining loop's online probe share:

- `extract_features(encoder, loader, device, pool)`: one feature per image from a frozen encoder.
  `pool="avg"` (default) is the mean of the last block's patch tokens followed by a LayerNorm without affine
  parameters: the fine-tuning recipes' `global_pool=avg` + `fc_norm` at its initial value (MAE's and dBOT's
  fine-tuning). It reads every patch token, which every target trains; the cls token is trained only by a
  ViT teacher's loss (dBOT, `loss.include_cls`), not by pixel, HOG or EMA targets. `pool="token"` is the cls
  token after the final LayerNorm (MAE's linear-probe recipe, `finetune/configs/linprobe_base.yaml`).
- `knn_top1`: DINO's weighted k-NN (cosine similarity of L2-normalised features, the k nearest training
  features vote with weight exp(sim / T), k = 20, T = 0.07).
- `linear_probe`: MAE's head, BatchNorm1d without affine (eps 1e-6) + a linear layer (trunc-normal std 0.01,
  zero bias), trained on the frozen features for a fixed number of epochs with MAE's base lr 0.1 per 256
  images, warmup then cosine, no weight decay. Plain SGD with momentum 0.9 replaces LARS: LARS scales every
  step by 0.001 x |w| / |grad|, which moves the head only at MAE's batch of 16,384 and thousands of steps; on a
  few hundred images it would leave the head near its initial value. Top-1 after the last epoch (no
  selection on the validation set).
- `probe(encoder, train_loader, val_loader, device)`: both on one extraction, `{"knn": .., "linprobe": ..}`.
- `OnlineProbe`: the same, on a (subsampled) labelled root, as pretraining calls it every `probe.every` epochs.

Features are extracted once (no augmentation), so a probe costs one forward pass over the labelled images.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from core import interrupt

POOLS = ("token", "avg")


@torch.no_grad()
def extract_features(encoder, loader, device, pool: str = "avg") -> tuple[torch.Tensor, torch.Tensor]:
    """Features `[N, D]` (float32, CPU) and labels `[N]` of every batch of `loader` (`(images, labels, ...)`).

    `encoder` has the shared backbone interface (`core.vit.ViT.forward_tokens`: the pretraining student, a
    teacher, a fine-tuning model). It runs in eval mode; its previous mode is restored afterwards."""
    if pool not in POOLS:
        raise ValueError(f"pool must be one of {POOLS}, got {pool!r}")
    was_training = encoder.training
    encoder.eval()
    feats, labels = [], []
    try:
        for batch in loader:
            if batch is None:
                continue
            images, y = batch[0], batch[1]
            if pool == "token":
                f = encoder.forward_tokens(images.to(device), final_norm=True)[:, 0]
            else:
                tokens = encoder.forward_tokens(images.to(device), final_norm=False)[:, 1:].mean(1)
                f = F.layer_norm(tokens, tokens.shape[-1:], eps=1e-6)
            feats.append(f.float().cpu())
            labels.append(torch.as_tensor(y).cpu())
    finally:
        encoder.train(was_training)
    if not feats:
        raise ValueError("extract_features: the loader gave no images")
    return torch.cat(feats), torch.cat(labels)


@torch.no_grad()
def knn_top1(
    train_f: torch.Tensor,
    train_y: torch.Tensor,
    val_f: torch.Tensor,
    val_y: torch.Tensor,
    k: int = 20,
    temperature: float = 0.07,
    chunk: int = 1024,
) -> float:
    """Weighted cosine k-NN top-1 (%), DINO's protocol: each of the k most similar training features votes
    for its class with weight exp(cosine / T); ties go to the lower class index."""
    train_f = F.normalize(train_f.float(), dim=1)
    val_f = F.normalize(val_f.float(), dim=1)
    k = min(k, len(train_f))
    num_classes = int(max(train_y.max(), val_y.max())) + 1
    correct = 0
    for start in range(0, len(val_f), chunk):
        sims, idx = (val_f[start : start + chunk] @ train_f.T).topk(k, dim=1)
        votes = torch.zeros(len(sims), num_classes)
        votes.scatter_add_(1, train_y[idx], (sims / temperature).exp())
        correct += (votes.argmax(1) == val_y[start : start + chunk]).sum().item()
    return 100.0 * correct / len(val_f)


def linear_head(dim: int, num_classes: int, generator: torch.Generator | None = None) -> nn.Sequential:
    """MAE's linear-probe head: BatchNorm1d(affine=False, eps 1e-6) then Linear (trunc-normal 0.01, bias 0)."""
    linear = nn.Linear(dim, num_classes)
    with torch.no_grad():
        nn.init.trunc_normal_(linear.weight, std=0.01, generator=generator)
        nn.init.zeros_(linear.bias)
    return nn.Sequential(nn.BatchNorm1d(dim, affine=False, eps=1e-6), linear)


def linear_probe(
    train_f: torch.Tensor,
    train_y: torch.Tensor,
    val_f: torch.Tensor,
    val_y: torch.Tensor,
    *,
    epochs: int = 100,
    batch: int = 256,
    blr: float = 0.1,
    warmup_epochs: int = 10,
    seed: int = 0,
) -> dict:
    """Train MAE's linear-probe head on frozen features; `{"top1", "train_top1", "train_loss"}` after the
    last epoch (top-1 in %). lr = blr x batch / 256, linear warmup then half-cosine to 0 per step."""
    if epochs < 1:
        raise ValueError(f"linear probe epochs must be >= 1, got {epochs}")
    g = torch.Generator().manual_seed(seed)
    num_classes = int(max(train_y.max(), val_y.max())) + 1
    head = linear_head(train_f.shape[1], num_classes, g)
    batch = min(batch, len(train_f))
    lr = blr * batch / 256
    opt = torch.optim.SGD(head.parameters(), lr=lr, momentum=0.9, weight_decay=0.0)
    steps_per_epoch = len(train_f) // batch
    total, warmup = epochs * steps_per_epoch, warmup_epochs * steps_per_epoch
    step, loss = 0, torch.zeros(())
    with torch.enable_grad():
        head.train()
        for _ in range(epochs):
            order = torch.randperm(len(train_f), generator=g)
            for s in range(steps_per_epoch):
                ids = order[s * batch : (s + 1) * batch]
                scale = (
                    (step + 1) / warmup
                    if step < warmup
                    else 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(total - warmup, 1)))
                )
                for group in opt.param_groups:
                    group["lr"] = lr * scale
                loss = F.cross_entropy(head(train_f[ids]), train_y[ids])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                step += 1
    head.eval()
    with torch.no_grad():
        top1 = 100.0 * (head(val_f).argmax(1) == val_y).float().mean().item()
        train_top1 = 100.0 * (head(train_f).argmax(1) == train_y).float().mean().item()
    return {"top1": top1, "train_top1": train_top1, "train_loss": float(loss.detach())}


def probe(
    encoder,
    train_loader,
    val_loader,
    device,
    *,
    epochs: int = 100,
    pool: str = "avg",
    k: int = 20,
    seed: int = 0,
) -> dict:
    """k-NN and linear-probe top-1 (%) of `encoder`'s frozen features: `{"knn": .., "linprobe": ..}`.

    `train_loader` / `val_loader` give `(images, labels)` of the labelled train / held-out split without
    augmentation (`eval_loaders`). Cheap enough to run every few epochs of pretraining."""
    train_f, train_y = extract_features(encoder, train_loader, device, pool)
    val_f, val_y = extract_features(encoder, val_loader, device, pool)
    lin = linear_probe(train_f, train_y, val_f, val_y, epochs=epochs, seed=seed)
    return {"knn": knn_top1(train_f, train_y, val_f, val_y, k=k), "linprobe": lin["top1"]}


def subsample(n: int, limit: int | None) -> list[int]:
    """At most `limit` of the indices 0..n-1, evenly spread (every class of a sorted ImageFolder keeps its
    share); all of them when `limit` is None or >= n."""
    if limit is None or limit >= n:
        return list(range(n))
    return [int(i * n / limit) for i in range(limit)]


def eval_loaders(
    root, img_size: int, batch: int = 256, workers: int = 0, max_train: int | None = None, max_val: int | None = None
):
    """Loaders of `<root>/train` and `<root>/val` (ImageNet layout) with the evaluation transform of the
    fine-tuning recipes (resize to img_size / 0.875 bicubic, centre crop, ImageNet mean/std), in order;
    `max_train` / `max_val`: an even subsample of at most that many images. The loaders draw from a private
    generator, so probing leaves the global random state (and so the training it interrupts) untouched."""
    from pathlib import Path

    from torch.utils.data import DataLoader, Subset
    from torchvision import transforms

    from core.data import IMAGENET_MEAN, IMAGENET_STD, DataError, ImageFolder

    tf = transforms.Compose(
        [
            transforms.Resize(int(img_size / 0.875), interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.CenterCrop(img_size),
            transforms.ToTensor(),
            transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )
    root = Path(root)
    train = ImageFolder(root / "train", tf, what="probe data (train split)")
    val = ImageFolder(root / "val", tf, what="probe data (val split)")
    if train.classes != val.classes:
        raise DataError(f"probe data {root}: train and val class folders differ")
    sets = (Subset(train, subsample(len(train), max_train)), Subset(val, subsample(len(val), max_val)))
    return tuple(
        DataLoader(
            d,
            batch_size=batch,
            shuffle=False,
            num_workers=workers,
            generator=torch.Generator(),
            worker_init_fn=interrupt.worker_init,
        )
        for d in sets
    )


class OnlineProbe:
    """The probe a training run calls every few epochs: `probe(encoder, device)` -> `{"knn", "linprobe"}` on
    a labelled ImageNet-layout root (loaders built on the first call, features re-extracted every call)."""

    def __init__(
        self,
        root,
        img_size: int,
        *,
        epochs: int = 100,
        pool: str = "avg",
        max_train: int | None = None,
        max_val: int | None = None,
        batch: int = 256,
        workers: int = 0,
        seed: int = 0,
    ):
        self.root, self.img_size, self.epochs, self.pool, self.seed = root, img_size, epochs, pool, seed
        self.limits, self.batch, self.workers = (max_train, max_val), batch, workers
        self._loaders = None

    def __call__(self, encoder, device) -> dict:
        if self._loaders is None:
            self._loaders = eval_loaders(self.root, self.img_size, self.batch, self.workers, *self.limits)
        train, val = self._loaders
        scores = probe(encoder, train, val, device, epochs=self.epochs, pool=self.pool, seed=self.seed)
        scores["probe_images"] = len(train.dataset) + len(val.dataset)
        return scores
