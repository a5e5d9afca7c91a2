"""Exports and targets checked with the consumers' own code (marker `interop`): mmsegmentation 1.2.2's `MAE` and
`VisionTransformer` backbones and mmpretrain 1.2.0's `VisionTransformer` load the converter's files through their
own loading paths and give this suite's features; their state-dict keys and load results equal what the
converter's report says; MaskFeat's HOG equals mmpretrain's `HOGGenerator`; the ViTDet-H warmup equals fvcore's
schedulers composed as detectron2's `WarmupParamScheduler`. The packages come from the `[interop]` extra that
`make venv` installs. mmcv-lite has no compiled ops: an import-time stand-in for `mmcv.ops` (whose functions
raise if called; nothing here calls them) lets mmseg import, inside this module only."""

from __future__ import annotations

import sys
import types

import pytest
import torch
from conftest import REPO

from core import checkpoint as ckpt
from core.config import load_config
from core.optim import warmup_step
from core.vit import build_vit, preset
from pretrain.beit import SymmetricStudent
from pretrain.targets.hog import HOGTarget, hog_cells
from tools import convert

pytestmark = pytest.mark.interop


def _ops_stand_in() -> types.ModuleType:
    ops = types.ModuleType("mmcv.ops")

    def missing(name: str):
        if name.startswith("__"):
            raise AttributeError(name)

        def call(*args, **kwargs):
            raise RuntimeError(f"mmcv.ops.{name} is a test stand-in (mmcv-lite has no compiled ops)")

        return call

    ops.__getattr__ = missing
    return ops


@pytest.fixture(scope="module")
def mm():
    """mmseg and mmpretrain backbones, imported with the `mmcv.ops` stand-in in place (removed afterwards)."""
    try:
        import mmcv.ops  # noqa: F401  # the full mmcv: nothing to stand in for

        saved = None
    except ImportError:
        saved = sys.modules.pop("mmcv.ops", None)
        sys.modules["mmcv.ops"] = _ops_stand_in()
    try:
        from mmpretrain.models.backbones import VisionTransformer as PretrainViT
        from mmpretrain.models.selfsup.maskfeat import HOGGenerator
        from mmseg.models.backbones import MAE
        from mmseg.models.backbones import VisionTransformer as SegViT
    except ImportError as e:  # pragma: no cover - the environment is broken, say how to fix it
        raise RuntimeError(f"{e}: the interop tests need the [interop] extra (make venv installs it)") from None
    yield types.SimpleNamespace(MAE=MAE, SegViT=SegViT, PretrainViT=PretrainViT, HOGGenerator=HOGGenerator)
    if saved is not None:
        sys.modules["mmcv.ops"] = saved


def plain_vit(seed=0):
    vit = build_vit("tiny").eval()
    vit.initialize_weights(torch.Generator().manual_seed(seed))
    with torch.no_grad():  # non-trivial norms and biases, so that a wrong mapping cannot hide
        for name, p in vit.named_parameters():
            if p.ndim == 1 or "norm" in name:
                p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))))
    return vit


def beit_student(seed=1):
    s = SymmetricStudent(target_dim=10, **preset("tiny")).eval()
    with torch.no_grad():
        for i, blk in enumerate(s.blocks):
            blk.ls1.gamma.uniform_(0.05, 0.5, generator=torch.Generator().manual_seed(seed + i))
            blk.ls2.gamma.uniform_(0.05, 0.5, generator=torch.Generator().manual_seed(seed + 10 + i))
    s.rel_pos_bias = None  # dropped by read_backbone: the encoder the exports carry
    return s


def export(tmp_path, model, layout):
    src = ckpt.save({"model": model.state_dict()}, tmp_path / f"src-{layout}.pth")
    return convert.convert(src, tmp_path / f"{layout}.pth", layout)


def tokens(model, x, final_norm):
    with torch.no_grad():
        return model.forward_tokens(x, final_norm=final_norm)[:, 1:]


def as_map(t: torch.Tensor) -> torch.Tensor:
    n, length, d = t.shape
    side = int(length**0.5)
    return t.reshape(n, side, side, d).permute(0, 3, 1, 2)


def check_load(module, weights: dict, report: convert.ConsumerReport) -> None:
    """The consumer's own key list and its non-strict load equal the report."""
    own = module.state_dict()
    assert {k: tuple(v.shape) for k, v in own.items()} == {
        k: tuple(s) if s is not None else tuple(own[k].shape) for k, s in report.consumer.keys.items()
    }
    result = module.load_state_dict(weights, strict=False)
    assert sorted(result.missing_keys) == sorted(report.new) and not report.at_init
    assert sorted(result.unexpected_keys) == sorted(report.unused)


X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))


@pytest.mark.parametrize("source", ["plain", "beit"])
@pytest.mark.parametrize("init_values", [1.0, 0.1])
def test_mmseg_mae_backbone_loads_the_mmseg_export_and_gives_our_features(tmp_path, mm, source, init_values):
    model = plain_vit() if source == "plain" else beit_student()
    done = export(tmp_path, model, "mmseg")
    kw = {**done.load.consumer.kwargs, "init_values": init_values}  # gammas in the file: init_values cannot matter
    mae = mm.MAE(**kw, out_indices=[3], init_cfg=dict(type="Pretrained", checkpoint=str(done.path)))
    mae.init_weights()  # mmseg's own loading path
    mae.eval()
    check_load(mae, ckpt.load(done.path)["state_dict"], done.load)
    with torch.no_grad():
        (out,) = mae(X)
    assert torch.allclose(out, as_map(tokens(model, X, final_norm=False)), atol=1e-5)


def test_the_report_catches_the_old_mmseg_export_in_the_mae_backbone(tmp_path, mm):
    vit = plain_vit()
    who = convert.consumer("mmseg", vit.state_dict())
    report = convert.consumer_report(convert.to_mmseg_vit(vit.state_dict()), who)  # VisionTransformer names
    assert "layers.0.attn.qkv.weight" in report.at_init and "layers.3.gamma_1" in report.at_init
    assert "WARNING left at random init" in report.summary()
    mae = mm.MAE(**who.kwargs, out_indices=[3])
    result = mae.load_state_dict(convert.to_mmseg_vit(vit.state_dict()), strict=False)
    assert sorted(set(result.missing_keys) - set(report.new)) == sorted(report.at_init)


@pytest.mark.parametrize("source", ["plain", "beit"])
def test_mmseg_vision_transformer_loads_the_mmseg_vit_export(tmp_path, mm, source):
    model = plain_vit() if source == "plain" else beit_student()
    done = export(tmp_path, model, "mmseg-vit")
    vit = mm.SegViT(
        **done.load.consumer.kwargs, out_indices=3, init_cfg=dict(type="Pretrained", checkpoint=str(done.path))
    )
    vit.init_weights()
    vit.eval()
    check_load(vit, ckpt.load(done.path)["state_dict"], done.load)
    with torch.no_grad():
        (out,) = vit(X)
    assert torch.allclose(out, as_map(tokens(model, X, final_norm=True)), atol=1e-5)


@pytest.mark.parametrize("source", ["plain", "beit"])
def test_mmpretrain_vision_transformer_loads_the_mmpretrain_export(tmp_path, mm, source):
    model = plain_vit() if source == "plain" else beit_student()
    done = export(tmp_path, model, "mmpretrain")
    vit = mm.PretrainViT(
        **done.load.consumer.kwargs, out_type="raw", init_cfg=dict(type="Pretrained", checkpoint=str(done.path))
    )
    vit.init_weights()
    vit.eval()
    check_load(vit, ckpt.load(done.path)["state_dict"], done.load)
    with torch.no_grad():
        (out,) = vit(X)
        ours = model.forward_tokens(X, final_norm=True)
    assert torch.allclose(out, ours, atol=1e-5)


@pytest.mark.parametrize("window", [0, 16])
def test_hog_equals_mmpretrains_hog_generator(mm, window):
    """mmpretrain's HOGGenerator is SlowFast's HOGLayerC plus the Gaussian window (0: none)."""
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(window))
    ref = mm.HOGGenerator(nbins=9, pool=8, gaussian_window=window)
    per_patch = ref(x)  # [N, 196, 108]: its layout for 16 px patches
    assert torch.allclose(hog_cells(x, 9, 8, window), ref.out, atol=1e-6)
    ours = HOGTarget(16, bins=9, cell=8, gaussian_window=window).compute(x, None)[:, 1:]
    assert torch.allclose(ours, per_patch, atol=1e-6)


def test_vitdet_h_warmup_equals_detectron2s_fractional_warmup():
    """detectron2's ViTDet-H config keeps the B config's `warmup_length=250 / 184375` (a fraction of the schedule)
    and shortens max_iter to 184375 * 3 // 4; `WarmupParamScheduler` is fvcore's CompositeParamScheduler of a
    linear warmup (0.001 -> the step value at warmup_length, rescaled) and the multi-step schedule (fixed),
    which `LRMultiplier` evaluates at iter / max_iter."""
    from fvcore.common.param_scheduler import CompositeParamScheduler, LinearParamScheduler, MultiStepParamScheduler

    for recipe in ("base", "large", "huge"):
        o = load_config(REPO / "detection" / "configs", recipe).optim
        max_iter = 184375 if recipe != "huge" else 184375 * 3 // 4
        milestones = [163889, 177546] if recipe != "huge" else [m * 3 // 4 for m in (163889, 177546)]
        assert (o.iters, list(o.steps)) == (max_iter, milestones)
        steps = MultiStepParamScheduler(values=[1.0, 0.1, 0.01], milestones=milestones, num_updates=max_iter)
        length = 250 / 184375
        d2 = CompositeParamScheduler(
            [LinearParamScheduler(0.001 * steps(0.0), steps(length)), steps],
            interval_scaling=["rescaled", "fixed"],
            lengths=[length, 1 - length],
        )
        ours = warmup_step(1.0, o.iters, o.warmup_iters, list(o.steps), gamma=0.1, warmup_factor=o.warmup_factor)
        check = [*range(0, 400), *range(milestones[0] - 2, milestones[0] + 2), *range(max_iter - 3, max_iter)]
        assert max(abs(ours[t] - d2(t / max_iter)) for t in check) < 1e-9, recipe
        warm = sum(1 for t in range(400) if d2(t / max_iter) < 1.0)
        assert warm == (188 if recipe == "huge" else 250), recipe  # iterations 0..187 warm up at 75 epochs
