"""Pre-flight image check: decode every image once and report every bad file together.

``capnet data check`` runs it on demand and ``capnet train`` before any feature extraction or
training, so a truncated or empty test image cannot end a run after hours of training. The
decode is :func:`capnet.data.base.image_problem`, the same one the loaders use, spread over a
small thread pool (PIL releases the GIL while decoding): about a second for the 3,426 images of
data/voc_real_lt on 2 cores. A training run's check (:func:`preflight_images`) remembers the
images that decoded, by fingerprint, so a repeated run decodes only new or changed files.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Set, Tuple, Union

from PIL import Image
from tqdm.auto import tqdm

from capnet.data.base import MultiLabelDataset, image_problem
from capnet.errors import DataError
from capnet.fileio import atomic_write_bytes, file_fingerprints, go_on_without_cache
from capnet.runtime import distributed
from capnet.runtime.progress import on_terminal
from capnet.runtime.resources import rank_cores

log = logging.getLogger(__name__)

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
    return _per_split(dataset, dict(check_images([p for s in dataset.splits.values() for p in s.image_paths],
                                                 workers, progress)))


def _per_split(dataset: MultiLabelDataset, bad: Mapping[Path, str]) -> Dict[str, List[Problem]]:
    found = {name: [(p, bad[p]) for p in split.image_paths if p in bad] for name, split in dataset.splits.items()}
    return {name: problems for name, problems in found.items() if problems}


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


# --- the training run's pre-flight: every image decoded once before any long work -------------

SKIPPED_FILE = "skipped_images.txt"  # in the run directory: one "path: reason" line per skipped image
CHECKED_FILE = "checked_images.json"  # in the feature cache: fingerprints of images that decoded
SKIPPED_SHOWN = 20  # skipped images named in report.md; all of them are in SKIPPED_FILE


def _known_good(cache_dir: Optional[Path]) -> Set[str]:
    """Fingerprints (path, size, mtime) of images an earlier run decoded; empty without a cache."""
    if cache_dir is None:
        return set()
    try:
        return set(json.loads((Path(cache_dir) / CHECKED_FILE).read_text()))
    except (OSError, ValueError, TypeError):
        return set()


def preflight_images(ds: MultiLabelDataset, skip_bad_images: bool,
                     cache_dir: Optional[Path] = None) -> Tuple[MultiLabelDataset, List[Problem]]:
    """Decode every image before any long work: a bad file fails here, not after training.

    Images that decoded in an earlier run and have not changed since (same path, size and
    mtime, under the same pixel limit, recorded in ``cache_dir/checked_images.json``) are not
    decoded again. Under DDP each
    rank decodes every ``world``-th image and the bad ones are all-gathered, so each image is
    decoded once in all. With ``skip_bad_images`` the bad files are dropped from their splits
    and returned, so the caller can list them; otherwise a ``BadImagesError`` names them.
    """
    paths = list(dict.fromkeys(p for split in ds.splits.values() for p in split.image_paths))
    limit = Image.MAX_IMAGE_PIXELS  # data.max_image_pixels: whether a file decodes depends on it too
    keys = [json.dumps([*fp, limit]) for fp in file_fingerprints(paths)]
    known = _known_good(cache_dir)
    todo = [(p, k) for p, k in zip(paths, keys) if k not in known]
    mine = [p for p, _ in todo[distributed.rank()::distributed.world_size()]]
    found_here = check_images(mine, workers=min(8, rank_cores()), progress=distributed.is_main())
    bad = {Path(p): r for part in distributed.all_gather_object([(str(p), r) for p, r in found_here])
           for p, r in part}
    if cache_dir is not None and distributed.is_main() and todo:
        good = known | {k for p, k in todo if p not in bad}
        try:
            atomic_write_bytes(json.dumps(sorted(good)).encode(), Path(cache_dir) / CHECKED_FILE)
        except OSError as err:  # a full disk: the next run decodes these images again, nothing else changes
            go_on_without_cache(cache_dir, err)
    found = _per_split(ds, bad)
    problems = [p for split in found.values() for p in split]
    if not problems:
        return ds, []
    if not skip_bad_images:
        raise bad_images_error(problems, str(ds.root))
    ds = drop_images(ds, [path for path, _ in problems])
    empty = [name for name, split in ds.splits.items() if len(split) == 0]
    if empty:
        raise DataError(f"{ds.root}: every image of split '{empty[0]}' is bad; nothing left to "
                        f"{'train on' if empty[0] == 'train' else 'score'}")
    if distributed.is_main():
        log.warning("skipping %d image(s) that cannot be decoded (%s)", len(problems),
                    ", ".join(f"{name} {len(split)}" for name, split in found.items()))
    return ds, problems


def write_skipped(problems: Sequence[Problem], path: Path) -> None:
    """skipped_images.txt: one 'path: reason' line per image left out of the run."""
    atomic_write_bytes("".join(f"{p}: {r}\n" for p, r in problems).encode(), path)


def skipped_summary(problems: Sequence[Problem]) -> str:
    """One report.md line: how many images were left out, the first ones by name and why."""
    named = "; ".join(f"`{p}`: {r}" for p, r in problems[:SKIPPED_SHOWN])
    more = f"; and {len(problems) - SKIPPED_SHOWN} more" if len(problems) > SKIPPED_SHOWN else ""
    return f"{len(problems)} that cannot be decoded (all in {SKIPPED_FILE}): {named}{more}"
