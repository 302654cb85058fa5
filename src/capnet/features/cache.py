"""Cache of frozen image-tower outputs: one float16 array per (feature key, image list), filled in place.

Layout: ``<root>/<key>/<list>.npy`` (+ ``.index.json``, ``.state.safetensors``; see
:mod:`capnet.features.store`). ``key`` hashes everything the features depend on except the images
(backbone and weights, the transform's description without object addresses, the stage depth, the
compute dtype); ``list`` hashes the image fingerprints (path, size, mtime_ns) in order, so row i is
image i. A new image list of a key (a re-split, a validation carve-out) first copies the rows other
lists of the key hold (by fingerprint, crc-checked): the sealed protocol's K-fold re-splits then put
no image through the tower twice. Values are rounded to float16 with or without a cache, so a cold,
warm, resumed or absent cache gives the same numbers; a value beyond float16 is a FeatureRangeError.

Under DDP rank r fills rows ``i % world == r`` of the missing ones into its own part file (a list
of the key holding those images) and rank 0 copies them in after a barrier, like any other list.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from tqdm.auto import tqdm

from capnet.data import load_image
from capnet.errors import FeatureRangeError
from capnet.features.store import FORMAT_VERSION, READ_CHUNK_BYTES, FeatureRows, RowFile, row_crcs
from capnet.runtime import distributed
from capnet.runtime.stopwatch import Stopwatch

log = logging.getLogger(__name__)

PathLike = Union[str, Path]
Batches = Iterable[Tuple[np.ndarray, np.ndarray]]  # (row numbers, float16 values) per batch


def cache_key(parts: Mapping[str, Any]) -> str:
    """sha256 of the canonical JSON (sorted keys, no spaces) of ``parts``."""
    text = json.dumps(parts, sort_keys=True, separators=(",", ":"), ensure_ascii=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def stable_repr(obj: Any) -> str:
    """``repr(obj)`` without object addresses (they differ between processes: capnet#23 item 6)."""
    return re.sub(r" at 0x[0-9a-fA-F]+", "", repr(obj))


def image_fingerprints(paths: Sequence[PathLike]) -> List[Tuple[str, int, int]]:
    """(absolute path, size, mtime_ns) per image: a changed or replaced file changes its row."""
    out = []
    for p in paths:
        st = os.stat(p)
        out.append((str(Path(p).resolve()), int(st.st_size), int(st.st_mtime_ns)))
    return out


def feature_key_parts(backbone: Any, transform: Callable, upto: int, compute: str = "float32") -> Dict[str, Any]:
    """Everything an entry's features depend on except which images (the spec's ``extra`` too:
    options such as the pooling change the features of the same weights)."""
    spec = backbone.spec
    return {"format": FORMAT_VERSION, "backbone": spec.name, "weights_sha256": spec.weights_sha256,
            "spec_extra": dict(sorted(dict(spec.extra).items())), "transform": stable_repr(transform),
            "upto": int(upto), "dtype": str(next(backbone.visual.parameters()).dtype), "compute": compute}


class FeatureCache:
    """A folder of per-key directories, one filled-in-place array per image list."""

    def __init__(self, root: PathLike, flush_every_s: float = 10.0) -> None:
        self.root, self.flush_every_s = Path(root), flush_every_s  # how often a fill marks its rows filled

    def stem(self, key: str, ids: Sequence[str]) -> Path:
        """Where the array of ``ids`` (one id per row, in order) under ``key`` lives (without suffix)."""
        return self.root / key / hashlib.sha256("\n".join(ids).encode("utf-8")).hexdigest()[:32]

    def open(self, key: str, ids: Sequence[str], prepare: bool = True) -> RowFile:
        """The entry of ``ids`` under ``key``; ``prepare`` (one process only) checks every filled row
        and copies in the missing rows its part files or the key's other lists hold."""
        entry = RowFile.open(self.stem(key, ids), key, ids, verify=prepare, flush_every_s=self.flush_every_s)
        if prepare:
            self.copy_shared(entry)
        return entry

    def part(self, entry: RowFile, rank: int, rows: np.ndarray) -> RowFile:
        """Rank ``rank``'s part file for ``rows`` of ``entry`` (a fresh list of those images)."""
        stem = entry.stem.with_name(f"{entry.stem.name}.part-{rank}")
        RowFile(stem, entry.key, []).delete()  # a stale part was merged (or is unusable) by now
        return RowFile.open(stem, entry.key, [entry.ids[r] for r in rows], flush_every_s=self.flush_every_s)

    def copy_shared(self, entry: RowFile) -> int:
        """Copy in the missing rows of ``entry`` that its part files (then the key's other lists)
        hold, each checked against its crc32; delete its part files. Rows copied."""
        parts = f"{entry.stem.name}.part-"
        copied = 0
        for index in sorted(entry.stem.parent.glob("*.index.json"), key=lambda p: not p.name.startswith(parts)):
            stem = index.with_name(index.name[: -len(".index.json")])
            want = {entry.ids[r]: int(r) for r in entry.missing()}
            if stem != entry.stem and want:
                try:
                    ids = json.loads(index.read_text())["ids"]
                except (OSError, ValueError, KeyError, TypeError):
                    ids = []  # unreadable: nothing to copy
                src = np.asarray([r for r, i in enumerate(ids) if i in want], dtype=np.int64)
                if len(src):
                    copied += _copy_rows(RowFile.open(stem, entry.key, ids, verify=False), src, entry, want)
            if stem.name.startswith(parts):
                RowFile(stem, entry.key, []).delete()
        if copied:
            log.info("feature cache: %d rows copied from part files or other image lists of the key", copied)
        entry.checkpoint()
        return copied


def _copy_rows(src: RowFile, rows: np.ndarray, dst: RowFile, want: Dict[str, int]) -> int:
    """Copy ``src``'s filled rows ``rows`` whose bytes match their crc32 into ``dst`` (by id); rows copied."""
    rows, copied = rows[src.filled[rows]], 0
    step = max(1, READ_CHUNK_BYTES // src.row_bytes) if len(rows) else 1
    for i in range(0, len(rows), step):
        chunk = rows[i:i + step]
        values = src.read(chunk)
        ok = row_crcs(values) == src.crc[chunk]
        dst.write(np.asarray([want[src.ids[r]] for r in chunk[ok]], dtype=np.int64), values[ok])
        copied += int(ok.sum())
    src.close()
    return copied


def prefix_features(backbone: Any, images: torch.Tensor, upto: int) -> torch.Tensor:
    """``backbone.image_prefix(images, upto)`` rounded to float16, the cache's storage, on the CPU.

    Run it under the extraction autocast: a freshly computed feature is then the very number a
    cache hit returns, so ``predict`` on an image scores what ``eval`` scored from the cache.
    """
    out = backbone.image_prefix(images, upto).detach().float().cpu()
    half = out.to(torch.float16).contiguous()
    if (torch.isfinite(out) & ~torch.isfinite(half)).any():
        raise FeatureRangeError(f"{backbone.spec.name}: image features of stage {upto} reach "
                                f"{out.abs().max().item():.4g}, beyond float16 (the feature cache's storage); "
                                "set train.feature_cache=false to run the whole image tower in float32")
    return half


def fill_missing(cache: FeatureCache, entry: RowFile, produce: Callable[[np.ndarray], Batches]) -> RowFile:
    """Fill ``entry``'s missing rows with ``produce(rows)``, sharded over DDP ranks; returns it complete.

    Progress is marked every ``flush_every_s`` and when the fill stops (even by an exception).
    Under DDP rank r produces rows ``i % world == r`` of the missing ones into its part file; after
    a barrier rank 0 copies the parts in and every rank re-reads the entry's state.
    """
    world, rank = distributed.world_size(), distributed.rank()
    mine = entry.missing()[rank::world]
    if len(mine):
        target = entry if world == 1 else cache.part(entry, rank, mine)
        try:
            for rows, values in produce(mine):
                target.write(rows if world == 1 else np.searchsorted(mine, rows), values)
        finally:
            target.checkpoint()
            if target is not entry:
                target.close()
    if world == 1:
        return entry
    distributed.barrier()
    if distributed.is_main():
        cache.copy_shared(entry)
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
    """(rows, float16 prefix features) per batch of ``paths[rows]``, decoding in ``num_workers`` processes."""
    loader = torch.utils.data.DataLoader(_ImageFiles([paths[i] for i in rows], transform), batch_size=batch_size,
                                         shuffle=False, num_workers=num_workers, pin_memory=device.type == "cuda")
    was_training, waited, tower, start = backbone.training, 0.0, 0.0, 0
    backbone.eval()
    try:
        with torch.inference_mode(), autocast:
            tic = time.perf_counter()
            for images in tqdm(loader, desc=f"image features (stage {upto})", unit="batch", disable=not progress):
                got = time.perf_counter()
                waited += got - tic
                flat = images.flatten(0, 1) if images.ndim == 5 else images  # (B, V, 3, H, W): V views each
                out = prefix_features(backbone, flat.to(device, non_blocking=True), upto)
                stored = out.view(*images.shape[:-3], *out.shape[1:]).numpy()
                tower += time.perf_counter() - got
                yield rows[start:start + len(stored)], stored
                start += len(stored)
                tic = time.perf_counter()
    finally:
        backbone.train(was_training)
        if stopwatch is not None:
            stopwatch.add_features(start, waited, tower)


def feature_rows(backbone: Any, paths: Sequence[PathLike], transform: Callable, upto: int, batch_size: int = 64,
                 num_workers: int = 0, device: Union[str, torch.device] = "cpu",
                 cache: Optional[FeatureCache] = None, progress: bool = True, amp: str = "none",
                 stopwatch: Optional[Stopwatch] = None) -> Union[FeatureRows, torch.Tensor]:
    """(N, ...) outputs of ``backbone.image_prefix(., upto)`` as rows read on demand (float32).

    With ``cache`` the rows live on disk (only missing rows are computed, sharded over DDP
    ranks) and are read per batch; without, they are computed here and held in memory.
    ``amp`` ("none" | "bf16" | "fp16") runs the tower under autocast and is part of the cache
    key. ``backbone`` must already sit on ``device``; its train/eval mode is restored afterwards.
    ``stopwatch`` (if given) counts the images computed, the seconds waiting for decoding and
    the seconds in the tower.
    """
    from capnet.runtime.precision import autocast as make_autocast

    paths, device = [Path(p) for p in paths], torch.device(device)
    if not paths:
        raise ValueError("compute_features needs at least one image path")

    def produce(rows: np.ndarray) -> Batches:
        log.info("feature cache: computing %d of %d images (stage %d)", len(rows), len(paths), upto)
        return _tower_batches(backbone, paths, rows, transform, upto, batch_size, num_workers, device,
                              make_autocast(device, amp), progress, stopwatch)

    if cache is None:  # float16-rounded like the cache's rows, held in memory as float32
        return torch.from_numpy(np.concatenate([v for _, v in produce(np.arange(len(paths)))]).astype(np.float32))
    key = cache_key(feature_key_parts(backbone, transform, upto, "float32" if amp == "none" else amp))
    ids = [json.dumps(fp) for fp in image_fingerprints(paths)]
    with distributed.main_first():  # rank 0 checks and repairs the entry, the others then read its state
        entry = cache.open(key, ids, prepare=distributed.is_main())
    entry = fill_missing(cache, entry, produce)
    rows = entry.rows()
    entry.close()
    return rows


def compute_features(*args: Any, **kwargs: Any) -> torch.Tensor:
    """:func:`feature_rows` as one float32 tensor in memory (small sets, tests, probes)."""
    return feature_rows(*args, **kwargs).float()
