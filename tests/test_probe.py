"""core.probe: k-NN and the linear probe by hand on constructed features, feature pooling, one real probe."""

import math

import pytest
import torch
import torch.nn.functional as F

from core import probe
from core.vit import ViT, preset


def test_knn_weights_votes_by_similarity_not_by_count():
    # val point v = (1, 0); neighbours: one of class 0 at cosine 1.0, two of class 1 at cosine 0.6
    train_f = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.6, -0.8], [-1.0, 0.0]])
    train_y = torch.tensor([0, 1, 1, 2])
    val_f, val_y = torch.tensor([[2.0, 0.0]]), torch.tensor([0])  # not unit length: normalised inside
    # T = 0.07: class 0 gets exp(1/0.07) = 1.6e6, class 1 gets 2 exp(0.6/0.07) = 1.0e4 -> class 0
    assert probe.knn_top1(train_f, train_y, val_f, val_y, k=3, temperature=0.07) == 100.0
    # T = 10: class 0 gets exp(0.1) = 1.105, class 1 gets 2 exp(0.06) = 2.124 -> class 1 (a plain majority)
    assert math.exp(1 / 10) < 2 * math.exp(0.6 / 10)
    assert probe.knn_top1(train_f, train_y, val_f, val_y, k=3, temperature=10.0) == 0.0
    # k = 1: the nearest alone
    assert probe.knn_top1(train_f, train_y, val_f, val_y, k=1, temperature=10.0) == 100.0


def test_knn_scores_a_fraction_and_chunks_agree():
    g = torch.Generator().manual_seed(0)
    centres = torch.eye(4, 8) * 5
    train_y = torch.arange(40) % 4
    val_y = torch.arange(20) % 4
    train_f = centres[train_y] + 0.3 * torch.randn(40, 8, generator=g)
    val_f = centres[val_y] + 0.3 * torch.randn(20, 8, generator=g)
    val_y_half = val_y.clone()
    val_y_half[:10] = (val_y_half[:10] + 1) % 4  # half of the labels wrong on purpose
    full = probe.knn_top1(train_f, train_y, val_f, val_y)
    assert full == 100.0
    assert probe.knn_top1(train_f, train_y, val_f, val_y_half) == 50.0
    assert probe.knn_top1(train_f, train_y, val_f, val_y_half, chunk=3) == 50.0


def clusters(n_per_class=30, classes=5, dim=16, spread=0.3, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=g)
    y = torch.arange(n_per_class * classes) % classes
    return (centres[y] + spread * torch.randn(len(y), dim, generator=g)) * scale, y


def test_linear_probe_separates_separable_features_and_not_noise():
    tf, ty = clusters(seed=0)
    vf, vy = clusters(seed=0, n_per_class=10)
    res = probe.linear_probe(tf, ty, vf, vy, epochs=30, batch=32)
    assert res["top1"] == 100.0 and res["train_top1"] == 100.0
    # labels unrelated to the features: the probe fits the training set but cannot beat chance by much
    g = torch.Generator().manual_seed(1)
    noise_t, noise_v = torch.randn(150, 16, generator=g), torch.randn(500, 16, generator=g)
    rand_t, rand_v = torch.randint(0, 5, (150,), generator=g), torch.randint(0, 5, (500,), generator=g)
    res = probe.linear_probe(noise_t, rand_t, noise_v, rand_v, epochs=30, batch=32)
    assert res["top1"] < 30.0 and res["train_top1"] > res["top1"]


def test_linear_probe_head_is_maes_and_scale_invariant():
    head = probe.linear_head(16, 5, torch.Generator().manual_seed(0))
    bn, linear = head
    assert isinstance(bn, torch.nn.BatchNorm1d) and not bn.affine and bn.eps == 1e-6
    assert linear.bias.abs().sum() == 0 and 0.006 < linear.weight.std().item() < 0.014  # trunc-normal, std 0.01
    # the BatchNorm in front makes the probe blind to a global scale of the features
    tf, ty = clusters(seed=2, spread=1.5)
    vf, vy = clusters(seed=3, spread=1.5, n_per_class=10)
    a = probe.linear_probe(tf, ty, vf, vy, epochs=5, batch=32)
    b = probe.linear_probe(tf * 1000, ty, vf * 1000, vy, epochs=5, batch=32)
    assert a["top1"] == b["top1"]
    assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-3)


def test_linear_probe_rejects_zero_epochs():
    tf, ty = clusters()
    with pytest.raises(ValueError, match="epochs"):
        probe.linear_probe(tf, ty, tf, ty, epochs=0)


def tiny_vit():
    model = ViT(**preset("tiny"), fixed_pos_embed=True)
    model.initialize_weights(torch.Generator().manual_seed(0))
    return model


def test_features_are_the_cls_token_or_the_normalised_mean_of_patch_tokens():
    model = tiny_vit().train()
    images = torch.randn(6, 3, 32, 32)
    loader = [(images[:4], torch.tensor([0, 1, 2, 3])), (images[4:], torch.tensor([0, 1]))]
    f, y = probe.extract_features(model, loader, "cpu", pool="token")
    assert model.training  # mode restored
    with torch.no_grad():
        model.eval()
        cls = model.forward_tokens(images, final_norm=True)[:, 0]
        mean = model.forward_tokens(images, final_norm=False)[:, 1:].mean(1)
    torch.testing.assert_close(f, cls)
    assert y.tolist() == [0, 1, 2, 3, 0, 1]
    f, _ = probe.extract_features(model, loader, "cpu", pool="avg")
    torch.testing.assert_close(f, F.layer_norm(mean, (96,), eps=1e-6))
    assert f.mean(1).abs().max() < 1e-5 and f.var(1, unbiased=False).sub(1).abs().max() < 1e-3
    with pytest.raises(ValueError, match="pool"):
        probe.extract_features(model, loader, "cpu", pool="max")


def test_probe_on_real_images(tiny_imagenet):
    train, val = probe.eval_loaders(tiny_imagenet, 32, batch=8)
    scores = probe.probe(tiny_vit(), train, val, "cpu", epochs=3)
    assert set(scores) == {"knn", "linprobe"} and all(0.0 <= v <= 100.0 for v in scores.values())
    # 4 classes x 4 val images: every score is a multiple of 1/16
    assert all((v * 16 / 100) == pytest.approx(round(v * 16 / 100), abs=1e-4) for v in scores.values())
