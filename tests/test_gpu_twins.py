"""CPU twins of the CUDA-only branches: the same code with the device made a parameter.

Each test runs on the `device` fixture: the CPU in `make test`, `--device cuda` in the GPU check
(`tools/gpu_check.py`, step `gpu_tests`). Each asserts what its branch is for:

- fp16 + GradScaler (`core.engine.Stepper`, the scaler built for the device type): a step with inf/nan gradients
  is skipped (weights and AdamW moments unchanged) and halves the scale; clipping sees unscaled gradients; the
  scaler's state survives a resume through a checkpoint file;
- fused AdamW (`core.optim.adamw(fused=True)`) = the default implementation on the suite's real parameter
  groups (layer decay, no-decay names), and a fused optimizer's state resumes into a default one;
- `core.trainer.Meter` keeps copies, not the loss tensors (a CUDA-graph replay overwrites its outputs in place);
- RNG state (`core.engine.rng_state`): the device's generator is saved and restored.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from core import checkpoint as ckpt
from core import engine
from core.engine import Stepper
from core.optim import adamw, mae_finetune_groups
from core.trainer import Meter


def mlp(device) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 2)).to(device)


def fp16_stepper(model, device, clip=None) -> Stepper:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.05)
    return Stepper(model, opt, amp="fp16", clip_grad=clip, device=device)


def loss_of(stepper: Stepper, x: torch.Tensor) -> torch.Tensor:
    with stepper.autocast():
        out = stepper.model(x)
    return out.float().square().mean()


def backward(stepper: Stepper, x: torch.Tensor, bad: float | None = None) -> None:
    """A micro-batch's backward with a finite loss; `bad` (inf / nan) then poisons one gradient element: what an
    fp16 overflow in the backward pass gives, the GradScaler's case. A non-finite loss is the engine's
    `nonfinite` policy's case instead (tests/test_nonfinite.py)."""
    stepper.backward(loss_of(stepper, x))
    if bad is not None:
        next(stepper.model.parameters()).grad.view(-1)[0] = bad


def moments(opt) -> list[torch.Tensor]:
    return [t.clone() for s in opt.state.values() for t in (s["exp_avg"], s["exp_avg_sq"], torch.as_tensor(s["step"]))]


def weights(model) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def same(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


# ------------------------------------------------------------------------------------- fp16 + GradScaler
def test_the_scaler_is_built_for_the_stepper_device(device):
    st = fp16_stepper(mlp(device), device)
    assert st.scaler.is_enabled() and st.scaler._device == device.type
    assert not Stepper(mlp(device), torch.optim.SGD(mlp(device).parameters(), lr=1), amp="bf16").scaler.is_enabled()


@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_fp16_step_with_non_finite_gradients_is_skipped_and_halves_the_scale(device, bad):
    """unscale -> clip -> skip on inf/nan -> back off: the weights and AdamW's moments (and its step count) do not
    move, the scale halves; a finite step afterwards moves them again."""
    model = mlp(device)
    st = fp16_stepper(model, device, clip=1.0)
    x = torch.randn(16, 4, device=device)
    st.backward(loss_of(st, x))
    st.step()  # a finite step: moments exist
    w0, m0, scale0 = weights(model), moments(st.optimizer), st.scaler.get_scale()
    assert scale0 == 2.0**16  # the default initial scale, not grown within 2000 steps
    backward(st, x, bad)
    st.step()
    assert same(weights(model), w0) and same(moments(st.optimizer), m0)
    assert st.scaler.get_scale() == scale0 / 2
    assert all(p.grad is None for p in model.parameters())  # the skipped step's gradients are gone too
    st.backward(loss_of(st, x))
    st.step()
    assert not same(weights(model), w0) and not same(moments(st.optimizer), m0)
    assert st.scaler.get_scale() == scale0 / 2


def test_fp16_clipping_sees_unscaled_gradients(device):
    """w = 0, loss = (x . w) / 8 with x = (1, 2, 2): the gradient is x / 8, norm 3/8 = 0.375 by hand. The scaled
    gradient is 2**16 times that; the reported norm and the clipped SGD update must be the unscaled ones."""
    model = nn.Linear(3, 1, bias=False).to(device)
    nn.init.zeros_(model.weight)
    st = Stepper(model, torch.optim.SGD(model.parameters(), lr=1.0), amp="fp16", clip_grad=0.25, device=device)
    x = torch.tensor([[1.0, 2.0, 2.0]], device=device)
    with st.autocast():
        out = model(x)
    assert out.dtype == torch.float16  # the fp16 autocast branch really ran
    st.backward(out.float().sum() / 8)
    norm = st.step()
    assert norm.item() == pytest.approx(0.375, rel=1e-6)
    # SGD(lr=1) on the gradient clipped to norm 0.25: w = -(x / 8) * 0.25 / 0.375 = -x / 12
    want = -x / 12
    assert torch.allclose(model.weight.detach(), want, atol=1e-6), model.weight


def test_fp16_scaler_state_survives_a_resume(device, tmp_path):
    """A run saved after a backed-off step (scale 2**15) and resumed from the file continues bitwise like the
    uninterrupted one: same scale, same weights; a fresh scaler (2**16) would differ."""
    x = torch.randn(16, 4, device=device)
    model = mlp(device)
    st = fp16_stepper(model, device, clip=1.0)
    for bad in (None, float("inf"), None):
        backward(st, x, bad)
        st.step()
    assert st.scaler.get_scale() == 2.0**15
    path = ckpt.save({"model": model.state_dict(), "stepper": st.state_dict()}, tmp_path / "last.pth")
    state = ckpt.load(path, map_location=device)
    resumed_model = mlp(device)
    resumed_model.load_state_dict(state["model"])
    resumed = fp16_stepper(resumed_model, device, clip=1.0)
    assert resumed.scaler.get_scale() == 2.0**16  # before loading: a fresh scaler
    resumed.load_state_dict(state["stepper"])
    assert resumed.scaler.get_scale() == 2.0**15 and resumed.step_count == st.step_count == 3
    assert resumed.scaler.state_dict() == st.scaler.state_dict()
    for bad in (None, float("nan"), None):
        for s in (st, resumed):
            backward(s, x, bad)
            s.step()
    assert st.scaler.get_scale() == resumed.scaler.get_scale() == 2.0**14
    assert same(weights(model), weights(resumed_model))


def test_a_new_optimizer_at_a_stage_switch_gets_a_fresh_scaler_for_the_device(device):
    model = mlp(device)
    st = fp16_stepper(model, device)
    backward(st, torch.randn(4, 4, device=device), float("inf"))
    st.step()
    assert st.scaler.get_scale() == 2.0**15
    st.swap(model, torch.optim.AdamW(model.parameters(), lr=1e-3))
    assert st.scaler.get_scale() == 2.0**16 and st.scaler._device == device.type


# ------------------------------------------------------------------------------------------ fused AdamW
FUSED_ATOL = 1e-6  # fused and foreach AdamW round differently; 5 steps of lr 1e-3 move weights ~1e-3 or more


def comparable(model, xs, ys) -> list[torch.Tensor]:
    """Differences x - y per parameter, without the key third of each `qkv.bias`: its gradient is zero in exact
    arithmetic (softmax ignores a shift of every score of a query), so what AdamW divides by its tiny second
    moment is rounding noise, and any two implementations (or two summation orders) step it by up to ~lr."""
    out = []
    for (name, p), x, y in zip(model.named_parameters(), xs, ys):
        d = x - y
        if name.endswith("attn.qkv.bias"):
            third = p.shape[0] // 3
            d = torch.cat([d[:third], d[2 * third :]])
        out.append(d)
    return out


def vit_and_groups(device):
    """The tiny fine-tuning ViT and its real groups: layer decay 0.75, no decay on norms / biases / cls / pos."""
    from core.vit import ViT

    torch.manual_seed(0)
    model = ViT(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, num_classes=5).to(device)
    return model, mae_finetune_groups(model, 0.05, layer_decay=0.75)


def test_fused_adamw_equals_the_default_on_the_suite_groups(device):
    a, groups_a = vit_and_groups(device)
    b = copy.deepcopy(a)
    groups_b = mae_finetune_groups(b, 0.05, layer_decay=0.75)
    scales = {g["lr_scale"] for g in groups_a}
    assert len(scales) == 4 and {g["weight_decay"] for g in groups_a} == {0.0, 0.05}  # the groups are real
    assert any("cls_token" in g["names"] and g["weight_decay"] == 0 for g in groups_a)
    fused = adamw(groups_a, lr=0.0, betas=(0.9, 0.999), device=device, fused=True)
    plain = adamw(groups_b, lr=0.0, betas=(0.9, 0.999), device=device, fused=False)
    assert fused.defaults["fused"] and not plain.defaults["fused"]
    schedule = [1e-3, 2e-3, 2e-3, 1e-3, 5e-4]
    sa = Stepper(a, fused, schedule, clip_grad=3.0, device=device)
    sb = Stepper(b, plain, schedule, clip_grad=3.0, device=device)
    w0 = weights(a)
    g = torch.Generator().manual_seed(1)
    for _ in range(len(schedule)):
        x, y = torch.randn(4, 3, 32, 32, generator=g).to(device), torch.randint(0, 5, (4,), generator=g).to(device)
        for s in (sa, sb):
            s.start_step()
            s.backward(nn.functional.cross_entropy(s.model(x), y))
            s.step()
    diff = max(d.abs().max().item() for d in comparable(a, weights(a), weights(b)))
    moved = max(d.abs().max().item() for d in comparable(a, weights(a), w0))
    assert diff < FUSED_ATOL and moved > 1000 * FUSED_ATOL, (diff, moved)
    # a checkpoint of the fused optimizer (a GPU run) resumes into a default one (and vice versa)
    c = copy.deepcopy(b)
    resumed = adamw(mae_finetune_groups(c, 0.05, layer_decay=0.75), lr=0.0, betas=(0.9, 0.999), device=device)
    resumed.load_state_dict(fused.state_dict())
    for opt, model in ((plain, b), (resumed, c)):
        st = Stepper(model, opt, [1e-3], device=device)
        st.start_step()
        st.backward(model(torch.ones(2, 3, 32, 32, device=device)).square().mean())
        st.step()
    assert max(d.abs().max().item() for d in comparable(b, weights(b), weights(c))) < FUSED_ATOL


# ------------------------------------------------------------------------------------------- Meter
def test_meter_keeps_copies_not_the_loss_tensors(device):
    """The logged mean is the mean of the values added, even when the tensor is overwritten in place after
    `add` (what a CUDA-graph replay does to the previous step's outputs) - float32, the case where `.float()`
    is the tensor itself, and bf16."""
    for dtype in (torch.float32, torch.bfloat16):
        m = Meter()
        buf = torch.tensor(2.0, device=device, dtype=dtype)
        m.add({"loss": buf}, 4)
        buf.fill_(100.0)  # the next step's output lands in the same buffer
        m.add({"loss": buf}, 4)
        buf.fill_(-7.0)
        assert m.means() == {"loss": pytest.approx(51.0)} and m.images == 8


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device (run with --device cuda)")
def test_meter_under_cuda_graph_replays(device):
    """The real thing on a GPU: `compile=reduce-overhead` replays overwrite the previous output."""
    if device.type != "cuda":
        pytest.skip("--device cuda only")
    f = torch.compile(lambda x: (x * 2).sum(), mode="reduce-overhead")
    m, want = Meter(), []
    for k in range(6):
        x = torch.full((8,), float(k), device=device)
        out = f(x)
        want.append(16.0 * k)
        m.add({"loss": out}, 1)
    assert m.means()["loss"] == pytest.approx(sum(want) / len(want))


# ------------------------------------------------------------------------------------------- RNG state
def test_rng_state_restores_the_device_generator(device):
    """`engine.rng_state` holds the CPU and (where CUDA exists) every CUDA generator; restoring it repeats the
    draws on the device (dropout, drop path and masks are drawn there on a GPU)."""
    state = engine.rng_state()
    if torch.cuda.is_available():
        assert len(state["cuda"]) == torch.cuda.device_count()
    else:
        assert "cuda" not in state
    first = torch.rand(5, device=device), nn.functional.dropout(torch.ones(64, device=device), 0.5)
    engine.set_rng_state(state)
    again = torch.rand(5, device=device), nn.functional.dropout(torch.ones(64, device=device), 0.5)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not torch.equal(first[0], torch.rand(5, device=device))
    if "cuda" in state:  # saved by a process that saw twice the GPUs: the ones present are restored
        engine.set_rng_state({**state, "cuda": state["cuda"] * 2})
        assert torch.equal(torch.rand(5, device=device), first[0])


# ------------------------------------------------------------------------------- the gpu data backend
GPU_DECODE_LEVELS = 2.0  # nvJPEG's IDCT and chroma upsampling vs libjpeg's: mean |difference| in grey levels


@pytest.fixture(scope="module")
def odd_jpegs(tmp_path_factory):
    """One photo-like JPEG saved the ways a decoder may refuse: CMYK, progressive, greyscale, and truncated."""
    from PIL import Image

    from tools.datasets import make_jpegs

    src = sorted((make_jpegs(tmp_path_factory.mktemp("src"), images=2, classes=1) / "train").rglob("*.JPEG"))[0]
    root = tmp_path_factory.mktemp("odd") / "train"
    (root / "a").mkdir(parents=True)
    img = Image.open(src).convert("RGB")
    img.save(root / "a" / "0_baseline.jpg", "JPEG", quality=90)
    img.convert("CMYK").save(root / "a" / "1_cmyk.jpg", "JPEG", quality=90)
    img.save(root / "a" / "2_progressive.jpg", "JPEG", quality=90, progressive=True)
    img.convert("L").save(root / "a" / "3_grey.jpg", "JPEG", quality=90)
    good = (root / "a" / "0_baseline.jpg").read_bytes()
    (root / "a" / "4_truncated.jpg").write_bytes(good[: int(len(good) * 0.9)])
    return root


def pil_pixels(path) -> torch.Tensor:
    import numpy as np

    from core.data import open_rgb

    return torch.from_numpy(np.array(open_rgb(path), dtype=np.uint8)).permute(2, 0, 1)


def check_decoded(decoded, batch, device) -> None:
    """Each decoded image is PIL's RGB decoding of its file: exactly on CPU (the same libjpeg-turbo), within
    GPU_DECODE_LEVELS on average with nvJPEG."""
    for img, enc in zip(decoded, batch):
        want = pil_pixels(enc.path)
        assert img is not None and img.device.type == device.type and img.shape[-2:] == want.shape[-2:], enc.path
        got = img.expand(3, -1, -1).cpu().int() if img.shape[0] == 1 else img.cpu().int()
        diff = (got - want.int()).abs().float()
        if device.type == "cpu":
            assert diff.max() == 0, enc.path
        else:
            assert diff.mean() < GPU_DECODE_LEVELS, (enc.path, diff.mean())


def test_gpu_backend_decodes_cmyk_progressive_and_grey_jpegs_as_pil_does(odd_jpegs, device):
    from pretrain import datapath as dp

    aug = dp.Augment(64)
    enc = dp.EncodedFolder(odd_jpegs, aug)
    batch = [enc[i] for i in range(4)]
    check_decoded(dp.DeviceAugment(aug).decode(batch, device), batch, device)
    images, labels, _ = dp.DeviceAugment(aug)(batch, device)
    assert images.shape == (4, 3, 64, 64) and torch.isfinite(images).all()


def test_gpu_backend_a_refused_file_falls_back_to_pil_and_a_broken_one_is_named_or_skipped(
    odd_jpegs, device, monkeypatch
):
    """The batched decode fails as a whole on the truncated file: the others are decoded one by one; a file the
    device decoder refuses (nvJPEG: CMYK) is decoded by PIL; the truncated one, which PIL cannot decode either,
    is a CorruptImageError naming it, or with data.skip_corrupt dropped from the batch and named in `skipped`.
    On CPU the refusal of CMYK is nvJPEG's, played by a wrapper of torchvision's CPU decoder (which decodes CMYK);
    with --device cuda the real decoder runs."""
    import torchvision.io

    from core.errors import CorruptImageError
    from pretrain import datapath as dp

    cmyk = (odd_jpegs / "a" / "1_cmyk.jpg").read_bytes()
    real = torchvision.io.decode_jpeg
    refused = []

    def like_nvjpeg(data, *args, **kwargs):
        files = data if isinstance(data, list) else [data]
        if any(bytes(f.cpu().numpy().tobytes()) == cmyk for f in files):
            refused.append(len(files))
            raise RuntimeError("nvjpegDecode: unsupported CMYK")
        return real(data, *args, **kwargs)

    if device.type == "cpu":
        monkeypatch.setattr(torchvision.io, "decode_jpeg", like_nvjpeg)
    aug = dp.Augment(64)
    enc = dp.EncodedFolder(odd_jpegs, aug)
    batch = [enc[i] for i in range(5)]
    with pytest.raises(CorruptImageError, match="4_truncated.jpg"):
        dp.DeviceAugment(aug)(batch, device)
    skipping = dp.DeviceAugment(aug, skip_corrupt=True)
    decoded = skipping.decode(batch, device)
    assert decoded[4] is None and [p for p, _ in skipping.skipped] == [str(odd_jpegs / "a" / "4_truncated.jpg")]
    assert "truncated" in skipping.skipped[0][1]
    check_decoded(decoded[:4], batch[:4], device)
    if device.type == "cpu":
        assert 1 in refused  # the one-by-one retry reached the CMYK file and it fell back to PIL
    images, labels, _ = skipping(batch, device)
    assert images.shape == (4, 3, 64, 64) and labels.tolist() == [0, 0, 0, 0]
