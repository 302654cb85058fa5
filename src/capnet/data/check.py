"""Pre-flight image check: decode every image once and report every bad file together.

``capnet data check`` runs it on demand and ``capnet train`` before any feature extraction or
training, so a truncated or empty test image cannot end a run after hours of training. The
decode is :func:`capnet.data.base.image_problem`, the same one the loaders use, spread over a
small thread pool (PIL releases the GIL while decoding): about a second for the 3,426 images of
data/voc_real_lt on 2 cores.
"""
from __future__ import annotations

import dataclasses
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

from tqdm.auto import tqdm

from capnet.data.base import MultiLabelDataset, image_problem
from capnet.errors import DataError
from capnet.runtime.progress import on_terminal

Problem = Tuple[Path, str]  # (image file, why it cannot be decoded)
SHOWN = 10  # bad files named in one error message; the rest are counted


class BadImagesError(DataError):
    """Images that cannot be decoded; ``problems`` holds every (path, reason)."""

    def __init__(self, message: str, problems: Sequence[Problem] = ()) -> None:
        super().__init__(message)
        self.problems = list(problems)


def check_images(paths: Iterable[Union[str, Path]], workers: Optional[int] = None, progress: bool = False,
                 desc: str = "checking images") -> List[Problem]:
    """(path, reason) of every path that does not decode, in input order (duplicates checked once)."""
    unique = list(dict.fromkeys(Path(p) for p in paths))
    if not unique:
        return []
    workers = workers or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        reasons = list(tqdm(pool.map(image_problem, unique), total=len(unique), desc=desc, unit="image",
                            disable=not (progress and on_terminal()), leave=False))
    return [(p, r) for p, r in zip(unique, reasons) if r is not None]


def check_dataset(dataset: MultiLabelDataset, workers: Optional[int] = None,
                  progress: bool = False) -> Dict[str, List[Problem]]:
    """Bad images per split (only the splits that have any)."""
    bad = dict(check_images([p for s in dataset.splits.values() for p in s.image_paths], workers, progress))
    out: Dict[str, List[Problem]] = {}
    for name, split in dataset.splits.items():
        found = [(p, bad[p]) for p in split.image_paths if p in bad]
        if found:
            out[name] = found
    return out


def bad_images_error(problems: Sequence[Problem], where: str) -> BadImagesError:
    """One line naming the first bad files and why; ``.problems`` keeps them all."""
    shown = "; ".join(f"{p}: {r}" for p, r in problems[:SHOWN])
    more = f"; and {len(problems) - SHOWN} more" if len(problems) > SHOWN else ""
    return BadImagesError(f"{where}: {len(problems)} image(s) cannot be decoded: {shown}{more}", problems)


def drop_images(dataset: MultiLabelDataset, paths: Iterable[Union[str, Path]]) -> MultiLabelDataset:
    """``dataset`` without the rows of ``paths`` in any split.

    The head/medium/tail groups are frozen from the data as it was, so dropping a few files
    does not move a class into another group.
    """
    bad = {Path(p) for p in paths}
    groups = dataset.class_groups
    if groups is None and dataset.has_groups:
        groups = {g: [dataset.classes[i] for i in idx] for g, idx in dataset.groups().items()}
    splits = {name: split.subset([i for i, p in enumerate(split.image_paths) if p not in bad])
              for name, split in dataset.splits.items()}
    return dataclasses.replace(dataset, splits=splits, class_groups=groups)
