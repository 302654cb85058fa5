"""metrics.py against sklearn on random data with many ties."""
from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, f1_score, precision_score, recall_score

from capnet.metrics import average_precision, best_thresholds, f1_report, map_report


def _data(n=300, c=12, seed=0, decimals=1):
    rng = np.random.default_rng(seed)
    targets = (rng.random((n, c)) < np.linspace(0.02, 0.5, c)).astype(np.float32)
    scores = np.round(rng.random((n, c)) * 0.6 + 0.4 * targets, decimals)  # heavy ties
    return scores, targets


@pytest.mark.parametrize("seed, decimals", [(0, 1), (1, 1), (2, 2), (3, 6)])
def test_average_precision_matches_sklearn_with_ties(seed, decimals):
    scores, targets = _data(seed=seed, decimals=decimals)
    targets[:, 0] = 0  # a class with no positive
    ap = average_precision(scores, targets)
    assert math.isnan(ap[0])
    for j in range(1, scores.shape[1]):
        assert ap[j] == pytest.approx(average_precision_score(targets[:, j], scores[:, j]), abs=1e-6)


def test_average_precision_edge_cases():
    assert average_precision(np.array([[0.5], [0.5], [0.5]]), np.array([[1], [0], [0]]))[0] == pytest.approx(1 / 3)
    assert average_precision(np.array([[0.9], [0.1]]), np.array([[1], [1]]))[0] == pytest.approx(1.0)
    assert average_precision(np.array([[0.1], [0.9]]), np.array([[1], [0]]))[0] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="shape"):
        average_precision(np.zeros((3, 2)), np.zeros((3, 1)))
    with pytest.raises(ValueError, match="NaN"):
        average_precision(np.full((2, 1), np.nan), np.ones((2, 1)))


def test_average_precision_large_is_vectorised():
    scores, targets = _data(n=5000, c=80, seed=4, decimals=2)
    ap = average_precision(scores, targets)  # must be quick: one argsort, no Python loop over classes
    j = 40
    assert ap[j] == pytest.approx(average_precision_score(targets[:, j], scores[:, j]), abs=1e-6)


def test_map_report_groups_and_exclusions():
    scores, targets = _data(seed=5)
    targets[:, 3] = 0
    names = [f"c{j}" for j in range(12)]
    groups = {"head": np.arange(8, 12), "medium": np.arange(3, 8), "tail": np.array([], dtype=int)}
    rep = map_report(scores, targets, groups, names)
    ap = average_precision(scores, targets) * 100
    assert rep["mAP"] == pytest.approx(np.nanmean(ap))
    assert rep["head"] == pytest.approx(ap[8:12].mean())
    assert rep["medium"] == pytest.approx(ap[4:8].mean())  # class 3 has no positive: excluded
    assert math.isnan(rep["tail"])
    assert rep["excluded"] == ["c3"] and rep["per_class"]["c3"] is None
    assert rep["per_class"]["c0"] == pytest.approx(ap[0])


def test_f1_report_matches_sklearn():
    scores, targets = _data(seed=6)
    thr = np.linspace(0.3, 0.7, 12)
    rep = f1_report(scores, targets, thr)
    pred = (scores >= thr).astype(int)
    np.testing.assert_allclose(rep["f1"], 100 * f1_score(targets, pred, average=None, zero_division=0), atol=1e-6)
    np.testing.assert_allclose(rep["precision"], 100 * precision_score(targets, pred, average=None, zero_division=0), atol=1e-6)
    assert rep["OF1"] == pytest.approx(100 * f1_score(targets, pred, average="micro"), abs=1e-6)
    assert rep["OP"] == pytest.approx(100 * precision_score(targets, pred, average="micro"), abs=1e-6)
    assert rep["CP"] == pytest.approx(100 * precision_score(targets, pred, average="macro", zero_division=0), abs=1e-6)
    assert rep["CR"] == pytest.approx(100 * recall_score(targets, pred, average="macro"), abs=1e-6)
    assert rep["CF1"] == pytest.approx(2 * rep["CP"] * rep["CR"] / (rep["CP"] + rep["CR"]))
    scalar = f1_report(scores, targets, 0.5)
    assert scalar["OF1"] == pytest.approx(100 * f1_score(targets, (scores >= 0.5).astype(int), average="micro"))


def test_best_thresholds_reach_the_best_f1():
    scores, targets = _data(seed=7)
    targets[:, 2] = 0
    thr = best_thresholds(scores, targets)
    assert thr[2] == 0.5
    for j in [0, 1, 5, 11]:
        candidates = np.unique(scores[:, j])
        best = max(f1_score(targets[:, j], scores[:, j] >= t) for t in candidates)
        got = f1_score(targets[:, j], scores[:, j] >= thr[j])
        assert got == pytest.approx(best, abs=1e-9)
        assert not np.isin(thr[j], candidates) or thr[j] == candidates.min()  # midpoint, not a score
