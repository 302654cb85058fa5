"""ZS-LP and CLAP (capnet/train/zs_probe.py) and their head (models/heads.py ZeroShotLinearProbe)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from capnet.config import load_config
from capnet.train.zs_probe import clap_multipliers, fit_zs_probe, prior_bias
from capnet.metrics import average_precision
from capnet.models.build import MODEL_KINDS, build_model

CLASSES = ["cat", "dog", "person"]


def _data(seed: int, n: int, zs_quality: float = 0.2):
    """Features whose class directions are ``true``; zero-shot prototypes only partly aligned."""
    fixed = np.random.default_rng(123)  # the same class directions and prototypes for every sample
    d, c = 16, 3
    true = np.linalg.qr(fixed.normal(size=(d, d)))[0][:c]
    other = np.linalg.qr(fixed.normal(size=(d, d)))[0][:c]
    rng = np.random.default_rng(seed)
    y = (rng.random((n, c)) < 0.35).astype(np.float32)
    x = 0.3 * rng.normal(size=(n, d)) + y @ true + 2.0 * np.ones(d) / np.sqrt(d)
    zs = zs_quality * true + (1 - zs_quality) * other
    return x.astype(np.float32), y, zs.astype(np.float32)


def _map(logits: np.ndarray, y: np.ndarray) -> float:
    return float(np.nanmean(average_precision(logits, y)) * 100)


def test_head_starts_as_zero_shot_and_registers_two_kinds() -> None:
    assert {"zs_linear_probe", "clap"} <= set(MODEL_KINDS.names())
    cfg = load_config([], ["model.kind=zs_linear_probe", "model.backbone=clip_tiny_vit.random"])
    zs = build_model(load_config([], ["model.kind=zeroshot", "model.backbone=clip_tiny_vit.random"]), CLASSES)
    head = build_model(cfg, CLASSES)
    feats = torch.randn(6, head.backbone.image_dim)
    a, b = zs.logits_from_image_features(feats), head.logits_from_image_features(feats)
    assert torch.allclose(a, b, atol=1e-5)  # bias 0 before fitting: identical logits
    assert set(head.param_groups()) == {"head"} and len(head.trainable_state_dict()) == 2
    w, bias = np.ones((3, head.backbone.image_dim), np.float32), np.arange(3, dtype=np.float32)
    head.load_fit(w, bias)
    expected = head.fixed_logit_scale * F.normalize(feats, dim=-1) @ torch.from_numpy(w).T + torch.from_numpy(bias)
    assert torch.allclose(head.logits_from_image_features(feats), expected, atol=1e-5)


def test_prior_bias_and_clap_multipliers_follow_their_rules() -> None:
    y = torch.tensor([[1, 0], [1, 0], [0, 0], [0, 1]], dtype=torch.float32)
    z = torch.tensor([[5.0, -1.0], [3.0, 0.0], [-2.0, 1.0], [-6.0, -4.0]])
    b = prior_bias(z, y)
    prior = (y.sum(0) + 1) / 6
    assert torch.allclose((z + b).mean(0), torch.log(prior / (1 - prior)), atol=1e-6)
    lam = clap_multipliers(z, y, b)
    assert lam[0] == pytest.approx(float(torch.sigmoid(z[:2, 0] + b[0]).mean()))
    assert lam[1] == pytest.approx(float(torch.sigmoid(z[3, 1] + b[1])))
    # class 0's zero-shot logits separate its positives; class 1's rank its positive last: lambda_0 > lambda_1
    assert lam[0] > lam[1]


def test_zs_lp_improves_on_poor_zero_shot_and_chooses_on_validation() -> None:
    x, y, zs = _data(0, 300)
    xv, yv, _ = _data(1, 200)
    xv_views = np.stack([xv, xv + 0.01], axis=1)  # (M, V, D): two views
    fit = fit_zs_probe((x, y), (xv_views, yv), zs, scale=20.0, lrs=(1e-3, 1e-2), decays=(0.0,), max_steps=60)
    zs_map = _map(F.normalize(torch.from_numpy(xv), dim=-1).numpy() @ zs.T, yv)
    fitted = 20.0 * F.normalize(torch.from_numpy(xv), dim=-1).numpy() @ fit.weight.T + fit.bias
    assert _map(fitted, yv) > zs_map + 5
    assert fit.val_map == pytest.approx(max(fit.tried.values())) and set(fit.tried) == {"lr=0.001,decay=0", "lr=0.01,decay=0"}
    assert fit.steps % 10 == 0 and 10 <= fit.steps <= 60 and fit.multipliers is None


def test_clap_stays_nearer_the_zero_shot_classifier_than_zs_lp() -> None:
    x, y, zs = _data(2, 300, zs_quality=0.6)
    free = fit_zs_probe((x, y), None, zs, scale=20.0, lrs=(1e-2,), max_steps=100)
    clap = fit_zs_probe((x, y), None, zs, scale=20.0, clap=True, lrs=(1e-2,), max_steps=100)
    unit = zs / np.linalg.norm(zs, axis=1, keepdims=True)
    def dist(w: np.ndarray) -> float:
        return float(np.linalg.norm(w - unit))

    assert clap.multipliers is not None and (clap.multipliers > 0).all()
    assert dist(clap.weight) < dist(free.weight)
    assert free.steps == 100 and np.isnan(free.val_map)  # without validation nothing is chosen
