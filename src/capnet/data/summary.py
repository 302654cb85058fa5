"""A dataset's long-tail summary: the ``capnet data stats`` table and the class_freq.json /
class_split.json files DB-Loss and LMPT style code reads.
"""
from __future__ import annotations

import json
from typing import Dict

import numpy as np

from capnet.data.base import MultiLabelDataset
from capnet.data.lt_stats import GROUP_NAMES, class_freq, format_table, group_of, imbalance_ratio
from capnet.errors import DataError


def describe(dataset: MultiLabelDataset) -> str:
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


def stat_files(dataset: MultiLabelDataset) -> Dict[str, str]:
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
