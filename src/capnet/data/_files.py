"""Readers' shared file formats: classes.txt, ``image_id,labels`` CSVs, class_split.json.

Every error names the file and, for a CSV, the line at fault. Text files are UTF-8 with or
without a byte-order mark (Excel's "CSV UTF-8" writes one) and LF or CRLF line ends.
"""
from __future__ import annotations

import csv
import difflib
import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from capnet.data.lt_stats import GROUP_NAMES
from capnet.errors import DataError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
ENCODING = "utf-8-sig"  # UTF-8; a leading byte-order mark is dropped


def _not_utf8(path: Path, err: UnicodeDecodeError) -> DataError:
    return DataError(f"{path}: not UTF-8 text (byte {err.start}: {err.reason}); "
                     "save it as UTF-8 (\"CSV UTF-8\" in Excel)")


def read_text(path: Path) -> str:
    """The text of a UTF-8 file (BOM dropped); a file in another encoding is a DataError."""
    try:
        return path.read_text(encoding=ENCODING)
    except UnicodeDecodeError as err:
        raise _not_utf8(path, err) from None


def select_splits(requested: Optional[Sequence[str]], sources: Dict[str, Path], where: str) -> List[str]:
    """The splits to read: ``requested`` as given, or (None) every split whose source file exists.

    ``sources`` maps each split name the layout knows to the file it is read from. A requested
    split whose file is missing is left for the reader to report (it names the file).
    """
    if requested is None:
        found = [name for name, path in sources.items() if path.exists()]
        if not found:
            raise DataError(f"{where}: no split found (looked for {', '.join(str(p) for p in sources.values())})")
        return found
    unknown = [name for name in requested if name not in sources]
    if unknown:
        raise DataError(f"{where}: no split '{unknown[0]}' in this layout (it has: {', '.join(sources)})")
    return list(dict.fromkeys(requested))


def read_classes(path: Path) -> List[str]:
    """Class names, one per non-empty line; duplicates and a missing file are errors."""
    if not path.is_file():
        raise DataError(f"class list not found: {path}")
    names = [line.strip() for line in read_text(path).splitlines() if line.strip()]
    if not names:
        raise DataError(f"{path}: no class names")
    seen = set()
    for name in names:
        if name in seen:
            raise DataError(f"{path}: class '{name}' is listed twice")
        seen.add(name)
    return names


def _unknown_class(name: str, classes: Sequence[str], where: str) -> DataError:
    close = difflib.get_close_matches(name, list(classes), n=1)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return DataError(f"{where}: unknown class '{name}'{hint}")


def read_label_csv(path: Path, classes: Sequence[str]) -> Tuple[List[str], np.ndarray]:
    """(ids, (N, C) multi-hot) from an ``image_id,labels`` CSV; ids are kept as strings."""
    if not path.is_file():
        raise DataError(f"label file not found: {path}")
    try:
        with path.open(newline="", encoding=ENCODING) as fh:  # csv handles LF and CRLF itself
            ids, rows = _label_rows(path, csv.reader(fh), classes)
    except UnicodeDecodeError as err:
        raise _not_utf8(path, err) from None
    labels = np.zeros((len(ids), len(classes)), dtype=np.float32)
    for r, cols in enumerate(rows):
        labels[r, cols] = 1.0
    return ids, labels


def _label_rows(path: Path, reader: Any, classes: Sequence[str]) -> Tuple[List[str], List[List[int]]]:
    """Check the header, then each row: (image ids, class columns per row)."""
    index = {c: i for i, c in enumerate(classes)}
    ids: List[str] = []
    rows: List[List[int]] = []
    seen: Dict[str, int] = {}
    header = next(reader, None)
    if header is None or [h.strip() for h in header] != ["image_id", "labels"]:
        raise DataError(f"{path}:1: header must be 'image_id,labels', got {header!r}")
    for row in reader:
        line = reader.line_num
        if not row:
            continue  # blank line
        if len(row) != 2:
            raise DataError(f"{path}:{line}: expected 2 columns (image_id,labels), got {len(row)}: {row!r}")
        image_id = row[0].strip()
        if not image_id:
            raise DataError(f"{path}:{line}: empty image_id")
        if image_id in seen:
            raise DataError(f"{path}:{line}: duplicate image id '{image_id}' (first on line {seen[image_id]})")
        seen[image_id] = line
        cols = []
        for name in row[1].split():
            if name not in index:
                raise _unknown_class(name, classes, f"{path}:{line} (image '{image_id}')")
            cols.append(index[name])
        ids.append(image_id)
        rows.append(cols)
    return ids, rows


def read_class_split(path: Path, classes: Sequence[str]) -> Optional[Dict[str, List[str]]]:
    """{"head"|"medium"|"tail": [names]} from class_split.json, or None when the file is absent."""
    if not path.is_file():
        return None
    try:
        raw = json.loads(read_text(path))
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: not valid JSON: {err}") from None
    if not isinstance(raw, dict) or set(raw) - set(GROUP_NAMES):
        raise DataError(f"{path}: expected an object with keys {GROUP_NAMES}, got {raw if not isinstance(raw, dict) else sorted(raw)}")
    owner: Dict[str, str] = {}
    for group, names in raw.items():
        for name in names:
            if name not in classes:
                raise _unknown_class(name, classes, f"{path} (group '{group}')")
            if name in owner:
                raise DataError(f"{path}: class '{name}' is in both '{owner[name]}' and '{group}'")
            owner[name] = group
    return {g: list(raw.get(g, [])) for g in GROUP_NAMES}


def resolve_image(folder: Path, image_id: str, where: str) -> Path:
    """folder/<image_id> if it has an image extension, else the first of .jpg/.jpeg/.png that exists."""
    if Path(image_id).suffix.lower() in IMAGE_EXTENSIONS:
        path = folder / image_id
        if path.is_file():
            return path
        raise DataError(f"{where}: image file not found: {path}")
    for ext in IMAGE_EXTENSIONS:
        path = folder / f"{image_id}{ext}"
        if path.is_file():
            return path
    raise DataError(f"{where}: no image file for id '{image_id}' in {folder} (tried {', '.join(IMAGE_EXTENSIONS)})")


def check_disjoint(split_ids: Dict[str, List[str]], where: str) -> None:
    """An image id in two splits is a train/test leak: raise naming the splits and an example."""
    names = list(split_ids)
    sets = {k: set(v) for k, v in split_ids.items()}
    for a in range(len(names)):
        for b in range(a + 1, len(names)):
            common = sets[names[a]] & sets[names[b]]
            if common:
                example = sorted(common)[0]
                raise DataError(
                    f"{where}: {len(common)} image id(s) in both '{names[a]}' and '{names[b]}', e.g. '{example}'"
                )


def select_listed_rows(split: Any, listed_ids: Sequence[str], where: str, allow_missing: bool = False) -> Any:
    """``split`` cut to ``listed_ids`` in their order (a split file made by ``capnet data lt-split``).

    An id the split lacks is an error naming ``where``, unless ``allow_missing`` (a reader that
    dropped missing images: the row is left out, as the reader already listed it).
    """
    index = {image_id: r for r, image_id in enumerate(split.image_ids)}
    missing = [i for i in listed_ids if i not in index]
    if missing and not allow_missing:
        raise DataError(f"{where}: {len(missing)} listed image(s) are not in the data, e.g. '{missing[0]}' "
                        "(was the split made from another copy of the dataset?)")
    return split.subset([index[i] for i in listed_ids if i in index])


def listed_splits(parts: Dict[str, Any], split_dir: Path, classes: Sequence[str], allow_missing: bool = False) -> Dict[str, Any]:
    """Each split of ``parts`` whose ``<name>.csv`` is in ``split_dir`` cut to the listed ids; the
    split folder's classes.txt must be the data's classes."""
    if not split_dir.is_dir():
        raise DataError(f"split folder not found: {split_dir} (write one with `capnet data lt-split DATA "
                        f"--reader READER --out {split_dir}`, docs/lt_split.md)")
    if list(read_classes(split_dir / "classes.txt")) != list(classes):
        raise DataError(f"{split_dir / 'classes.txt'}: not the data's classes in the data's order")
    out = dict(parts)
    for name, split in parts.items():
        path = split_dir / f"{name}.csv"
        if path.is_file():
            ids, _ = read_label_csv(path, classes)
            out[name] = select_listed_rows(split, ids, str(path), allow_missing)
    return out
