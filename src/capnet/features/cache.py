"""Cache of frozen image-tower outputs: one array per (feature key, image list), filled in place.

Layout: ``<root>/<key>/<list>.npy`` (+ ``.index.json``, ``.state.safetensors``; see
:mod:`capnet.features.store`). ``key`` is the sha256 of a canonical JSON of everything the
features depend on except the images: backbone name and weights digest, the transform's
description (a multi-view transform names its views; object addresses are stripped, so every
process and every run computes the same key), the stage depth and the compute dtype (float32, or
bf16 autocast). ``list`` hashes the image fingerprints (absolute path, size, mtime_ns) in order,
so row i of a split's array is image i of the split. A new image list (a re-split, a validation
carve-out, a changed image file) first copies the rows it shares with the other lists of its key
(matched by fingerprint, checked by crc32); only the rest go through the tower. A multi-view
transform (a (V, 3, H, W) stack per image) is decoded once per image: its rows are (V, ...).

Storage is float16 (half the disk and page cache; features come back as float32). The values
are rounded to float16 whether or not a cache is used, so a run gives the same numbers with a
cold cache, a warm cache, a resumed fill or no cache. An array whose values overflow float16 is
widened to float32.

Filling is resumable: rows are written in place and marked filled every ``flush_every_s`` seconds,
so an interrupted extraction (even SIGKILL) continues where its last mark left off. Under DDP each
rank extracts rows ``i % world == rank`` of the missing ones into its own part file, and rank 0
merges the parts after a barrier (part files keep ranks on different hosts of a shared file
system off each other's pages). Damaged files are warned about and recomputed, never used.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import re
import time
from pathlib import Path
from typing import (
    Any,
    Callable,
    Dict,
    Iterable,
    Iterator,
    List,
    Mapping,
    Optional,
    Sequence,
    Tuple,
    Union,
)

import numpy as np
import torch
from tqdm.auto import tqdm

from capnet.data import load_image
from capnet.features.full_disk import go_on_without_cache
from capnet.features.store import FORMAT_VERSION, FeatureRows, RowFile
from capnet.runtime import distributed
from capnet.runtime.progress import on_terminal
from capnet.runtime.workers import quiet_worker
from capnet.runtime.stopwatch import Stopwatch

log = logging.getLogger(__name__)

PathLike = Union[str, Path]
Fingerprint = Tuple[str, int, int]
Batches = Iterable[Tuple[np.ndarray, np.ndarray]]  # (row numbers, stored values) per batch
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


def cache_key(parts: Mapping[str, Any]) -> str:
    """sha256 of the canonical JSON (sorted keys, no spaces) of ``parts``."""
    text = json.dumps(parts, sort_keys=True, separators=(",", ":"), ensure_ascii=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def stable_repr(obj: Any) -> str:
    """``repr(obj)`` without object addresses (``<function _to_rgb at 0x7f..>`` -> ``<function _to_rgb>``).

    An address differs between processes and runs, so a key holding one missed in every
    process (capnet#23 item 6). A transform object with the default ``repr`` then describes only
    its class: give it a ``__repr__`` that names its settings.
    """
    return _ADDRESS.sub("", repr(obj))


def image_fingerprints(paths: Sequence[PathLike]) -> List[Fingerprint]:
    """(absolute path, size, mtime_ns) per image: a changed or replaced file changes its row."""
    import os

    out = []
    for p in paths:
        st = os.stat(p)
        out.append((str(Path(p).resolve()), int(st.st_size), int(st.st_mtime_ns)))
    return out


def feature_key_parts(backbone: Any, transform: Callable, upto: int, compute: str = "float32") -> Dict[str, Any]:
    """Everything an entry's features depend on, except which images (JSON-ready).

    The spec's ``extra`` is part of it: backbone options such as the pooling change the features
    of the same weights and transform.
    """
    spec = backbone.spec
    return {
        "format": FORMAT_VERSION,
        "backbone": spec.name,
        "weights_sha256": spec.weights_sha256,
        "spec_extra": {k: v for k, v in sorted(dict(spec.extra).items())},
        "transform": stable_repr(transform),
        "upto": int(upto),
        "dtype": str(next(backbone.visual.parameters()).dtype),
        "compute": compute,
    }


class FeatureCache:
    """A folder of per-key directories, one filled-in-place array per image list."""

    def __init__(self, root: PathLike, flush_every_s: float = 10.0) -> None:
        self.root = Path(root)
        self.flush_every_s = flush_every_s  # how often a fill marks its written rows filled

    def stem(self, key: str, ids: Sequence[str]) -> Path:
        """Where the array of ``ids`` (one id per row, in order) under ``key`` lives (without suffix)."""
        digest = hashlib.sha256("\n".join(ids).encode("utf-8")).hexdigest()[:32]
        return self.root / key / digest

    def open(self, key: str, ids: Sequence[str], prepare: bool = True) -> RowFile:
        """The entry of ``ids`` under ``key``; ``prepare`` (one process only) checks every filled
        row, merges part files left by an interrupted DDP fill and copies rows shared with the
        key's other image lists."""
        entry = RowFile.open(self.stem(key, ids), key, ids, verify=prepare, flush_every_s=self.flush_every_s)
        if prepare:
            self.merge_parts(entry)
            if len(entry.missing()):
                self._import_shared_rows(entry)
        return entry

    def part(self, entry: RowFile, rank: int, rows: np.ndarray) -> RowFile:
        """Rank ``rank``'s part file for ``rows`` of ``entry`` (its ids are those row numbers)."""
        stem = entry.stem.with_name(f"{entry.stem.name}.part-{rank}")
        RowFile(stem, entry.key, []).delete()  # a stale part was merged (or is unusable) by now
        return RowFile.open(stem, entry.key, [str(int(r)) for r in rows], flush_every_s=self.flush_every_s)

    def merge_parts(self, entry: RowFile) -> int:
        """Copy the filled rows of ``entry``'s part files into it, delete the parts; rows merged."""
        merged = 0
        for index in sorted(entry.stem.parent.glob(f"{entry.stem.name}.part-*.index.json")):
            stem = index.with_name(index.name[: -len(".index.json")])
            try:
                ids = json.loads(index.read_text())["ids"]
            except (OSError, ValueError, KeyError, TypeError) as err:
                ids = None
                log.warning("%s: unreadable part index (%s: %s); its rows are deleted and will be extracted again",
                            index, type(err).__name__, err)
            if ids is not None:
                part = RowFile.open(stem, entry.key, ids, verify=True)
                merged += _copy_rows(part, np.flatnonzero(part.filled), entry,
                                     np.asarray([int(i) for i in ids], dtype=np.int64))
            RowFile(stem, entry.key, []).delete()
        entry.checkpoint()
        return merged

    def _import_shared_rows(self, entry: RowFile) -> int:
        """Copy rows whose image another list of the same key already holds (crc-checked)."""
        want = {entry.ids[r]: int(r) for r in entry.missing()}
        copied = 0
        for index in sorted(entry.stem.parent.glob("*.index.json")):
            name = index.name[: -len(".index.json")]
            if name == entry.stem.name or ".part-" in name or not want:
                continue
            try:
                ids = json.loads(index.read_text())["ids"]
            except (OSError, ValueError, KeyError, TypeError):
                continue
            src_rows = [r for r, i in enumerate(ids) if i in want]
            if not src_rows:
                continue
            other = RowFile.open(index.with_name(name), entry.key, ids, verify=False)
            src = np.asarray([r for r in src_rows if other.filled[r]], dtype=np.int64)
            n = _copy_rows(other, src, entry, np.asarray([want[ids[r]] for r in src], dtype=np.int64))
            other.close()
            copied += n
            want = {i: r for i, r in want.items() if not entry.filled[r]}
        if copied:
            log.info("feature cache: %d rows copied from other image lists of the same key", copied)
            entry.checkpoint()
        return copied


def _copy_rows(src: RowFile, src_rows: np.ndarray, dst: RowFile, dst_rows: np.ndarray) -> int:
    """Copy rows whose bytes still match their crc32 from ``src`` into ``dst``; rows copied."""
    from capnet.features.store import READ_CHUNK_BYTES, _row_crcs

    copied = 0
    step = max(1, READ_CHUNK_BYTES // max(1, src.row_bytes)) if src.dtype is not None else 1
    for i in range(0, len(src_rows), step):
        rows, to = src_rows[i:i + step], dst_rows[i:i + step]
        values = src.read(rows)
        ok = _row_crcs(values) == src.crc[rows]
        if ok.any():
            dst.write(to[ok], values[ok])
            copied += int(ok.sum())
    return copied


def to_storage(tensor: torch.Tensor) -> torch.Tensor:
    """Contiguous CPU float16, or float32 where float16 would overflow a finite value."""
    tensor = tensor.detach().float().cpu().contiguous()
    half = tensor.to(torch.float16)
    if torch.isfinite(half).all() or not torch.isfinite(tensor).all():
        return half
    return tensor


def prefix_features(backbone: Any, images: torch.Tensor, upto: int) -> torch.Tensor:
    """``backbone.image_prefix(images, upto)`` rounded to the cache's storage dtype.

    Run it under the extraction autocast: a freshly computed feature is then the very number a
    cache hit returns, so ``predict`` on an image scores what ``eval`` scored from the cache.
    """
    return to_storage(backbone.image_prefix(images, upto))


def fill(target: RowFile, batches: Batches) -> int:
    """Write each (rows, values) batch into ``target``; progress is marked even if interrupted."""
    done = 0
    try:
        for rows, values in batches:
            target.write(rows, values)
            done += len(rows)
    finally:
        target.checkpoint()
    return done


def fill_missing(cache: FeatureCache, entry: RowFile, produce: Callable[[np.ndarray], Batches]) -> RowFile:
    """Fill ``entry``'s missing rows with ``produce(rows)``, sharded over DDP ranks; returns it complete.

    Alone, rows go straight into the entry. Under DDP rank r produces rows ``i % world == r`` of
    the missing ones into its part file; after a barrier rank 0 merges the parts and every rank
    re-reads the entry's state.
    """
    world, rank = distributed.world_size(), distributed.rank()
    missing = entry.missing()
    if world == 1:
        if len(missing):
            fill(entry, produce(missing))
        return entry
    mine = missing[rank::world]
    if len(mine):
        part = cache.part(entry, rank, mine)
        fill(part, ((np.searchsorted(mine, rows), values) for rows, values in produce(mine)))
        part.close()
    distributed.barrier()
    if distributed.is_main():
        cache.merge_parts(entry)
    distributed.barrier()
    if not distributed.is_main():
        entry.close()
        entry = RowFile.open(entry.stem, entry.key, entry.ids, verify=False)
    return entry


class _ImageFiles(torch.utils.data.Dataset):
    """Image files -> transformed tensors (one view or a (V, 3, H, W) stack), in order."""

    def __init__(self, paths: Sequence[Path], transform: Callable) -> None:
        self.paths, self.transform = list(paths), transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.transform(load_image(self.paths[i]))


def _tower_batches(backbone: Any, paths: Sequence[Path], rows: np.ndarray, transform: Callable, upto: int,
                   batch_size: int, num_workers: int, device: torch.device,
                   autocast: contextlib.AbstractContextManager, progress: bool,
                   stopwatch: Optional[Stopwatch]) -> Iterator[Tuple[np.ndarray, np.ndarray]]:
    """(rows, stored prefix features) per batch of ``paths[rows]``, decoding in ``num_workers`` processes."""
    loader = torch.utils.data.DataLoader(_ImageFiles([paths[i] for i in rows], transform), batch_size=batch_size,
                                         shuffle=False, num_workers=num_workers, pin_memory=device.type == "cuda",
                                         worker_init_fn=quiet_worker)
    was_training = backbone.training
    backbone.eval()
    waited = tower = 0.0
    start = 0
    try:
        with torch.inference_mode(), autocast:
            tic = time.perf_counter()
            for images in tqdm(loader, desc=f"image features (stage {upto})", unit="batch",
                               disable=not (progress and on_terminal())):
                got = time.perf_counter()
                waited += got - tic
                views = images.shape[1] if images.ndim == 5 else None
                flat = images.flatten(0, 1) if views else images
                out = prefix_features(backbone, flat.to(device, non_blocking=True), upto)
                stored = (out.view(images.shape[0], views, *out.shape[1:]) if views else out).numpy()
                tower += time.perf_counter() - got
                yield rows[start:start + len(stored)], stored
                start += len(stored)
                tic = time.perf_counter()
    finally:
        backbone.train(was_training)
        if stopwatch is not None:
            stopwatch.add_features(start, waited, tower)


def feature_rows(
    backbone: Any,
    paths: Sequence[PathLike],
    transform: Callable,
    upto: int,
    batch_size: int = 64,
    num_workers: int = 0,
    device: Union[str, torch.device] = "cpu",
    cache: Optional[FeatureCache] = None,
    progress: bool = True,
    amp: str = "none",
    stopwatch: Optional[Stopwatch] = None,
) -> FeatureRows:
    """(N, ...) outputs of ``backbone.image_prefix(., upto)`` as rows read on demand (float32).

    With ``cache`` the rows live on disk (only missing rows are computed, sharded over DDP
    ranks) and are read per batch; without, they are computed here and held in memory.
    ``amp`` ("none" | "bf16" | "fp16") runs the tower under autocast and is part of the cache
    key. ``backbone`` must already sit on ``device``; its train/eval mode is restored afterwards.
    ``stopwatch`` (if given) counts the images computed, the seconds waiting for decoding and
    the seconds in the tower.
    """
    from capnet.runtime.precision import autocast as make_autocast

    paths = [Path(p) for p in paths]
    if not paths:
        raise ValueError("compute_features needs at least one image path")
    device = torch.device(device)

    def produce(rows: np.ndarray) -> Batches:
        log.info("feature cache: computing %d of %d images (stage %d)", len(rows), len(paths), upto)
        return _tower_batches(backbone, paths, rows, transform, upto, batch_size, num_workers, device,
                              make_autocast(device, amp), progress, stopwatch)

    if cache is None:
        chunks = [values for _, values in produce(np.arange(len(paths)))]
        dtype = np.float32 if any(c.dtype == np.float32 for c in chunks) else np.float16
        return FeatureRows(np.concatenate([c.astype(dtype, copy=False) for c in chunks]))
    key = cache_key(feature_key_parts(backbone, transform, upto, "float32" if amp == "none" else amp))
    ids = [json.dumps(fp) for fp in image_fingerprints(paths)]
    try:
        with distributed.main_first():  # rank 0 checks and repairs the entry, the others then read its state
            entry = cache.open(key, ids, prepare=distributed.is_main())
        entry = fill_missing(cache, entry, produce)
    except OSError as err:  # a full disk: warn once and compute without the cache (same values)
        go_on_without_cache(cache.root, err)
        return feature_rows(backbone, paths, transform, upto, batch_size=batch_size, num_workers=num_workers,
                            device=device, cache=None, progress=progress, amp=amp, stopwatch=stopwatch)
    rows = entry.rows()
    entry.close()
    return rows


def compute_features(*args: Any, **kwargs: Any) -> torch.Tensor:
    """:func:`feature_rows` as one float32 tensor in memory (small sets, tests, probes)."""
    return feature_rows(*args, **kwargs).float()
