"""What a run saw and what it scored: the image ids of every split and the per-image test logits.

``split_ids.json`` lists the ids of train / val / test as the run used them (val is what every
choice of the run was made on, train what it was fitted on); ``test_scores.npz`` holds the test
ids, the view-averaged float32 logits and the targets, row by row. Together they let a benchmark
prove that no test image reached a choice and pool out-of-fold predictions image by image
(``benchmarks/ablation.py``).
"""
from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any, Dict, List, Tuple

import numpy as np

from capnet.fileio import atomic_write_bytes

SPLIT_IDS = "split_ids.json"
TEST_SCORES = "test_scores.npz"


def write_run_record(run_dir: Path, ds: Any, logits: np.ndarray, targets: np.ndarray) -> None:
    """Write ``split_ids.json`` and ``test_scores.npz`` into ``run_dir`` (atomically)."""
    run_dir = Path(run_dir)
    ids = {name: list(map(str, split.image_ids)) for name, split in ds.splits.items()}
    atomic_write_bytes(json.dumps(ids).encode(), run_dir / SPLIT_IDS)
    buf = io.BytesIO()
    np.savez(buf, ids=np.asarray(ids["test"]), logits=np.asarray(logits, dtype=np.float32),
             targets=np.asarray(targets, dtype=np.float32), classes=np.asarray(list(ds.classes)))
    atomic_write_bytes(buf.getvalue(), run_dir / TEST_SCORES)


def read_split_ids(run_dir: Path) -> Dict[str, List[str]]:
    """split name -> image ids, as written by :func:`write_run_record`."""
    return json.loads((Path(run_dir) / SPLIT_IDS).read_text())


def read_test_scores(run_dir: Path) -> Tuple[List[str], np.ndarray, np.ndarray]:
    """(test ids, (N, C) logits, (N, C) targets) of a run."""
    with np.load(Path(run_dir) / TEST_SCORES, allow_pickle=False) as z:
        return [str(i) for i in z["ids"]], z["logits"], z["targets"]
