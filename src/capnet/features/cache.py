"""Cache of frozen image-tower outputs: one float16 array per (feature key, image list), filled in place.

``<root>/<key>/<list>.npy`` (:mod:`capnet.features.store`): ``key`` hashes what the features depend
on but the images (backbone, weights, transform description, depth, compute dtype), ``list`` the
image fingerprints in order. A new list first copies the rows its key's other lists hold (so the
protocol's K-fold re-splits put no image through the tower twice); under DDP rank r fills rows
``i % world == r`` of the missing ones into a part file (a list of those images) that rank 0 copies
in. Features are float16-rounded with or without a cache: cold, warm, resumed, none agree.
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import re
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from tqdm.auto import tqdm

from capnet.data import load_image
from capnet.errors import FeatureRangeError
from capnet.fileio import file_fingerprints, go_on_without_cache
from capnet.features.store import FORMAT_VERSION, FeatureRows, RowFile
from capnet.runtime import distributed
from capnet.runtime.precision import autocast
from capnet.runtime.progress import on_terminal
from capnet.runtime.workers import quiet_worker
from capnet.runtime.stopwatch import Stopwatch

log = logging.getLogger(__name__)


def cache_key(parts: Mapping[str, Any]) -> str:
    """sha256 of the canonical JSON (sorted keys, no spaces) of ``parts``."""
    text = json.dumps(parts, sort_keys=True, separators=(",", ":"), ensure_ascii=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def stable_repr(obj: Any) -> str:
    """``repr(obj)`` without object addresses (they differ between processes: capnet#23 item 6)."""
    return re.sub(r" at 0x[0-9a-fA-F]+", "", repr(obj))


def feature_key_parts(backbone: Any, transform: Callable, depth: int, compute: str = "float32") -> Dict[str, Any]:
    """Everything an entry's features depend on except which images (spec ``extra``: e.g. the pooling)."""
    spec = backbone.spec
    return {"format": FORMAT_VERSION, "backbone": spec.name, "weights_sha256": spec.weights_sha256,
            "spec_extra": dict(sorted(dict(spec.extra).items())), "transform": stable_repr(transform),
            "depth": int(depth), "dtype": str(next(backbone.visual.parameters()).dtype), "compute": compute}


class FeatureCache:
    """A folder of per-key directories, one filled-in-place array per image list."""

    def __init__(self, root: Union[str, Path], flush_every_s: float = 10.0) -> None:
        self.root, self.flush_every_s = Path(root), flush_every_s  # how often a fill marks its rows filled

    def stem(self, key: str, ids: Sequence[str]) -> Path:
        """Where the array of ``ids`` (one id per row, in order) under ``key`` lives (without suffix)."""
        return self.root / key / hashlib.sha256("\n".join(ids).encode("utf-8")).hexdigest()[:32]

    def open(self, key: str, ids: Sequence[str], prepare: bool = True) -> RowFile:
        """The entry of ``ids`` under ``key``; ``prepare`` (one process only) checks and completes it."""
        entry = RowFile.open(self.stem(key, ids), key, ids, verify=prepare, flush_every_s=self.flush_every_s)
        if prepare:
            self.copy_shared(entry)
        return entry

    def part(self, entry: RowFile, rank: int, rows: np.ndarray) -> RowFile:
        """Rank ``rank``'s part file for ``rows`` of ``entry`` (a fresh list of those images)."""
        stem = entry.stem.with_name(f"{entry.stem.name}.part-{rank}")  # stale parts: merged on prepare
        return RowFile.open(stem, entry.key, [entry.ids[r] for r in rows], flush_every_s=self.flush_every_s)

    def copy_shared(self, entry: RowFile) -> int:
        """Copy in the missing rows of ``entry`` its part files, then the key's other lists, hold."""
        parts, copied = f"{entry.stem.name}.part-", 0
        for index in sorted(entry.stem.parent.glob("*.index.json"), key=lambda p: not p.name.startswith(parts)):
            stem = index.with_name(index.name[: -len(".index.json")])
            want = {entry.ids[r]: int(r) for r in entry.missing()}
            if stem != entry.stem and want:
                try:
                    ids = json.loads(index.read_text())["ids"]
                except (OSError, ValueError, KeyError, TypeError) as err:
                    log.warning("feature cache: %s is unreadable (%s); its rows are recomputed", index, err)
                    ids = []
                if any(i in want for i in ids):
                    copied += entry.copy_from(RowFile.open(stem, entry.key, ids, verify=False), want)
            if stem.name.startswith(parts):
                RowFile(stem, entry.key, []).delete()
        log.debug("feature cache: %d rows copied from part files or other image lists of the key", copied)
        entry.checkpoint()
        return copied


def prefix_features(backbone: Any, images: torch.Tensor, depth: int) -> torch.Tensor:
    """``backbone.image_prefix(images, depth)`` rounded to float16 (on the images' device), under the
    extraction autocast: the very number a cache hit returns, so ``predict`` scores what ``eval``
    scored from the cache."""
    out = backbone.image_prefix(images, depth).detach().float()
    half = out.to(torch.float16).contiguous()
    if (torch.isfinite(out) & ~torch.isfinite(half)).any():
        raise FeatureRangeError(f"{backbone.spec.name}: stage-{depth} image features reach "
                                f"{out.abs().max().item():.4g}, beyond float16; set train.feature_cache=false "
                                "to run the whole image tower in float32")
    return half


def fill_missing(cache: FeatureCache, entry: RowFile,
                 produce: Callable[[np.ndarray], Iterable[Tuple[np.ndarray, np.ndarray]]]) -> RowFile:
    """Fill ``entry``'s missing rows with ``produce(rows)`` (rows marked filled every ``flush_every_s``
    and when it stops); under DDP into part files rank 0 copies in. Returns the entry, complete."""
    world, rank = distributed.world_size(), distributed.rank()
    mine = entry.missing()[rank::world]
    if len(mine):
        target = entry if world == 1 else cache.part(entry, rank, mine)
        try:
            for rows, values in produce(mine):
                target.write(rows if world == 1 else np.searchsorted(mine, rows), values)
        finally:
            target.checkpoint()
            target.close()
    if world == 1:
        return entry
    distributed.barrier()
    if distributed.is_main():
        cache.copy_shared(entry)
    distributed.barrier()
    entry.close()
    return RowFile.open(entry.stem, entry.key, entry.ids, verify=False)  # the merged state


def _decode(transform: Callable, paths: Sequence[Path]) -> torch.Tensor:
    """A DataLoader batch: the images at ``paths`` through ``transform`` (one view or a (V, 3, H, W) stack)."""
    return torch.stack([transform(load_image(p)) for p in paths])


def feature_rows(backbone: Any, paths: Sequence[Union[str, Path]], transform: Callable, depth: int, batch_size: int = 64,
                 num_workers: int = 0, device: Union[str, torch.device] = "cpu",
                 cache: Optional[FeatureCache] = None, progress: bool = True, amp: str = "none",
                 stopwatch: Optional[Stopwatch] = None) -> Union[FeatureRows, torch.Tensor]:
    """(N, ...) outputs of ``backbone.image_prefix(., depth)``, float16-rounded, as float32 rows: read
    per batch from ``cache`` (computing only missing rows) or computed and held in memory. ``amp``
    (none | bf16 | fp16: part of the key) is the tower's autocast; ``backbone`` sits on ``device``."""
    paths, device = [Path(p) for p in paths], torch.device(device)
    if not paths:
        raise ValueError("feature_rows needs at least one image path")

    def produce(rows: np.ndarray) -> Iterator[Tuple[np.ndarray, np.ndarray]]:
        log.info("feature cache: computing %d of %d images (stage %d)", len(rows), len(paths), depth)
        loader = torch.utils.data.DataLoader([paths[i] for i in rows], batch_size=batch_size, num_workers=num_workers,
                                             collate_fn=functools.partial(_decode, transform),
                                             pin_memory=device.type == "cuda", worker_init_fn=quiet_worker)
        was_training, waited, tower, start = backbone.training, 0.0, 0.0, 0
        backbone.eval()
        try:
            with torch.inference_mode(), autocast(device, amp):
                tic = time.perf_counter()
                for images in tqdm(loader, desc=f"image features (stage {depth})", unit="batch",
                                   disable=not (progress and on_terminal())):
                    got = time.perf_counter()
                    flat = images.flatten(0, 1) if images.ndim == 5 else images  # (B, V, 3, H, W): V views each
                    out = prefix_features(backbone, flat.to(device, non_blocking=True), depth)
                    stored = out.view(*images.shape[:-3], *out.shape[1:]).cpu().numpy()
                    waited, tower = waited + got - tic, tower + time.perf_counter() - got
                    yield rows[start:start + len(stored)], stored
                    start, tic = start + len(stored), time.perf_counter()
        finally:
            backbone.train(was_training)
            if stopwatch is not None:
                stopwatch.add_features(start, waited, tower)

    if cache is None:  # held in memory as float32 (float16-rounded like the cache's rows)
        return torch.from_numpy(np.concatenate([v for _, v in produce(np.arange(len(paths)))]).astype(np.float32))
    key = cache_key(feature_key_parts(backbone, transform, depth, "float32" if amp == "none" else amp))
    try:
        with distributed.main_first():  # rank 0 checks and repairs the entry, the others then read its state
            entry = cache.open(key, [json.dumps(fp) for fp in file_fingerprints(paths)], prepare=distributed.is_main())
        return fill_missing(cache, entry, produce).rows()
    except OSError as err:  # a full disk: warn once and compute without the cache (same values)
        go_on_without_cache(cache.root, err)
        return feature_rows(backbone, paths, transform, depth, batch_size=batch_size, num_workers=num_workers,
                            device=device, cache=None, progress=progress, amp=amp, stopwatch=stopwatch)


def compute_features(*args: Any, **kwargs: Any) -> torch.Tensor:
    """:func:`feature_rows` as one float32 tensor in memory (small sets, tests, probes)."""
    return feature_rows(*args, **kwargs)[:]
