"""The ``folder`` reader: the repository's own simple layout (used by data/voc_real_lt).

    root/classes.txt            one class name per line, in index order
    root/train.csv              image_id,labels  (labels: space-separated class names; empty = none)
    root/val.csv                optional, same columns
    root/test.csv               same columns
    root/class_split.json       optional {"head": [...], "medium": [...], "tail": [...]}
    root/images/<image_id>.jpg  (.jpeg / .png too, or image_id already carrying its extension)

Only the requested splits are read (``splits``; default: every CSV present), so a folder holding
just classes.txt, test.csv and images/ is a valid evaluation set.

With ``split_dir`` (a folder written by ``capnet data lt-split``): each split whose CSV is there
keeps only the listed images, and class_split.json is read from there.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional, Sequence

from capnet.data._files import (check_disjoint, listed_splits, read_class_split, read_classes, read_label_csv,
                                resolve_image, select_splits)
from capnet.data.base import MultiLabelDataset, Split
from capnet.errors import DataError
from capnet.registry import DATASETS

SPLITS = ("train", "val", "test")  # <name>.csv each


def read_split_csv(path: Path, classes: list, image_dir: Path) -> Split:
    """One ``image_id,labels`` CSV with its image files resolved under ``image_dir``."""
    ids, labels = read_label_csv(path, classes)
    paths = [resolve_image(image_dir, i, f"{path} (image '{i}')") for i in ids]
    return Split(ids, paths, labels)


@DATASETS.register("folder")
def build_folder(root: Path, split_dir: Optional[Path] = None,
                 splits: Optional[Sequence[str]] = None) -> MultiLabelDataset:
    """Read a folder-layout dataset (see the module docstring)."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"dataset folder not found: {root}")
    classes = read_classes(root / "classes.txt")
    image_dir = root / "images"
    if not image_dir.is_dir():
        raise DataError(f"image folder not found: {image_dir}")
    sources = {name: root / f"{name}.csv" for name in SPLITS}
    parts: Dict[str, Split] = {}
    for name in select_splits(splits, sources, str(root)):
        parts[name] = read_split_csv(sources[name], classes, image_dir)
    groups_file = root / "class_split.json"
    if split_dir is not None:
        parts, groups_file = listed_splits(parts, Path(split_dir), classes), Path(split_dir) / "class_split.json"
    check_disjoint({k: s.image_ids for k, s in parts.items()}, str(root))
    groups = read_class_split(groups_file, classes)
    return MultiLabelDataset(root.name, root, classes, parts, groups)
