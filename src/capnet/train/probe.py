"""The linear-probe baseline, fitted the way its users fit it: scikit-learn, to convergence.

One ``LogisticRegression`` (L-BFGS, L2) per class on features standardised with the training
statistics; the inverse regularisation strength ``C`` is chosen on validation mAP from a grid
(``Cs``), then, with ``refit``, the probe is refitted on train + val at that ``C``. The fitted
coefficients are written into the model's ``LinearProbe`` head (``load_fit``), so the probe is
evaluated, saved and exported like every other model kind.

Validation features may carry a view axis ((M, V, D): the test-time views), so the choice is made
on the same view-averaged logits that test is scored with; for a linear head, the mean of the
logits over views is the logit of the mean feature. The engine reaches this probe, ZS-LP and the
CLAPs through ``FEATURE_FITS`` (``train/feature_fit.py``).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from capnet.registry import FEATURE_FITS

DEFAULT_CS = (0.0003, 0.001, 0.003, 0.01, 0.03, 0.1)  # inverse L2 strengths tried on validation


@dataclass
class ProbeFit:
    """Standardisation and per-class logistic-regression weights of a fitted probe."""

    mean: np.ndarray  # (D,) training-feature mean
    scale: np.ndarray  # (D,) training-feature std (1 where a feature is constant)
    coef: np.ndarray  # (C, D) weights on standardised features
    intercept: np.ndarray  # (C,)
    C: float  # the chosen inverse regularisation strength
    val_map: Dict[float, float] = field(default_factory=dict)  # validation mAP of every C tried

    def decision(self, features: np.ndarray) -> np.ndarray:
        """(N, D) features -> (N, C) logits; (N, V, D) view stacks -> logits averaged over V."""
        features = np.asarray(features)
        if features.ndim == 3:
            features = features.mean(axis=1)  # linear: mean of the view logits = logit of the mean feature
        return ((features - self.mean) / self.scale) @ self.coef.T + self.intercept


def fit_logistic(features: np.ndarray, labels: np.ndarray, C: float, max_iter: int = 5000) -> ProbeFit:
    """One L2 logistic regression per class (sklearn, L-BFGS) on standardised features.

    A class with no positive (or no negative) gets a constant logit of -/+ 10, so it ranks
    nothing and never fails the fit.
    """
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    x = np.asarray(features, dtype=np.float64)
    y = np.asarray(labels) > 0
    mean = x.mean(axis=0)
    scale = x.std(axis=0)
    scale[scale == 0] = 1.0
    z = (x - mean) / scale
    coef = np.zeros((y.shape[1], x.shape[1]))
    intercept = np.zeros(y.shape[1])
    for c in range(y.shape[1]):
        if y[:, c].all() or not y[:, c].any():
            intercept[c] = 10.0 if y[:, c].all() else -10.0
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("error", ConvergenceWarning)  # an unconverged probe is not a baseline
            model = LogisticRegression(C=C, max_iter=max_iter, tol=1e-6).fit(z, y[:, c])
        coef[c], intercept[c] = model.coef_[0], model.intercept_[0]
    return ProbeFit(mean, scale, coef, intercept, float(C))


def select_and_fit(train: Tuple[np.ndarray, np.ndarray], val: Optional[Tuple[np.ndarray, np.ndarray]],
                   Cs: Sequence[float] = DEFAULT_CS, refit: bool = True, default_C: float = 0.01) -> ProbeFit:
    """Choose ``C`` on validation mAP (or ``default_C`` without val), then refit on train + val."""
    from capnet.metrics import average_precision

    if val is None:
        return fit_logistic(*train, C=default_C)
    scores: Dict[float, float] = {}
    fits: List[ProbeFit] = []
    for C in Cs:
        fit = fit_logistic(*train, C=C)
        ap = average_precision(fit.decision(val[0]), val[1])
        scores[float(C)] = float(np.nanmean(ap) * 100.0)
        fits.append(fit)
    best = max(scores, key=lambda c: (scores[c], -c))  # ties: the stronger regularisation
    chosen = fits[list(scores).index(best)]
    if refit:
        first = val[0][:, 0] if np.asarray(val[0]).ndim == 3 else val[0]  # view 0: the eval view train uses
        both = np.concatenate([train[0], first]), np.concatenate([train[1], val[1]])
        chosen = fit_logistic(*both, C=best)
    chosen.val_map = scores
    return chosen


@FEATURE_FITS.register("linear_probe")
def fit_linear_probe(model: Any, train: Tuple[np.ndarray, np.ndarray], val: Optional[Tuple[np.ndarray, np.ndarray]],
                     refit: bool = False, seed: int = 0) -> Dict[str, Any]:
    """The scikit-learn probe: C chosen on val, optionally refitted on train + val; loaded into the head."""
    fitted = select_and_fit(train, val, refit=refit)
    model.load_fit(fitted.coef, fitted.intercept, fitted.mean, fitted.scale)
    best = max(fitted.val_map.values()) if fitted.val_map else None
    return {"C": fitted.C, "val_mAP_by_C": fitted.val_map, "refit": refit, "val_mAP": best}
