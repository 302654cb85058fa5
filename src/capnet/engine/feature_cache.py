"""Cache of frozen image-tower outputs, so repeated runs skip the backbone forward pass.

A cache entry is one safetensors file ``<root>/<key>.safetensors`` holding a tensor
``features`` (N, ...) for an ordered list of images. The key is the sha256 of a canonical JSON
of everything the features depend on: backbone name and weights digest, the transform's repr,
the stage depth, the compute dtype and each image's (path, size, mtime_ns). Change any of them
and the key changes, so a stale entry is never returned.

Storage is float16 (half the disk and page cache; features come back as float32). The values
are rounded to float16 whether or not a cache is used, so a run gives the same numbers with a
cold cache, a warm cache or no cache. A block whose values overflow float16 is kept as float32.

Integrity: files are written to a temporary name and renamed (``os.replace``), so a crash
never leaves half a file under a real key. Each file records its key and the sha256 of its
tensor bytes. A file that cannot be parsed, or whose key, checksum or dtype does not match, is
reported with a warning naming it, deleted, and treated as a miss (``compute_features``
recomputes and rewrites it) -- never silently used.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Union

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as st_save
from tqdm.auto import tqdm

from capnet.data import load_image
from capnet.fileio import atomic_write_bytes

log = logging.getLogger(__name__)

FORMAT_VERSION = 1  # bump when the entry layout or key recipe changes
TENSOR_NAME = "features"
STORAGE_DTYPES = {"float16": torch.float16, "float32": torch.float32}
PathLike = Union[str, Path]


def cache_key(parts: Mapping[str, Any]) -> str:
    """sha256 of the canonical JSON (sorted keys, no spaces) of ``parts``."""
    text = json.dumps(parts, sort_keys=True, separators=(",", ":"), ensure_ascii=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def image_fingerprints(paths: Sequence[PathLike]) -> List[List[Any]]:
    """[(absolute path, size, mtime_ns)] per image: a changed or replaced file changes the key."""
    out = []
    for p in paths:
        st = os.stat(p)
        out.append([str(Path(p).resolve()), st.st_size, st.st_mtime_ns])
    return out


def feature_key_parts(backbone: Any, paths: Sequence[PathLike], transform: Callable, upto: int) -> Dict[str, Any]:
    """Everything the prefix features of ``paths`` depend on, as JSON-ready data."""
    spec = backbone.spec
    return {
        "format": FORMAT_VERSION,
        "backbone": spec.name,
        "weights_sha256": spec.weights_sha256,
        "transform": repr(transform),
        "upto": int(upto),
        "dtype": str(next(backbone.visual.parameters()).dtype),
        "images": image_fingerprints(paths),
    }


def _tensor_sha256(tensor: torch.Tensor) -> str:
    """sha256 of a CPU tensor's raw bytes."""
    array = tensor.detach().cpu().contiguous().numpy()
    return hashlib.sha256(array.reshape(-1).view(np.uint8)).hexdigest()


class FeatureCache:
    """A folder of safetensors feature files addressed by ``cache_key``."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def path(self, key: str) -> Path:
        """File that holds (or would hold) entry ``key``."""
        return self.root / f"{key}.safetensors"

    def load(self, key: str) -> Optional[torch.Tensor]:
        """The cached float32 tensor, or None on a miss (a corrupt entry is warned about and deleted)."""
        path = self.path(key)
        if not path.is_file():
            return None
        try:
            with safe_open(str(path), framework="pt") as fh:
                meta = fh.metadata() or {}
                tensor = fh.get_tensor(TENSOR_NAME)
            problem = self._check(key, tensor, meta)
        except (SafetensorError, OSError, ValueError, KeyError, RuntimeError) as err:
            problem = f"unreadable ({type(err).__name__}: {err})"
        if problem is not None:
            warnings.warn(f"feature cache entry {path} is corrupt: {problem}; deleting it and recomputing")
            path.unlink(missing_ok=True)
            return None
        return tensor.float()

    @staticmethod
    def _check(key: str, tensor: torch.Tensor, meta: Mapping[str, str]) -> Optional[str]:
        """Why an entry cannot be trusted, or None."""
        if meta.get("key") != key:
            return f"it records key {meta.get('key')!r}"
        if str(tensor.dtype).replace("torch.", "") not in STORAGE_DTYPES:
            return f"unexpected dtype {tensor.dtype}"
        if meta.get("sha256") != _tensor_sha256(tensor):
            return "checksum mismatch"
        return None

    def save(self, key: str, tensor: torch.Tensor, meta: Optional[Mapping[str, Any]] = None) -> Path:
        """Write ``tensor`` (float16 unless that overflows) under ``key`` atomically."""
        stored = to_storage(tensor)
        header = {k: v if isinstance(v, str) else json.dumps(v, default=str) for k, v in (meta or {}).items()}
        header.update(key=key, sha256=_tensor_sha256(stored), format=str(FORMAT_VERSION))
        atomic_write_bytes(st_save({TENSOR_NAME: stored}, metadata=header), self.path(key))
        return self.path(key)


def to_storage(tensor: torch.Tensor) -> torch.Tensor:
    """Contiguous CPU float16, or float32 where float16 would overflow a finite value."""
    tensor = tensor.detach().cpu().contiguous()
    half = tensor.to(torch.float16)
    if torch.isfinite(half).all() or not torch.isfinite(tensor).all():
        return half
    return tensor.to(torch.float32)


class _ImageFiles(torch.utils.data.Dataset):
    """Image files -> transformed tensors, in order."""

    def __init__(self, paths: Sequence[Path], transform: Callable) -> None:
        self.paths, self.transform = list(paths), transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.transform(load_image(self.paths[i]))


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
) -> torch.Tensor:
    """(N, ...) float32 outputs of ``backbone.image_prefix(., upto)``, read from ``cache`` if there.

    ``backbone`` must already sit on ``device``; its train/eval mode is restored afterwards.
    """
    paths = [Path(p) for p in paths]
    if not paths:
        raise ValueError("compute_features needs at least one image path")
    key = None
    if cache is not None:
        key = cache_key(feature_key_parts(backbone, paths, transform, upto))
        hit = cache.load(key)
        if hit is not None:
            log.info("feature cache hit %s (%d images)", cache.path(key), len(paths))
            return hit
    loader = torch.utils.data.DataLoader(
        _ImageFiles(paths, transform),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        pin_memory=torch.device(device).type == "cuda",
    )
    chunks: List[torch.Tensor] = []
    was_training = backbone.training
    backbone.eval()
    try:
        with torch.inference_mode():
            for images in tqdm(loader, desc=f"features (stage {upto})", unit="batch", disable=not progress):
                chunks.append(to_storage(backbone.image_prefix(images.to(device), upto)))
    finally:
        backbone.train(was_training)
    dtype = torch.float32 if any(c.dtype == torch.float32 for c in chunks) else torch.float16
    stored = torch.cat([c.to(dtype) for c in chunks])
    if cache is not None and key is not None:
        meta = {"backbone": backbone.spec.name, "upto": upto, "num_images": len(paths)}
        cache.save(key, stored, meta)
    return stored.float()
