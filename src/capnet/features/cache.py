"""Cache of frozen image-tower outputs, kept per image, so repeated runs skip the tower.

An entry is one safetensors file ``<root>/<key>.safetensors`` holding a tensor ``features``
(M, ...) and, in its metadata, the fingerprint (absolute path, size, mtime_ns) of each row's
image. The key is the sha256 of a canonical JSON of everything the features depend on except
the image list: backbone name and weights digest, the transform's repr (a multi-view transform
names its views), the stage depth and the compute dtype (float32, or bf16 autocast). Rows are
found by fingerprint, so any split, re-split or validation carve-out of the same images reuses
them, and a changed image file (new size or mtime) is a miss that is recomputed and replaces
its old row. A multi-view transform (one returning a (V, 3, H, W) stack per image) is decoded
once per image and the tower runs on all V views: its rows are (V, ...).

Storage is float16 (half the disk and page cache; features come back as float32). The values
are rounded to float16 whether or not a cache is used, so a run gives the same numbers with a
cold cache, a warm cache or no cache. A block whose values overflow float16 is kept as float32.

Integrity: files are written to a temporary name and renamed (``os.replace``), so a crash
never leaves half a file under a real key. Each file records its key and the sha256 of its
tensor bytes. A file that cannot be parsed, or whose key, checksum or dtype does not match, is
reported with a warning naming it, deleted, and treated as a miss -- never silently used.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
import warnings
from pathlib import Path
from typing import (
    Any,
    Callable,
    Dict,
    List,
    Mapping,
    MutableMapping,
    Optional,
    Sequence,
    Tuple,
    Union,
)

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as st_save
from tqdm.auto import tqdm

from capnet.data import load_image
from capnet.fileio import atomic_write_bytes

log = logging.getLogger(__name__)

FORMAT_VERSION = 2  # 2: rows addressed by image fingerprint (1 keyed whole image lists)
TENSOR_NAME = "features"
STORAGE_DTYPES = {"float16": torch.float16, "float32": torch.float32}
PathLike = Union[str, Path]
Fingerprint = Tuple[str, int, int]


def cache_key(parts: Mapping[str, Any]) -> str:
    """sha256 of the canonical JSON (sorted keys, no spaces) of ``parts``."""
    text = json.dumps(parts, sort_keys=True, separators=(",", ":"), ensure_ascii=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def image_fingerprints(paths: Sequence[PathLike]) -> List[Fingerprint]:
    """(absolute path, size, mtime_ns) per image: a changed or replaced file changes its row."""
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
        "transform": repr(transform),
        "upto": int(upto),
        "dtype": str(next(backbone.visual.parameters()).dtype),
        "compute": compute,
    }


def _tensor_sha256(tensor: torch.Tensor) -> str:
    """sha256 of a CPU tensor's raw bytes."""
    array = tensor.detach().cpu().contiguous().numpy()
    return hashlib.sha256(array.reshape(-1).view(np.uint8)).hexdigest()


class FeatureCache:
    """A folder of safetensors entries addressed by ``cache_key``; rows addressed by image."""

    def __init__(self, root: PathLike) -> None:
        self.root = Path(root)

    def path(self, key: str) -> Path:
        """File that holds (or would hold) entry ``key``."""
        return self.root / f"{key}.safetensors"

    def load(self, key: str) -> Optional[Tuple[torch.Tensor, List[Fingerprint]]]:
        """(float32 rows, their image fingerprints), or None on a miss (a corrupt entry is warned about and deleted)."""
        path = self.path(key)
        if not path.is_file():
            return None
        try:
            with safe_open(str(path), framework="pt") as fh:
                meta = fh.metadata() or {}
                tensor = fh.get_tensor(TENSOR_NAME)
            images = [tuple(f) for f in json.loads(meta.get("images", "null"))]
            problem = self._check(key, tensor, meta, len(images))
        except (SafetensorError, OSError, ValueError, KeyError, RuntimeError, TypeError) as err:
            problem = f"unreadable ({type(err).__name__}: {err})"
        if problem is not None:
            warnings.warn(f"feature cache entry {path} is corrupt: {problem}; deleting it and recomputing")
            path.unlink(missing_ok=True)
            return None
        return tensor.float(), images  # type: ignore[return-value]

    @staticmethod
    def _check(key: str, tensor: torch.Tensor, meta: Mapping[str, str], rows: int) -> Optional[str]:
        """Why an entry cannot be trusted, or None."""
        if meta.get("key") != key:
            return f"it records key {meta.get('key')!r}"
        if str(tensor.dtype).replace("torch.", "") not in STORAGE_DTYPES:
            return f"unexpected dtype {tensor.dtype}"
        if rows != tensor.shape[0]:
            return f"{rows} fingerprints for {tensor.shape[0]} rows"
        if meta.get("sha256") != _tensor_sha256(tensor):
            return "checksum mismatch"
        return None

    def save(self, key: str, tensor: torch.Tensor, images: Sequence[Fingerprint],
             meta: Optional[Mapping[str, Any]] = None) -> Path:
        """Write ``tensor`` (float16 unless that overflows) and its row fingerprints atomically."""
        stored = to_storage(tensor)
        header = {k: v if isinstance(v, str) else json.dumps(v, default=str) for k, v in (meta or {}).items()}
        header.update(key=key, sha256=_tensor_sha256(stored), format=str(FORMAT_VERSION),
                      images=json.dumps([list(f) for f in images]))
        atomic_write_bytes(st_save({TENSOR_NAME: stored}, metadata=header), self.path(key))
        return self.path(key)


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


class _ImageFiles(torch.utils.data.Dataset):
    """Image files -> transformed tensors (one view or a (V, 3, H, W) stack), in order."""

    def __init__(self, paths: Sequence[Path], transform: Callable) -> None:
        self.paths, self.transform = list(paths), transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.transform(load_image(self.paths[i]))


def _run_tower(backbone: Any, paths: Sequence[Path], transform: Callable, upto: int, batch_size: int,
               num_workers: int, device: torch.device, autocast: contextlib.AbstractContextManager,
               progress: bool, timings: Optional[MutableMapping[str, float]]) -> torch.Tensor:
    """Prefix features of ``paths`` (float16/32 storage dtype), decoding in ``num_workers`` processes."""
    loader = torch.utils.data.DataLoader(_ImageFiles(paths, transform), batch_size=batch_size, shuffle=False,
                                         num_workers=num_workers, pin_memory=device.type == "cuda")
    chunks: List[torch.Tensor] = []
    was_training = backbone.training
    backbone.eval()
    waited = tower = 0.0
    try:
        with torch.inference_mode(), autocast:
            tic = time.perf_counter()
            for images in tqdm(loader, desc=f"image features (stage {upto})", unit="batch", disable=not progress):
                got = time.perf_counter()
                waited += got - tic
                views = images.shape[1] if images.ndim == 5 else None
                flat = images.flatten(0, 1) if views else images
                out = prefix_features(backbone, flat.to(device, non_blocking=True), upto)
                chunks.append(out.view(images.shape[0], views, *out.shape[1:]) if views else out)
                tic = time.perf_counter()
                tower += tic - got
    finally:
        backbone.train(was_training)
    if timings is not None:
        timings["images"] = timings.get("images", 0) + len(paths)
        timings["decode_wait_s"] = timings.get("decode_wait_s", 0.0) + waited
        timings["tower_s"] = timings.get("tower_s", 0.0) + tower
    dtype = torch.float32 if any(c.dtype == torch.float32 for c in chunks) else torch.float16
    return torch.cat([c.to(dtype) for c in chunks])


def compute_features(
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
    timings: Optional[MutableMapping[str, float]] = None,
) -> torch.Tensor:
    """(N, ...) float32 outputs of ``backbone.image_prefix(., upto)``; rows found in ``cache`` are reused.

    ``amp`` ("none" | "bf16" | "fp16") runs the tower under autocast and is part of the cache
    key. ``backbone`` must already sit on ``device``; its train/eval mode is restored afterwards.
    ``timings`` (if given) accumulates images computed, seconds waiting for decoding and
    seconds in the tower.
    """
    from capnet.runtime.precision import autocast as make_autocast

    paths = [Path(p) for p in paths]
    if not paths:
        raise ValueError("compute_features needs at least one image path")
    device = torch.device(device)
    autocast = make_autocast(device, amp)
    fingerprints = image_fingerprints(paths)
    stored, stored_fps = None, []
    key = None
    if cache is not None:
        key = cache_key(feature_key_parts(backbone, transform, upto, "float32" if amp == "none" else amp))
        hit = cache.load(key)
        if hit is not None:
            stored, stored_fps = hit
    index = {fp: row for row, fp in enumerate(stored_fps)}
    missing = [i for i, fp in enumerate(fingerprints) if fp not in index]
    if missing:
        log.info("feature cache: computing %d of %d images (stage %d)", len(missing), len(paths), upto)
        new = _run_tower(backbone, [paths[i] for i in missing], transform, upto, batch_size, num_workers,
                         device, autocast, progress, timings)
        new_fps = [fingerprints[i] for i in missing]
        if cache is not None and key is not None:
            replaced = {fp[0] for fp in new_fps}  # a path with a new fingerprint drops its old row
            keep = [r for r, fp in enumerate(stored_fps) if fp[0] not in replaced]
            parts = ([stored[keep].to(new.dtype)] if stored is not None and keep else []) + [new]
            all_fps = [stored_fps[r] for r in keep] + new_fps
            cache.save(key, torch.cat(parts), all_fps,
                       {"backbone": backbone.spec.name, "upto": upto, "num_images": len(all_fps)})
        stored = new.float() if stored is None else torch.cat([stored, new.float()])
        index.update({fp: len(stored_fps) + k for k, fp in enumerate(new_fps)})
    rows = torch.as_tensor([index[fp] for fp in fingerprints])
    return stored.index_select(0, rows).float()
