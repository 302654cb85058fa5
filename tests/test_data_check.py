"""Pre-flight image check and run-to-data class matching (the library side of data check / eval)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from capnet.data import check_images, drop_images, load_dataset, match_classes
from capnet.data.class_match import normalise_class_name
from capnet.errors import DataError


def _bad_files(tmp_path: Path, write_jpeg) -> tuple:
    good = write_jpeg(tmp_path / "good.jpg", size=64)
    data = good.read_bytes()
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(data[: len(data) // 2])
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    text = tmp_path / "text.png"
    text.write_text("not an image")
    return good, cut, empty, text


def test_check_images_reports_every_bad_file_with_a_reason(tmp_path, write_jpeg):
    good, cut, empty, text = _bad_files(tmp_path, write_jpeg)
    missing = tmp_path / "missing.jpg"
    found = dict(check_images([good, cut, empty, text, missing, cut], workers=2))
    assert set(found) == {cut, empty, text, missing}  # every one at once, duplicates once
    assert "truncated" in found[cut].lower()
    assert found[empty] == "empty file (0 bytes)"
    assert "not an image" in found[text]
    assert found[missing] == "image file not found"
    assert check_images([]) == []


def test_drop_images_keeps_the_groups_of_the_full_data(folder_tree):
    ds = load_dataset("folder", folder_tree)
    before = {g: v.tolist() for g, v in ds.groups().items()}
    bad = [ds.splits["train"].image_paths[0], ds.splits["test"].image_paths[1]]
    kept = drop_images(ds, bad)
    assert kept.splits["train"].image_ids == ["0002", "0003", "0004", "0005", "0006"]
    assert kept.splits["test"].image_ids == ["0101", "0103", "0104"]
    np.testing.assert_array_equal(kept.splits["test"].labels, ds.splits["test"].labels[[0, 2, 3]])
    assert {g: v.tolist() for g, v in kept.groups().items()} == before


def test_class_names_match_after_normalising_case_spaces_underscores():
    assert normalise_class_name("Dining_Table") == normalise_class_name("dining table") == "diningtable"
    m = match_classes(["person", "motorcycle", "dining_table", "cat"], ["Person", "diningtable", "dog", "motorbike"],
                      {"motorcycle": "motorbike"})
    assert m.run_index == [0, 1, 2] and m.data_index == [0, 3, 1]
    assert m.absent == ["cat"] and m.unknown == ["dog"]
    assert m.renamed == {"person": "Person", "motorcycle": "motorbike", "dining_table": "diningtable"}


@pytest.mark.parametrize("run, data, class_map, match", [
    (["cat", "dog"], ["car", "bus"], None, r"none of the run's 2 classes \(cat, dog\).*car, bus.*run_name=data_name"),
    (["cat"], ["cat"], {"kat": "cat"}, r"class map kat=cat: 'kat' is not a class of the run; did you mean 'cat'"),
    (["cat"], ["cat"], {"cat": "dgo"}, r"class map cat=dgo: 'dgo' is not a class of"),
    (["cat"], ["dining_table", "diningtable"], None, r"'dining_table' and 'diningtable' are the same name"),
    (["cat", "kitty"], ["cat"], {"kitty": "cat"}, r"run classes 'cat' and 'kitty' both match 'cat'"),
])
def test_class_match_errors(run, data, class_map, match):
    with pytest.raises(DataError, match=match):
        match_classes(run, data, class_map)


def test_preflight_memory_of_good_images_is_per_pixel_limit(folder_tree, tmp_path):
    """An image that decoded under Pillow's limit is checked again under a lower data.max_image_pixels
    (the loader would reject it mid-run), not skipped as remembered-good."""
    from capnet.data import set_max_image_pixels
    from capnet.data.check import BadImagesError, preflight_images

    ds = load_dataset("folder", folder_tree)
    cache = tmp_path / "cache"
    try:
        assert preflight_images(ds, False, cache)[1] == []  # all good, remembered in the cache
        set_max_image_pixels(8)  # the 8x8 images are now decompression bombs (> 2x the limit)
        with pytest.raises(BadImagesError):
            preflight_images(ds, False, cache)
    finally:
        set_max_image_pixels(None)
