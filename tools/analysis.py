"""Property analysis of pretrained encoders (the paper's averaged attention distance and singular values).

    python -m tools.analysis runs/pretrain-base/checkpoint-stage1-student.pth mae=mae_pretrain_vit_base.pth \\
        --data /path/to/imagenet/val --out runs/analysis [--max-images 5000]

For every checkpoint `core.weights.read_backbone` reads (NAME=PATH to name it) and the images of any folder
(searched recursively), as docs/RECIPES.md section 6 and the authors' `analysis/analysis.py` define them:

- averaged attention distance, per block and head: the post-softmax attention over the images, cls row and
  column dropped (the patch-to-patch part, not renormalised), weighted by the distance between grid
  positions times the patch size, summed over keys and averaged over queries;
- singular values, per block: each image's block output (patch tokens, before any final norm), every token
  L2-normalised, its singular values s; sum(s[:k]) / sum(s) for k = 1..5, averaged over images.

Images are resized (bicubic) to 256/224 of the model's resolution and centre-cropped, ImageNet mean/std.
Attention probabilities are computed as softmax(q k^T * scale) from each block's own qkv projection (timm's
attention is a fused kernel that never forms them) while the model runs its ordinary forward pass; on the
first batch they are checked to reproduce every block's attention output.

Writes `analysis.json` (raw numbers), `attention_distance.png` and `singular_values.png` (one panel per
model, like the authors' figures, plus a panel with all models overlaid). `--from-json A.json B.json`
merges earlier results into one figure without computing anything.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

from core import checkpoint as ckpt
from core.data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    IMG_EXTENSIONS,
    CorruptImageError,
    DataError,
    collate_skip,
    is_image_file,
    open_rgb,
)
from core.errors import one_line
from core.monitor import file_sha256
from core.vit import PRESETS, ViT, resize_pos_embed
from core.weights import read_backbone

TOPK = 5


# ------------------------------------------------------------------------------------------- definitions
def distance_matrix(grid: tuple[int, int], patch_size: int) -> torch.Tensor:
    """`[L, L]` (float64) distance in pixels between the patches of a row-major `grid` (h, w):
    patch_size x the Euclidean distance of their (row, column) positions."""
    h, w = grid
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    pos = torch.stack([rows.flatten(), cols.flatten()], dim=1).double()  # [L, 2]
    return patch_size * torch.cdist(pos, pos)


def mean_attention_distance(probs: torch.Tensor, dist: torch.Tensor, num_prefix: int = 1) -> torch.Tensor:
    """Per image and head: sum over keys of attention x distance, averaged over queries. `probs` `[B, H, N, N]`
    with `num_prefix` leading non-patch tokens, whose rows and columns are dropped. Returns `[B, H]`."""
    a = probs[..., num_prefix:, num_prefix:].double()
    return torch.einsum("bhqk,qk->bhq", a, dist.to(a.device)).mean(-1)


def uniform_attention_distance(grid: tuple[int, int], patch_size: int, num_prefix: int = 1) -> float:
    """The attention distance of a head attending uniformly to all tokens (a random network's level)."""
    n = num_prefix + grid[0] * grid[1]
    probs = torch.full((1, 1, n, n), 1.0 / n)
    return mean_attention_distance(probs, distance_matrix(grid, patch_size), num_prefix).item()


def topk_singular_fraction(tokens: torch.Tensor, k: int = TOPK) -> torch.Tensor:
    """`[B, L, D]` patch tokens -> `[B, k]`: sum of the j largest singular values over their sum, j = 1..k,
    of each image's token matrix after L2-normalising every token."""
    s = singular_values(F.normalize(tokens.double(), dim=-1))  # [B, min(L, D)], descending
    cum = s.cumsum(-1) / s.sum(-1, keepdim=True)
    if cum.shape[-1] < k:  # fewer singular values than k: the rest are the whole sum
        cum = torch.cat([cum, cum[:, -1:].expand(-1, k - cum.shape[-1])], dim=-1)
    return cum[:, :k]


def singular_values(x: torch.Tensor) -> torch.Tensor:
    """Singular values `[B, min(L, D)]` (descending) of float64 `[B, L, D]`, as square roots of the smaller
    Gram matrix's eigenvalues: 8-20x faster than an SVD on CPU and equal to it within 1e-12 for well
    conditioned matrices. Eigenvalues within rounding of zero (below min(L, D) x eps x the largest) are set
    to zero, so a rank-r matrix has exactly r non-zero values."""
    gram = x @ x.transpose(-1, -2) if x.shape[-2] <= x.shape[-1] else x.transpose(-1, -2) @ x
    e = torch.linalg.eigvalsh(gram).flip(-1)  # descending
    tol = e[..., :1] * e.shape[-1] * torch.finfo(e.dtype).eps
    return torch.where(e > tol, e, torch.zeros_like(e)).sqrt()


def attention_probs(attn: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T * scale) `[B, H, N, N]` of a timm `Attention` for its input `x` `[B, N, C]`: the same
    qkv projection, head split and q/k norms as its forward pass, with the softmax formed explicitly."""
    b, n, _ = x.shape
    qkv = attn.qkv(x).reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, _ = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    return ((q * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1)


def attention_output(attn: torch.nn.Module, x: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """The attention module's output rebuilt from `probs`: (probs @ v), heads merged, norm, output projection.
    Equal to `attn(x)` exactly when `probs` are the probabilities its fused kernel used."""
    b, n, _ = x.shape
    v = attn.qkv(x).reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)[2]
    out = (probs @ v).transpose(1, 2).reshape(b, n, attn.num_heads * attn.head_dim)
    return attn.proj(attn.norm(out))


# ------------------------------------------------------------------------------------------------ model
def infer_arch(sd: dict, num_heads: int | None = None, source: str = "<state dict>") -> dict:
    """ViT constructor kwargs from encoder weights. The head count is not in the weights: `num_heads`, else
    the preset of the same width and patch size, else 64-d heads."""
    if "pos_embed" not in sd:
        raise ckpt.CheckpointError(f"{source}: no pos_embed; the analysis needs an absolute position embedding")
    w = sd["patch_embed.proj.weight"]  # [D, 3, p, p]
    dim, patch = w.shape[0], w.shape[-1]
    depth = 1 + max((int(k.split(".")[1]) for k in sd if k.startswith("blocks.")), default=-1)
    if depth == 0:
        raise ckpt.CheckpointError(f"{source}: no transformer blocks (blocks.N.*) in the weights")
    n = sd["pos_embed"].shape[1] - 1
    grid = math.isqrt(n)
    if grid * grid != n:
        raise ckpt.CheckpointError(f"{source}: pos_embed has {n} patch positions, not a square grid")
    if num_heads is None:
        same = [p for p in PRESETS.values() if p["embed_dim"] == dim and p["patch_size"] == patch]
        same = same or [p for p in PRESETS.values() if p["embed_dim"] == dim]
        num_heads = same[0]["num_heads"] if same else max(dim // 64, 1)
    if dim % num_heads:
        raise ValueError(f"{source}: width {dim} is not divisible by {num_heads} heads; pass --heads")
    arch = dict(
        img_size=grid * patch,
        patch_size=patch,
        embed_dim=dim,
        depth=depth,
        num_heads=num_heads,
        mlp_ratio=sd["blocks.0.mlp.fc1.weight"].shape[0] / dim,
        qkv_bias="blocks.0.attn.qkv.bias" in sd,
    )
    if "blocks.0.ls1.gamma" in sd:
        arch["init_values"] = 1.0  # layer scale present (the values are loaded)
    return arch


def load_model(path: str | os.PathLike, img_size: int | None = None, num_heads: int | None = None):
    """(ViT in eval mode, description) for any checkpoint the converters read, at `img_size` (position
    embedding resized bicubically) or the checkpoint's own resolution."""
    sd, info = read_backbone(path)
    arch = infer_arch(sd, num_heads, str(path))
    if img_size:
        arch["img_size"] = int(img_size)
    model = ViT(**arch)

    def resize(name, t, target):
        return resize_pos_embed(t, model.grid_size) if name == "pos_embed" else None

    report = ckpt.load_weights(
        model, sd, source=str(path), adapters=[resize], allow_missing=lambda k: k.startswith("norm.")
    )
    desc = {"layout": info.layout, "arch": {k: v for k, v in arch.items()}, "load": report.summary()}
    return model.eval().requires_grad_(False), desc


# -------------------------------------------------------------------------------------------- analysis
class Probe:
    """Hooks on every block of a ViT that reduce each batch to per-image sums while the model runs its own
    forward: attention distance per head from the attention's input, and top-k singular-value fractions
    from the block's output."""

    def __init__(self, model: ViT, topk: int = TOPK, check: bool = True):
        self.model = model
        self.topk = topk
        self.check = check
        self.prefix = model.num_prefix_tokens
        self.dist = distance_matrix(model.grid_size, model.patch_size)
        depth, heads = len(model.blocks), model.num_heads
        self.dist_sum = torch.zeros(depth, heads, dtype=torch.float64)
        self.svd_sum = torch.zeros(depth, topk, dtype=torch.float64)
        self.count = 0
        self.max_error = 0.0
        self._handles = []
        for i, blk in enumerate(model.blocks):
            self._handles.append(blk.attn.register_forward_hook(self._attn_hook(i), with_kwargs=True))
            self._handles.append(blk.register_forward_hook(self._block_hook(i)))

    def _attn_hook(self, i: int):
        def hook(module, args, kwargs, output):
            if kwargs.get("attn_mask") is not None or kwargs.get("is_causal"):
                raise RuntimeError(f"block {i}: masked attention is not supported by the analysis")
            x = args[0]
            probs = attention_probs(module, x)  # [B, H, N, N]
            if self.check:
                ref = output.float()
                err = (attention_output(module, x, probs).float() - ref).abs().max().item()
                scale = ref.abs().max().item() + 1e-6
                self.max_error = max(self.max_error, err / scale)
                if err > 1e-4 * scale:
                    raise RuntimeError(
                        f"block {i}: attention probabilities do not reproduce the block's attention output "
                        f"(max abs error {err:.3g} at output scale {scale:.3g}); unsupported attention variant"
                    )
            self.dist_sum[i] += mean_attention_distance(probs, self.dist, self.prefix).sum(0).cpu()

        return hook

    def _block_hook(self, i: int):
        def hook(module, args, output):
            self.svd_sum[i] += topk_singular_fraction(output[:, self.prefix :], self.topk).sum(0).cpu()

        return hook

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> None:
        self.model.forward_tokens(images, final_norm=False)
        self.count += images.shape[0]
        self.check = False  # verified on the first batch

    def close(self) -> None:
        for h in self._handles:
            h.remove()

    def results(self) -> dict:
        if self.count == 0:
            raise DataError("no image could be analysed")
        dist = self.dist_sum / self.count
        svd = self.svd_sum / self.count
        return {
            "images": self.count,
            "attention_distance": dist.tolist(),  # [block][head], pixels
            "attention_distance_mean": dist.mean(1).tolist(),  # [block]
            "svd_topk_fraction": svd.tolist(),  # [block][k-1], fraction of the sum of singular values
            "uniform_attention_distance": uniform_attention_distance(
                self.model.grid_size, self.model.patch_size, self.prefix
            ),
            "max_relative_attention_error": self.max_error,
        }


# -------------------------------------------------------------------------------------------------- data
def image_files(root: str | os.PathLike, max_images: int | None = None) -> list[Path]:
    """Every image under `root` (recursively, sorted); with `max_images`, an evenly spaced subset (so a
    class-sorted folder stays balanced)."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"--data: folder {root} does not exist")
    files = sorted(p for p in root.rglob("*") if p.is_file() and is_image_file(p.name))
    if not files:
        raise DataError(f"--data: no images ({', '.join(IMG_EXTENSIONS)}) under {root}")
    if max_images and max_images < len(files):
        step = len(files) / max_images
        files = [files[int(i * step)] for i in range(max_images)]
    return files


def eval_transform(img_size: int):
    """The authors' evaluation view: resize the short side to 256/224 of the resolution, centre crop."""
    return transforms.Compose(
        [
            transforms.Resize(round(img_size * 256 / 224), interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.CenterCrop(img_size),
            transforms.ToTensor(),
            transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


class Images(Dataset):
    """Images of a file list; an undecodable file gives None (skipped and listed)."""

    def __init__(self, files: list[Path], transform):
        self.files, self.transform = files, transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i):
        try:
            return self.transform(open_rgb(self.files[i])), i
        except CorruptImageError:
            return None


def analyse(
    model: ViT, files: list[Path], *, batch_size: int = 64, workers: int = 0, device="cpu", topk: int = TOPK
) -> tuple[dict, list[str]]:
    """The property numbers of `model` over `files`, and the files that could not be decoded."""
    model.to(device)
    probe = Probe(model, topk)
    loader = DataLoader(
        Images(files, eval_transform(model.patch_embed.img_size[0])),
        batch_size=batch_size,
        num_workers=workers,
        collate_fn=collate_skip,
    )
    seen = set()
    try:
        for batch in loader:
            if batch is None:
                continue
            images, idx = batch
            seen.update(idx.tolist())
            probe(images.to(device))
    finally:
        probe.close()
    skipped = [str(f) for i, f in enumerate(files) if i not in seen]
    return probe.results(), skipped


def name_skipped(skipped: list[str]) -> None:
    """One line on stderr per image left out because it does not decode (a truncated JPEG, ...), with why."""
    for f in skipped:
        try:
            open_rgb(f)
            reason = f"{f}: not decoded"
        except CorruptImageError as e:
            reason = one_line(e)
        print(f"warning: skipped an image that does not decode: {reason}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------- plots
def _grid(n: int, per_row: int = 5):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(n, per_row)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 3.0 * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.axis("off")
    return plt, fig, list(axes.flat[:n])


def plot_attention_distance(models: list[dict], path: str | Path) -> Path:
    """One panel per model (x: block, one dot per head, coloured by block), plus all models' head means."""
    for m in models:  # results written before the field existed
        if "uniform_attention_distance" not in m and "grid" in m and "patch_size" in m:
            m["uniform_attention_distance"] = uniform_attention_distance(tuple(m["grid"]), m["patch_size"])
    panels = len(models) + (len(models) > 1)
    plt, fig, axes = _grid(panels)
    top = max(max(max(max(h) for h in m["attention_distance"]), m.get("uniform_attention_distance", 0)) for m in models)
    top = top * 1.1 or 1.0
    cmap = plt.get_cmap("tab10")
    for ax, m in zip(axes, models):
        for b, heads in enumerate(m["attention_distance"]):
            ax.scatter([b] * len(heads), heads, s=14, color=cmap(b % 10))
        if "uniform_attention_distance" in m:
            ax.axhline(m["uniform_attention_distance"], color="0.5", ls=":", lw=1, label="uniform attention")
            ax.legend(fontsize=6, loc="lower right")
        ax.set_title(m["name"], fontsize=9)
    if len(models) > 1:
        ax = axes[-1]
        for j, m in enumerate(models):
            ax.plot(m["attention_distance_mean"], marker="o", ms=3, color=cmap(j % 10), label=m["name"])
        ax.set_title("all models: mean over heads", fontsize=9)
        ax.legend(fontsize=6)
    for ax in axes:
        ax.set_ylim(0, top)
        depth = max(len(m["attention_distance"]) for m in models)
        ax.set_xticks(range(depth))
        ax.set_xlabel("block", fontsize=8)
        ax.set_ylabel("attention distance (px)", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(linestyle="--", alpha=0.5)
    return _save(plt, fig, path)


def plot_singular_values(models: list[dict], path: str | Path) -> Path:
    """One panel per model (x: block, one line per k), plus all models' top-1 (solid) and top-k (dashed)."""
    panels = len(models) + (len(models) > 1)
    plt, fig, axes = _grid(panels)
    cmap = plt.get_cmap("tab10")
    for ax, m in zip(axes, models):
        svd = torch.tensor(m["svd_topk_fraction"])
        for k in range(svd.shape[1]):
            ax.plot(svd[:, k].tolist(), color=cmap(k % 10), label=str(k + 1))
        ax.set_title(m["name"], fontsize=9)
        ax.legend(fontsize=6, loc="upper right", title="k", title_fontsize=6)
    if len(models) > 1:
        ax = axes[-1]
        for j, m in enumerate(models):
            svd = torch.tensor(m["svd_topk_fraction"])
            ax.plot(svd[:, 0].tolist(), color=cmap(j % 10), label=m["name"])
            ax.plot(svd[:, -1].tolist(), color=cmap(j % 10), ls="--")
        ax.set_title(f"all models: top-1 (solid), top-{len(models[0]['svd_topk_fraction'][0])} (dashed)", fontsize=9)
        ax.legend(fontsize=6)
    for ax in axes:
        ax.set_ylim(0, 1)
        depth = max(len(m["svd_topk_fraction"]) for m in models)
        ax.set_xticks(range(depth))
        ax.set_xlabel("block", fontsize=8)
        ax.set_ylabel("top-k fraction of singular values", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(linestyle="--", alpha=0.5)
    return _save(plt, fig, path)


def _save(plt, fig, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------------------------------- run
def parse_spec(spec: str) -> tuple[str, Path]:
    """`NAME=PATH` or `PATH` (named `<folder>/<file stem>`)."""
    name, sep, path = spec.partition("=")
    if sep and not Path(spec).exists():
        return name, Path(path)
    p = Path(spec)
    return f"{p.parent.name}/{p.stem}" if p.parent.name else p.stem, p


def run(
    specs: list[str],
    data: str | os.PathLike,
    out: str | os.PathLike,
    *,
    max_images: int | None = None,
    batch_size: int = 64,
    workers: int = 0,
    img_size: int | None = None,
    num_heads: int | None = None,
    topk: int = TOPK,
    device: str = "auto",
) -> dict:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    files = image_files(data, max_images)
    named = [parse_spec(s) for s in specs]
    missing = [str(p) for _, p in named if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"checkpoint(s) not found: {', '.join(missing)}")
    models = []
    for name, path in named:
        t0 = time.time()
        model, desc = load_model(path, img_size, num_heads)
        numbers, skipped = analyse(model, files, batch_size=batch_size, workers=workers, device=device, topk=topk)
        if not models:  # the same files for every model: named once
            name_skipped(skipped)
        models.append(
            {
                "name": name,
                "checkpoint": str(path),
                "checkpoint_sha256": file_sha256(path),
                **desc,
                "patch_size": model.patch_size,
                "grid": list(model.grid_size),
                **numbers,
                "skipped_images": skipped,
                "seconds": round(time.time() - t0, 2),
            }
        )
        print(
            f"{name}: {numbers['images']} images, attention distance per block "
            f"{[round(v, 1) for v in numbers['attention_distance_mean']]} px, top-1 singular fraction "
            f"{[round(v[0], 3) for v in numbers['svd_topk_fraction']]}"
        )
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    result = {
        "definition": {
            "attention_distance": "per block and head: mean over images and patch queries of sum over patch keys of "
            "softmax attention x patch_size x grid distance (cls row/column dropped, not renormalised), pixels",
            "svd_topk_fraction": "per block: mean over images of sum(top-k singular values) / sum(all) of the "
            "block output's patch tokens, each token L2-normalised; k = 1..topk",
            "images": "resize 256/224 x resolution (bicubic), centre crop, ImageNet mean/std",
        },
        "data": str(data),
        "topk": topk,
        "device": str(device),
        "models": models,
    }
    (out / "analysis.json").write_text(json.dumps(result, indent=2) + "\n")
    plot_attention_distance(models, out / "attention_distance.png")
    plot_singular_values(models, out / "singular_values.png")
    print(f"wrote {out / 'analysis.json'}, {out / 'attention_distance.png'}, {out / 'singular_values.png'}")
    return result


def replot(jsons: list[str | os.PathLike], out: str | os.PathLike) -> dict:
    """Merge the models of earlier `analysis.json` files (e.g. analysed on different machines) into one
    JSON and one pair of figures, without computing anything."""
    docs = []
    for j in jsons:
        try:
            docs.append(json.loads(Path(j).read_text()))
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"--from-json {j}: cannot read ({type(e).__name__}: {e})") from None
        if not isinstance(docs[-1], dict) or not docs[-1].get("models"):
            raise ValueError(f"--from-json {j}: not an analysis.json (no 'models')")
    merged = {**docs[0], "data": [d.get("data") for d in docs], "models": [m for d in docs for m in d["models"]]}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "analysis.json").write_text(json.dumps(merged, indent=2) + "\n")
    plot_attention_distance(merged["models"], out / "attention_distance.png")
    plot_singular_values(merged["models"], out / "singular_values.png")
    print(f"wrote {out / 'analysis.json'} ({len(merged['models'])} models) and the figures")
    return merged


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.analysis", description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoints", nargs="*", help="checkpoint files, optionally NAME=PATH")
    p.add_argument("--data", help="image folder (searched recursively), e.g. ImageNet val")
    p.add_argument("--from-json", nargs="+", default=None, help="replot the models of earlier analysis.json files")
    p.add_argument("--out", default="runs/analysis")
    p.add_argument("--max-images", type=int, default=None, help="evenly spaced subset of the images")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1))
    p.add_argument("--img-size", type=int, default=None, help="resolution (default: the checkpoint's)")
    p.add_argument("--heads", type=int, default=None, help="attention heads (default: the preset of that width)")
    p.add_argument("--topk", type=int, default=TOPK)
    p.add_argument("--device", default="auto")
    a = p.parse_args(argv)
    if a.from_json:
        if a.checkpoints:
            p.error("give checkpoints (with --data) or --from-json, not both")
    elif not a.checkpoints or not a.data:
        p.error("give one or more checkpoints and --data (or --from-json)")
    try:
        if a.from_json:
            replot(a.from_json, a.out)
            return 0
        run(
            a.checkpoints,
            a.data,
            a.out,
            max_images=a.max_images,
            batch_size=a.batch_size,
            workers=a.workers,
            img_size=a.img_size,
            num_heads=a.heads,
            topk=a.topk,
            device=a.device,
        )
    except (DataError, ckpt.CheckpointError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
