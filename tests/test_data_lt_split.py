"""DB's long-tailed split construction (capnet.data.lt_split) and ``capnet data lt-split``."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from capnet.cli import main
from capnet.data import load_dataset
from capnet.data.lt_split import (COCO_LT_MAX, VOC_LT_MAX, db_groups, pareto_reference, select_longtail,
                                  visiting_order)

from _native_trees import native_trees

REPO = Path(__file__).resolve().parents[1]


def _db_pareto_dist(b, num_classes, max, min=1, tail=0.99):
    """DistributionBalancedLoss tools/create_longtail_dataset.py:52-59, verbatim but for the plot."""
    from scipy.stats import pareto

    rv = pareto(b)
    classes_x = np.linspace(pareto.ppf(0.0, b), pareto.ppf(tail, b), num_classes)
    dist = rv.pdf(classes_x) * (max - min) / b + min
    return dist.astype(int)


@pytest.mark.parametrize("classes,max_count", [(20, VOC_LT_MAX), (80, COCO_LT_MAX), (81, COCO_LT_MAX), (5, 50)])
def test_reference_counts_equal_dbs_formula(classes, max_count):
    pytest.importorskip("scipy")
    np.testing.assert_array_equal(pareto_reference(classes, max_count), _db_pareto_dist(6, classes, max_count))


def _pareto_labels(n: int, c: int, seed: int) -> np.ndarray:
    """A synthetic pool: class k present with probability ~ Pareto-shaped, plus a 'person'-like
    class 0 that co-occurs with everything."""
    rng = np.random.default_rng(seed)
    p = 0.5 / (1.0 + np.arange(c)) ** 0.8
    y = rng.random((n, c)) < p
    y[:, 0] |= y[:, 1:].any(axis=1) & (rng.random(n) < 0.4)
    return y.astype(np.float32)


def test_selection_follows_dbs_greedy_rules():
    y = _pareto_labels(6000, 20, seed=0)
    sel = select_longtail(y, max_count=VOC_LT_MAX, seed=0)
    counts = y[sel.indices].sum(axis=0)
    np.testing.assert_array_equal(counts, sel.counts)
    last = sel.order[-1]  # nothing after the last visit changes its count: it sits exactly on its reference
    assert counts[last] == sel.reference[-1] and not sel.short
    assert sel.order[0] == 0  # the class that comes with everything is visited first
    assert sel == select_longtail(y, max_count=VOC_LT_MAX, seed=0)
    assert sel.indices != select_longtail(y, max_count=VOC_LT_MAX, seed=1).indices
    assert len(sel.indices) < len(y) and counts.max() <= VOC_LT_MAX * 1.5
    groups = db_groups(counts, [str(k) for k in range(20)])
    assert sum(len(v) for v in groups.values()) == 20 and groups["head"] and groups["tail"]


def test_visiting_order_by_hand():
    """sum_i P(j | i) worked out on paper: scores 4/3, 5/2, 4/3 for classes 0-2 (tie kept in class
    order), and the class without images last."""
    y = np.array([[1, 1, 0, 0], [1, 0, 0, 0], [0, 1, 1, 0], [0, 1, 0, 0]], dtype=np.float32)
    assert visiting_order(y).tolist() == [1, 0, 2, 3]


def test_a_split_folder_of_other_origin_is_not_overwritten(tmp_path, write_jpeg, capsys):
    """DB's own split folders (or a dataset root) have no lt_split.json: their files still stand."""
    root = native_trees(tmp_path / "native", write_jpeg, n_train=40, n_test=6)["voc"]
    out = tmp_path / "db_split"
    out.mkdir()
    (out / "train.csv").write_text("theirs\n")
    args = ["data", "lt-split", str(root), "--reader", "voc", "--out", str(out), "--max-count", "12"]
    assert main(args) == 1 and "train.csv" in capsys.readouterr().err
    assert (out / "train.csv").read_text() == "theirs\n" and not (out / "lt_split.json").exists()


def test_short_classes_are_reported():
    y = np.zeros((30, 3), dtype=np.float32)
    y[:, 0] = 1
    y[:2, 2] = 1
    sel = select_longtail(y, max_count=20, min_count=5, seed=0)
    assert 2 in sel.short and 1 in sel.short  # class 1 has no image at all, class 2 only two


def test_cli_writes_a_split_every_reader_reads(tmp_path, write_jpeg, capsys):
    trees = native_trees(tmp_path / "native", write_jpeg, n_train=40, n_test=6)
    for reader, root in trees.items():
        out = tmp_path / f"{reader}_lt"
        args = ["data", "lt-split", str(root), "--reader", reader, "--out", str(out), "--max-count", "12", "--seed", "3"]
        assert main(args) == 0
        record = json.loads((out / "lt_split.json").read_text())
        assert record["parameters"]["seed"] == 3 and record["parameters"]["max_count"] == 12
        assert record["source"]["reader"] == reader and record["source_train_images"] == 40
        full = load_dataset(reader, root)
        lt = load_dataset(reader, root, split_dir=out)
        assert 0 < len(lt.splits["train"]) == record["train_images"] < 40
        assert lt.splits["test"].image_ids == full.splits["test"].image_ids
        assert set(lt.splits["train"].image_ids) <= set(full.splits["train"].image_ids)
        freq = json.loads((out / "class_freq.json").read_text())
        assert [freq[c] for c in lt.classes] == lt.splits["train"].labels.sum(0).astype(int).tolist()
        assert lt.class_groups == json.loads((out / "class_split.json").read_text())
        assert main(args) == 1 and "--force" in capsys.readouterr().err  # never overwritten silently
        assert main(args + ["--force"]) == 0
        assert load_dataset(reader, root, split_dir=out).splits["train"].image_ids == lt.splits["train"].image_ids


def test_folder_reader_takes_a_split_dir(folder_tree, tmp_path):
    out = tmp_path / "lt"
    assert main(["data", "lt-split", str(folder_tree), "--out", str(out), "--max-count", "3"]) == 0
    ds = load_dataset("folder", folder_tree, split_dir=out)
    assert len(ds.splits["train"]) < 6 and len(ds.splits["test"]) == 4
    (out / "train.csv").write_text("image_id,labels\n9999,cat\n")
    from capnet.errors import DataError

    with pytest.raises(DataError, match="9999"):
        load_dataset("folder", folder_tree, split_dir=out)


@pytest.mark.parametrize("name,max_count", [("voc_lt", VOC_LT_MAX), ("coco_lt", COCO_LT_MAX)])
def test_dbs_own_files_follow_the_thresholds_and_the_reference(name, max_count):
    """DB's shipped groups are its thresholds on its counts, and its sorted counts stay near the reference."""
    freq = json.loads((REPO / "data/splits" / name / "class_freq.json").read_text())
    groups = json.loads((REPO / "data/splits" / name / "class_split.json").read_text())
    assert {g: sorted(v) for g, v in db_groups(np.array(list(freq.values())), list(freq)).items()} == \
        {g: sorted(v) for g, v in groups.items()}
    counts = np.sort(np.array(list(freq.values())))[::-1]
    ref = pareto_reference(len(counts), max_count)
    half = len(counts) // 2
    assert np.abs(counts[half:] - ref[half:]).max() <= (3 if name == "voc_lt" else 11)


def test_builder_on_dbs_voc_rows_gives_voc_lt_group_sizes():
    from capnet.data._files import read_classes, read_label_csv

    classes = read_classes(REPO / "data/splits/voc_lt/classes.txt")
    _, labels = read_label_csv(REPO / "data/splits/voc_lt/train.csv", classes)
    sel = select_longtail(np.tile(labels, (10, 1)), VOC_LT_MAX, seed=0)  # a stand-in pool: DB's rows x 10
    groups = db_groups(np.array(sel.counts), classes)
    assert [len(groups[g]) for g in ("head", "medium", "tail")] == [6, 6, 8]
    tail = np.sort(sel.counts)[::-1][10:]
    assert np.abs(tail - pareto_reference(20, VOC_LT_MAX)[10:]).max() <= 1


def test_a_missing_split_folder_names_the_command_that_writes_it(tmp_path, write_jpeg):
    from capnet.errors import DataError

    root = native_trees(tmp_path / "native", write_jpeg, n_train=4, n_test=2)["nus_wide"]
    with pytest.raises(DataError, match="capnet data lt-split"):
        load_dataset("nus_wide", root, split_dir=tmp_path / "nus_wide_lt")
