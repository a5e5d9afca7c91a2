"""Property analysis: attention distance and singular values against values worked out by hand, attention
probabilities against PyTorch's own multi-head attention, and a tiny end-to-end run."""

import json
import math

import pytest
import torch

from core import checkpoint as ckpt
from core.data import DataError
from core.vit import build_vit
from tools import analysis


# --------------------------------------------------------------------------------------- attention distance
def test_distance_matrix_by_hand():
    d = analysis.distance_matrix((2, 2), patch_size=16)
    r2 = math.sqrt(2)
    expected = 16 * torch.tensor([[0, 1, 1, r2], [1, 0, r2, 1], [1, r2, 0, 1], [r2, 1, 1, 0]], dtype=torch.float64)
    torch.testing.assert_close(d, expected)
    # row-major on a rectangular grid: token 3 of a 2 x 3 grid is (1, 0)
    assert analysis.distance_matrix((2, 3), 1)[0, 3].item() == 1.0


def test_uniform_attention_distance_by_hand():
    # cls + a 2 x 2 grid, every query attends uniformly to all 5 tokens: the cls column is dropped without
    # renormalising, so each query gives (1/5) x 16 x (0 + 1 + 1 + sqrt 2)
    probs = torch.full((1, 2, 5, 5), 1 / 5)
    d = analysis.mean_attention_distance(probs, analysis.distance_matrix((2, 2), 16), num_prefix=1)
    assert d.shape == (1, 2)
    torch.testing.assert_close(d, torch.full((1, 2), 16 * (2 + math.sqrt(2)) / 5, dtype=torch.float64))


def test_uniform_over_patches_on_a_line_by_hand():
    # a 1 x 3 grid, patch 4, no cls, uniform over the 3 patches: per-query sums 3/3, 2/3, 3/3 -> mean 8/9 x 4
    probs = torch.full((1, 1, 3, 3), 1 / 3)
    d = analysis.mean_attention_distance(probs, analysis.distance_matrix((1, 3), 4), num_prefix=0)
    assert d.item() == pytest.approx(32 / 9)


def test_identity_and_cls_only_attention_have_zero_distance():
    dist = analysis.distance_matrix((3, 3), 16)
    eye = torch.eye(10).expand(2, 4, 10, 10)
    assert analysis.mean_attention_distance(eye, dist).abs().max().item() == 0.0
    to_cls = torch.zeros(1, 1, 10, 10)
    to_cls[..., 0] = 1.0
    assert analysis.mean_attention_distance(to_cls, dist).item() == 0.0


# ----------------------------------------------------------------------------------------- singular values
def test_rank_one_tokens_are_100_percent_at_k1():
    v = torch.randn(24)
    a = torch.tensor([1.0, -2.0, 0.5, 3.0, -0.1, 7.0])  # token norms differ, signs too: still one direction
    tokens = (a[:, None] * v[None, :]).unsqueeze(0)  # [1, 6, 24], rank 1
    frac = analysis.topk_singular_fraction(tokens, k=5)
    torch.testing.assert_close(frac, torch.ones(1, 5, dtype=torch.float64))


def test_orthogonal_tokens_spread_evenly():
    # 4 orthogonal tokens (any lengths): after L2 normalisation all singular values are 1 -> top-k = k / 4,
    # and k = 5 > 4 values is the whole sum
    tokens = torch.zeros(1, 4, 6)
    for i, scale in enumerate((1.0, 5.0, 0.2, 3.0)):
        tokens[0, i, i] = scale
    frac = analysis.topk_singular_fraction(tokens, k=5)
    torch.testing.assert_close(frac, torch.tensor([[0.25, 0.5, 0.75, 1.0, 1.0]], dtype=torch.float64))


@pytest.mark.parametrize("shape", [(3, 20, 12), (3, 12, 20)])
def test_singular_values_equal_an_svd(shape):
    x = torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(analysis.singular_values(x), torch.linalg.svdvals(x), atol=1e-10, rtol=1e-10)


# --------------------------------------------------------------------------------- attention probabilities
def tiny_model(seed: int = 0):
    model = build_vit("tiny")
    model.initialize_weights(torch.Generator().manual_seed(seed))
    with torch.no_grad():  # non-zero biases so that the test sees them
        for blk in model.blocks:
            blk.attn.qkv.bias.normal_(0, 0.5, generator=torch.Generator().manual_seed(seed + 1))
            blk.attn.proj.bias.normal_(0, 0.5)
    return model.eval()


def test_attention_probs_equal_torch_multihead_attention():
    attn = tiny_model().blocks[1].attn
    dim, heads = attn.qkv.in_features, attn.num_heads
    mha = torch.nn.MultiheadAttention(dim, heads, batch_first=True)
    with torch.no_grad():
        mha.in_proj_weight.copy_(attn.qkv.weight)
        mha.in_proj_bias.copy_(attn.qkv.bias)
        mha.out_proj.weight.copy_(attn.proj.weight)
        mha.out_proj.bias.copy_(attn.proj.bias)
    x = torch.randn(2, 65, dim)
    with torch.no_grad():
        out, weights = mha(x, x, x, need_weights=True, average_attn_weights=False)
        probs = analysis.attention_probs(attn, x)
    torch.testing.assert_close(probs, weights, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, heads, 65))
    torch.testing.assert_close(analysis.attention_output(attn, x, probs), out, atol=1e-5, rtol=1e-5)


def test_explicit_probabilities_reproduce_every_fused_block():
    model = tiny_model()
    assert all(blk.attn.fused_attn for blk in model.blocks), "timm should use its fused kernel here"
    tokens = torch.randn(3, 65, 96)  # cls + 8 x 8 patches
    with torch.no_grad():
        for blk in model.blocks:
            h = blk.norm1(tokens)
            attn_out = analysis.attention_output(blk.attn, h, analysis.attention_probs(blk.attn, h))
            torch.testing.assert_close(attn_out, blk.attn(h), atol=1e-5, rtol=1e-5)
            rebuilt = tokens + attn_out
            rebuilt = rebuilt + blk.mlp(blk.norm2(rebuilt))
            tokens_next = blk(tokens)
            torch.testing.assert_close(rebuilt, tokens_next, atol=1e-5, rtol=1e-5)
            tokens = tokens_next


def test_probe_refuses_probabilities_that_do_not_reproduce_the_block():
    model = tiny_model()
    model.blocks[2].attn.scale *= 2  # the fused kernel keeps 1/sqrt(d); our explicit softmax would not
    probe = analysis.Probe(model)
    with pytest.raises(RuntimeError, match="block 2: attention probabilities do not reproduce"):
        probe(torch.randn(2, 3, 32, 32))
    probe.close()


def test_results_do_not_depend_on_batching():
    model = tiny_model()
    images = torch.randn(4, 3, 32, 32)
    one = analysis.Probe(model)
    one(images)
    one.close()
    two = analysis.Probe(model)
    two(images[:1])
    two(images[1:])
    two.close()
    a, b = one.results(), two.results()
    assert a["images"] == b["images"] == 4
    torch.testing.assert_close(torch.tensor(a["attention_distance"]), torch.tensor(b["attention_distance"]))
    torch.testing.assert_close(torch.tensor(a["svd_topk_fraction"]), torch.tensor(b["svd_topk_fraction"]))
    assert a["max_relative_attention_error"] < 1e-5


# ------------------------------------------------------------------------------------------ model, data, run
def test_infer_arch_from_weights():
    sd = tiny_model().state_dict()
    arch = analysis.infer_arch(sd)
    assert arch == dict(
        img_size=32, patch_size=4, embed_dim=96, depth=4, num_heads=3, mlp_ratio=4.0, qkv_bias=True
    )  # tiny preset
    assert analysis.infer_arch(sd, num_heads=6)["num_heads"] == 6
    with pytest.raises(ValueError, match="not divisible by 5 heads"):
        analysis.infer_arch(sd, num_heads=5)
    with pytest.raises(ckpt.CheckpointError, match="pos_embed"):
        analysis.infer_arch({k: v for k, v in sd.items() if k != "pos_embed"})


def test_image_files_subset_and_errors(tmp_path, tiny_imagenet):
    files = analysis.image_files(tiny_imagenet / "val")
    assert len(files) == 16
    sub = analysis.image_files(tiny_imagenet / "val", max_images=4)
    assert sub == files[::4]  # evenly spaced: one per class of the sorted folder
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no images"):
        analysis.image_files(tmp_path / "empty")
    with pytest.raises(DataError, match="does not exist"):
        analysis.image_files(tmp_path / "nope")


def test_end_to_end_two_models(tmp_path, tiny_imagenet):
    paths = []
    for seed in (0, 1):
        p = tmp_path / f"vit{seed}.pth"
        ckpt.save(tiny_model(seed).state_dict(), p)  # a plain timm state dict
        paths.append(p)
    data = tmp_path / "images"
    data.mkdir()
    for f in analysis.image_files(tiny_imagenet / "val", max_images=5):
        (data / f.name).write_bytes(f.read_bytes())
    (data / "broken.jpg").write_bytes(b"not a jpeg")
    out = tmp_path / "out"
    result = analysis.run([str(paths[0]), f"other={paths[1]}"], data, out, batch_size=4, device="cpu")
    saved = json.loads((out / "analysis.json").read_text())
    assert saved["models"][0]["name"] == f"{tmp_path.name}/vit0" and saved["models"][1]["name"] == "other"
    for m in result["models"]:
        assert m["images"] == 5 and m["skipped_images"] == [str(data / "broken.jpg")]
        dist = torch.tensor(m["attention_distance"])
        svd = torch.tensor(m["svd_topk_fraction"])
        assert dist.shape == (4, 3) and svd.shape == (4, 5)
        # bounded by the grid's diagonal, and top-k fractions grow with k up to at most 1
        assert (dist >= 0).all() and (dist <= 4 * math.hypot(7, 7)).all()
        assert (svd[:, 1:] >= svd[:, :-1]).all() and (svd <= 1 + 1e-12).all() and (svd > 0).all()
        assert m["arch"]["num_heads"] == 3 and m["grid"] == [8, 8]
    assert result["models"][0]["attention_distance"] != result["models"][1]["attention_distance"]
    assert (out / "attention_distance.png").stat().st_size > 0 and (out / "singular_values.png").stat().st_size > 0


def test_img_size_resizes_the_position_embedding(tmp_path):
    p = tmp_path / "vit.pth"
    ckpt.save(tiny_model().state_dict(), p)
    model, desc = analysis.load_model(p, img_size=48)
    assert model.grid_size == (12, 12) and "pos_embed" in desc["load"]


def test_uniform_attention_on_vit_b_matches_the_authors_random_teacher():
    # ViT-B/16 at 224 (cls + 14 x 14): a head attending uniformly sits at 115.9 px, the level of every head of
    # the random teacher ("random-0th") in the authors' attention-distance figure (.github/avd.png, ~115)
    assert analysis.uniform_attention_distance((14, 14), 16) == pytest.approx(115.90, abs=0.01)
    # the same figure by plain arithmetic: each query gives 1/197 of the summed pixel distance to the 196 patches
    cells = [(r, c) for r in range(14) for c in range(14)]
    by_hand = sum(16 * math.dist(q, k) for q in cells for k in cells) / 197 / 196
    assert analysis.uniform_attention_distance((14, 14), 16) == pytest.approx(by_hand, rel=1e-7)  # cdist: via matmul


def test_replot_merges_earlier_results(tmp_path):
    model = {
        "name": "a",
        "attention_distance": [[1.0, 2.0], [3.0, 4.0]],
        "attention_distance_mean": [1.5, 3.5],
        "svd_topk_fraction": [[0.5, 0.7], [0.4, 0.6]],
        "grid": [2, 2],
        "patch_size": 16,
    }
    for name in ("one", "two"):
        (tmp_path / f"{name}.json").write_text(json.dumps({"data": name, "models": [{**model, "name": name}]}))
    assert (
        analysis.main(
            ["--from-json", str(tmp_path / "one.json"), str(tmp_path / "two.json"), "--out", str(tmp_path / "o")]
        )
        == 0
    )
    merged = json.loads((tmp_path / "o" / "analysis.json").read_text())
    assert [m["name"] for m in merged["models"]] == ["one", "two"] and merged["data"] == ["one", "two"]
    assert (tmp_path / "o" / "attention_distance.png").stat().st_size > 0
    (tmp_path / "bad.json").write_text("{}")
    assert analysis.main(["--from-json", str(tmp_path / "bad.json"), "--out", str(tmp_path / "o")]) == 2
    with pytest.raises(SystemExit):
        analysis.main(["x.pth"])  # no --data
