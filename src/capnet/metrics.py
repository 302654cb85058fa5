"""Multi-label metrics on plain numpy arrays: per-class AP, mAP by head/medium/tail, F1.

AP follows sklearn.metrics.average_precision_score exactly (a tie block of equal scores is
one threshold step), vectorised over classes: one argsort of the whole (N, C) matrix, then
each row takes the precision at the end of its tie block. F1 follows the ML-GCN convention
(CP/CR/CF1 averaged over classes, OP/OR/OF1 over all decisions). No torch here.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Union

import numpy as np

GROUP_NAMES = ("head", "medium", "tail")


def _check(scores: np.ndarray, targets: np.ndarray) -> tuple:
    scores = np.asarray(scores, dtype=np.float64)
    targets = np.asarray(targets)
    if scores.ndim != 2 or scores.shape != targets.shape:
        raise ValueError(f"scores {scores.shape} and targets {targets.shape} must be the same (N, C) shape")
    if np.isnan(scores).any():
        raise ValueError("scores contain NaN")
    return scores, (targets > 0).astype(np.float64)


def _sorted_blocks(scores: np.ndarray, targets: np.ndarray) -> tuple:
    """Per column, descending: (scores, targets, cumulative TP, block end of each row, is block end)."""
    n = scores.shape[0]
    order = np.argsort(-scores, axis=0, kind="stable")
    s = np.take_along_axis(scores, order, axis=0)
    y = np.take_along_axis(targets, order, axis=0)
    tp = np.cumsum(y, axis=0)
    is_last = np.ones_like(s, dtype=bool)
    is_last[:-1] = s[:-1] != s[1:]
    rows = np.broadcast_to(np.arange(n)[:, None], s.shape)
    end = np.where(is_last, rows, n)
    end = np.minimum.accumulate(end[::-1], axis=0)[::-1]  # first block end at or after each row
    return s, y, tp, end, is_last


def average_precision(scores: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Per-class AP (C,) in [0, 1], as sklearn computes it; np.nan for a class with no positive."""
    scores, targets = _check(scores, targets)
    n, c = scores.shape
    out = np.full(c, np.nan)
    if n == 0:
        return out
    _, y, tp, end, _ = _sorted_blocks(scores, targets)
    precision = tp / np.arange(1, n + 1)[:, None]
    block_precision = np.take_along_axis(precision, end, axis=0)
    positives = y.sum(axis=0)
    has = positives > 0
    out[has] = (y * block_precision).sum(axis=0)[has] / positives[has]
    return out


def _group_mean(ap: np.ndarray, idx: np.ndarray) -> float:
    values = ap[np.asarray(idx, dtype=int)]
    values = values[~np.isnan(values)]
    return float(values.mean() * 100.0) if values.size else float("nan")


def map_report(
    scores: np.ndarray, targets: np.ndarray, groups: Dict[str, np.ndarray], class_names: Sequence[str]
) -> Dict[str, object]:
    """mAP overall and per head/medium/tail (percent), per-class AP, classes without a positive."""
    ap = average_precision(scores, targets)
    if len(class_names) != ap.size:
        raise ValueError(f"{len(class_names)} class names for {ap.size} score columns")
    report: Dict[str, object] = {"mAP": _group_mean(ap, np.arange(ap.size))}
    for name in list(GROUP_NAMES) + sorted(set(groups) - set(GROUP_NAMES)):
        report[name] = _group_mean(ap, groups.get(name, np.array([], dtype=int)))
    report["per_class"] = {n: (None if math.isnan(a) else float(a * 100.0)) for n, a in zip(class_names, ap)}
    report["excluded"] = [n for n, a in zip(class_names, ap) if math.isnan(a)]
    return report


def _safe_div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    num = np.asarray(num, dtype=np.float64)
    den = np.asarray(den, dtype=np.float64)
    return np.divide(num, den, out=np.zeros_like(num), where=den > 0)


def _f1(p: np.ndarray, r: np.ndarray) -> np.ndarray:
    return _safe_div(2 * p * r, p + r)


def f1_report(probs: np.ndarray, targets: np.ndarray, thresholds: Union[float, np.ndarray] = 0.5) -> Dict[str, object]:
    """Per-class precision/recall/F1 and CP, CR, CF1, OP, OR, OF1 (percent) at ``probs >= thresholds``.

    ML-GCN convention: CP/CR are means of per-class precision/recall, CF1 their harmonic mean;
    OP/OR/OF1 pool every (image, class) decision. 0/0 counts as 0 (sklearn zero_division=0);
    CP/CR average over classes with at least one positive (the ones AP also evaluates).
    """
    probs, y = _check(probs, targets)
    thr = np.broadcast_to(np.asarray(thresholds, dtype=np.float64), (probs.shape[1],))
    pred = probs >= thr[None, :]
    tp = (pred * y).sum(axis=0)
    n_pred = pred.sum(axis=0)
    n_true = y.sum(axis=0)
    precision, recall = _safe_div(tp, n_pred), _safe_div(tp, n_true)
    evaluated = n_true > 0
    cp = float(precision[evaluated].mean()) if evaluated.any() else 0.0
    cr = float(recall[evaluated].mean()) if evaluated.any() else 0.0
    op = float(_safe_div(tp.sum(), n_pred.sum()))
    o_r = float(_safe_div(tp.sum(), n_true.sum()))
    pct = 100.0
    return {
        "precision": precision * pct,
        "recall": recall * pct,
        "f1": _f1(precision, recall) * pct,
        "CP": cp * pct, "CR": cr * pct, "CF1": float(_f1(np.array(cp), np.array(cr))) * pct,
        "OP": op * pct, "OR": o_r * pct, "OF1": float(_f1(np.array(op), np.array(o_r))) * pct,
    }


def best_thresholds(probs: np.ndarray, targets: np.ndarray, default: float = 0.5) -> np.ndarray:
    """Per-class threshold maximising F1 on (probs, targets); ``default`` for a class with no positive.

    Candidates are the distinct scores (predict positive when prob >= t); the returned value is
    the midpoint between the best candidate and the next lower distinct score, which gives the
    same F1 here and a margin on new data.
    """
    probs, y = _check(probs, targets)
    n, c = probs.shape
    out = np.full(c, float(default))
    if n == 0:
        return out
    s, _, tp, _, is_last = _sorted_blocks(probs, y)
    positives = y.sum(axis=0)
    f1 = 2 * tp / (np.arange(1, n + 1)[:, None] + positives[None, :])
    f1 = np.where(is_last, f1, -1.0)
    best = np.argmax(f1, axis=0)  # first maximum = highest threshold among ties
    cols = np.arange(c)
    chosen = s[best, cols]
    nxt = s[np.minimum(best + 1, n - 1), cols]
    mid = (chosen + nxt) / 2.0
    thr = np.where((best + 1 < n) & (mid > nxt), mid, chosen)  # mid == nxt only for adjacent floats
    has = positives > 0
    out[has] = thr[has]
    return out


def summarize(report: Dict[str, object], keys: Optional[List[str]] = None) -> str:
    """One line like ``mAP 71.2 | head 80.1 | medium 70.3 | tail 60.0`` for logs."""
    keys = keys or ["mAP", *GROUP_NAMES]
    return " | ".join(f"{k} {report[k]:.2f}" for k in keys if k in report)
