"""Files: atomic writes (readers never see half a file, a crash leaves the old one intact), where
capnet keeps what it derives (``capnet_cache_dir``) and what a full disk under a cache means.

A cache is an optimisation: every cached value is also computable (features from the tower,
image checks by decoding) and the feature cache stores features rounded exactly as an uncached
run rounds them, so a run whose cache cannot be written gives the same numbers, only slower
(:func:`go_on_without_cache`). Under DDP the ranks could no longer agree on the cache's state,
so there a full disk stops the run with one line instead.
"""
from __future__ import annotations

import errno
import logging
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable, List, Sequence, Set, Tuple, Union

import numpy as np

from capnet.errors import CapnetError, DiskFullError
from capnet.runtime import distributed

log = logging.getLogger(__name__)

PathLike = Union[str, Path]
NO_SPACE = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))  # a full disk, an exhausted quota


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(data: bytes, path: PathLike) -> None:
    """Write ``data`` to ``path`` via a fsync'ed temporary file and ``os.replace``.

    The file gets the permissions a plain ``open`` would give (0666 less the umask), not
    mkstemp's private 0600: run directories and exports are meant to be shared. A full disk (or
    quota) is a :class:`~capnet.errors.DiskFullError` naming ``path``; the old file stays.
    """
    path = Path(path)
    try:
        _write_replace(data, path)
    except OSError as err:
        if err.errno in NO_SPACE:
            raise DiskFullError(str(path), err.errno) from None
        raise


def _write_replace(data: bytes, path: Path) -> None:
    """Temporary file beside ``path``, written with ``os.write`` (the one place bytes reach the
    disk), fsync'ed, then renamed over ``path``; the temporary file is removed on any failure."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        try:
            if hasattr(os, "fchmod"):
                os.fchmod(fd, 0o666 & ~_umask())
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    try:  # make the rename itself durable (POSIX); best effort elsewhere
        dir_fd = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)


def is_disk_full(err: BaseException) -> bool:
    """Whether ``err`` is a write that found no space or no quota."""
    return isinstance(err, OSError) and err.errno in NO_SPACE


_WARNED: Set[str] = set()


def go_on_without_cache(root: PathLike, err: BaseException) -> None:
    """Warn (once per cache ``root`` and process) that the cache could not be written, or re-raise
    ``err``: anything that is not a full disk or quota, and a full disk under DDP (one line)."""
    if not is_disk_full(err):
        raise err
    where = getattr(err, "path", None) or getattr(err, "filename", None) or root
    if distributed.world_size() > 1:
        raise CapnetError(f"feature cache {root}: no space left on the device to write {where}; free space "
                          "or pass --no-cache (or --cache-dir on another disk)") from None
    if str(root) not in _WARNED:
        _WARNED.add(str(root))
        log.warning("feature cache %s: no space left on the device%s; going on without the cache "
                    "(same results, features are recomputed; free space or use --cache-dir elsewhere)", root,
                    "" if str(where) == str(root) else f" to write {where}")


def file_fingerprints(paths: Sequence[PathLike]) -> List[Tuple[str, int, int]]:
    """(absolute path, size, mtime_ns) per file: a changed or replaced file changes its fingerprint."""
    stats = [(Path(p), os.stat(p)) for p in paths]
    return [(str(p.resolve()), int(st.st_size), int(st.st_mtime_ns)) for p, st in stats]


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def write_json_atomic(path: PathLike, obj: Any) -> None:
    """JSON (numpy scalars and arrays allowed) written through :func:`atomic_write_bytes`."""
    atomic_write_bytes(json.dumps(obj, indent=2, default=_json_default).encode(), path)


def sha256_of(files: Iterable[PathLike]) -> str:
    """SHA-256 over the bytes of ``files`` in order (one file: its usual checksum)."""
    digest = hashlib.sha256()
    for f in files:
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def capnet_cache_dir() -> Path:
    """``$CAPNET_CACHE`` (``~`` expanded) or ``~/.cache/capnet``.

    Image features, the extracted MiniLM, weight digests, the text bridge's keys and stratified
    split indices live under it; deleting it costs time, never results.
    """
    root = os.environ.get("CAPNET_CACHE")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "capnet"
