"""A full disk for tests: writes under one folder fail with ENOSPC, as on a real full file system.

Every capnet write reaches the disk through ``os.write`` (``capnet.fileio``) or ``os.pwrite``
(feature cache rows); both are wrapped so that, once ``allow`` distinct files under ``under``
(whose names contain ``name``) have been written, every further write there fails. The file a
descriptor belongs to is read from ``/proc/self/fd`` (Linux), so nothing of capnet is patched.
"""
from __future__ import annotations

import errno
import os
import sys
from pathlib import Path
from typing import List, Optional

import pytest

needs_proc_fd = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/fd (Linux)")


class FullDisk:
    """Installed by :func:`fill_disk`; ``failed`` lists the files whose writes were refused."""

    def __init__(self, under: Path, name: str, allow: int) -> None:
        self.under, self.name, self.allow = str(Path(under).resolve()), name, allow
        self.written: List[str] = []
        self.failed: List[str] = []

    def _target(self, fd: int) -> Optional[str]:
        try:
            path = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            return None
        inside = path == self.under or path.startswith(self.under + os.sep)
        return path if inside and self.name in os.path.basename(path) else None

    def check(self, fd: int) -> None:
        path = self._target(fd)
        if path is None:
            return
        if path not in self.written:
            self.written.append(path)
        if len(self.written) > self.allow:
            self.failed.append(path)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)


def fill_disk(monkeypatch: pytest.MonkeyPatch, under: Path, name: str = "", allow: int = 0) -> FullDisk:
    """Make the disk under ``under`` full after ``allow`` files (names containing ``name``) were written."""
    disk = FullDisk(under, name, allow)
    real_write, real_pwrite = os.write, os.pwrite

    def write(fd, data):
        disk.check(fd)
        return real_write(fd, data)

    def pwrite(fd, data, offset):
        disk.check(fd)
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "write", write)
    monkeypatch.setattr(os, "pwrite", pwrite)
    return disk
