"""The bundled real data (data/voc_real_lt, data/splits) and ``capnet data stats``."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from capnet.cli import main
from capnet.data import load_dataset, load_image
from capnet.data._files import read_class_split, read_classes, read_label_csv

DATA = Path(__file__).resolve().parents[1] / "data"


@pytest.fixture(scope="module")
def voc_real_lt():
    return load_dataset("folder", DATA / "voc_real_lt")


def test_bundled_voc_real_lt(voc_real_lt):
    ds = voc_real_lt
    assert ds.num_classes == 16 and "aeroplane" not in ds.classes
    assert len(ds.splits["train"]) == 2400 and len(ds.splits["test"]) == 1026
    groups = ds.groups()
    assert [len(groups[g]) for g in ("head", "medium", "tail")] == [8, 4, 4]
    freq = ds.class_freq()
    recorded = json.loads((DATA / "voc_real_lt" / "class_freq.json").read_text())
    recorded = recorded if isinstance(recorded, dict) else dict(zip(ds.classes, recorded))
    assert {c: int(f) for c, f in zip(ds.classes, freq)} == {c: int(v) for c, v in recorded.items()}
    assert freq[groups["head"]].min() >= 100 and freq[groups["tail"]].max() < 20
    assert (ds.class_freq("test") >= 3).all()
    assert (ds.splits["train"].labels.sum(1) >= 1).all()
    im = load_image(ds.splits["test"].image_paths[0])
    assert im.mode == "RGB" and max(im.size) <= 224


def test_bundled_val_split(voc_real_lt):
    ds = voc_real_lt.with_val_split(0.15, seed=0)
    assert len(ds.splits["train"]) + len(ds.splits["val"]) == 2400
    assert 340 <= len(ds.splits["val"]) <= 380
    assert (ds.class_freq("val") >= 1).all()  # stratification reaches even the 5-image class
    assert [len(ds.groups()[g]) for g in ("head", "medium", "tail")] == [8, 4, 4]


@pytest.mark.parametrize("name, n_classes, n_train, n_test, sizes", [
    ("voc_lt", 20, 1142, 4952, [6, 6, 8]),
    ("coco_lt", 80, 1909, 5000, [22, 33, 25]),
])
def test_bundled_split_files(name, n_classes, n_train, n_test, sizes):
    folder = DATA / "splits" / name
    classes = read_classes(folder / "classes.txt")
    train_ids, train = read_label_csv(folder / "train.csv", classes)
    test_ids, test = read_label_csv(folder / "test.csv", classes)
    assert (len(classes), len(train_ids), len(test_ids)) == (n_classes, n_train, n_test)
    assert not set(train_ids) & set(test_ids)
    groups = read_class_split(folder / "class_split.json", classes)
    assert [len(groups[g]) for g in ("head", "medium", "tail")] == sizes
    freq = train.sum(0)
    index = {c: i for i, c in enumerate(classes)}
    assert all(freq[index[c]] >= 100 for c in groups["head"])
    assert all(freq[index[c]] < 20 for c in groups["tail"])


def test_cli_data_stats(capsys):
    assert main(["data", "stats", str(DATA / "voc_real_lt")]) == 0
    out = capsys.readouterr().out
    assert "train" in out and "2400" in out and "1026" in out
    assert "head 8, medium 4, tail 4" in out
    assert "imbalance ratio (max/min train count): 180.2" in out
    lines = out.splitlines()
    dog = next(line for line in lines if line.startswith("dog "))
    motorbike = next(line for line in lines if line.startswith("motorbike "))
    assert dog.split() == ["dog", "901", "388", "head"]
    assert lines.index(dog) < lines.index(motorbike)  # sorted by train frequency
    assert motorbike.split()[-1] == "tail"


def test_cli_data_stats_error(tmp_path, capsys):
    assert main(["data", "stats", str(tmp_path / "missing")]) == 1
    assert "not found" in capsys.readouterr().err
