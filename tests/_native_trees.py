"""Tiny fake trees of the native VOC and COCO layouts (reader and CLI tests)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Dict, List, Sequence, Tuple

COCO_CATS = [{"id": 1, "name": "person"}, {"id": 3, "name": "car"}, {"id": 10, "name": "traffic light"}]


def voc_xml(objects: Sequence[Tuple[str, int]]) -> str:
    """One VOC annotation with (class name, difficult) objects."""
    body = "".join(
        f"<object><name>{n}</name><difficult>{int(d)}</difficult></object>" for n, d in objects
    )
    return f"<annotation><filename>x.jpg</filename>{body}</annotation>"


def voc_year(root: Path, year: str, sets: Dict[str, List[str]], annotations: Dict[str, list],
             write_jpeg: Callable[..., Path]) -> None:
    """root/VOC<year>/{ImageSets/Main/<set>.txt, Annotations/<id>.xml, JPEGImages/<id>.jpg}."""
    base = root / f"VOC{year}"
    (base / "ImageSets" / "Main").mkdir(parents=True)
    (base / "Annotations").mkdir()
    for name, ids in sets.items():
        (base / "ImageSets" / "Main" / f"{name}.txt").write_text("\n".join(ids) + "\n")
    for k, (image_id, objects) in enumerate(annotations.items()):
        (base / "Annotations" / f"{image_id}.xml").write_text(voc_xml(objects))
        write_jpeg(base / "JPEGImages" / f"{image_id}.jpg", seed=k)


def coco_file(root: Path, sub: str, images: Dict[int, None], anns: List[Tuple[int, int]],
              write_jpeg: Callable[..., Path]) -> None:
    """root/annotations/instances_<sub>.json (COCO_CATS) and root/<sub>/<id:012d>.jpg."""
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    raw = {
        "categories": list(reversed(COCO_CATS)),  # order in the file must not matter
        "images": [{"id": i, "file_name": f"{i:012d}.jpg"} for i in images],
        "annotations": [{"image_id": i, "category_id": c, "iscrowd": 0} for i, c in anns],
    }
    (root / "annotations" / f"instances_{sub}.json").write_text(json.dumps(raw))
    for k, i in enumerate(images):
        write_jpeg(root / sub / f"{i:012d}.jpg", seed=k)


def voc_test_only(root: Path, write_jpeg: Callable[..., Path]) -> Path:
    """A VOCdevkit holding only VOC2007 test (no trainval list, no VOC2012)."""
    voc_year(root, "2007", {"test": ["000001", "000002", "000004"]},
             {"000001": [("dog", 0), ("person", 0)], "000002": [("motorbike", 0), ("person", 1)],
              "000004": [("diningtable", 0), ("car", 0)]}, write_jpeg)
    return root


def coco_val_only(root: Path, write_jpeg: Callable[..., Path]) -> Path:
    """A COCO root holding only val2017/ and annotations/instances_val2017.json."""
    coco_file(root, "val2017", {139: None, 285: None, 632: None}, [(139, 1), (285, 3), (632, 1), (632, 10)],
              write_jpeg)
    return root
