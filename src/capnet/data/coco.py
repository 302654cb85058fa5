"""The ``coco`` reader: MS COCO 2017, full or long-tailed (COCO-LT).

    root/annotations/instances_train2017.json, instances_val2017.json
    root/train2017/<file_name>, root/val2017/<file_name>

Classes are the 80 categories in category-id order, spaces replaced by "_" (traffic_light).
Without ``split_dir``: train = train2017, test = val2017. With ``split_dir`` (e.g.
data/splits/coco_lt: classes.txt, train.csv, test.csv, class_split.json): the listed integer
ids select train2017 (train) and val2017 (test) images, as in DistributionBalancedLoss.
Only the requested splits are read (default: those whose annotation file / CSV exists), so a
root holding only ``val2017/`` and ``instances_val2017.json`` is a valid evaluation set.
A class is positive when the image has any instance of it (crowd instances included, as in
ML-GCN); an image without annotations has an empty label row.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from capnet.data._files import check_disjoint, read_class_split, read_classes, read_label_csv, read_text, select_splits
from capnet.data.base import MultiLabelDataset, Split
from capnet.errors import DataError
from capnet.registry import DATASETS

SUBSETS = {"train": "train2017", "test": "val2017"}


class CocoIndex:
    """One instances_*.json reduced to class names, file names and per-image label sets."""

    def __init__(self, path: Path) -> None:
        if not path.is_file():
            raise DataError(f"COCO annotation file not found: {path}")
        try:
            raw = json.loads(read_text(path))
        except json.JSONDecodeError as err:
            raise DataError(f"{path}: not valid JSON: {err}") from None
        try:
            cats = sorted(raw["categories"], key=lambda c: c["id"])
            self.classes = [c["name"].replace(" ", "_") for c in cats]
            column = {c["id"]: k for k, c in enumerate(cats)}
            self.files: Dict[str, str] = {str(im["id"]): im["file_name"] for im in raw["images"]}
            self.positives: Dict[str, set] = {i: set() for i in self.files}
            for ann in raw["annotations"]:
                self.positives[str(ann["image_id"])].add(column[ann["category_id"]])
        except (KeyError, TypeError) as err:
            raise DataError(f"{path}: not a COCO instances file (missing or unknown key/id {err})") from None
        self.path = path

    def split(self, image_dir: Path, ids: Sequence[str], num_classes: int) -> Split:
        """Split over ``ids``; an id not in the file or a missing image is an error."""
        labels = np.zeros((len(ids), num_classes), dtype=np.float32)
        paths = []
        for r, image_id in enumerate(ids):
            if image_id not in self.files:
                raise DataError(f"image id '{image_id}' is not in {self.path}")
            labels[r, sorted(self.positives[image_id])] = 1.0
            path = image_dir / self.files[image_id]
            if not path.is_file():
                raise DataError(f"COCO image not found: {path} (id '{image_id}')")
            paths.append(path)
        return Split(list(ids), paths, labels)


def _normalise_id(image_id: str, where: str) -> str:
    try:
        return str(int(image_id))
    except ValueError:
        raise DataError(f"{where}: COCO image id '{image_id}' is not an integer") from None


def _ids_from_csv(path: Path, classes: List[str]) -> Tuple[List[str], np.ndarray]:
    ids, listed = read_label_csv(path, classes)
    return [_normalise_id(i, str(path)) for i in ids], listed


@DATASETS.register("coco")
def build_coco(root: Path, split_dir: Optional[Path] = None,
               splits: Optional[Sequence[str]] = None) -> MultiLabelDataset:
    """Read COCO 2017 or, with ``split_dir``, COCO-LT (see the module docstring)."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"COCO folder not found: {root}")
    annotations = {k: root / "annotations" / f"instances_{sub}.json" for k, sub in SUBSETS.items()}
    lists = None if split_dir is None else {k: Path(split_dir) / f"{k}.csv" for k in SUBSETS}
    wanted = select_splits(splits, lists or annotations, str(split_dir or root))
    indices = {k: CocoIndex(annotations[k]) for k in wanted}
    classes = indices[wanted[0]].classes
    if any(idx.classes != classes for idx in indices.values()):
        raise DataError(f"{root}/annotations: train and val files list different categories")
    groups = None
    if lists is None:
        ids = {k: sorted(idx.files, key=int) for k, idx in indices.items()}
        name = root.name
    else:
        split_dir = Path(split_dir)
        listed_classes = read_classes(split_dir / "classes.txt")
        if listed_classes != classes:
            raise DataError(
                f"{split_dir / 'classes.txt'}: classes differ from the COCO categories of {root} "
                "(expected the 80 category names in id order, spaces as '_')"
            )
        ids = {k: _ids_from_csv(lists[k], classes)[0] for k in wanted}
        groups = read_class_split(split_dir / "class_split.json", classes)
        name = split_dir.name
    parts = {k: indices[k].split(root / SUBSETS[k], ids[k], len(classes)) for k in wanted}
    check_disjoint({k: s.image_ids for k, s in parts.items()}, str(root))
    return MultiLabelDataset(name, root, classes, parts, groups)
