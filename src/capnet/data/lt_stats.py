"""Long-tail statistics: class counts, head/medium/tail groups, imbalance ratio, a text table,
and the class_freq.json / class_split.json files DB-Loss and LMPT style code reads.

The group rule is the one used by DistributionBalancedLoss and LMPT on VOC-LT / COCO-LT:
head = at least 100 train images, medium = 20-99, tail = fewer than 20.
"""
from __future__ import annotations

import json
from typing import TYPE_CHECKING, Dict, List, Sequence

import numpy as np

from capnet.errors import DataError

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
    groups = dataset.groups() if dataset.has_groups else {}
    group = group_of(groups, dataset.num_classes)
    train = counts.get("train", np.zeros(dataset.num_classes, dtype=np.int64))
    order = sorted(range(dataset.num_classes), key=lambda i: (-int(train[i]), dataset.classes[i]))
    out = [f"dataset {dataset.name} at {dataset.root}: {dataset.num_classes} classes"]
    out.append(format_table(["split", "images"], [[s, len(dataset.splits[s].image_ids)] for s in split_names]))
    out.append("")
    rows = [[dataset.classes[i]] + [int(counts[s][i]) for s in split_names] + [group[i]] for i in order]
    out.append(format_table(["class"] + split_names + ["group"], rows))
    out.append("")
    if groups:
        source = "fixed class_groups" if dataset.class_groups is not None else "train-count thresholds"
        sizes = ", ".join(f"{g} {len(groups.get(g, []))}" for g in GROUP_NAMES)
        out.append(f"groups ({source}): {sizes}")
    else:
        out.append("groups: none (no train split and no class_split.json)")
    if "train" in counts:
        out.append(f"imbalance ratio (max/min train count): {imbalance_ratio(train):.1f}")
    return "\n".join(out)


STAT_FILES = ("class_freq.json", "class_split.json")


def stat_files(dataset: "MultiLabelDataset") -> Dict[str, str]:
    """The text of class_freq.json ({class: train images}) and class_split.json ({group: [classes]}).

    The format of data/voc_real_lt, which DB-Loss / LMPT style code reads as ``class_freq`` and
    ``class_split``; the groups are :meth:`MultiLabelDataset.groups` (class_split.json if the
    data has one, else the train-count thresholds).
    """
    if "train" not in dataset.splits:
        raise DataError(f"{dataset.root}: class_freq.json counts train images, but the data has no train split")
    freq = class_freq(dataset.splits["train"].labels)
    groups = dataset.groups()
    objects = {
        "class_freq.json": {c: int(n) for c, n in zip(dataset.classes, freq)},
        "class_split.json": {g: sorted(dataset.classes[i] for i in groups[g]) for g in GROUP_NAMES},
    }
    return {name: json.dumps(obj, indent=1, sort_keys=True) + "\n" for name, obj in objects.items()}
