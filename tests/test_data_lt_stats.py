"""Long-tail statistics: counts, threshold groups, imbalance ratio, the text table."""
from __future__ import annotations

import math

import numpy as np
import pytest

from capnet.data import MultiLabelDataset, Split, assign_groups, class_freq, describe, imbalance_ratio


def test_class_freq_and_group_boundaries():
    labels = np.array([[1, 0, 1], [1, 0, 0], [0, 0, 1]], dtype=np.float32)
    np.testing.assert_array_equal(class_freq(labels), [2, 0, 2])
    groups = assign_groups(np.array([100, 99, 20, 19, 0, 500]))
    assert groups["head"].tolist() == [0, 5]
    assert groups["medium"].tolist() == [1, 2]
    assert groups["tail"].tolist() == [3, 4]
    with pytest.raises(ValueError):
        assign_groups(np.array([1]), head_min=10, tail_max=20)


def test_imbalance_ratio_ignores_empty_classes():
    assert imbalance_ratio(np.array([200, 0, 5, 10])) == 40.0
    assert math.isnan(imbalance_ratio(np.array([0, 0])))


def test_describe_threshold_groups():
    labels = np.zeros((120, 3), dtype=np.float32)
    labels[:, 0] = 1
    labels[:30, 1] = 1
    labels[:2, 2] = 1
    ids = [str(i) for i in range(120)]
    ds = MultiLabelDataset("toy", "/toy", ["a", "b", "c"], {"train": Split(ids, ids, labels)})
    text = describe(ds)
    assert "groups (train-count thresholds): head 1, medium 1, tail 1" in text
    assert "imbalance ratio (max/min train count): 60.0" in text
    rows = [line.split() for line in text.splitlines() if line[:2] in ("a ", "b ", "c ")]
    assert rows == [["a", "120", "head"], ["b", "30", "medium"], ["c", "2", "tail"]]
