"""benchmarks/_stats.py: the fold-unit corrected t and the paired bootstrap, on data with a known answer."""
from __future__ import annotations

import importlib
import math
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


def _stats():
    sys.path.insert(0, str(REPO))  # benchmarks/ is a package at the repository root, not installed
    return importlib.import_module("benchmarks._stats")


def test_nb_corrected_t_matches_the_formula_and_widens_the_plain_interval() -> None:
    from scipy import stats

    S = _stats()
    d = np.array([5.73, 1.16, -0.14, 6.78, 0.16])  # the per-fold margins the review found
    out = S.nb_corrected_t(d, n_train=2741, n_test=685)
    var = (1 / 5 + 685 / 2741) * d.var(ddof=1)
    assert out["mean"] == pytest.approx(d.mean())
    assert out["half"] == pytest.approx(stats.t.ppf(0.975, 4) * math.sqrt(var))
    assert out["lo"] < 0 < out["hi"]  # the review's conclusion: this margin is not resolved
    plain = stats.t.ppf(0.975, 4) * d.std(ddof=1) / math.sqrt(5)
    assert out["half"] > plain  # the correction only ever widens (n_test/n_train > 0)
    assert out["half"] == pytest.approx(plain * math.sqrt(1 + 5 * 685 / 2741))


def test_nb_corrected_t_resolves_a_consistent_difference_and_handles_few_folds() -> None:
    S = _stats()
    out = S.nb_corrected_t([2.0, 2.1, 1.9, 2.05, 1.95, 2.0, 2.02, 1.98, 2.01, 1.99], n_train=4, n_test=1)
    assert out["lo"] > 0 and S.resolved(out["lo"], out["hi"]) == "above 0" and out["n"] == 10
    one = S.nb_corrected_t([1.0, float("nan")], n_train=4, n_test=1)
    assert one["n"] == 1 and math.isnan(one["half"]) and S.resolved(one["lo"], one["hi"]) == "n/a"


def _labels(rng: np.random.Generator, n: int = 300, c: int = 5) -> np.ndarray:
    y = (rng.random((n, c)) < 0.3).astype(np.float32)
    y[0] = 1  # every class has a positive
    return y


def test_paired_bootstrap_identical_methods_give_exactly_zero() -> None:
    S = _stats()
    rng = np.random.default_rng(0)
    y = _labels(rng)
    s = rng.normal(size=y.shape)
    out = S.paired_bootstrap([s, s + 1.0], [s, s + 1.0], y, n_boot=200)  # shifting scores leaves AP unchanged
    assert out["mean"] == 0.0 and out["lo"] == 0.0 and out["hi"] == 0.0 and out["n_boot"] == 200


def test_paired_bootstrap_perfect_vs_reversed_ranking_is_resolved_with_the_known_point() -> None:
    from capnet.metrics import average_precision

    S = _stats()
    rng = np.random.default_rng(1)
    y = _labels(rng)
    perfect = y + 0.01 * rng.random(y.shape)  # every positive above every negative: AP = 100
    worse = -perfect
    out = S.paired_bootstrap([perfect], [worse], y, n_boot=300)
    known = 100.0 - np.nanmean(average_precision(worse, y)) * 100
    assert out["mean"] == pytest.approx(known)
    assert out["lo"] > 0 and out["lo"] <= out["mean"] <= out["hi"]
    flipped = S.paired_bootstrap([worse], [perfect], y, n_boot=300)  # same draws: the exact mirror
    assert flipped["lo"] == pytest.approx(-out["hi"]) and flipped["hi"] == pytest.approx(-out["lo"])


def test_paired_bootstrap_covers_zero_for_two_equally_noisy_methods_and_uses_classes() -> None:
    S = _stats()
    rng = np.random.default_rng(2)
    y = _labels(rng, n=400)
    a = y + rng.normal(scale=1.0, size=y.shape)
    b = y + rng.normal(scale=1.0, size=y.shape)  # same signal, independent noise: no true difference
    out = S.paired_bootstrap([a], [b], y, n_boot=400)
    assert out["lo"] < 0 < out["hi"]
    # a group: only class 0 improves -> the difference on classes [1..4] is exactly 0
    c = b.copy()
    c[:, 0] = y[:, 0] * 10
    group = S.paired_bootstrap([c], [b], y, classes=np.array([1, 2, 3, 4]), n_boot=100)
    assert group["mean"] == 0.0 and group["lo"] == 0.0 == group["hi"]
    assert S.paired_bootstrap([c], [b], y, classes=np.array([0]), n_boot=100)["lo"] > 0


def test_paired_bootstrap_averages_repetitions_on_the_same_draws() -> None:
    S = _stats()
    rng = np.random.default_rng(3)
    y = _labels(rng)
    a1, b1 = y + rng.normal(size=y.shape), y + rng.normal(size=y.shape)
    a2, b2 = y + rng.normal(size=y.shape), y + rng.normal(size=y.shape)
    one = S.paired_bootstrap([a1], [b1], y, n_boot=50)
    two = S.paired_bootstrap([a2], [b2], y, n_boot=50)
    both = S.paired_bootstrap([a1, a2], [b1, b2], y, n_boot=50)
    assert both["mean"] == pytest.approx((one["mean"] + two["mean"]) / 2)
    with pytest.raises(ValueError):
        S.paired_bootstrap([a1], [b1, b2], y)


def test_class_ap_draws_equals_average_precision_of_the_resampled_rows_ties_included() -> None:
    from capnet.metrics import average_precision

    S = _stats()
    rng = np.random.default_rng(4)
    y = _labels(rng, n=60, c=3)
    s = np.round(rng.normal(size=y.shape), 1)  # many ties between distinct images
    draws = S.bootstrap_draws(60, 40, seed=5)
    fast = S.class_ap_draws([s], y, draws)
    for b, idx in enumerate(draws):
        np.testing.assert_allclose(fast[b, 0], average_precision(s[idx], y[idx]) * 100.0, rtol=1e-9, atol=1e-9)
