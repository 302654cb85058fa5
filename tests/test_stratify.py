"""Memoised stratified splits: the same indices as iterstrat, read back from disk, never wrong."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from capnet.data import stratify


@pytest.fixture()
def labels() -> np.ndarray:
    rng = np.random.default_rng(0)
    return (rng.random((120, 6)) < np.array([0.5, 0.3, 0.2, 0.1, 0.05, 0.4])).astype(np.uint8)


def test_equals_iterstrat_and_is_read_back(labels: np.ndarray, tmp_path: Path, monkeypatch) -> None:
    from iterstrat.ml_stratifiers import MultilabelStratifiedKFold, MultilabelStratifiedShuffleSplit

    want = next(MultilabelStratifiedShuffleSplit(n_splits=1, test_size=0.2, random_state=3)
                .split(np.zeros((120, 1)), labels))
    got = stratify.shuffle_split(labels, 0.2, 3, cache_dir=tmp_path)
    for a, b in zip(got, want):
        np.testing.assert_array_equal(a, b)
    folds = list(MultilabelStratifiedKFold(n_splits=4, shuffle=True, random_state=1).split(np.zeros((120, 1)), labels))
    for k in range(4):
        for a, b in zip(stratify.kfold_split(labels, 4, k, 1, cache_dir=tmp_path), folds[k]):
            np.testing.assert_array_equal(a, b)
    assert len(list((tmp_path / "splits").iterdir())) == 2  # one entry per (labels, kind, params)

    import iterstrat.ml_stratifiers as ms

    def refuse(*args, **kwargs):
        raise AssertionError("recomputed instead of read back")
    monkeypatch.setattr(ms, "MultilabelStratifiedShuffleSplit", refuse)
    monkeypatch.setattr(ms, "MultilabelStratifiedKFold", refuse)
    np.testing.assert_array_equal(stratify.shuffle_split(labels, 0.2, 3, cache_dir=tmp_path)[1], want[1])
    np.testing.assert_array_equal(stratify.kfold_split(labels, 4, 2, 1, cache_dir=tmp_path)[1], folds[2][1])

def test_other_labels_or_params_get_other_entries(labels: np.ndarray, tmp_path: Path) -> None:
    a = stratify.shuffle_split(labels, 0.2, 3, cache_dir=tmp_path)
    b = stratify.shuffle_split(labels, 0.2, 4, cache_dir=tmp_path)
    flipped = labels.copy()
    flipped[0, 0] ^= 1
    stratify.shuffle_split(flipped, 0.2, 3, cache_dir=tmp_path)
    assert len(list((tmp_path / "splits").iterdir())) == 3
    assert not np.array_equal(a[1], b[1])


def test_a_damaged_entry_is_recomputed(labels: np.ndarray, tmp_path: Path) -> None:
    want = stratify.shuffle_split(labels, 0.2, 3, cache_dir=tmp_path)
    (entry,) = (tmp_path / "splits").iterdir()
    for junk in ("{not json", json.dumps({"parts": [[[0, 1], [1, 2]]]})):  # unreadable; not a partition
        entry.write_text(junk)
        got = stratify.shuffle_split(labels, 0.2, 3, cache_dir=tmp_path)
        np.testing.assert_array_equal(got[1], want[1])
    assert json.loads(entry.read_text())["kind"] == "shuffle_split"  # rewritten


def test_an_unwritable_cache_only_costs_time(labels: np.ndarray, tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")  # a file where the cache folder should be: every write fails
    got = stratify.shuffle_split(labels, 0.2, 3, cache_dir=blocker)
    assert len(got[0]) + len(got[1]) == 120
