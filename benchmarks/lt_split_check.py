"""How far ``capnet data lt-split`` can be checked against DB's VOC-LT / COCO-LT files here.

DB's split needs the full VOC2012 trainval / COCO train2017 label lists (not in this repository)
and Python's set order under its pickled index, so its exact ids cannot be regenerated. What can be
compared: (1) the Pareto reference (exact, tested), (2) DB's per-class counts and group sizes
against that reference, (3) the same comparison for capnet's builder on stand-in pools: DB's own
long-tailed training rows repeated 10 times (real co-occurrence, every class with at least 10x its
LT count available), and independent Pareto-shaped labels. Prints a markdown report
(docs/lt_split.md quotes it).

    python benchmarks/lt_split_check.py [--seeds 0 1 2]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from capnet.data.lt_split import COCO_LT_MAX, VOC_LT_MAX, db_groups, pareto_reference, select_longtail

REPO = Path(__file__).resolve().parents[1]
POOLS = {"voc_lt": (11540, 20, VOC_LT_MAX), "coco_lt": (118287, 80, COCO_LT_MAX)}  # VOC2012 trainval, train2017 sizes


def synthetic_pool(n: int, c: int, seed: int) -> np.ndarray:
    """Class k present with probability 0.5 / (1 + k)^0.8, class 0 also with 40% of labelled images."""
    rng = np.random.default_rng(seed)
    y = rng.random((n, c)) < 0.5 / (1.0 + np.arange(c)) ** 0.8
    y[:, 0] |= y[:, 1:].any(axis=1) & (rng.random(n) < 0.4)
    return y


def tiled_pool(name: str, copies: int = 10) -> np.ndarray:
    """DB's long-tailed train rows (data/splits/<name>/train.csv), ``copies`` times."""
    from capnet.data._files import read_classes, read_label_csv

    classes = read_classes(REPO / "data/splits" / name / "classes.txt")
    _, labels = read_label_csv(REPO / "data/splits" / name / "train.csv", classes)
    return np.tile(labels > 0, (copies, 1))


def summary(counts: np.ndarray, ref: np.ndarray) -> dict:
    """Sorted counts against the reference by rank: images, groups, equal ranks, max |diff| in the tail half."""
    s = np.sort(counts)[::-1]
    half = len(s) // 2
    groups = db_groups(counts, [str(k) for k in range(len(counts))])
    return {"groups": "/".join(str(len(groups[g])) for g in ("head", "medium", "tail")),
            "equal_ranks": int((s == ref).sum()), "tail_max_abs_diff": int(np.abs(s[half:] - ref[half:]).max()),
            "head_ratio": round(float(s[0] / ref[0]), 3)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args(argv)
    print("| split | source | train images | head/medium/tail | ranks equal to the reference | max abs diff, tail half | top count / reference |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, (n, c, max_count) in POOLS.items():
        ref = pareto_reference(c, max_count)
        freq = json.loads((REPO / "data/splits" / name / "class_freq.json").read_text())
        images = sum(1 for _ in open(REPO / "data/splits" / name / "train.csv")) - 1
        s = summary(np.array(list(freq.values())), ref)
        print(f"| {name} | DB's file | {images} | {s['groups']} | {s['equal_ranks']} of {c} | {s['tail_max_abs_diff']} | {s['head_ratio']} |")
        pools = [(f"DB's rows x 10 ({len(tiled_pool(name))} images)", lambda seed: tiled_pool(name)),
                 (f"independent Pareto labels ({n} images)", lambda seed: synthetic_pool(n, c, seed))]
        for label, pool in pools:
            for seed in args.seeds:
                sel = select_longtail(pool(seed), max_count, seed=seed)
                s = summary(np.array(sel.counts), ref)
                print(f"| {name} | capnet on {label}, seed {seed} | {len(sel.indices)} | {s['groups']} | "
                      f"{s['equal_ranks']} of {c} | {s['tail_max_abs_diff']} | {s['head_ratio']} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
