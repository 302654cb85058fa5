"""Stratified multi-label splits (iterstrat's iterative stratification), memoised on disk.

iterstrat needs scikit-learn, whose import (with SciPy) costs 1-2 s on a small CPU: more than
the split itself and a tenth of a repeated ``capnet demo``. The indices are a pure function of
the label matrix, the split parameters and the iterstrat version, so they are stored under
``$CAPNET_CACHE/splits`` by a digest of all of these and read back instead; a missing or
unreadable entry is recomputed (and an unwritable cache only costs the time).
"""
from __future__ import annotations

import hashlib
import json
from importlib import metadata
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np

from capnet.fileio import capnet_cache_dir
from capnet.fileio import write_json_atomic

Indices = Tuple[np.ndarray, np.ndarray]


def _key(kind: str, labels: np.ndarray, params: dict) -> str:
    h = hashlib.sha256()
    labels = np.ascontiguousarray(labels, dtype=np.uint8)
    h.update(json.dumps({"kind": kind, "shape": labels.shape, "params": params,
                         "iterstrat": metadata.version("iterative-stratification")}, sort_keys=True).encode())
    h.update(labels.tobytes())
    return h.hexdigest()[:32]


def _memo_path(key: str, cache_dir: Optional[Path]) -> Path:
    return (Path(cache_dir) if cache_dir is not None else capnet_cache_dir()) / "splits" / f"{key}.json"


def _read(path: Path, n: int) -> Optional[List[Indices]]:
    try:
        parts = json.loads(path.read_text())["parts"]
        out = [(np.asarray(a, dtype=np.int64), np.asarray(b, dtype=np.int64)) for a, b in parts]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    ok = all(np.array_equal(np.sort(np.concatenate([a, b])), np.arange(n)) for a, b in out)
    return out if ok and out else None


def _memoised(kind: str, labels: np.ndarray, params: dict, compute, cache_dir: Optional[Path]) -> List[Indices]:
    path = _memo_path(_key(kind, labels, params), cache_dir)
    found = _read(path, len(labels))
    if found is not None:
        return found
    parts = compute()
    try:
        write_json_atomic(path, {"kind": kind, "params": params, "parts": [[a.tolist(), b.tolist()] for a, b in parts]})
    except OSError:
        pass  # a read-only cache: the split is still right, only not remembered
    return [(np.asarray(a, dtype=np.int64), np.asarray(b, dtype=np.int64)) for a, b in parts]


def shuffle_split(labels: np.ndarray, fraction: float, seed: int, cache_dir: Optional[Path] = None) -> Indices:
    """(rest, held) indices: ``fraction`` of the rows held out, every class's share kept."""
    def compute() -> List[Indices]:
        from iterstrat.ml_stratifiers import MultilabelStratifiedShuffleSplit

        splitter = MultilabelStratifiedShuffleSplit(n_splits=1, test_size=fraction, random_state=seed)
        return [next(splitter.split(np.zeros((len(labels), 1)), labels))]

    return _memoised("shuffle_split", labels, {"fraction": fraction, "seed": seed}, compute, cache_dir)[0]


def kfold_split(labels: np.ndarray, folds: int, fold: int, seed: int, cache_dir: Optional[Path] = None) -> Indices:
    """(rest, held) indices of fold ``fold`` of a shuffled stratified ``folds``-fold split."""
    def compute() -> List[Indices]:
        from iterstrat.ml_stratifiers import MultilabelStratifiedKFold

        splitter = MultilabelStratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
        return list(splitter.split(np.zeros((len(labels), 1)), labels))

    return _memoised("kfold", labels, {"folds": folds, "seed": seed}, compute, cache_dir)[fold]
