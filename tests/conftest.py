"""Shared fixtures: tiny fake dataset trees written into tmp_path (no downloads)."""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Dict, Iterator, List

import pytest
from PIL import Image

FOLDER_CLASSES = ["cat", "dog", "person"]
FOLDER_ROWS: Dict[str, List[tuple]] = {  # image_id -> space-separated labels
    "train": [("0001", "cat"), ("0002", "dog person"), ("0003", "cat dog"), ("0004", ""),
              ("0005", "person"), ("0006", "cat person")],
    "test": [("0101", "dog"), ("0102", "cat"), ("0103", "person dog"), ("0104", "cat")],
}


def _write_jpeg(path: Path, seed: int = 0, size: int = 8, fmt: str = "JPEG") -> Path:
    """An RGB size x size image whose colour depends on seed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    colour = ((seed * 37) % 256, (seed * 91) % 256, (seed * 13) % 256)
    Image.new("RGB", (size, size), colour).save(path, format=fmt)
    return path


@pytest.fixture
def write_jpeg() -> Callable[..., Path]:
    """write_jpeg(path, seed=0, size=8, fmt="JPEG") -> path: a tiny real image file."""
    return _write_jpeg


def write_folder_tree(root: Path, rows: Dict[str, List[tuple]] = FOLDER_ROWS,
                      classes: List[str] = FOLDER_CLASSES) -> Path:
    """A folder-layout dataset (classes.txt, <split>.csv, images/<id>.jpg) under root."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "classes.txt").write_text("\n".join(classes) + "\n")
    k = 0
    for split, items in rows.items():
        lines = ["image_id,labels"] + [f"{i},{labels}" for i, labels in items]
        (root / f"{split}.csv").write_text("\n".join(lines) + "\n")
        for image_id, _ in items:
            _write_jpeg(root / "images" / f"{image_id}.jpg", seed=k)
            k += 1
    return root


@pytest.fixture
def folder_tree(tmp_path: Path) -> Path:
    """A 3-class folder dataset: 6 train / 4 test 8x8 JPEGs, ids with leading zeros."""
    return write_folder_tree(tmp_path / "tiny")


@pytest.fixture
def make_folder_tree() -> Callable[..., Path]:
    """make_folder_tree(root, rows=..., classes=...) -> root, for custom folder datasets."""
    return write_folder_tree


BUNDLED = Path(__file__).resolve().parents[1] / "data" / "voc_real_lt"
SMALL_REAL_CLASSES = ["cat", "dog", "person", "horse"]


def write_small_real_dataset(root: Path, n_train: int = 48, n_test: int = 24) -> Path:
    """A 4-class folder dataset of real bundled VOC images (first rows with a kept label)."""
    import csv
    import shutil

    (root / "images").mkdir(parents=True)
    (root / "classes.txt").write_text("\n".join(SMALL_REAL_CLASSES) + "\n")
    for split, n in (("train", n_train), ("test", n_test)):
        rows = []
        with open(BUNDLED / f"{split}.csv", newline="") as fh:
            for row in csv.DictReader(fh):
                labels = [c for c in row["labels"].split() if c in SMALL_REAL_CLASSES]
                if labels:
                    rows.append((row["image_id"], " ".join(labels)))
                if len(rows) == n:
                    break
        for image_id, _ in rows:
            shutil.copy(BUNDLED / "images" / f"{image_id}.jpg", root / "images" / f"{image_id}.jpg")
        (root / f"{split}.csv").write_text("image_id,labels\n" + "".join(f"{i},{l}\n" for i, l in rows))
    return root


@pytest.fixture(scope="session")
def small_real(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """48 train / 24 test real bundled images over 4 classes (cat, dog, person, horse)."""
    return write_small_real_dataset(tmp_path_factory.mktemp("data") / "small")


@pytest.fixture
def toy_random() -> Iterator[str]:
    """The tiny test backbone registered as ``toy.random`` in BACKBONES for this test only."""
    from toy_backbone import registered

    with registered() as name:
        yield name


# One intra-op thread: the test models are tiny, so threads only add overhead (and CI has 2 cores
# shared with DataLoader workers).
import torch  # noqa: E402

torch.set_num_threads(1)
