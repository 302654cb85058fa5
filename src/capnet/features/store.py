"""One feature array on disk, filled in place: the storage under :mod:`capnet.features.cache`.

An entry ``<stem>`` is ``<stem>.npy``, an (N, ...) float16 array created sparse and written with
positional writes (never replaced once it exists, so processes filling it share it);
``<stem>.index.json``, the cache key and one id per row, written once; and
``<stem>.state.safetensors``, the crc32 of each filled row (-1: missing) under a sha256 bound to the
entry, rewritten atomically every ``flush_every_s`` seconds of a fill and when it stops. A fill
killed at any point leaves every row its last state calls filled on disk, so the next computes only
the others. Opening checks the state's sha256, the array's header and every filled row's crc32;
what fails is warned about, naming the file, and recomputed (those rows or the entry), never used.
Reads are ``os.pread`` of the rows asked for (:class:`FeatureRows`): memory stays bounded by a batch.

Format 4 dropped, for want of a measurement needing them: the ``fdatasync`` before each state write
(a row the OS never wrote fails its crc32 on the next open and is recomputed), the separate filled
bitmap, and the float32 widening on overflow (no cached feature measured comes near float16's range;
overflow is a ``FeatureRangeError`` now).
"""
from __future__ import annotations

import hashlib
import json
import os
import time
import warnings
import zlib
from pathlib import Path
from typing import Any, List, Optional, Sequence, Tuple

import numpy as np
import torch
from numpy.lib.format import open_memmap
from safetensors import safe_open
from safetensors.numpy import save as st_save

from capnet.fileio import atomic_write_bytes

FORMAT_VERSION = 4  # 4: float16 only, the crc table is the state; 3 kept a filled bitmap and widened to float32
DTYPE = np.dtype(np.float16)
READ_CHUNK_BYTES = 16 << 20  # verification and copies read at most this much at a time


def _runs(rows: np.ndarray) -> List[Tuple[int, int, int]]:
    """(position in ``rows``, first row, count) for each run of consecutive row numbers."""
    breaks = np.flatnonzero(np.diff(rows) != 1) + 1
    starts, ends = np.concatenate([[0], breaks]), np.concatenate([breaks, [len(rows)]])
    return [(int(s), int(rows[s]), int(e - s)) for s, e in zip(starts, ends) if e > s]


def _read_rows(fd: int, offset: int, row_shape: Tuple[int, ...], rows: np.ndarray) -> np.ndarray:
    """(k, *row_shape) float16: rows ``rows`` of the array whose data starts at ``offset`` of ``fd``."""
    out = np.empty((len(rows), *row_shape), dtype=DTYPE)
    row_bytes = int(np.prod(row_shape, dtype=np.int64)) * DTYPE.itemsize
    for pos, first, count in _runs(np.asarray(rows, dtype=np.int64)):
        flat, start, done = out[pos:pos + count].reshape(-1).view(np.uint8), offset + first * row_bytes, 0
        while done < flat.size:  # os.pread may return fewer bytes than asked
            got = os.pread(fd, flat.size - done, start + done)
            if not got:
                raise OSError(f"unexpected end of file at byte {start + done}")
            flat[done:done + len(got)] = np.frombuffer(got, dtype=np.uint8)
            done += len(got)
    return out


def _header(path: Path) -> Tuple[Optional[Tuple[int, ...]], int]:
    """(shape, data offset) of a float16 .npy file; (None, 0) if it is not one (or is truncated)."""
    try:
        array = np.load(path, mmap_mode="r")
        return (tuple(array.shape), int(array.offset)) if array.dtype == DTYPE else (None, 0)
    except (OSError, ValueError):
        return None, 0


def row_crcs(values: np.ndarray) -> np.ndarray:
    """crc32 of each row's bytes (int64)."""
    flat = np.ascontiguousarray(values).reshape(len(values), -1).view(np.uint8)
    return np.fromiter((zlib.crc32(row) for row in flat), dtype=np.int64, count=len(values))


class RowFile:
    """A (N, ...) float16 array on disk whose rows are filled in place and checked by crc32."""

    def __init__(self, stem: Path, key: str, ids: Sequence[str], flush_every_s: float = 10.0) -> None:
        self.stem, self.key, self.ids, self.flush_every_s = Path(stem), key, list(ids), flush_every_s
        self.crc = np.full(len(self.ids), -1, dtype=np.int64)  # -1: not filled
        self.row_shape: Optional[Tuple[int, ...]] = None
        self.offset, self._fd, self._last_flush, self._dirty = 0, None, time.monotonic(), False

    def _file(self, suffix: str) -> Path:
        return self.stem.with_name(self.stem.name + suffix)

    array_path = property(lambda self: self._file(".npy"))
    index_path = property(lambda self: self._file(".index.json"))
    state_path = property(lambda self: self._file(".state.safetensors"))
    filled = property(lambda self: self.crc >= 0, doc="(N,) bool: the rows holding trusted values")
    row_bytes = property(lambda self: int(np.prod(self.row_shape, dtype=np.int64)) * DTYPE.itemsize)

    def __len__(self) -> int:
        return len(self.ids)

    def missing(self) -> np.ndarray:
        """Row numbers not filled yet, ascending."""
        return np.flatnonzero(self.crc < 0)

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
            atomic_write_bytes(json.dumps(entry._index()).encode(), entry.index_path)
        if verify:
            entry._verify()
        return entry

    def _index(self) -> dict:
        return {"format": FORMAT_VERSION, "key": self.key, "ids": self.ids}

    def _digest(self, crc: np.ndarray) -> str:
        """sha256 of a state, bound to this entry (another entry's state fails it)."""
        return hashlib.sha256(f"{FORMAT_VERSION}/{self.key}/{self.stem.name}/".encode() + crc.tobytes()).hexdigest()

    def _load(self) -> Optional[str]:
        """Read index, state and array header; why they cannot be trusted, or None."""
        try:
            if self.index_path.is_file() and json.loads(self.index_path.read_text()) != self._index():
                return f"{self.index_path.name} records another key or image list"
            if not self.state_path.is_file():
                return None  # nothing filled yet (an array without a state holds no trusted row)
            with safe_open(self.state_path, "np") as f:
                crc, meta = f.get_tensor("crc32").astype(np.int64), f.metadata() or {}
            if len(crc) != len(self) or meta.get("sha256") != self._digest(crc):
                return f"{self.state_path.name} fails its checksum (damaged, or another entry's)"
            shape, offset = _header(self.array_path)
            if (crc >= 0).any() and (shape is None or shape[0] != len(self)):
                return f"{self.array_path.name} is not a {len(self)}-row {DTYPE} array (truncated?)"
        except (OSError, ValueError, KeyError, TypeError, RuntimeError) as err:
            return f"unreadable ({type(err).__name__}: {err})"
        if shape is not None:
            self.crc, self.row_shape, self.offset = crc, shape[1:], offset
        return None

    def _verify(self) -> None:
        """Un-fill (and warn about) filled rows whose bytes no longer match their crc32."""
        rows, bad = np.flatnonzero(self.crc >= 0), []
        step = max(1, READ_CHUNK_BYTES // self.row_bytes) if len(rows) else 1
        for i in range(0, len(rows), step):
            chunk = rows[i:i + step]
            bad.extend(chunk[row_crcs(self.read(chunk)) != self.crc[chunk]].tolist())
        if bad:
            warnings.warn(f"feature cache entry {self.array_path}: {len(bad)} row(s) fail their checksum "
                          f"(first: row {bad[0]}); recomputing them")
            self.crc[bad], self._dirty = -1, True
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

    def write(self, rows: np.ndarray, values: np.ndarray) -> None:
        """Store float16 ``values`` (k, ...) at ``rows``; marked filled at the next checkpoint."""
        if self.row_shape is None:
            self._create(tuple(int(s) for s in values.shape[1:]))
        if values.dtype != DTYPE or tuple(values.shape[1:]) != self.row_shape:
            raise ValueError(f"{self.array_path}: rows {values.dtype}{list(values.shape[1:])}, "
                             f"the array holds {DTYPE}{list(self.row_shape)}")
        rows = np.asarray(rows, dtype=np.int64)
        order = np.argsort(rows, kind="stable")
        rows, values = rows[order], np.ascontiguousarray(values[order])
        for pos, first, count in _runs(rows):
            os.pwrite(self._handle(), values[pos:pos + count].tobytes(), self.offset + first * self.row_bytes)
        self.crc[rows], self._dirty = row_crcs(values), True
        if time.monotonic() - self._last_flush >= self.flush_every_s:
            self.checkpoint()

    def read(self, rows: np.ndarray) -> np.ndarray:
        """Rows ``rows`` (k,) as float16, read with positional reads (no mapping)."""
        return _read_rows(self._handle(), self.offset, self.row_shape, rows)

    def checkpoint(self) -> None:
        """Record the rows written so far as filled (one atomic state write)."""
        self._last_flush = time.monotonic()
        if self._dirty:
            meta = {"format": str(FORMAT_VERSION), "sha256": self._digest(self.crc)}
            atomic_write_bytes(st_save({"crc32": self.crc}, metadata=meta), self.state_path)
            self._dirty = False

    def _create(self, row_shape: Tuple[int, ...]) -> None:
        """The sparse array, once the first rows tell its row shape; one another process made is shared."""
        self.close()
        shape, tmp = (len(self), *row_shape), self._file(f".{os.getpid()}.tmp")
        open_memmap(tmp, mode="w+", dtype=DTYPE, shape=shape)  # header + sparse zeros
        try:
            os.link(tmp, self.array_path)  # atomic, and never replaces an array another process fills
        except FileExistsError:
            if _header(self.array_path)[0] != shape:  # a leftover no state refers to
                os.replace(tmp, self.array_path)
        tmp.unlink(missing_ok=True)
        self.row_shape, self.offset = row_shape, _header(self.array_path)[1]

    def rows(self) -> "FeatureRows":
        """A read-only row view of the whole (filled) array."""
        if self.row_shape is None or not self.filled.all():
            raise ValueError(f"{self.array_path}: {len(self.missing())} rows are not filled")
        return FeatureRows(self.array_path, self.offset, (len(self), *self.row_shape))


class FeatureRows:
    """Rows of a stored (N, ...) float16 array as float32 tensors, read on demand (a Tensor-like view).

    ``rows[i]``, ``rows[a:b]``, ``rows[idx_array]`` and ``rows[i, v]`` read only those rows from
    disk and convert only them, so a DataLoader over it holds one batch at a time.
    """

    def __init__(self, path: Path, offset: int, shape: Tuple[int, ...]) -> None:
        self.path, self.offset, self.shape, self._fd = Path(path), offset, tuple(shape), None

    def __len__(self) -> int:
        return self.shape[0]

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_fd": None}  # DataLoader workers reopen the file

    def __del__(self) -> None:
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)

    def __getitem__(self, key: Any) -> torch.Tensor:
        rows, rest = (key[0], key[1:]) if isinstance(key, tuple) else (key, ())
        rows = rows.cpu().numpy() if isinstance(rows, torch.Tensor) else rows
        single = not isinstance(rows, slice) and np.ndim(rows) == 0
        if single or isinstance(rows, slice):  # range() indexes like a sequence (IndexError out of range)
            idx = np.atleast_1d(np.asarray(range(len(self))[rows if isinstance(rows, slice) else int(rows)]))
        else:
            idx = np.asarray(rows)
            idx = np.flatnonzero(idx) if idx.dtype == bool else np.where(idx < 0, idx + len(self), idx)
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
        data = torch.from_numpy(_read_rows(self._fd, self.offset, self.shape[1:], idx).astype(np.float32))
        return data[(0, *rest)] if single else data[(slice(None), *rest)]

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
