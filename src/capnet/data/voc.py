"""The ``voc`` reader: a PASCAL VOC ``VOCdevkit`` folder, full or long-tailed (VOC-LT).

    root/VOC2007/{Annotations/<id>.xml, ImageSets/Main/{trainval,test}.txt, JPEGImages/<id>.jpg}
    root/VOC2012/{Annotations, ImageSets/Main/trainval.txt, JPEGImages}   (optional)

Without ``split_dir``: train = VOC2007 trainval (+ VOC2012 trainval when present), test =
VOC2007 test. With ``split_dir`` (e.g. data/splits/voc_lt: classes.txt, train.csv, test.csv,
class_split.json): VOC-LT as in DistributionBalancedLoss, train = the listed VOC2012 trainval
ids, test = the listed VOC2007 test ids, groups from class_split.json. A train id that only
VOC2007 has is read from there (a ``capnet data lt-split`` of the full VOC2007 + 2012 trainval).

Only the requested splits are read (default: those whose image set / CSV exists), so a
VOCdevkit holding only VOC2007 test is a valid evaluation set.

Labels always come from the XML annotations: a class is positive when the image has any
object of it. ``include_difficult=True`` (default) counts objects flagged difficult too;
False ignores them (the official VOC classification ground truth marks such images 0).
"""
from __future__ import annotations

import warnings
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from capnet.data._files import check_disjoint, read_class_split, read_classes, read_label_csv, read_text, select_splits
from capnet.data.base import MultiLabelDataset, Split
from capnet.errors import DataError
from capnet.registry import DATASETS

VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)  # the standard order


def read_id_list(path: Path) -> List[str]:
    """Image ids of an ImageSets/Main/<set>.txt file (first token of each line)."""
    if not path.is_file():
        raise DataError(f"VOC image set not found: {path}")
    return [line.split()[0] for line in read_text(path).splitlines() if line.strip()]


def parse_annotation(path: Path, include_difficult: bool) -> List[str]:
    """Class names of the objects in one VOC XML annotation."""
    if not path.is_file():
        raise DataError(f"VOC annotation not found: {path}")
    try:
        tree = ET.parse(path)
    except ET.ParseError as err:
        raise DataError(f"{path}: malformed XML: {err}") from None
    names = []
    for obj in tree.getroot().iter("object"):
        name = (obj.findtext("name") or "").strip()
        difficult = (obj.findtext("difficult") or "0").strip() == "1"
        if include_difficult or not difficult:
            names.append(name)
    return names


def read_voc_split(year_dir: Path, ids: Sequence[str], include_difficult: bool) -> Split:
    """Split over ``ids`` of one VOC year: labels from Annotations, images from JPEGImages."""
    index = {c: i for i, c in enumerate(VOC_CLASSES)}
    labels = np.zeros((len(ids), len(VOC_CLASSES)), dtype=np.float32)
    paths = []
    for r, image_id in enumerate(ids):
        xml = year_dir / "Annotations" / f"{image_id}.xml"
        for name in parse_annotation(xml, include_difficult):
            if name not in index:
                raise DataError(f"{xml}: unknown VOC class '{name}'")
            labels[r, index[name]] = 1.0
        image = year_dir / "JPEGImages" / f"{image_id}.jpg"
        if not image.is_file():
            raise DataError(f"VOC image not found: {image} (listed for id '{image_id}')")
        paths.append(image)
    return Split(list(ids), paths, labels)


def _concat(parts: Sequence[Split]) -> Split:
    return Split(
        [i for p in parts for i in p.image_ids],
        [q for p in parts for q in p.image_paths],
        np.concatenate([p.labels for p in parts], axis=0),
    )


def _year(root: Path, year: str, required: bool) -> Optional[Path]:
    path = root / f"VOC{year}"
    if path.is_dir():
        return path
    if required:
        raise DataError(f"{root}: no VOC{year}/ folder (expected a VOCdevkit directory)")
    return None


def _warn_label_mismatch(csv_path: Path, listed: np.ndarray, split: Split) -> None:
    bad = np.flatnonzero((listed != split.labels).any(axis=1))
    if bad.size:
        warnings.warn(
            f"{csv_path}: {bad.size} of {len(split)} images have labels that differ from the XML "
            f"annotations (e.g. '{split.image_ids[bad[0]]}'); the XML labels are used "
            "(try include_difficult to match the split file)",
            stacklevel=4,
        )


@DATASETS.register("voc")
def build_voc(root: Path, split_dir: Optional[Path] = None, include_difficult: bool = True,
              splits: Optional[Sequence[str]] = None) -> MultiLabelDataset:
    """Read VOC2007(+2012) or, with ``split_dir``, VOC-LT (see the module docstring)."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"VOCdevkit folder not found: {root}")
    if split_dir is None:
        parts, groups, name = _read_full(root, splits, include_difficult), None, root.name
    else:
        parts, groups, name = _read_lt(root, Path(split_dir), splits, include_difficult)
    check_disjoint({k: s.image_ids for k, s in parts.items()}, str(root))
    return MultiLabelDataset(name, root, list(VOC_CLASSES), parts, groups)


def _read_full(root: Path, splits: Optional[Sequence[str]], include_difficult: bool) -> Dict[str, Split]:
    """train = VOC2007 trainval (+ VOC2012 trainval when present), test = VOC2007 test."""
    voc07 = _year(root, "2007", required=True)
    sources = {"train": voc07 / "ImageSets/Main/trainval.txt", "test": voc07 / "ImageSets/Main/test.txt"}
    parts: Dict[str, Split] = {}
    for key in select_splits(splits, sources, str(root)):
        lists = [(voc07, sources[key])]
        voc12 = _year(root, "2012", required=False) if key == "train" else None
        if voc12 is not None:
            lists.append((voc12, voc12 / "ImageSets/Main/trainval.txt"))
        parts[key] = _concat([read_voc_split(d, read_id_list(f), include_difficult) for d, f in lists])
    return parts


def _read_lt(root: Path, split_dir: Path, splits: Optional[Sequence[str]],
             include_difficult: bool) -> Tuple[Dict[str, Split], Optional[Dict[str, List[str]]], str]:
    """VOC-LT: the split folder's train ids from VOC2012, its test ids from VOC2007."""
    classes = read_classes(split_dir / "classes.txt")
    if tuple(classes) != VOC_CLASSES:
        raise DataError(f"{split_dir / 'classes.txt'}: expected the 20 VOC classes in standard order")
    years = {"train": "2012", "test": "2007"}
    sources = {key: split_dir / f"{key}.csv" for key in years}
    parts: Dict[str, Split] = {}
    for key in select_splits(splits, sources, str(split_dir)):
        ids, listed = read_label_csv(sources[key], classes)
        years_with = [d for d in (_year(root, years[key], required=False), _year(root, "2007", required=False))
                      if d is not None] if key == "train" else []
        if len(years_with) < 2:  # VOC-LT: train from VOC2012 (or only VOC2007 present), test from VOC2007
            home = years_with[0] if years_with else _year(root, years[key], required=True)
            parts[key] = read_voc_split(home, ids, include_difficult)
        else:  # each train id from the year that has it (a capnet data lt-split of VOC2007 + 2012 trainval)
            in_2012 = {i for i in ids if (years_with[0] / "Annotations" / f"{i}.xml").is_file()}
            both = _concat([read_voc_split(years_with[0], [i for i in ids if i in in_2012], include_difficult),
                            read_voc_split(years_with[1], [i for i in ids if i not in in_2012], include_difficult)])
            row = {i: r for r, i in enumerate(both.image_ids)}
            parts[key] = both.subset([row[i] for i in ids])
        _warn_label_mismatch(sources[key], listed, parts[key])
    return parts, read_class_split(split_dir / "class_split.json", classes), split_dir.name
