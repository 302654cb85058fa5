"""A long-tailed training subset built the way VOC-LT and COCO-LT were (Wu et al., ECCV 2020).

The construction of wutong16/DistributionBalancedLoss@14460d0acda6a3e77a8a6a5999b9746243cb1535,
``tools/create_longtail_dataset.py``:

1. a reference count per rank from a Pareto pdf (``pareto_dist``, lines 52-64): ``b = 6``, the
   pdf at ``num_classes`` points evenly spaced from the 0 to the 0.99 quantile, scaled to
   ``(max - min) / b + min`` and truncated to int (VOC-LT: max 800, line 66; COCO-LT: max 1200,
   line 194; min 1);
2. classes ranked by ``sum_i P(j | i)``, the column sums of the conditional co-occurrence matrix
   (lines 80-93): classes that come along with many others are visited first;
3. in that order each class is brought to its reference count (lines 95-124): while it has too
   many images, randomly chosen selected images containing it are removed; while too few,
   randomly chosen unselected images containing it are added (at most as many as exist: the
   COCO variant, line 245). Later classes' images change earlier classes' counts, so the final
   counts follow the reference only roughly;
4. head / medium / tail = at least 100 / 20-99 / under 20 training images (lines 172-174).

Only the training split is subsampled; the other splits are kept whole. DB draws with Python's
``random`` seeded 0 (line 17) from sets, whose iteration order depends on its pickled index; here
the draws come from ``random.Random(seed)`` over sorted candidates, so a split is reproducible
from the dataset, the parameters and the seed alone (recorded in ``lt_split.json``).
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

from capnet.data.base import MultiLabelDataset
from capnet.data.lt_stats import GROUP_NAMES
from capnet.errors import DataError

PARETO_B, TAIL_QUANTILE, MIN_COUNT = 6.0, 0.99, 1  # DB's pareto_dist(b=6, min=1, tail=0.99)
VOC_LT_MAX, COCO_LT_MAX = 800, 1200  # DB's create_voc_longtail / create_coco_longtail max
HEAD_AT, TAIL_BELOW = 100, 20  # DB's group thresholds on the selected training counts
SPLIT_RECORD = "lt_split.json"


def pareto_reference(num_classes: int, max_count: int, min_count: int = MIN_COUNT, b: float = PARETO_B,
                     tail: float = TAIL_QUANTILE) -> np.ndarray:
    """(C,) int reference counts by rank: DB's ``pareto_dist`` (scipy's pareto pdf and ppf, closed form)."""
    if num_classes < 1 or max_count < min_count or b <= 0 or not 0.0 < tail < 1.0:
        raise ValueError(f"pareto_reference: bad parameters (classes {num_classes}, max {max_count}, "
                         f"min {min_count}, b {b}, tail {tail})")
    x = np.linspace(1.0, (1.0 - tail) ** (-1.0 / b), num_classes)  # ppf(0) = 1, ppf(q) = (1 - q)^(-1/b)
    pdf = b / x ** (b + 1.0)
    return (pdf * (max_count - min_count) / b + min_count).astype(int)


def visiting_order(labels: np.ndarray) -> np.ndarray:
    """Class indices by decreasing ``sum_i P(j | i)`` (DB lines 87-93); classes without images last."""
    y = (np.asarray(labels) > 0).astype(np.float64)
    co = y.T @ y  # co[i, j] = images with both i and j
    counts = np.diag(co).copy()
    cond = np.divide(co, counts[:, None], out=np.zeros_like(co), where=counts[:, None] > 0)
    score = cond.sum(axis=0)
    score[counts == 0] = -np.inf
    return np.argsort(-score, kind="stable")


@dataclass
class LongTailSelection:
    """The selected training rows and how they were reached."""

    indices: List[int]  # sorted row indices into the source training split
    order: List[int]  # class indices in visiting order
    reference: List[int]  # the wanted count at each rank
    counts: List[int]  # per-class positives of the selection (class order)
    short: Dict[int, int] = field(default_factory=dict)  # class -> images missing to reach its reference


def select_longtail(labels: np.ndarray, max_count: int, min_count: int = MIN_COUNT, b: float = PARETO_B,
                    tail: float = TAIL_QUANTILE, seed: int = 0) -> LongTailSelection:
    """DB's greedy subsampling of ``labels`` ((N, C) multi-hot) towards the Pareto reference."""
    y = np.asarray(labels) > 0
    num_classes = y.shape[1]
    ref = pareto_reference(num_classes, max_count, min_count, b, tail)
    order = visiting_order(y)
    members = [set(np.flatnonzero(y[:, c]).tolist()) for c in range(num_classes)]
    rng = random.Random(seed)
    selected: set = set()
    have = np.zeros(num_classes, dtype=np.int64)
    short: Dict[int, int] = {}
    for rank, c in enumerate(order):
        need = int(ref[rank] - have[c])
        if need < 0:
            chosen = rng.sample(sorted(members[c] & selected), -need)
            selected.difference_update(chosen)
            have -= y[chosen].sum(axis=0)
        elif need > 0:
            pool = sorted(members[c] - selected)
            if len(pool) < need:
                short[int(c)] = need - len(pool)
            chosen = rng.sample(pool, min(need, len(pool)))
            selected.update(chosen)
            have += y[chosen].sum(axis=0)
    return LongTailSelection(sorted(selected), [int(c) for c in order], [int(r) for r in ref],
                             [int(n) for n in have], short)


def db_groups(counts: np.ndarray, classes: List[str]) -> Dict[str, List[str]]:
    """head / medium / tail by DB's thresholds on the selected counts."""
    counts = np.asarray(counts)
    masks = {"head": counts >= HEAD_AT, "medium": (counts < HEAD_AT) & (counts >= TAIL_BELOW), "tail": counts < TAIL_BELOW}
    return {g: sorted(classes[i] for i in np.flatnonzero(masks[g])) for g in GROUP_NAMES}


def _csv(ids: List[str], labels: np.ndarray, classes: List[str]) -> str:
    rows = ["image_id,labels"]
    for image_id, row in zip(ids, np.asarray(labels) > 0):
        if "," in image_id or '"' in image_id:
            raise DataError(f"image id {image_id!r} cannot be written to a split CSV (it holds a comma or quote)")
        rows.append(f"{image_id},{' '.join(classes[c] for c in np.flatnonzero(row))}")
    return "\n".join(rows) + "\n"


def write_longtail_split(dataset: MultiLabelDataset, out: Path, max_count: int, min_count: int = MIN_COUNT,
                         b: float = PARETO_B, tail: float = TAIL_QUANTILE, seed: int = 0,
                         source: Optional[Dict[str, str]] = None, force: bool = False) -> LongTailSelection:
    """Select a long-tailed training subset of ``dataset`` and write a split folder to ``out``.

    ``out`` gets classes.txt, train.csv (the selection), every other split's CSV unchanged,
    class_freq.json, class_split.json (DB's groups) and lt_split.json (parameters, seed, source,
    counts): the layout the readers take as ``split_dir`` (``data.split_dir``).
    """
    from capnet.fileio import atomic_write_bytes

    if "train" not in dataset.splits:
        raise DataError(f"{dataset.root}: a long-tailed split subsamples train, but the data has no train split")
    out = Path(out)
    train = dataset.splits["train"]
    sel = select_longtail(train.labels, max_count, min_count, b, tail, seed)
    classes = list(dataset.classes)
    files = {"classes.txt": "\n".join(classes) + "\n",
             "train.csv": _csv([train.image_ids[i] for i in sel.indices], train.labels[sel.indices], classes)}
    for name, split in dataset.splits.items():
        if name != "train":
            files[f"{name}.csv"] = _csv(list(split.image_ids), split.labels, classes)
    groups = db_groups(np.asarray(sel.counts), classes)
    record = {"construction": "DistributionBalancedLoss tools/create_longtail_dataset.py (Wu et al., ECCV 2020)",
              "parameters": {"max_count": max_count, "min_count": min_count, "pareto_b": b, "tail_quantile": tail,
                             "seed": seed, "head_at": HEAD_AT, "tail_below": TAIL_BELOW},
              "source": {"root": str(dataset.root), **(source or {})},
              "source_train_images": len(train), "train_images": len(sel.indices),
              "group_sizes": {g: len(v) for g, v in groups.items()},
              "short_of_reference": {classes[c]: n for c, n in sel.short.items()},
              "visiting_order": [classes[c] for c in sel.order], "reference_by_rank": sel.reference}
    files["class_freq.json"] = json.dumps({c: n for c, n in zip(classes, sel.counts)}, indent=1, sort_keys=True) + "\n"
    files["class_split.json"] = json.dumps(groups, indent=1, sort_keys=True) + "\n"
    files[SPLIT_RECORD] = json.dumps(record, indent=1) + "\n"
    present = [name for name in files if (out / name).exists()]
    if present and not force:  # e.g. DB's own split folder, or a dataset root with its classes.txt
        raise DataError(f"{out}: {', '.join(present)} exist(s); pass --force to overwrite them, or choose another --out")
    for name, text in files.items():
        atomic_write_bytes(text.encode(), out / name)
    return sel
