"""The ``nus_wide`` reader: NUS-WIDE in its standard distribution layout (81 concepts).

Assumed layout (as distributed by NUS, with the images downloaded from Flickr):

    root/Concepts81.txt                                  one concept name per line (class order)
    root/ImageList/TrainImagelist.txt, TestImagelist.txt  one image per line, Windows separators,
                                                          e.g. ``actor\\0001_2124494179.jpg``
    root/Groundtruth/TrainTestLabels/Labels_<concept>_Train.txt, ..._Test.txt
                                                          one 0/1 per line, aligned with the list
    root/Flickr/<folder>/<file>                           the images

Image ids are the list entries with ``/`` separators (``actor/0001_2124494179.jpg``).
Many Flickr images are no longer downloadable; a missing image is an error unless
``drop_missing=True`` (``data.reader_options: {drop_missing: true}``, the default of
configs/data/nus_wide.yaml), which drops those rows, logs their number and lists them in the
dataset's ``dropped`` (a training run writes them to ``dropped_images.txt``).
Images with no positive concept are kept (empty label row).

With ``split_dir`` (a folder written by ``capnet data lt-split``, e.g. a DB-style long-tailed
train subset; configs/data/nus_wide.yaml documents the command): each split whose CSV is there
keeps only the listed images (labels from the ground-truth files), groups from its class_split.json.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np

from capnet.data._files import check_disjoint, listed_splits, read_class_split, read_classes, read_text, select_splits
from capnet.data.base import MultiLabelDataset, Split
from capnet.errors import DataError
from capnet.registry import DATASETS

SPLIT_FILES = {"train": "Train", "test": "Test"}
MISSING = "image file not found (dropped: data.reader_options.drop_missing)"

log = logging.getLogger(__name__)


def read_image_list(path: Path) -> List[str]:
    """Image ids (posix relative paths) of an ImageList file."""
    if not path.is_file():
        raise DataError(f"NUS-WIDE image list not found: {path}")
    return [line.strip().replace("\\", "/") for line in read_text(path).splitlines() if line.strip()]


def read_concept_labels(path: Path, n: int) -> np.ndarray:
    """One concept's 0/1 column; its length must match the image list."""
    if not path.is_file():
        raise DataError(f"NUS-WIDE label file not found: {path}")
    values = [line.strip() for line in read_text(path).splitlines() if line.strip()]
    if len(values) != n:
        raise DataError(f"{path}: {len(values)} labels for {n} images in the image list")
    bad = next((k for k, v in enumerate(values) if v not in ("0", "1")), None)
    if bad is not None:
        raise DataError(f"{path}:{bad + 1}: expected 0 or 1, got '{values[bad]}'")
    return np.array(values, dtype=np.float32)


def read_nus_split(root: Path, classes: List[str], tag: str, drop_missing: bool,
                   dropped: Optional[List[Tuple[Path, str]]] = None) -> Split:
    """One split: image list, the 81 label columns, image files under Flickr/ (missing ones
    appended to ``dropped`` when ``drop_missing``)."""
    ids = read_image_list(root / "ImageList" / f"{tag}Imagelist.txt")
    label_dir = root / "Groundtruth" / "TrainTestLabels"
    labels = np.stack([read_concept_labels(label_dir / f"Labels_{c}_{tag}.txt", len(ids)) for c in classes], axis=1)
    paths = [root / "Flickr" / i for i in ids]
    exists = np.array([p.is_file() for p in paths], dtype=bool)
    if not exists.all():
        missing = int((~exists).sum())
        example = paths[int(np.flatnonzero(~exists)[0])]
        if not drop_missing:
            raise DataError(
                f"NUS-WIDE {tag}: {missing} of {len(ids)} images are missing, e.g. {example} "
                "(set data.reader_options.drop_missing=true to train without them)"
            )
        log.warning("NUS-WIDE %s: dropped %d of %d images missing under %s", tag, missing, len(ids), root / "Flickr")
        if dropped is not None:
            dropped.extend((paths[k], MISSING) for k in np.flatnonzero(~exists))
    keep = np.flatnonzero(exists)
    return Split([ids[k] for k in keep], [paths[k] for k in keep], labels[keep])


@DATASETS.register("nus_wide")
def build_nus_wide(root: Path, split_dir: Optional[Path] = None, drop_missing: bool = False,
                   splits: Optional[Sequence[str]] = None) -> MultiLabelDataset:
    """Read NUS-WIDE (see the module docstring for the layout)."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"NUS-WIDE folder not found: {root}")
    classes = read_classes(root / "Concepts81.txt")
    sources = {k: root / "ImageList" / f"{tag}Imagelist.txt" for k, tag in SPLIT_FILES.items()}
    dropped: List[Tuple[Path, str]] = []
    parts = {k: read_nus_split(root, classes, SPLIT_FILES[k], drop_missing, dropped)
             for k in select_splits(splits, sources, str(root))}
    for key, split in parts.items():
        if len(set(split.image_ids)) != len(split):
            raise DataError(f"NUS-WIDE {key}: the image list has duplicate entries")
    groups = None
    if split_dir is not None:
        parts = listed_splits(parts, Path(split_dir), classes, allow_missing=drop_missing)
        groups = read_class_split(Path(split_dir) / "class_split.json", classes)
    check_disjoint({k: s.image_ids for k, s in parts.items()}, str(root))
    return MultiLabelDataset(root.name, root, classes, parts, groups, dropped=dropped)
