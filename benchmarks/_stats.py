"""Intervals for paired comparisons under repeated k-fold: the outer fold is the unit.

* ``nb_corrected_t``: Nadeau & Bengio (2003), the corrected resampled t-test as used for repeated
  k-fold by Bouckaert & Frank (2004). The J = r x k per-fold differences share training images,
  so their plain variance understates the variance of the mean; the corrected variance is
  ``(1/J + n_test/n_train) * s^2``, with a t distribution on J - 1 degrees of freedom.
* ``paired_bootstrap``: the images are the unit. Out-of-fold scores pooled over the k folds of one
  repetition give every image exactly one score per method (so each tail class has all its
  positives); resampling images with replacement, the same draw for both methods (and for every
  repetition, which score the same images), gives a percentile interval of the mAP difference.
"""
from __future__ import annotations

import math
import warnings
from typing import Dict, Optional, Sequence

import numpy as np


def nb_corrected_t(diffs: Sequence[float], n_train: float, n_test: float, level: float = 0.95) -> Dict[str, float]:
    """Mean, corrected standard error and ``level`` t-interval of per-fold paired differences.

    ``n_train`` / ``n_test``: images a fold trains on / is tested on (means over folds). NaNs
    (e.g. a group with no positives in a fold) are dropped.
    """
    from scipy import stats

    d = np.asarray([x for x in diffs if x is not None and not math.isnan(x)], dtype=float)
    j = d.size
    if j < 2:
        mean = float(d.mean()) if j else float("nan")
        return {"mean": mean, "se": float("nan"), "half": float("nan"), "lo": float("nan"), "hi": float("nan"), "n": j}
    var = (1.0 / j + float(n_test) / float(n_train)) * d.var(ddof=1)
    se = math.sqrt(var)
    half = float(stats.t.ppf(0.5 + level / 2, j - 1) * se)
    mean = float(d.mean())
    return {"mean": mean, "se": se, "half": half, "lo": mean - half, "hi": mean + half, "n": j}


def bootstrap_draws(n: int, n_boot: int = 2000, seed: int = 0) -> np.ndarray:
    """(n_boot, n) image indices drawn with replacement (int32); the same seed gives the same draws."""
    return np.random.default_rng(seed).integers(0, n, (n_boot, n)).astype(np.int32)


def class_ap_draws(scores: Sequence[np.ndarray], targets: np.ndarray, draws: np.ndarray, chunk: int = 250) -> np.ndarray:
    """(B, R, C) per-class AP (%) of each repetition's (N, C) scores under every draw (nan: no positive).

    Exactly ``capnet.metrics.average_precision`` of the resampled rows, computed without
    re-sorting: a draw is a count per image, the ranking of the full set is fixed, and an image
    drawn k times is a tie block of k copies. AP = sum_i w_i y_i P(end of i's tie block) / sum_i w_i y_i
    with P = cumulative weighted positives / cumulative weights in score order.
    """
    y = np.asarray(targets) > 0
    n = y.shape[0]
    counts = np.stack([np.bincount(d, minlength=n) for d in draws]).astype(np.float64)  # (B, N)
    out = np.empty((draws.shape[0], len(scores), y.shape[1]))
    for r, s in enumerate(scores):
        s = np.asarray(s, dtype=np.float64)
        for c in range(y.shape[1]):
            order = np.argsort(-s[:, c], kind="mergesort")
            sc, yc = s[order, c], y[order, c].astype(np.float64)
            # index of the last row of each row's tie block (equal scores rank together)
            last = np.r_[np.nonzero(np.diff(sc))[0], n - 1]
            end = last[np.searchsorted(last, np.arange(n))]
            for b0 in range(0, counts.shape[0], chunk):
                w = counts[b0:b0 + chunk][:, order]
                wy = w * yc
                cum_w, cum_tp = np.cumsum(w, axis=1), np.cumsum(wy, axis=1)
                prec = np.divide(cum_tp[:, end], cum_w[:, end], out=np.zeros_like(cum_w), where=cum_w[:, end] > 0)
                pos = wy.sum(axis=1)
                with np.errstate(invalid="ignore", divide="ignore"):
                    out[b0:b0 + chunk, r, c] = np.where(pos > 0, (wy * prec).sum(axis=1) / pos * 100.0, np.nan)
    return out


def point_ap(scores: Sequence[np.ndarray], targets: np.ndarray) -> np.ndarray:
    """(R, C) per-class AP (%) of each repetition's scores on all images."""
    from capnet.metrics import average_precision

    return np.stack([average_precision(np.asarray(s), np.asarray(targets)) * 100.0 for s in scores])


def _group_mean(ap: np.ndarray, classes: Optional[np.ndarray]) -> np.ndarray:
    """nan-mean over ``classes`` (all when None) of the last axis."""
    sel = ap if classes is None else ap[..., np.asarray(classes, dtype=int)]
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(sel, axis=-1)


def difference_interval(ap_a: np.ndarray, ap_b: np.ndarray, point_a: np.ndarray, point_b: np.ndarray,
                        classes: Optional[np.ndarray] = None, level: float = 0.95) -> Dict[str, float]:
    """Bootstrap percentile interval of (group mAP of a) - (group mAP of b), averaged over repetitions.

    ``ap_*``: (B, R, C) from :func:`class_ap_draws` with the SAME draws; ``point_*``: (R, C).
    """
    point = float(np.mean(_group_mean(point_a, classes) - _group_mean(point_b, classes)))
    draws = np.mean(_group_mean(ap_a, classes) - _group_mean(ap_b, classes), axis=1)
    draws = draws[~np.isnan(draws)]
    if not draws.size:
        return {"mean": point, "lo": float("nan"), "hi": float("nan"), "n_boot": 0, "p_le_0": float("nan")}
    lo, hi = np.quantile(draws, [(1 - level) / 2, 1 - (1 - level) / 2])
    return {"mean": point, "lo": float(lo), "hi": float(hi), "n_boot": int(draws.size),
            "p_le_0": float(np.mean(draws <= 0))}


def paired_bootstrap(scores_a: Sequence[np.ndarray], scores_b: Sequence[np.ndarray], targets: np.ndarray,
                     classes: Optional[np.ndarray] = None, n_boot: int = 2000, seed: int = 0,
                     level: float = 0.95) -> Dict[str, float]:
    """Percentile interval of mAP(a) - mAP(b) over ``classes`` with images resampled with replacement.

    ``scores_a`` / ``scores_b``: one (N, C) score array per repetition, rows aligned with
    ``targets`` (N, C); the statistic is the mean over repetitions of the difference, and every
    draw resamples the same images in every repetition and for both methods.
    """
    if len(scores_a) != len(scores_b) or not scores_a:
        raise ValueError("paired_bootstrap needs the same number (>= 1) of repetitions for both methods")
    draws = bootstrap_draws(np.asarray(targets).shape[0], n_boot, seed)
    return difference_interval(class_ap_draws(scores_a, targets, draws), class_ap_draws(scores_b, targets, draws),
                               point_ap(scores_a, targets), point_ap(scores_b, targets), classes, level)


def resolved(lo: float, hi: float) -> str:
    """'above 0' / 'below 0' when the interval excludes 0, else 'not resolved'."""
    if math.isnan(lo) or math.isnan(hi):
        return "n/a"
    return "above 0" if lo > 0 else "below 0" if hi < 0 else "not resolved"
