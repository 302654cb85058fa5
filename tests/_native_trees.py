"""Tiny fake trees of the native layouts (reader, CLI and reproduce tests: VOC, COCO, NUS-WIDE) and one
per DATASETS reader."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, FrozenSet, List, Optional, Sequence, Tuple

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
              write_jpeg: Callable[..., Path], categories: Optional[List[dict]] = None) -> None:
    """root/annotations/instances_<sub>.json (``categories``, default COCO_CATS) and root/<sub>/<id:012d>.jpg."""
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    raw = {
        "categories": list(reversed(categories or COCO_CATS)),  # order in the file must not matter
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


def nus_wide_tree(root: Path, concepts: Sequence[str], lists: Dict[str, List[str]],
                  labels: Dict[str, Dict[str, List[int]]], write_jpeg: Callable[..., Path]) -> Path:
    """root/{Concepts81.txt, ImageList/<Tag>Imagelist.txt (CRLF, backslashes), Groundtruth/TrainTestLabels/
    Labels_<concept>_<Tag>.txt, Flickr/<folder>/<file>.jpg}; ``lists``/``labels`` keyed by Train/Test."""
    (root / "ImageList").mkdir(parents=True)
    (root / "Concepts81.txt").write_text("\n".join(concepts) + "\n")
    gt = root / "Groundtruth" / "TrainTestLabels"
    gt.mkdir(parents=True)
    k = 0
    for tag, items in lists.items():
        (root / "ImageList" / f"{tag}Imagelist.txt").write_text("\r\n".join(items) + "\r\n")
        for item in items:
            write_jpeg(root / "Flickr" / item.replace("\\", "/"), seed=k)
            k += 1
        for concept in concepts:
            (gt / f"Labels_{concept}_{tag}.txt").write_text("\n".join(str(v) for v in labels[tag][concept]) + "\n")
    return root


def random_label_rows(n: int, num_classes: int, seed: int, rate: float = 0.4) -> List[List[int]]:
    """n rows of class indices, each class present with probability ``rate`` / (1 + index) (a long tail)."""
    import random

    rng = random.Random(seed)
    rows = [[c for c in range(num_classes) if rng.random() < rate / (1 + c)] for _ in range(n)]
    return [r or [0] for r in rows]


def native_trees(base: Path, write_jpeg: Callable[..., Path], n_train: int = 12, n_test: int = 8) -> Dict[str, Path]:
    """A VOCdevkit (VOC2007 trainval + test), a COCO root (train2017 + val2017) and a NUS-WIDE root
    (3 concepts), each with ``n_train`` / ``n_test`` tiny images and long-tailed random labels."""
    voc_names = ["person", "car", "dog", "chair"]
    ids = {"trainval": [f"{i:06d}" for i in range(1, n_train + 1)],
           "test": [f"{i:06d}" for i in range(101, 101 + n_test)]}
    rows = random_label_rows(n_train + n_test, len(voc_names), seed=1)
    annotations = {i: [(voc_names[c], 0) for c in r] for i, r in zip(ids["trainval"] + ids["test"], rows)}
    voc_year(base / "VOCdevkit", "2007", ids, annotations, write_jpeg)
    rows = random_label_rows(n_train + n_test, len(COCO_CATS), seed=2)
    cats = [c["id"] for c in COCO_CATS]
    train_ids, val_ids = list(range(1, n_train + 1)), list(range(1001, 1001 + n_test))
    anns = [(i, cats[c]) for i, r in zip(train_ids + val_ids, rows) for c in r]
    coco_file(base / "coco", "train2017", dict.fromkeys(train_ids), [a for a in anns if a[0] < 1000], write_jpeg)
    coco_file(base / "coco", "val2017", dict.fromkeys(val_ids), [a for a in anns if a[0] >= 1000], write_jpeg)
    concepts = ["sky", "water", "animal"]
    lists = {"Train": [f"sky\\{i:04d}_{i}.jpg" for i in range(n_train)],
             "Test": [f"water\\{i:04d}_{i}.jpg" for i in range(100, 100 + n_test)]}
    rows = random_label_rows(n_train + n_test, len(concepts), seed=3)
    split_rows = {"Train": rows[:n_train], "Test": rows[n_train:]}
    labels = {tag: {c: [int(k in r) for r in split_rows[tag]] for k, c in enumerate(concepts)} for tag in lists}
    nus_wide_tree(base / "nus_wide", concepts, lists, labels, write_jpeg)
    return {"voc": base / "VOCdevkit", "coco": base / "coco", "nus_wide": base / "nus_wide"}


# ------------------------------------------------------------- one fake tree per DATASETS reader
# The same small labelled set (conftest's FOLDER_ROWS over cat / dog / person: 6 train images,
# one without a label, 4 test) written in each reader's native layout, with what the reader must
# read back. tests/test_registry_datasets.py runs every registered reader over its entry and fails
# for a reader registered without one: add the tree here when you register a reader.

@dataclass(frozen=True)
class FakeTree:
    """A fake dataset tree on disk and what its reader must return for it."""

    reader: str  # DATASETS name
    root: Path
    classes: List[str]  # the class order the reader must return
    rows: Dict[str, Dict[str, FrozenSet[str]]]  # split -> image id -> positive classes
    options: Dict[str, Any] = field(default_factory=dict)  # data.reader_options for this tree


def _abstract_rows() -> Dict[str, List[Tuple[str, FrozenSet[str]]]]:
    from conftest import FOLDER_ROWS

    return {split: [(i, frozenset(labels.split())) for i, labels in items] for split, items in FOLDER_ROWS.items()}


def folder_fake(root: Path, write_jpeg: Callable[..., Path]) -> FakeTree:
    """classes.txt, train.csv / test.csv and images/ (the repository's own layout)."""
    from conftest import FOLDER_CLASSES, write_folder_tree

    write_folder_tree(root)
    rows = {s: dict(items) for s, items in _abstract_rows().items()}
    return FakeTree("folder", root, list(FOLDER_CLASSES), rows)


def voc_fake(root: Path, write_jpeg: Callable[..., Path]) -> FakeTree:
    """A VOCdevkit with VOC2007 trainval (train) and test; ids keep their leading zeros."""
    from capnet.data.voc import VOC_CLASSES

    rows = _abstract_rows()
    sets = {"trainval" if s == "train" else s: [i for i, _ in items] for s, items in rows.items()}
    annotations = {i: [(name, 0) for name in sorted(labels)] for items in rows.values() for i, labels in items}
    voc_year(root, "2007", sets, annotations, write_jpeg)
    return FakeTree("voc", root, list(VOC_CLASSES), {s: dict(items) for s, items in rows.items()})


def coco_fake(root: Path, write_jpeg: Callable[..., Path]) -> FakeTree:
    """COCO 2017 (train2017 -> train, val2017 -> test) with integer ids and sparse category ids."""
    cats = {"person": 1, "cat": 17, "dog": 18}  # COCO's own ids: class order is id order
    rows = _abstract_rows()
    out: Dict[str, Dict[str, FrozenSet[str]]] = {}
    for split, sub in (("train", "train2017"), ("test", "val2017")):
        ids = {int(i): None for i, _ in rows[split]}
        anns = [(int(i), cats[name]) for i, labels in rows[split] for name in sorted(labels)]
        coco_file(root, sub, ids, anns, write_jpeg, categories=[{"id": v, "name": k} for k, v in cats.items()])
        out[split] = {str(int(i)): labels for i, labels in rows[split]}
    return FakeTree("coco", root, sorted(cats, key=cats.get), out)


def nus_wide_fake(root: Path, write_jpeg: Callable[..., Path]) -> FakeTree:
    """NUS-WIDE: Concepts81.txt, Windows-separated image lists, one 0/1 file per concept."""
    concepts = ["person", "dog", "cat"]  # the file's order, not alphabetical
    rows = _abstract_rows()
    gt = root / "Groundtruth" / "TrainTestLabels"
    gt.mkdir(parents=True)
    (root / "ImageList").mkdir()
    (root / "Concepts81.txt").write_text("\n".join(concepts) + "\n")
    out: Dict[str, Dict[str, FrozenSet[str]]] = {}
    for split, tag in (("train", "Train"), ("test", "Test")):
        items = [(f"{sorted(labels)[0] if labels else 'misc'}/{i}_{k}.jpg", labels)
                 for k, (i, labels) in enumerate(rows[split])]
        windows = [i.replace("/", "\\") + "\r\n" for i, _ in items]  # as NUS distributes them
        (root / "ImageList" / f"{tag}Imagelist.txt").write_text("".join(windows))
        for k, (image_id, _) in enumerate(items):
            write_jpeg(root / "Flickr" / image_id, seed=k)
        for concept in concepts:
            (gt / f"Labels_{concept}_{tag}.txt").write_text("".join(f"{int(concept in l)}\n" for _, l in items))
        out[split] = dict(items)
    return FakeTree("nus_wide", root, concepts, out, {"drop_missing": True})  # configs/data/nus_wide.yaml's


# reader name -> writer(root, write_jpeg) -> FakeTree
READER_TREES: Dict[str, Callable[[Path, Callable[..., Path]], FakeTree]] = {
    "folder": folder_fake,
    "voc": voc_fake,
    "coco": coco_fake,
    "nus_wide": nus_wide_fake,
}
