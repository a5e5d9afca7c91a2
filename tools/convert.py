"""Checkpoint conversion: read any supported ViT checkpoint; write it for this suite, timm, detectron2 or
OpenMMLab.

    python -m tools.convert runs/pretrain-base/checkpoint-stage1-student.pth vit_b_dbot.pth --to timm --model base

Reading (`core.weights`: every container this suite, the authors, MAE and timm write, size guessing, shape
adapters) is shared with the tasks; this file holds the writers and the command line.

Writers (`--to`), each a plain function of a timm-named state dict:
- `backbone`: this suite's `{'model', 'meta'}` file (what every downstream task reads back);
- `timm`: a flat state dict for `timm.create_model('vit_base_patch16_224', num_classes=0, checkpoint_path=...)`
  (layer scale needs `init_values=...`: the report prints the call that loads the file strictly);
- `detectron2`: ViTDet (`detectron2/modeling/backbone/vit.py` inside `SimpleFeaturePyramid`): keys
  `backbone.net.*`, no cls token and no final norm (the position table keeps its cls entry,
  `pretrain_use_cls_token=True`); the decomposed relative-position tables are new and start at zero;
- `mmdet`: mmdetection's `projects/ViTDet` `ViT` backbone, which reads `ckpt['model']` under timm/MAE names;
- `mmseg`: mmsegmentation's `MAE` backbone (`mmseg/models/backbones/mae.py`), the one its MAE UperNet config
  uses and the one matching this suite's ADE20K recipe: `layers.N.{ln1, attn.qkv, attn.proj, gamma_1, ln2,
  ffn.layers.0.0, ffn.layers.1, gamma_2}` (block names as its `beit2mmseg.py` renames), final norm `ln1`
  (the module's name with final_norm=True), relative position tables new;
- `mmseg-vit`: mmsegmentation's `VisionTransformer` (the names of its `tools/model_converters/vit2mmseg.py`);
- `mmpretrain`: mmpretrain's `VisionTransformer` (`layers.N.ln1`, `attn.qkv`, `ffn.layers.0.0`, final `ln1`).
Consumers without layer scale (detectron2, mmdet, mmseg-vit) get it folded into the layer before it (exact).
After writing, a report compares the file with the consumer's module (`consumer`, written out from the
published definitions and checked against the installed modules in tests/test_interop.py): what it loads,
ignores, creates by design, and what it would leave at its random initialisation.

With `--model` (or the size guessed from the weights) the tensors are checked against this suite's ViT of
that size, the position embedding is resized bicubically to `--img-size`, and `--patch-size` resizes the
patch-embedding kernel the way ViTDet made its ViT-H/16 from MAE's ViT-H/14; the report lists what was
dropped, missing, unexpected and reshaped, and a tensor that cannot be adapted is an error naming it.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from core import checkpoint as ckpt
from core import errors
from core.config import ConfigError, positive_int
from core.vit import PRESETS
from core.weights import HEAD_PREFIXES, BackboneInfo, arch_of, fit_to_model, guess_size, read_backbone

# ------------------------------------------------------------------------------------------------ writers
LAYOUTS = ("backbone", "timm", "detectron2", "mmdet", "mmseg", "mmseg-vit", "mmpretrain")

# timm block names -> the consumers' (applied to the part after `blocks.N.`)
_MM_BLOCK = {"norm1.": "ln1.", "norm2.": "ln2.", "mlp.fc1.": "ffn.layers.0.0.", "mlp.fc2.": "ffn.layers.1."}
MMSEG_MAE_BLOCK = {**_MM_BLOCK, "ls1.gamma": "gamma_1", "ls2.gamma": "gamma_2"}  # attn.qkv / attn.proj kept
MMSEG_VIT_BLOCK = {**_MM_BLOCK, "attn.qkv.": "attn.attn.in_proj_", "attn.proj.": "attn.attn.out_proj."}
MMPRETRAIN_BLOCK = {**_MM_BLOCK, "ls1.gamma": "attn.gamma1.weight", "ls2.gamma": "ffn.gamma2.weight"}
_MM_TOP = {"patch_embed.proj.": "patch_embed.projection.", "norm.": "ln1."}


def _encoder_only(sd: dict) -> dict:
    """Drop what detection backbones do not have: cls token, final norm, classifier."""
    return {k: v for k, v in sd.items() if k != "cls_token" and not k.startswith(("norm.", *HEAD_PREFIXES))}


def _rename(sd: dict, block: dict, top: dict = _MM_TOP, blocks: str = "layers") -> dict:
    """timm names -> a consumer's: `blocks.N.<a>` -> `<blocks>.N.<block[a]>`, top-level prefixes by `top`;
    classifier tensors are left out, names matching no rule are kept (and show up as unused in the report)."""
    out = {}
    for k, v in sd.items():
        if k.startswith(HEAD_PREFIXES):
            continue
        if k.startswith("blocks."):
            _, i, rest = k.split(".", 2)
            for a, b in block.items():
                if rest.startswith(a):
                    rest = b + rest[len(a) :]
                    break
            k = f"{blocks}.{i}.{rest}"
        else:
            for a, b in top.items():
                if k.startswith(a):
                    k = b + k[len(a) :]
                    break
        out[k] = v
    return out


def has_layer_scale(sd: dict) -> bool:
    return any(k.startswith("blocks.") and k.endswith((".ls1.gamma", ".ls2.gamma")) for k in sd)


def fold_layer_scale(sd: dict) -> dict:
    """Layer scale folded into the layer before it, for consumers without it (exact): x + g * (W a + b) =
    x + (diag(g) W) a + g * b, with `ls1` into `attn.proj` and `ls2` into `mlp.fc2`."""
    out = {k: v for k, v in sd.items() if not k.endswith((".ls1.gamma", ".ls2.gamma"))}
    for k, g in sd.items():
        if k.endswith((".ls1.gamma", ".ls2.gamma")):
            layer = k[: -len("ls1.gamma")] + ("attn.proj" if k.endswith("ls1.gamma") else "mlp.fc2")
            out[f"{layer}.weight"] = sd[f"{layer}.weight"] * g.unsqueeze(1)
            out[f"{layer}.bias"] = sd[f"{layer}.bias"] * g
    return out


def to_timm(sd: dict) -> dict:
    """timm's VisionTransformer names are this suite's: a plain state dict (load with num_classes=0, or with
    the fine-tuned head and global_pool='avg' when `head`/`fc_norm` are present; layer scale needs
    `init_values`: `timm_arguments` gives the call)."""
    return dict(sd)


def to_detectron2(sd: dict) -> dict:
    """detectron2 ViTDet (`modeling/backbone/vit.py` under SimpleFeaturePyramid): `backbone.net.` prefix, no
    cls token and no final norm (the position embedding keeps its cls entry: pretrain_use_cls_token); its
    blocks have no layer scale, so a layer scale is folded into the layer before it."""
    return {f"backbone.net.{k}": v for k, v in _encoder_only(fold_layer_scale(sd)).items()}


def to_mmdet(sd: dict) -> dict:
    """mmdetection's projects/ViTDet `ViT`: timm/MAE block names, no cls token, no final norm (its
    `init_weights` reads `ckpt['model']`); layer scale folded as for detectron2."""
    return _encoder_only(fold_layer_scale(sd))


def to_mmseg(sd: dict) -> dict:
    """mmsegmentation's `MAE` backbone (mmseg/models/backbones/mae.py, a `BEiT` with MAE's initialisation),
    which mmseg's MAE UperNet config (`configs/mae`) uses, with the block names its `beit2mmseg.py` converter
    writes: blocks -> layers, norm1/2 -> ln1/2, attn.qkv and attn.proj kept, mlp.fc1/fc2 -> ffn.layers.0.0 /
    ffn.layers.1, patch_embed.proj -> patch_embed.projection; final norm -> ln1 (the module's final norm when
    built with final_norm=True; the MAE config has none, so it is reported unused); layer scale -> gamma_1 /
    gamma_2, written as ones for a ViT without it (the identity, whatever `init_values` the consumer has). The
    per-block relative position tables are not written: MAE's are zero-initialised and trained from scratch,
    as in this suite's ADE20K recipe (a table written here would be resized by mmseg's scipy `interp2d`)."""
    out = _rename(sd, MMSEG_MAE_BLOCK)
    if not has_layer_scale(sd):
        for k, v in sd.items():
            if k.startswith("blocks.") and k.endswith(".norm1.weight"):
                i = k.split(".")[1]
                out[f"layers.{i}.gamma_1"] = torch.ones_like(v)
                out[f"layers.{i}.gamma_2"] = torch.ones_like(v)
    return out


def to_mmseg_vit(sd: dict) -> dict:
    """mmsegmentation's `VisionTransformer` (the mapping of its tools/model_converters/vit2mmseg.py):
    blocks -> layers, norm1/2 -> ln1/2, attn.qkv -> attn.attn.in_proj_, attn.proj -> attn.attn.out_proj,
    mlp.fc1/fc2 -> ffn.layers.0.0 / ffn.layers.1, patch_embed.proj -> patch_embed.projection, norm -> ln1;
    layer scale (which it does not have) folded into the layer before it."""
    return _rename(fold_layer_scale(sd), MMSEG_VIT_BLOCK)


def to_mmpretrain(sd: dict) -> dict:
    """mmpretrain / mmcls `VisionTransformer`: as mmseg's but attention keeps `attn.qkv` / `attn.proj`; layer
    scale -> `attn.gamma1.weight` / `ffn.gamma2.weight` (build it with `layer_scale_init_value` > 0)."""
    return _rename(sd, MMPRETRAIN_BLOCK)


WRITERS = {
    "timm": to_timm,
    "detectron2": to_detectron2,
    "mmdet": to_mmdet,
    "mmseg": to_mmseg,
    "mmseg-vit": to_mmseg_vit,
    "mmpretrain": to_mmpretrain,
}


# ------------------------------------------------------------------------- the consumers and what they load
@dataclass
class Consumer:
    """A module of another codebase that reads a layout: the callable (`module`) and arguments (`kwargs`) that
    build it for these weights, the state-dict keys it has (`keys`, name -> shape, None where the shape does
    not matter) and the keys it creates by design rather than from the file (`new`, name -> why)."""

    layout: str
    module: str
    kwargs: dict
    keys: dict
    new: dict = field(default_factory=dict)
    note: str = ""

    def build(self, path: str | None = None) -> str:
        """The call, with `checkpoint_path` for timm (`path`, or OUT)."""
        call = _call(self.module, self.kwargs)
        if self.module == "timm.create_model":
            call = call[:-1] + f", checkpoint_path={repr(str(path)) if path else 'OUT'})"
        return call + (f" {self.note}" if self.note else "")


@dataclass
class ConsumerReport:
    """What the consumer's non-strict load (mmseg, mmdet, detectron2) or strict load (timm) makes of a file:
    `loaded`, `unused` (in the file, not in the consumer), `new` (not in the file, created by design), `at_init`
    (not in the file: left at the consumer's random initialisation) and `mismatched` shapes."""

    consumer: Consumer
    loaded: list = field(default_factory=list)
    unused: list = field(default_factory=list)
    new: dict = field(default_factory=dict)
    at_init: list = field(default_factory=list)
    mismatched: list = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.at_init and not self.mismatched

    def summary(self, path: str | None = None) -> str:
        lines = [f"consumer: {self.consumer.build(path)}", f"  loads {len(self.loaded)} tensors"]
        if self.unused:
            lines.append(f"  ignores ({len(self.unused)}): {_names(self.unused, 6)}")
        reasons: dict[str, list] = {}
        for k, why in self.new.items():
            reasons.setdefault(why, []).append(k)
        for why, names in reasons.items():
            lines.append(f"  new in the consumer ({len(names)}, {why}): {_names(names, 3)}")
        if self.at_init:
            lines.append(f"  WARNING left at random init ({len(self.at_init)}): {_names(self.at_init, 6)}")
        if self.mismatched:
            lines.append(f"  WARNING shape mismatch ({len(self.mismatched)}): {_names(self.mismatched, 6)}")
        return "\n".join(lines)


def _names(names, n: int) -> str:
    names = list(names)
    return ", ".join(names[:n]) + (f", ... (+{len(names) - n})" if len(names) > n else "")


def _arch(sd: dict) -> dict:
    """Dimensions of a timm-named encoder, with the number of heads of the matching preset (None if unknown)."""
    from core.vit import PRESETS

    a = arch_of(sd)
    size = guess_size(sd)
    a["num_heads"] = PRESETS[size]["num_heads"] if size else None
    a["size"] = size
    a["final_norm"] = "norm.weight" in sd
    a["fc_norm"] = "fc_norm.weight" in sd
    a["num_classes"] = sd["head.weight"].shape[0] if "head.weight" in sd else 0
    a["patch_bias"] = "patch_embed.proj.bias" in sd
    return a


def _call(name: str, kwargs: dict) -> str:
    return f"{name}(" + ", ".join(f"{k}={v!r}" for k, v in kwargs.items()) + ")"


def timm_arguments(sd: dict) -> tuple[str, dict]:
    """The `timm.create_model(name, **kwargs)` that loads `to_timm(sd)` strictly: the registry name of the
    size (its dimensions spelled out otherwise), num_classes, img_size if the grid is not 224 px, global_pool
    for fine-tuned files with fc_norm, and `init_values` for layer scale (any value: the file's gammas replace
    it; 0.1 is the BEiT-style student's init)."""
    from core.vit import TIMM_NAMES

    a = _arch(sd)
    name = TIMM_NAMES.get(a["size"])
    kw: dict = {}
    if name is None:
        name = "vit_base_patch16_224"
        kw |= dict(patch_size=a["patch_size"], embed_dim=a["embed_dim"], depth=a["depth"])
        if a["num_heads"]:
            kw["num_heads"] = a["num_heads"]
    kw["num_classes"] = a["num_classes"]
    if a["grid"] and a["grid"] * a["patch_size"] != 224:
        kw["img_size"] = a["grid"] * a["patch_size"]
    if a["fc_norm"]:
        kw["global_pool"] = "avg"
    if has_layer_scale(sd):
        kw["init_values"] = 0.1
    return name, kw


def _vit_blocks(depth: int, prefix: str, parts: dict) -> dict:
    return {f"{prefix}{i}.{k}": s for i in range(depth) for k, s in parts.items()}


def consumer(layout: str, sd: dict) -> Consumer | None:
    """The consumer module of `layout` for the timm-named encoder `sd`, written out from its published
    definition (checked against the modules themselves in tests/test_interop.py where they install)."""
    if layout == "backbone":
        return None
    a = _arch(sd)
    d, depth, p, g, heads = a["embed_dim"], a["depth"], a["patch_size"], a["grid"], a["num_heads"]
    img = g * p
    lin = lambda o, i: {"weight": (o, i), "bias": (o,)}  # noqa: E731
    ln = {"weight": (d,), "bias": (d,)}

    def flat(prefix: str, params: dict) -> dict:
        return {f"{prefix}.{k}": s for k, s in params.items()}

    if layout == "timm":
        name, kw = timm_arguments(sd)
        parts = {**flat("norm1", ln), **flat("attn.qkv", lin(3 * d, d)), **flat("attn.proj", lin(d, d))}
        parts |= {**flat("norm2", ln), **flat("mlp.fc1", lin(4 * d, d)), **flat("mlp.fc2", lin(d, 4 * d))}
        if "init_values" in kw:
            parts |= {"ls1.gamma": (d,), "ls2.gamma": (d,)}
        keys = {"cls_token": (1, 1, d), "pos_embed": (1, 1 + g * g, d), **flat("patch_embed.proj", lin(d, 3))}
        keys["patch_embed.proj.weight"] = (d, 3, p, p)
        keys |= _vit_blocks(depth, "blocks.", parts)
        keys |= flat("fc_norm" if a["fc_norm"] else "norm", ln)
        if a["num_classes"]:
            keys |= flat("head", lin(a["num_classes"], d))
        note = "" if a["size"] else "(the weights match no preset: add its num_heads)"
        return Consumer(layout, "timm.create_model", {"model_name": name, **kw}, keys, note=note)

    if layout in ("detectron2", "mmdet"):
        parts = {**flat("norm1", ln), **flat("attn.qkv", lin(3 * d, d)), **flat("attn.proj", lin(d, d))}
        parts |= {**flat("norm2", ln), **flat("mlp.fc1", lin(4 * d, d)), **flat("mlp.fc2", lin(d, 4 * d))}
        parts |= {"attn.rel_pos_h": None, "attn.rel_pos_w": None}
        keys = {"pos_embed": (1, 1 + g * g, d), "patch_embed.proj.weight": (d, 3, p, p), "patch_embed.proj.bias": (d,)}
        keys |= _vit_blocks(depth, "blocks.", parts)
        prefix = "backbone.net." if layout == "detectron2" else ""
        keys = {prefix + k: s for k, s in keys.items()}
        new = {k: "decomposed relative positions, zero-initialised" for k in keys if ".rel_pos_" in k}
        kw = dict(img_size=1024, patch_size=p, embed_dim=d, depth=depth, num_heads=heads or "?", window_size=14)
        kw |= dict(use_rel_pos=True, pretrain_img_size=img, pretrain_use_cls_token=True)
        module = "detectron2.modeling.ViT" if layout == "detectron2" else "projects.ViTDet.vitdet.ViT"
        return Consumer(layout, module, kw, keys, new, note="(in SimpleFeaturePyramid)")

    if layout in ("mmseg", "mmseg-vit", "mmpretrain"):
        keys = {"cls_token": (1, 1, d), "pos_embed": (1, 1 + g * g, d), "patch_embed.projection.weight": (d, 3, p, p)}
        if layout != "mmseg-vit" or a["patch_bias"]:
            keys["patch_embed.projection.bias"] = (d,)
        attn = {**flat("attn.qkv", lin(3 * d, d)), **flat("attn.proj", lin(d, d))}
        if layout == "mmseg-vit":
            attn = {"attn.attn.in_proj_weight": (3 * d, d), "attn.attn.in_proj_bias": (3 * d,)}
            attn |= flat("attn.attn.out_proj", lin(d, d))
        parts = {**flat("ln1", ln), **attn, **flat("ln2", ln)}
        parts |= {**flat("ffn.layers.0.0", lin(4 * d, d)), **flat("ffn.layers.1", lin(d, 4 * d))}
        new = {}
        if layout == "mmseg":
            rows = (2 * g - 1) ** 2 + 3
            parts |= {"gamma_1": (d,), "gamma_2": (d,)}
            parts |= {"attn.relative_position_bias_table": (rows, heads) if heads else None}
            parts |= {"attn.relative_position_index": (g * g + 1, g * g + 1)}
        if layout == "mmpretrain" and has_layer_scale(sd):
            parts |= {"attn.gamma1.weight": (d,), "ffn.gamma2.weight": (d,)}
        keys |= _vit_blocks(depth, "layers.", parts)
        final_norm = a["final_norm"] and layout != "mmseg"
        if final_norm:
            keys |= flat("ln1", ln)
        if layout == "mmseg":
            for k in keys:
                if k.endswith("relative_position_bias_table"):
                    new[k] = "MAE's zero-initialised relative position bias, trained from scratch"
                elif k.endswith("relative_position_index"):
                    new[k] = "index buffer computed by the module"
            kw = dict(img_size=img, patch_size=p, embed_dims=d, num_layers=depth, num_heads=heads or "?")
            kw |= dict(mlp_ratio=4, init_values=1.0, final_norm=False, norm_cfg=dict(type="LN", eps=1e-6))
            module, note = "mmseg.models.backbones.MAE", "(any img_size: mmseg resizes pos_embed at load)"
        elif layout == "mmseg-vit":
            kw = dict(img_size=img, patch_size=p, embed_dims=d, num_layers=depth, num_heads=heads or "?")
            kw |= dict(patch_bias=a["patch_bias"], final_norm=final_norm, with_cls_token=True)
            kw |= dict(norm_cfg=dict(type="LN", eps=1e-6))
            module, note = "mmseg.models.backbones.VisionTransformer", "(any img_size: resized at load)"
        else:
            arch = dict(embed_dims=d, num_layers=depth, num_heads=heads or "?", feedforward_channels=4 * d)
            kw = dict(arch=arch, img_size=img, patch_size=p, final_norm=final_norm)
            if has_layer_scale(sd):
                kw["layer_scale_init_value"] = 0.1
            module, note = "mmpretrain.models.backbones.VisionTransformer", ""
        return Consumer(layout, module, kw, keys, new, note)
    raise ValueError(f"--to must be one of {LAYOUTS}, got {layout!r}")


def consumer_report(weights: dict, who: Consumer) -> ConsumerReport:
    """Compare written `weights` (the consumer's names) with the consumer's keys."""
    r = ConsumerReport(who)
    for k, v in weights.items():
        if k not in who.keys:
            r.unused.append(k)
            continue
        shape = who.keys[k]
        if shape is not None and tuple(v.shape) != tuple(shape):
            r.mismatched.append(f"{k} {tuple(v.shape)} vs {tuple(shape)}")
        else:
            r.loaded.append(k)
    for k in who.keys:
        if k not in weights:
            if k in who.new:
                r.new[k] = who.new[k]
            else:
                r.at_init.append(k)
    return r


def layout_weights(sd: dict, layout: str) -> dict:
    """`sd` (timm names) in the names of `layout`."""
    if layout == "backbone":
        return dict(sd)
    if layout not in WRITERS:
        raise ValueError(f"--to must be one of {LAYOUTS}, got {layout!r}")
    return WRITERS[layout](sd)


def write(sd: dict, path: str | os.PathLike, layout: str, meta: dict | None = None) -> Path:
    """Save `sd` (timm names) in `layout`; `.safetensors` paths get a flat safetensors file."""
    path = Path(path)
    weights = {k: v.contiguous() for k, v in layout_weights(sd, layout).items()}
    if layout == "backbone":
        container = lambda w: {"model": w, "meta": {"format": "dbot-suite/backbone/v1", **(meta or {})}}  # noqa: E731
    elif layout == "timm":
        container = lambda w: w  # noqa: E731
    elif layout == "detectron2":
        container = lambda w: {"model": w, "__author__": "dbot-suite", "matching_heuristics": False}  # noqa: E731
    elif layout == "mmdet":
        container = lambda w: {"model": w}  # noqa: E731
    else:
        container = lambda w: {"state_dict": w, "meta": {"converted_by": "dbot-suite", **(meta or {})}}  # noqa: E731
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(weights, str(path))
        return path
    return ckpt.save(container(weights), path)


@dataclass
class Converted:
    """What `convert` did: the file written, what was read, the check against this suite's ViT (None when the
    size is unknown) and what the layout's consumer loads from the file (None for `backbone`)."""

    path: Path
    info: BackboneInfo
    report: ckpt.LoadReport | None
    load: ConsumerReport | None


def convert(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    layout: str,
    *,
    model: str | None = None,
    img_size: int | None = None,
    patch_size: int | None = None,
    key: str | None = None,
    keep_head: bool = False,
) -> Converted:
    """Read any supported checkpoint, check/adapt it to a model size (given, or guessed from the weights)
    and resolution, write `layout`, and report what the layout's consumer loads from it."""
    if layout not in LAYOUTS:
        raise ValueError(f"--to must be one of {LAYOUTS}, got {layout!r}")
    sd, info = read_backbone(src, key=key, keep_head=keep_head)
    size = model or guess_size(sd)
    if size is None and (img_size or patch_size):
        raise ckpt.CheckpointError(
            f"{src}: weights of width {arch_of(sd)['embed_dim']} / depth {arch_of(sd)['depth']} match no preset; "
            "give --model to resize them"
        )
    report = None
    if size is not None and img_size is not None and img_size % (patch_size or PRESETS[size]["patch_size"]):
        raise ConfigError(
            f"--img-size {img_size} is not a multiple of the patch size {patch_size or PRESETS[size]['patch_size']}"
        )
    if size is not None:
        head = {k: v for k, v in sd.items() if k.startswith(HEAD_PREFIXES)}
        body = {k: v for k, v in sd.items() if k not in head}
        sd, report = fit_to_model(body, size, img_size, str(src), patch_size=patch_size)
        sd.update(head)
    meta = {"source": str(src), "source_layout": info.layout, "model": size, "img_size": img_size}
    path = write(sd, dst, layout, meta=meta)
    who = consumer(layout, sd)
    seen = consumer_report(layout_weights(sd, layout), who) if who is not None else None
    return Converted(path, info, report, seen)


def main(argv=None) -> None:
    import argparse

    p = argparse.ArgumentParser(prog="python -m tools.convert", description=__doc__.split("\n\n")[0])
    p.add_argument("src", help="checkpoint to read (.pth/.pt/.safetensors): this suite's, the authors', MAE's, timm's")
    p.add_argument("dst", help="file to write (.pth, or .safetensors for a flat file)")
    p.add_argument(
        "--to",
        default="backbone",
        choices=LAYOUTS,
        help="layout to write (mmseg: mmseg's MAE backbone, as its MAE UperNet config; mmseg-vit: VisionTransformer)",
    )
    p.add_argument("--model", default=None, choices=sorted(PRESETS), help="check against this size; default: guessed")
    p.add_argument(
        "--img-size", type=positive_int, default=None, help="resize the position embedding for this resolution"
    )
    p.add_argument("--patch-size", type=positive_int, default=None, help="resize the patch kernel (ViTDet's ViT-H: 16)")
    p.add_argument("--key", default=None, help="entry of the container to read (e.g. teacher)")
    p.add_argument("--keep-head", action="store_true", help="keep head/fc_norm of fine-tuned checkpoints")
    a = p.parse_args(argv)
    done = convert(
        a.src,
        a.dst,
        a.to,
        model=a.model,
        img_size=a.img_size,
        patch_size=a.patch_size,
        key=a.key,
        keep_head=a.keep_head,
    )
    info = done.info
    print(
        f"read {a.src} ({info.layout}); dropped {len(info.dropped)} pretraining/head tensors"
        + (f": {', '.join(info.dropped[:6])}{' ...' if len(info.dropped) > 6 else ''}" if info.dropped else "")
    )
    if done.report is not None:
        print(done.report.summary())
    else:
        print("size not recognised (no --model): written unchecked")
    print(f"wrote {done.path} ({a.to} layout)")
    if done.load is not None:
        print(done.load.summary(done.path))


if __name__ == "__main__":
    sys.exit(errors.main(main))
