"""Long-tail statistics: class counts, head/medium/tail groups, imbalance ratio, a text table.

The group rule is the one used by DistributionBalancedLoss and LMPT on VOC-LT / COCO-LT:
head = at least 100 train images, medium = 20-99, tail = fewer than 20.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Dict, List, Sequence

import numpy as np

if TYPE_CHECKING:  # pragma: no cover - typing only (base imports this module)
    from capnet.data.base import MultiLabelDataset

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


def describe(dataset: "MultiLabelDataset") -> str:
    """Split sizes, per-class counts sorted by train frequency, group sizes, imbalance ratio."""
    split_names = [s for s in ("train", "val", "test") if s in dataset.splits]
    split_names += sorted(s for s in dataset.splits if s not in split_names)
    counts = {s: class_freq(dataset.splits[s].labels) for s in split_names}
    groups = dataset.groups()
    group = group_of(groups, dataset.num_classes)
    train = counts.get("train", np.zeros(dataset.num_classes, dtype=np.int64))
    order = sorted(range(dataset.num_classes), key=lambda i: (-int(train[i]), dataset.classes[i]))
    out = [f"dataset {dataset.name} at {dataset.root}: {dataset.num_classes} classes"]
    out.append(format_table(["split", "images"], [[s, len(dataset.splits[s].image_ids)] for s in split_names]))
    out.append("")
    rows = [[dataset.classes[i]] + [int(counts[s][i]) for s in split_names] + [group[i]] for i in order]
    out.append(format_table(["class"] + split_names + ["group"], rows))
    out.append("")
    source = "fixed class_groups" if dataset.class_groups is not None else "train-count thresholds"
    sizes = ", ".join(f"{g} {len(groups.get(g, []))}" for g in GROUP_NAMES)
    out.append(f"groups ({source}): {sizes}")
    out.append(f"imbalance ratio (max/min train count): {imbalance_ratio(train):.1f}")
    return "\n".join(out)
