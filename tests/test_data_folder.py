"""The folder reader, the in-memory dataset API and load_image on tiny fake trees."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from capnet.data import DATASETS, ImageDataset, MultiLabelDataset, Split, load_dataset, load_image
from capnet.errors import DataError


def test_folder_reads_classes_ids_labels(folder_tree):
    ds = load_dataset("folder", folder_tree)
    assert ds.classes == ["cat", "dog", "person"] and ds.num_classes == 3
    train = ds.splits["train"]
    assert train.image_ids[:2] == ["0001", "0002"]  # leading zeros kept
    assert train.labels.dtype == np.float32 and train.labels.shape == (6, 3)
    np.testing.assert_array_equal(train.labels[1], [0, 1, 1])
    np.testing.assert_array_equal(train.labels[3], [0, 0, 0])  # empty labels
    assert train.image_paths[0] == folder_tree / "images" / "0001.jpg"
    assert set(ds.splits) == {"train", "test"} and len(ds.splits["test"]) == 4
    np.testing.assert_array_equal(ds.class_freq(), [3, 2, 3])
    np.testing.assert_array_equal(ds.class_freq("test"), [2, 2, 1])


def test_groups_thresholds_without_class_split(folder_tree):
    groups = load_dataset("folder", folder_tree).groups()
    assert list(groups) == ["head", "medium", "tail"]
    assert groups["head"].size == 0 and groups["medium"].size == 0
    np.testing.assert_array_equal(groups["tail"], [0, 1, 2])


def test_class_split_json_and_png_and_val(folder_tree, write_jpeg):
    (folder_tree / "class_split.json").write_text(json.dumps({"head": ["cat"], "medium": ["dog"], "tail": ["person"]}))
    (folder_tree / "val.csv").write_text("image_id,labels\nv1.png,dog\n")
    write_jpeg(folder_tree / "images" / "v1.png", fmt="PNG")
    (folder_tree / "images" / "0001.jpg").rename(folder_tree / "images" / "0001.jpeg")
    ds = load_dataset("folder", folder_tree)
    assert ds.splits["val"].image_ids == ["v1.png"]
    assert ds.splits["train"].image_paths[0].name == "0001.jpeg"
    g = ds.groups()
    assert [g[k].tolist() for k in ("head", "medium", "tail")] == [[0], [1], [2]]


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda r: (r / "classes.txt").unlink(), "classes.txt"),
        (lambda r: (r / "test.csv").unlink(), "test.csv"),
        (lambda r: (r / "train.csv").write_text("image_id,labels\n0001,cta\n"), r"train.csv:2.*'cta'.*did you mean 'cat'"),
        (lambda r: (r / "train.csv").write_text("image_id,labels\n0001,cat,dog\n"), r"train.csv:2: expected 2 columns"),
        (lambda r: (r / "train.csv").write_text("id,labels\n0001,cat\n"), r"train.csv:1: header"),
        (lambda r: (r / "train.csv").write_text("image_id,labels\n0001,cat\n0001,dog\n"), r"duplicate image id '0001'"),
        (lambda r: (r / "images" / "0102.jpg").unlink(), r"test.csv.*'0102'"),
        (lambda r: (r / "test.csv").write_text("image_id,labels\n0001,cat\n"), r"both 'train' and 'test'.*'0001'"),
        (lambda r: (r / "class_split.json").write_text('{"head": ["cow"]}'), r"class_split.json.*'cow'"),
    ],
)
def test_folder_errors_name_the_fault(folder_tree, mutate, match):
    mutate(folder_tree)
    with pytest.raises(DataError, match=match):
        load_dataset("folder", folder_tree, splits=("train", "test"))  # what training reads


def test_unknown_reader_and_missing_root(tmp_path):
    with pytest.raises(DataError, match="did you mean 'folder'|Did you mean 'folder'"):
        load_dataset("foldr", tmp_path)
    with pytest.raises(DataError, match="not found"):
        load_dataset("folder", tmp_path / "nope")


def test_every_registered_reader_is_callable():
    assert {"folder", "voc", "coco", "nus_wide"} <= set(DATASETS.names())


def _dataset(n: int = 60, seed: int = 0) -> MultiLabelDataset:
    rng = np.random.default_rng(seed)
    labels = (rng.random((n, 4)) < [0.6, 0.3, 0.15, 0.05]).astype(np.float32)
    labels[0] = 1  # every class has a positive
    ids = [f"{i:04d}" for i in range(n)]
    train = Split(ids, [f"/x/{i}.jpg" for i in ids], labels)
    test = Split(["t0"], ["/x/t0.jpg"], np.ones((1, 4)))
    return MultiLabelDataset("synthetic", "/x", ["a", "b", "c", "d"], {"train": train, "test": test})


def test_with_val_split_is_deterministic_disjoint_and_keeps_groups():
    ds = _dataset(200)
    groups_before = {k: v.tolist() for k, v in ds.groups().items()}
    a, b = ds.with_val_split(0.25, seed=3), ds.with_val_split(0.25, seed=3)
    assert a.splits["val"].image_ids == b.splits["val"].image_ids
    tr, va = set(a.splits["train"].image_ids), set(a.splits["val"].image_ids)
    assert not tr & va and tr | va == set(ds.splits["train"].image_ids)
    assert abs(len(va) - 50) <= 2
    assert a.splits["test"] is ds.splits["test"] and len(ds.splits["train"]) == 200  # original untouched
    assert {k: v.tolist() for k, v in a.groups().items()} == groups_before
    # stratified: class shares in val close to train's
    share_val = a.splits["val"].labels.mean(0)
    share_all = ds.splits["train"].labels.mean(0)
    assert np.abs(share_val - share_all).max() < 0.05
    other = ds.with_val_split(0.25, seed=4)
    assert other.splits["val"].image_ids != a.splits["val"].image_ids
    assert ds.with_val_split(0.0, seed=0) is ds
    assert a.with_val_split(0.5, seed=0) is a  # an existing val split is kept
    with pytest.raises(DataError, match=r"\[0, 1\)"):
        ds.with_val_split(1.0, seed=0)


def test_split_and_dataset_shape_checks():
    with pytest.raises(DataError, match="disagree"):
        Split(["a", "b"], ["/a"], np.zeros((2, 3)))
    with pytest.raises(DataError, match="label columns"):
        MultiLabelDataset("x", "/x", ["a"], {"train": Split(["a"], ["/a"], np.zeros((1, 2)))})


def test_image_dataset_items(folder_tree):
    split = load_dataset("folder", folder_tree).splits["train"]
    ds = ImageDataset(split, lambda im: torch.tensor(np.asarray(im), dtype=torch.float32))
    assert len(ds) == 6
    image, target, index = ds[2]
    assert image.shape == (8, 8, 3) and index == 2
    assert target.dtype == torch.float32 and target.tolist() == [1.0, 1.0, 0.0]


def test_load_image_rgb_and_errors(tmp_path, write_jpeg):
    gray = tmp_path / "g.png"
    from PIL import Image

    Image.new("L", (5, 4), 7).save(gray)
    im = load_image(gray)
    assert im.mode == "RGB" and im.size == (5, 4)
    with pytest.raises(DataError, match="not found.*missing.jpg"):
        load_image(tmp_path / "missing.jpg")
    bad = tmp_path / "corrupt.jpg"
    bad.write_bytes(b"not an image at all")
    with pytest.raises(DataError, match="corrupt.jpg"):
        load_image(bad)
    big = write_jpeg(tmp_path / "big.jpg", seed=5, size=64)
    data = big.read_bytes()
    cut = tmp_path / "truncated.jpg"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="truncated.jpg"):
        load_image(cut)


def test_test_only_folder_reads_just_test(folder_tree):
    (folder_tree / "train.csv").unlink()
    ds = load_dataset("folder", folder_tree)
    assert list(ds.splits) == ["test"] and len(ds.splits["test"]) == 4
    assert not ds.has_groups
    with pytest.raises(DataError, match="no train split"):
        ds.groups()
    with pytest.raises(DataError, match=r"train.csv"):
        load_dataset("folder", folder_tree, splits=("train", "test"))
    (folder_tree / "train.csv").write_text("image_id,labels\n0001,cat\n")  # present but not asked for
    (folder_tree / "images" / "0001.jpg").unlink()
    assert list(load_dataset("folder", folder_tree, splits=("test",)).splits) == ["test"]


def test_excel_csv_utf8_bom_and_crlf(folder_tree):
    bom = "\ufeff"
    (folder_tree / "classes.txt").write_text(bom + "cat\r\ndog\r\nperson\r\n", newline="")
    (folder_tree / "test.csv").write_text(bom + "image_id,labels\r\n0101,dog\r\n0102,cat person\r\n", newline="")
    (folder_tree / "class_split.json").write_text(bom + '{"head": ["cat"], "medium": [], "tail": ["dog", "person"]}')
    ds = load_dataset("folder", folder_tree)
    assert ds.classes == ["cat", "dog", "person"]
    assert ds.splits["test"].image_ids == ["0101", "0102"]
    np.testing.assert_array_equal(ds.splits["test"].labels, [[0, 1, 0], [1, 0, 1]])
    assert ds.groups()["head"].tolist() == [0]


def test_a_csv_in_another_encoding_names_the_file(folder_tree):
    (folder_tree / "test.csv").write_bytes("image_id,labels\n0101,dog\n0102,caf\xe9\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"test.csv: not UTF-8 text .*save it as UTF-8"):
        load_dataset("folder", folder_tree)
