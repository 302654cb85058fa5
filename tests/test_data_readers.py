"""The voc, coco and nus_wide readers on tiny fake trees of their native layouts."""
from __future__ import annotations

import json

import numpy as np
import pytest

from capnet.data import load_dataset
from capnet.data.voc import VOC_CLASSES
from capnet.errors import DataError

from _native_trees import coco_file, coco_val_only, voc_test_only, voc_xml, voc_year

# ----------------------------------------------------------------------------- VOC


@pytest.fixture
def voc_root(tmp_path, write_jpeg):
    root = tmp_path / "VOCdevkit"
    voc_year(root, "2007", {"trainval": ["000005", "000007"], "test": ["000001", "000002"]},
             {"000005": [("chair", 0), ("chair", 1)], "000007": [("car", 0)],
              "000001": [("dog", 0), ("person", 0)], "000002": [("train", 0), ("cat", 1)]}, write_jpeg)
    voc_year(root, "2012", {"trainval": ["2008_000008", "2008_000023"]},
             {"2008_000008": [("horse", 0), ("person", 0)], "2008_000023": [("bottle", 1), ("tvmonitor", 0)]},
             write_jpeg)
    return root


def _row(ds, split, image_id):
    s = ds.splits[split]
    return {ds.classes[j] for j in np.flatnonzero(s.labels[s.image_ids.index(image_id)])}


def test_voc_full(voc_root):
    ds = load_dataset("voc", voc_root)
    assert ds.classes == list(VOC_CLASSES) and ds.class_groups is None
    assert ds.splits["train"].image_ids == ["000005", "000007", "2008_000008", "2008_000023"]
    assert ds.splits["test"].image_ids == ["000001", "000002"]
    assert _row(ds, "train", "2008_000008") == {"horse", "person"}
    assert _row(ds, "test", "000002") == {"train", "cat"}  # difficult counted by default
    assert ds.splits["train"].image_paths[2] == voc_root / "VOC2012" / "JPEGImages" / "2008_000008.jpg"
    strict = load_dataset("voc", voc_root, include_difficult=False)
    assert _row(strict, "test", "000002") == {"train"}
    assert _row(strict, "train", "000005") == {"chair"}


def test_voc_lt_with_split_dir(voc_root, tmp_path):
    split = tmp_path / "voc_lt"
    split.mkdir()
    (split / "classes.txt").write_text("\n".join(VOC_CLASSES) + "\n")
    (split / "train.csv").write_text("image_id,labels\n2008_000023,bottle tvmonitor\n")
    (split / "test.csv").write_text("image_id,labels\n000001,dog person\n000002,cat train\n")
    (split / "class_split.json").write_text(json.dumps({"head": ["bottle"], "medium": [], "tail": ["tvmonitor"]}))
    ds = load_dataset("voc", voc_root, split_dir=split)
    assert ds.name == "voc_lt"
    assert ds.splits["train"].image_ids == ["2008_000023"] and len(ds.splits["test"]) == 2
    assert _row(ds, "train", "2008_000023") == {"bottle", "tvmonitor"}
    assert ds.groups()["tail"].tolist() == [VOC_CLASSES.index("tvmonitor")]
    with pytest.warns(UserWarning, match="differ from the XML"):
        load_dataset("voc", voc_root, split_dir=split, include_difficult=False)
    (split / "train.csv").write_text("image_id,labels\n2008_999999,cat\n")
    with pytest.raises(DataError, match="2008_999999.xml"):
        load_dataset("voc", voc_root, split_dir=split)


def test_voc_errors(voc_root, tmp_path):
    with pytest.raises(DataError, match="VOC2007"):
        load_dataset("voc", tmp_path)
    (voc_root / "VOC2007" / "JPEGImages" / "000002.jpg").unlink()
    with pytest.raises(DataError, match="000002.jpg"):
        load_dataset("voc", voc_root)
    (voc_root / "VOC2007" / "Annotations" / "000007.xml").write_text(voc_xml([("unicorn", 0)]))
    with pytest.raises(DataError, match="000007.xml.*unicorn"):
        load_dataset("voc", voc_root)


# ---------------------------------------------------------------------------- COCO

@pytest.fixture
def coco_root(tmp_path, write_jpeg):
    root = tmp_path / "coco"
    coco_file(root, "train2017", {9: None, 25: None, 30: None}, [(9, 1), (9, 10), (25, 3), (25, 3)], write_jpeg)
    coco_file(root, "val2017", {139: None, 285: None}, [(139, 1)], write_jpeg)
    return root


def test_coco_full(coco_root):
    ds = load_dataset("coco", coco_root)
    assert ds.classes == ["person", "car", "traffic_light"]
    assert ds.splits["train"].image_ids == ["9", "25", "30"]
    np.testing.assert_array_equal(ds.splits["train"].labels, [[1, 0, 1], [0, 1, 0], [0, 0, 0]])
    np.testing.assert_array_equal(ds.splits["test"].labels, [[1, 0, 0], [0, 0, 0]])  # 285: no annotation
    assert ds.splits["test"].image_paths[1] == coco_root / "val2017" / "000000000285.jpg"


def test_coco_lt_with_split_dir(coco_root, tmp_path):
    split = tmp_path / "coco_lt"
    split.mkdir()
    (split / "classes.txt").write_text("person\ncar\ntraffic_light\n")
    (split / "train.csv").write_text("image_id,labels\n25,car\n9,person traffic_light\n")
    (split / "test.csv").write_text("image_id,labels\n285,\n")
    ds = load_dataset("coco", coco_root, split_dir=split)
    assert ds.splits["train"].image_ids == ["25", "9"] and ds.splits["test"].image_ids == ["285"]
    np.testing.assert_array_equal(ds.splits["train"].labels, [[0, 1, 0], [1, 0, 1]])
    assert ds.splits["test"].labels.sum() == 0
    (split / "test.csv").write_text("image_id,labels\n9,\n")  # a train2017 id is not in val2017
    with pytest.raises(DataError, match="'9' is not in .*instances_val2017.json"):
        load_dataset("coco", coco_root, split_dir=split)
    (split / "classes.txt").write_text("person\ncar\ntraffic light\n")
    with pytest.raises(DataError, match="classes differ"):
        load_dataset("coco", coco_root, split_dir=split)


# ------------------------------------------------------------------------ NUS-WIDE


@pytest.fixture
def nus_root(tmp_path, write_jpeg):
    root = tmp_path / "nus"
    concepts = ["airport", "animal", "beach"]
    (root / "ImageList").mkdir(parents=True)
    (root / "Concepts81.txt").write_text("\n".join(concepts) + "\n")
    lists = {"Train": ["actor\\0001_11.jpg", "beach\\0002_12.jpg", "beach\\0003_13.jpg"], "Test": ["zoo\\0004_14.jpg"]}
    labels = {"Train": {"airport": "1 0 0", "animal": "1 0 1", "beach": "0 1 0"},
              "Test": {"airport": "0", "animal": "1", "beach": "1"}}
    gt = root / "Groundtruth" / "TrainTestLabels"
    gt.mkdir(parents=True)
    for tag, items in lists.items():
        (root / "ImageList" / f"{tag}Imagelist.txt").write_text("\r\n".join(items) + "\r\n")
        for k, item in enumerate(items):
            write_jpeg(root / "Flickr" / item.replace("\\", "/"), seed=k)
        for concept, values in labels[tag].items():
            (gt / f"Labels_{concept}_{tag}.txt").write_text("\n".join(values.split()) + "\n")
    return root


def test_nus_wide(nus_root):
    ds = load_dataset("nus_wide", nus_root)
    assert ds.classes == ["airport", "animal", "beach"]
    assert ds.splits["train"].image_ids == ["actor/0001_11.jpg", "beach/0002_12.jpg", "beach/0003_13.jpg"]
    np.testing.assert_array_equal(ds.splits["train"].labels, [[1, 1, 0], [0, 0, 1], [0, 1, 0]])
    np.testing.assert_array_equal(ds.splits["test"].labels, [[0, 1, 1]])
    assert ds.splits["test"].image_paths[0] == nus_root / "Flickr" / "zoo" / "0004_14.jpg"


def test_nus_wide_missing_images_and_bad_labels(nus_root, caplog):
    (nus_root / "Flickr" / "beach" / "0002_12.jpg").unlink()
    with pytest.raises(DataError, match="1 of 3 images are missing.*0002_12.jpg"):
        load_dataset("nus_wide", nus_root)
    with caplog.at_level("WARNING", logger="capnet.data.nus_wide"):
        ds = load_dataset("nus_wide", nus_root, drop_missing=True)
    assert "dropped 1 of 3" in caplog.text
    assert [p.name for p, _ in ds.dropped] == ["0002_12.jpg"]
    assert ds.splits["train"].image_ids == ["actor/0001_11.jpg", "beach/0003_13.jpg"]
    np.testing.assert_array_equal(ds.splits["train"].labels, [[1, 1, 0], [0, 1, 0]])
    label_file = nus_root / "Groundtruth" / "TrainTestLabels" / "Labels_beach_Train.txt"
    label_file.write_text("0\n1\n")
    with pytest.raises(DataError, match="Labels_beach_Train.txt: 2 labels for 3 images"):
        load_dataset("nus_wide", nus_root, drop_missing=True)


# ------------------------------------------------------------- only the splits asked for


def test_voc_2007_test_only_tree(tmp_path, write_jpeg):
    root = voc_test_only(tmp_path / "VOCdevkit", write_jpeg)
    ds = load_dataset("voc", root)
    assert list(ds.splits) == ["test"] and ds.splits["test"].image_ids == ["000001", "000002", "000004"]
    assert _row(ds, "test", "000002") == {"motorbike", "person"}
    assert list(load_dataset("voc", root, splits=("test",)).splits) == ["test"]
    with pytest.raises(DataError, match=r"VOC2007/ImageSets/Main/trainval.txt"):
        load_dataset("voc", root, splits=("train", "test"))
    with pytest.raises(DataError, match=r"no split 'val' in this layout \(it has: train, test\)"):
        load_dataset("voc", root, splits=("val",))


def test_voc_lt_reads_only_the_requested_split(voc_root, tmp_path):
    import shutil

    split = tmp_path / "voc_lt"
    split.mkdir()
    (split / "classes.txt").write_text("\n".join(VOC_CLASSES) + "\n")
    (split / "test.csv").write_text("image_id,labels\n000001,dog person\n")
    shutil.rmtree(voc_root / "VOC2012")  # test needs VOC2007 only
    ds = load_dataset("voc", voc_root, split_dir=split, splits=("test",))
    assert list(ds.splits) == ["test"] and ds.splits["test"].image_ids == ["000001"]
    with pytest.raises(DataError, match=r"voc_lt/train.csv"):
        load_dataset("voc", voc_root, split_dir=split, splits=("train",))


def test_coco_val_only_tree(tmp_path, write_jpeg):
    root = coco_val_only(tmp_path / "coco", write_jpeg)
    ds = load_dataset("coco", root)
    assert list(ds.splits) == ["test"] and ds.classes == ["person", "car", "traffic_light"]
    np.testing.assert_array_equal(ds.splits["test"].labels, [[1, 0, 0], [0, 1, 0], [1, 0, 1]])
    with pytest.raises(DataError, match=r"instances_train2017.json"):
        load_dataset("coco", root, splits=("train",))


def test_coco_lt_test_list_needs_only_val2017(coco_root, tmp_path):
    import shutil

    split = tmp_path / "coco_lt"
    split.mkdir()
    (split / "classes.txt").write_text("person\ncar\ntraffic_light\n")
    (split / "test.csv").write_text("image_id,labels\n139,person\n")
    shutil.rmtree(coco_root / "train2017")
    (coco_root / "annotations" / "instances_train2017.json").unlink()
    ds = load_dataset("coco", coco_root, split_dir=split)
    assert list(ds.splits) == ["test"] and ds.splits["test"].image_ids == ["139"]


def test_nus_wide_test_only(nus_root):
    (nus_root / "ImageList" / "TrainImagelist.txt").unlink()
    ds = load_dataset("nus_wide", nus_root)
    assert list(ds.splits) == ["test"]
    with pytest.raises(DataError, match="TrainImagelist.txt"):
        load_dataset("nus_wide", nus_root, splits=("train",))
