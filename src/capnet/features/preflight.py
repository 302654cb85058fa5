"""Pre-flight for a training run: decode every image before any feature extraction or training.

A truncated or empty image found after hours of training would end the run at test time; found
here it costs seconds (:mod:`capnet.data.check`). Bad files fail the run up front, or, when the
caller asks to skip them, are dropped from their splits and listed in ``skipped_images.txt``.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, List, Optional, Sequence, Tuple

from capnet.errors import DataError
from capnet.features.full_disk import go_on_without_cache
from capnet.fileio import atomic_write_bytes
from capnet.runtime import distributed
from capnet.runtime.resources import rank_cores

log = logging.getLogger(__name__)
SKIPPED_FILE = "skipped_images.txt"  # in the run directory: one "path: reason" line per skipped image
SHOWN = 20  # skipped images named in report.md; all of them are in SKIPPED_FILE


CHECKED_FILE = "checked_images.json"  # in the feature cache: fingerprints of images that decoded


def _fingerprint_keys(paths: Sequence[Path]) -> List[str]:
    from capnet.features.cache import image_fingerprints

    return [json.dumps(fp) for fp in image_fingerprints(paths)]


def _known_good(cache_dir: Optional[Path]) -> set:
    """Fingerprints (path, size, mtime) of images an earlier run decoded; empty without a cache."""
    if cache_dir is None:
        return set()
    try:
        return set(json.loads((Path(cache_dir) / CHECKED_FILE).read_text()))
    except (OSError, ValueError, TypeError):
        return set()


def preflight_images(ds: Any, skip_bad_images: bool,
                     cache_dir: Optional[Path] = None) -> Tuple[Any, List[Tuple[Path, str]]]:
    """Decode every image before any long work: a bad file fails here, not after training.

    Images that decoded in an earlier run and have not changed since (same path, size and
    mtime, recorded in ``cache_dir/checked_images.json``) are not decoded again. Under DDP each
    rank decodes every ``world``-th of the others and the bad ones are all-gathered, so each
    image is decoded once in all, not once per rank. With
    ``skip_bad_images`` the bad files are dropped from their splits and returned, so the caller
    can list them; otherwise a ``BadImagesError`` names them (``.problems`` has all).
    """
    from capnet.data.check import bad_images_error, check_images, drop_images

    paths = list(dict.fromkeys(p for split in ds.splits.values() for p in split.image_paths))
    keys = _fingerprint_keys(paths)
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
    found = {name: [(p, bad[p]) for p in split.image_paths if p in bad] for name, split in ds.splits.items()}
    found = {name: probs for name, probs in found.items() if probs}
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


def write_skipped(problems: Sequence[Tuple[Path, str]], path: Path) -> None:
    """skipped_images.txt: one 'path: reason' line per image left out of the run."""
    atomic_write_bytes("".join(f"{p}: {r}\n" for p, r in problems).encode(), path)


def skipped_summary(problems: Sequence[Tuple[Path, str]]) -> str:
    """One report.md line: how many images were left out, the first ones by name and why."""
    named = "; ".join(f"`{p}`: {r}" for p, r in problems[:SHOWN])
    more = f"; and {len(problems) - SHOWN} more" if len(problems) > SHOWN else ""
    return f"{len(problems)} that cannot be decoded (all in {SKIPPED_FILE}): {named}{more}"
