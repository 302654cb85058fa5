"""One feature array on disk, filled in place: the storage under :mod:`capnet.features.cache`.

An entry ``<stem>`` is three files:

* ``<stem>.npy`` -- a (N, ...) float16 (float32 where float16 overflows) ``.npy`` array, created
  sparse (``numpy.lib.format.open_memmap``) and written row by row with positional writes;
* ``<stem>.index.json`` -- the entry's cache key and one id per row (an image fingerprint),
  written once, atomically;
* ``<stem>.state.safetensors`` -- the "filled" bitmap and a crc32 per row, rewritten atomically
  (after an ``fdatasync`` of the array) every ``flush_every_s`` seconds and when a fill ends.

A fill killed at any point leaves every row the state calls filled intact on disk, so the next
fill computes only the others. Reading goes through ``os.pread`` of the rows asked for
(:class:`FeatureRows`): memory stays bounded by the batch, and mapped file pages never count
towards the reader's resident size. Opening checks the array against the state (shape, dtype,
size) and every filled row against its crc32; a mismatch is reported with a warning naming the
file and those rows (or the whole entry) are recomputed -- never silently used.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
import warnings
import zlib
from pathlib import Path
from typing import Any, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from numpy.lib.format import open_memmap
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from capnet.fileio import atomic_write_bytes

FORMAT_VERSION = 3  # 3: one in-place .npy per (key, image list); 2 kept every image of a key in one safetensors file
STORAGE = {"float16": np.float16, "float32": np.float32}
READ_CHUNK_BYTES = 16 << 20  # verification and copies read at most this much at a time


def _pread(fd: int, size: int, offset: int) -> bytes:
    """Exactly ``size`` bytes at ``offset`` (os.pread may return fewer)."""
    parts, done = [], 0
    while done < size:
        got = os.pread(fd, size - done, offset + done)
        if not got:
            raise OSError(f"unexpected end of file at byte {offset + done}")
        parts.append(got)
        done += len(got)
    return b"".join(parts)


def _read_rows(fd: int, offset: int, row_bytes: int, rows: np.ndarray) -> np.ndarray:
    """(k, row_bytes) uint8: rows ``rows`` of a file of fixed-size rows starting at ``offset``."""
    out = np.empty((len(rows), row_bytes), dtype=np.uint8)
    for pos, first, count in _runs(rows):
        raw = _pread(fd, count * row_bytes, offset + first * row_bytes)
        out[pos:pos + count] = np.frombuffer(raw, dtype=np.uint8).reshape(count, row_bytes)
    return out


def _write_rows(fd: int, offset: int, row_bytes: int, rows: np.ndarray, values: np.ndarray) -> None:
    """Positional writes of ``values`` (k, ...) at ascending ``rows``, one per consecutive run."""
    for pos, first, count in _runs(rows):
        os.pwrite(fd, values[pos:pos + count].tobytes(), offset + first * row_bytes)


def _runs(rows: np.ndarray) -> List[Tuple[int, int, int]]:
    """(position in ``rows``, first row, count) for each run of consecutive row numbers."""
    if len(rows) == 0:
        return []
    breaks = np.flatnonzero(np.diff(rows) != 1) + 1
    starts = np.concatenate([[0], breaks])
    ends = np.concatenate([breaks, [len(rows)]])
    return [(int(s), int(rows[s]), int(e - s)) for s, e in zip(starts, ends)]


class RowFile:
    """A (N, ...) feature array on disk whose rows are filled in place and checked by crc32."""

    def __init__(self, stem: Path, key: str, ids: Sequence[str], flush_every_s: float = 10.0) -> None:
        self.stem, self.key, self.ids = Path(stem), key, list(ids)
        self.flush_every_s = flush_every_s
        n = len(self.ids)
        self.filled = np.zeros(n, dtype=bool)
        self.crc = np.zeros(n, dtype=np.uint32)
        self.dtype: Optional[np.dtype] = None
        self.row_shape: Optional[Tuple[int, ...]] = None
        self.offset = 0
        self._fd: Optional[int] = None
        self._last_flush = time.monotonic()
        self._dirty = False

    # ------------------------------------------------------------------ files
    @property
    def array_path(self) -> Path:
        return self.stem.with_name(self.stem.name + ".npy")

    @property
    def index_path(self) -> Path:
        return self.stem.with_name(self.stem.name + ".index.json")

    @property
    def state_path(self) -> Path:
        return self.stem.with_name(self.stem.name + ".state.safetensors")

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def row_bytes(self) -> int:
        return int(np.prod(self.row_shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize

    @classmethod
    def open(cls, stem: Path, key: str, ids: Sequence[str], verify: bool = True,
             flush_every_s: float = 10.0) -> "RowFile":
        """The entry at ``stem`` (created empty if absent); damage is warned about and repaired."""
        entry = cls(stem, key, ids, flush_every_s)
        problem = entry._load()
        if problem is not None:
            warnings.warn(f"feature cache entry {entry.array_path} is corrupt: {problem}; deleting it and recomputing")
            entry.delete()
            entry = cls(stem, key, ids, flush_every_s)
        if not entry.index_path.is_file():
            entry.stem.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(json.dumps({"format": FORMAT_VERSION, "key": key, "ids": entry.ids}).encode(),
                               entry.index_path)
        if verify and entry.filled.any():
            entry._verify()
        return entry

    def _load(self) -> Optional[str]:
        """Read index, state and array header; why they cannot be trusted, or None."""
        try:
            if self.index_path.is_file():
                index = json.loads(self.index_path.read_text())
                if index.get("key") != self.key or index.get("ids") != self.ids:
                    return f"{self.index_path.name} records another key or image list"
            if not self.state_path.is_file():
                return None  # nothing filled yet (an array without a state holds no trusted row)
            raw = self.state_path.read_bytes()
            with_meta = _state_metadata(raw)
            tensors = st_load(raw)
            filled = np.unpackbits(tensors["filled"], count=len(self))[: len(self)].astype(bool)
            crc = tensors["crc32"]
            if with_meta.get("key") != self.key or int(with_meta.get("rows", -1)) != len(self):
                return (f"{self.state_path.name} belongs to another entry (key {with_meta.get('key')!r}, "
                        f"{with_meta.get('rows')} rows)")
            if with_meta.get("sha256") != _state_digest(tensors["filled"], crc):
                return f"{self.state_path.name} fails its checksum"
            if not filled.any():
                return None
            array = np.load(self.array_path, mmap_mode="r")
            dtype, shape = str(array.dtype), tuple(array.shape)
            offset = int(array.offset)
            del array
            if dtype != with_meta.get("dtype") or list(shape) != json.loads(with_meta.get("shape", "null")):
                return f"array {dtype}{list(shape)} but the state says {with_meta.get('dtype')}{with_meta.get('shape')}"
            if dtype not in STORAGE or shape[0] != len(self):
                return f"unexpected array {dtype}{list(shape)}"
            expected = offset + int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
            if os.path.getsize(self.array_path) != expected:
                return f"{os.path.getsize(self.array_path)} bytes, expected {expected} (truncated?)"
        except (OSError, ValueError, KeyError, TypeError, RuntimeError) as err:
            return f"unreadable ({type(err).__name__}: {err})"
        self.filled, self.crc = filled, crc.astype(np.uint32)
        self.dtype, self.row_shape, self.offset = np.dtype(dtype), shape[1:], offset
        return None

    def _verify(self) -> None:
        """Un-fill (and warn about) filled rows whose bytes no longer match their crc32."""
        rows = np.flatnonzero(self.filled)
        bad: List[int] = []
        step = max(1, READ_CHUNK_BYTES // max(1, self.row_bytes))
        for i in range(0, len(rows), step):
            chunk = rows[i:i + step]
            data = self.read(chunk)
            for r, crc in zip(chunk, _row_crcs(data)):
                if crc != self.crc[r]:
                    bad.append(int(r))
        if bad:
            warnings.warn(f"feature cache entry {self.array_path}: {len(bad)} row(s) fail their checksum "
                          f"(first: row {bad[0]}); recomputing them")
            self.filled[bad] = False
            self._dirty = True
            self.checkpoint()

    def delete(self) -> None:
        """Remove the entry's files."""
        self.close()
        for p in (self.array_path, self.index_path, self.state_path):
            p.unlink(missing_ok=True)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _handle(self) -> int:
        if self._fd is None:
            self._fd = os.open(self.array_path, os.O_RDWR)
        return self._fd

    # ----------------------------------------------------------------- rows
    def missing(self) -> np.ndarray:
        """Row numbers not filled yet, ascending."""
        return np.flatnonzero(~self.filled)

    def write(self, rows: np.ndarray, values: np.ndarray) -> None:
        """Store ``values`` (k, ...) at ``rows`` (float16 unless the array or ``values`` is float32)."""
        rows = np.asarray(rows, dtype=np.int64)
        if self.dtype is None:
            self._create(values.shape[1:], values.dtype)
        elif values.dtype == np.float32 and self.dtype == np.float16:
            self._widen()
        if tuple(values.shape[1:]) != self.row_shape:
            raise ValueError(f"{self.array_path}: rows of shape {tuple(values.shape[1:])}, the array holds {self.row_shape}")
        values = np.ascontiguousarray(values, dtype=self.dtype)
        order = np.argsort(rows, kind="stable")
        rows, values = rows[order], values[order]
        _write_rows(self._handle(), self.offset, self.row_bytes, rows, values)
        self.crc[rows] = _row_crcs(values)
        self.filled[rows] = True
        self._dirty = True
        if time.monotonic() - self._last_flush >= self.flush_every_s:
            self.checkpoint()

    def read(self, rows: np.ndarray) -> np.ndarray:
        """Rows ``rows`` (k,) in storage dtype, read with positional reads (no mapping)."""
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        raw = _read_rows(self._handle(), self.offset, self.row_bytes, rows)
        return raw.view(self.dtype).reshape((len(rows),) + tuple(self.row_shape))

    def checkpoint(self) -> None:
        """Make the rows written so far durable, then record them as filled (atomically)."""
        self._last_flush = time.monotonic()
        if not self._dirty:
            return
        if self._fd is not None:
            os.fdatasync(self._fd) if hasattr(os, "fdatasync") else os.fsync(self._fd)
        packed = np.packbits(self.filled)
        meta = {"format": str(FORMAT_VERSION), "key": self.key, "rows": str(len(self)),
                "dtype": str(np.dtype(self.dtype)) if self.dtype is not None else "",
                "shape": json.dumps([len(self), *self.row_shape] if self.row_shape is not None else None),
                "sha256": _state_digest(packed, self.crc)}
        atomic_write_bytes(st_save({"filled": packed, "crc32": self.crc}, metadata=meta), self.state_path)
        self._dirty = False

    def _new_array(self, row_shape: Tuple[int, ...], dtype: Any) -> Tuple[Path, int]:
        """A sparse zero .npy of the entry's size under a temporary name: (its path, data offset)."""
        tmp = self.stem.with_name(f".{self.stem.name}.npy.{os.getpid()}.tmp")
        array = open_memmap(tmp, mode="w+", dtype=dtype, shape=(len(self), *row_shape))
        offset = int(array.offset)
        del array
        return tmp, offset

    def _create(self, row_shape: Tuple[int, ...], dtype: np.dtype) -> None:
        """The (empty) array, once the first rows tell its row shape and dtype."""
        self.close()
        dtype = np.dtype(np.float32 if dtype == np.float32 else np.float16)
        tmp, self.offset = self._new_array(row_shape, dtype)
        os.replace(tmp, self.array_path)
        self.dtype, self.row_shape = dtype, tuple(int(s) for s in row_shape)
        self.filled[:] = False

    def _widen(self) -> None:
        """float16 -> float32 array (a block overflowed float16), copying filled rows chunk by chunk."""
        tmp, offset = self._new_array(self.row_shape, np.float32)
        new_fd, size = os.open(tmp, os.O_RDWR), self.row_bytes * 2
        old = np.flatnonzero(self.filled)
        step = max(1, READ_CHUNK_BYTES // size)
        for i in range(0, len(old), step):
            rows = old[i:i + step]
            values = self.read(rows).astype(np.float32)
            _write_rows(new_fd, offset, size, rows, values)
            self.crc[rows] = _row_crcs(values)
        os.fsync(new_fd)
        self.close()
        os.replace(tmp, self.array_path)
        self._fd, self.offset, self.dtype = new_fd, offset, np.dtype(np.float32)
        self._dirty = True
        self.checkpoint()

    def rows(self) -> "FeatureRows":
        """A read-only row view of the whole (filled) array."""
        if self.dtype is None:
            raise ValueError(f"{self.array_path}: no rows have been written")
        if not self.filled.all():
            raise ValueError(f"{self.array_path}: {int((~self.filled).sum())} rows are not filled")
        return FeatureRows(self.array_path, self.offset, self.dtype, (len(self), *self.row_shape))


def _row_crcs(values: np.ndarray) -> np.ndarray:
    """crc32 of each row's bytes."""
    flat = np.ascontiguousarray(values).reshape(len(values), -1).view(np.uint8)
    return np.fromiter((zlib.crc32(row) for row in flat), dtype=np.uint32, count=len(values))


def _state_digest(packed: np.ndarray, crc: np.ndarray) -> str:
    return hashlib.sha256(packed.tobytes() + np.ascontiguousarray(crc, dtype=np.uint32).tobytes()).hexdigest()


def _state_metadata(raw: bytes) -> dict:
    """The ``__metadata__`` of a safetensors byte string."""
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8:8 + n]).get("__metadata__", {})


Index = Union[int, slice, Sequence[int], np.ndarray, torch.Tensor]


class FeatureRows:
    """Rows of a stored (N, ...) array as float32 tensors, read on demand (a Tensor-like view).

    ``rows[i]``, ``rows[a:b]``, ``rows[idx_array]`` and ``rows[i, v]`` read only those rows from
    disk (or from an in-memory array) and convert only them to float32, so a DataLoader over it
    holds one batch at a time. ``rows[:]`` materialises everything (small data only).
    """

    def __init__(self, source: Union[Path, np.ndarray], offset: int = 0, dtype: Any = None,
                 shape: Optional[Tuple[int, ...]] = None) -> None:
        if isinstance(source, np.ndarray):
            self._array: Optional[np.ndarray] = source
            self.path, self.offset, self.dtype, self.shape = None, 0, source.dtype, tuple(source.shape)
        else:
            self._array = None
            self.path, self.offset, self.dtype, self.shape = Path(source), offset, np.dtype(dtype), tuple(shape)
        self._fd: Optional[int] = None
        self._row_bytes = int(np.prod(self.shape[1:], dtype=np.int64)) * np.dtype(self.dtype).itemsize

    def __len__(self) -> int:
        return self.shape[0]

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_fd": None}  # DataLoader workers reopen the file

    def __del__(self) -> None:
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)

    def read(self, rows: np.ndarray) -> np.ndarray:
        """Rows ``rows`` in storage dtype."""
        if self._array is not None:
            return self._array[rows]
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
        out = _read_rows(self._fd, self.offset, self._row_bytes, rows)
        return out.view(self.dtype).reshape((len(rows),) + self.shape[1:])

    def __getitem__(self, key: Any) -> torch.Tensor:
        rows, rest = (key[0], key[1:]) if isinstance(key, tuple) else (key, ())
        single = isinstance(rows, (int, np.integer)) or (isinstance(rows, torch.Tensor) and rows.ndim == 0)
        n = len(self)
        if single:
            r = int(rows)
            if not -n <= r < n:
                raise IndexError(f"row {r} out of range for {n} rows")
            idx = np.array([r % n])
        elif isinstance(rows, slice):
            idx = np.arange(*rows.indices(n))
        else:
            idx = np.asarray(rows.cpu() if isinstance(rows, torch.Tensor) else rows)
            idx = np.flatnonzero(idx) if idx.dtype == bool else np.where(idx < 0, idx + n, idx).astype(np.int64)
        data = self.read(idx)
        data = data[0][rest] if single else data[(slice(None),) + tuple(rest)]
        return torch.from_numpy(np.array(data, dtype=np.float32))

    def float(self) -> torch.Tensor:
        """Every row as one float32 tensor (small data only)."""
        return self[:]


class ConcatViews:
    """Several (N, V_k, ...) row views side by side as one (N, sum V_k, ...) view, read lazily."""

    def __init__(self, parts: Sequence[Any]) -> None:
        if len({len(p) for p in parts}) != 1:
            raise ValueError("ConcatViews needs parts with the same number of rows")
        self.parts = list(parts)
        self.shape = (len(parts[0]), sum(p.shape[1] for p in parts), *parts[0].shape[2:])

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key: Any) -> torch.Tensor:
        rows, rest = (key[0], key[1:]) if isinstance(key, tuple) else (key, ())
        if rest and isinstance(rest[0], (int, np.integer)):
            view = int(rest[0]) % self.shape[1]
            for part in self.parts:
                if view < part.shape[1]:
                    return part[(rows, view, *rest[1:])]
                view -= part.shape[1]
        single = isinstance(rows, (int, np.integer))
        out = torch.cat([p[rows] for p in self.parts], dim=0 if single else 1)
        return out[tuple(rest)] if single else out[(slice(None),) + tuple(rest)]

    def float(self) -> torch.Tensor:
        return self[:]
