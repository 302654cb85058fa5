"""Long-tail statistics: class counts, head/medium/tail groups, imbalance ratio, a text table,
on label arrays (``capnet.data.summary`` turns a dataset into the text table and stat files).

The group rule is the one used by DistributionBalancedLoss and LMPT on VOC-LT / COCO-LT:
head = at least 100 train images, medium = 20-99, tail = fewer than 20.
"""
from __future__ import annotations

from typing import Dict, List, Sequence

import numpy as np


GROUP_NAMES = ("head", "medium", "tail")
HEAD_MIN = 100  # a class with >= HEAD_MIN train positives is head
TAIL_MAX = 20  # a class with < TAIL_MAX train positives is tail; in between is medium


def class_freq(labels: np.ndarray) -> np.ndarray:
    """Positive images per class of an (N, C) multi-hot array, as int64 (C,)."""
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"labels must be (N, C), got shape {labels.shape}")
    return (labels > 0).sum(axis=0).astype(np.int64)


def assign_groups(freq: np.ndarray, head_min: int = HEAD_MIN, tail_max: int = TAIL_MAX) -> Dict[str, np.ndarray]:
    """Class indices of head (>= head_min), medium and tail (< tail_max) from train counts."""
    freq = np.asarray(freq)
    if head_min < tail_max:
        raise ValueError(f"head_min={head_min} must be >= tail_max={tail_max}")
    return {
        "head": np.flatnonzero(freq >= head_min),
        "medium": np.flatnonzero((freq >= tail_max) & (freq < head_min)),
        "tail": np.flatnonzero(freq < tail_max),
    }


def imbalance_ratio(freq: np.ndarray) -> float:
    """max / min train count over classes with at least one positive (nan if none has one)."""
    freq = np.asarray(freq)
    present = freq[freq > 0]
    if present.size == 0:
        return float("nan")
    return float(present.max() / present.min())


def group_of(groups: Dict[str, np.ndarray], num_classes: int) -> List[str]:
    """Per-class group name ("-" for a class in no group), for tables."""
    names = ["-"] * num_classes
    for group, idx in groups.items():
        for i in np.asarray(idx, dtype=int):
            names[i] = group
    return names


def format_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Plain-text table: first column left-aligned, the others right-aligned."""
    cells = [[str(c) for c in header]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[j]) for r in cells) for j in range(len(header))]
    lines = []
    for k, r in enumerate(cells):
        parts = [r[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(r[1:], widths[1:])]
        lines.append("  ".join(parts).rstrip())
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)
