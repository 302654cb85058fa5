"""One feature array on disk, filled in place: the storage under :mod:`capnet.features.cache`.

An entry is ``<stem>.npy``, an (N, ...) float16 array created sparse, written by positional writes,
never replaced once it exists (processes filling it share it); ``<stem>.index.json``, the key and one
id per row; and ``<stem>.state.safetensors``, each row's crc32 (-1: missing) under a sha256 bound to
the entry, rewritten atomically every ``flush_every_s`` seconds of a fill and when it stops: a fill
killed at any point leaves every row its last state calls filled on disk. Reads are ``os.pread`` of
the rows asked for (:class:`FeatureRows`), so memory stays bounded by a batch.

Format 4 dropped, as no measurement needs them: the ``fdatasync`` before each state write (a row the
OS never wrote fails its crc32 on the next open and is recomputed), the separate filled bitmap, and
the float32 widening on overflow (cached features stay far inside float16; overflow is an error).
"""
from __future__ import annotations

import hashlib
import json
import os
import time
import warnings
import zlib
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

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
    view = memoryview(out.reshape(-1).view(np.uint8))  # filled in place, one pread per run of rows
    row_bytes = int(np.prod(row_shape, dtype=np.int64)) * DTYPE.itemsize
    for pos, first, count in _runs(np.asarray(rows, dtype=np.int64)):
        at, start, end = pos * row_bytes, offset + first * row_bytes, offset + (first + count) * row_bytes
        while start < end:  # os.pread may return fewer bytes than asked
            got = os.pread(fd, end - start, start)
            if not got:
                raise OSError(f"unexpected end of file at byte {start}")
            view[at:at + len(got)], at, start = got, at + len(got), start + len(got)
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
        self.row_shape: Optional[Tuple[int, ...]] = None  # known once the array exists
        self.offset, self._fd, self._last_flush, self._dirty = 0, None, time.monotonic(), False
        self._owner = hashlib.sha256(json.dumps([FORMAT_VERSION, key, self.ids]).encode()).digest()

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
        """The entry at ``stem`` (made if absent); damage (with ``verify``: rows failing their crc32) is
        warned about and recomputed."""
        entry = cls(stem, key, ids, flush_every_s)
        if (problem := entry._load()) is not None:
            warnings.warn(f"feature cache entry {entry.array_path} is corrupt: {problem}; deleting it and recomputing")
            entry.delete()
            entry = cls(stem, key, ids, flush_every_s)
        if not entry.index_path.is_file():
            atomic_write_bytes(json.dumps({"key": key, "ids": entry.ids}).encode(), entry.index_path)
        bad = [int(r) for chunk, _, ok in entry._checked(np.arange(len(entry))) for r in chunk[~ok]] if verify else []
        if bad:
            warnings.warn(f"feature cache entry {entry.array_path}: {len(bad)} row(s) fail their checksum "
                          f"(first: row {bad[0]}); recomputing them")
            entry.crc[bad], entry._dirty = -1, True
            entry.checkpoint()
        return entry

    def _digest(self, crc: np.ndarray) -> str:
        """sha256 of a state, bound to this entry's key and image list (another entry's state fails it)."""
        return hashlib.sha256(self._owner + crc.tobytes()).hexdigest()

    def _load(self) -> Optional[str]:
        """Read the state and the array header; why they cannot be trusted, or None."""
        if not self.state_path.is_file():
            return None  # nothing filled yet (an array without a state holds no trusted row)
        try:
            with safe_open(self.state_path, "np") as f:
                crc, meta = f.get_tensor("crc32").astype(np.int64), f.metadata() or {}
        except (OSError, ValueError, KeyError, RuntimeError) as err:
            return f"{self.state_path.name} is unreadable ({type(err).__name__}: {err})"
        if len(crc) != len(self) or meta.get("sha256") != self._digest(crc):
            return f"{self.state_path.name} fails its checksum (damaged, or another entry's)"
        shape, self.offset = _header(self.array_path)
        if (crc >= 0).any() and (shape is None or shape[0] != len(self)):
            return f"{self.array_path.name} is not a {len(self)}-row {DTYPE} array (truncated?)"
        if shape is not None:
            self.crc, self.row_shape = crc, shape[1:]
        return None

    def _checked(self, rows: np.ndarray) -> Iterator[Tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """(rows, values, crc32 matches) per chunk of the filled ones among ``rows``."""
        rows = rows[self.crc[rows] >= 0]
        step = max(1, READ_CHUNK_BYTES // self.row_bytes) if len(rows) else 1
        for chunk in (rows[i:i + step] for i in range(0, len(rows), step)):
            values = self.read(chunk)
            yield chunk, values, row_crcs(values) == self.crc[chunk]

    def copy_from(self, src: "RowFile", want: Dict[str, int]) -> int:
        """Copy in the filled rows of ``src`` whose id ``want`` maps to a row here, if their crc32 holds."""
        rows, copied = np.asarray([r for r, i in enumerate(src.ids) if i in want], dtype=np.int64), 0
        for chunk, values, ok in src._checked(rows):
            self.write(np.asarray([want[src.ids[r]] for r in chunk[ok]], dtype=np.int64), values[ok])
            copied += int(ok.sum())
        src.close()
        return copied

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
        self._fd = os.open(self.array_path, os.O_RDWR) if self._fd is None else self._fd
        return self._fd

    def write(self, rows: np.ndarray, values: np.ndarray) -> None:
        """Store float16 ``values`` (k, ...) at ``rows``; marked filled at the next checkpoint."""
        if self.row_shape is None:
            self._create(tuple(int(s) for s in values.shape[1:]))
        if values.dtype != DTYPE or tuple(values.shape[1:]) != self.row_shape:
            raise ValueError(f"{self.array_path}: rows {values.dtype}{list(values.shape[1:])}, "
                             f"the array holds {DTYPE}{list(self.row_shape)}")
        rows = np.asarray(rows, dtype=np.int64)
        for pos, first, count in _runs(rows):  # one write per run of consecutive rows
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
            meta = {"sha256": self._digest(self.crc)}
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
        """A read-only row view of the whole (filled) array; this writer is closed."""
        if self.row_shape is None or not self.filled.all():
            raise ValueError(f"{self.array_path}: {len(self.missing())} rows are not filled")
        self.close()
        return FeatureRows(self.array_path, self.offset, (len(self), *self.row_shape))


class FeatureRows:
    """Rows of a stored (N, ...) float16 array as float32 tensors, read on demand: ``rows[i]``,
    ``rows[a:b]``, ``rows[int_array]``, ``rows[i, v]`` read only those rows (``rows[:]``: all)."""

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
        rows = range(len(self))[rows] if isinstance(rows, slice) else rows
        single = np.ndim(rows) == 0
        idx = np.atleast_1d(np.asarray(range(len(self))[int(rows)] if single else rows, dtype=np.int64))
        self._fd = os.open(self.path, os.O_RDONLY) if self._fd is None else self._fd
        data = torch.from_numpy(_read_rows(self._fd, self.offset, self.shape[1:], idx).astype(np.float32))
        return data[(0, *rest)] if single else data[(slice(None), *rest)]

    def float(self) -> torch.Tensor:
        return self[:]

