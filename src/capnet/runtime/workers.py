"""DataLoader worker set-up: seeds, and quiet when the main process stops first.

Workers hand batches to the main process through file descriptors (torch's default sharing on
Linux): a thread of the worker (multiprocessing's ``resource_sharer``) serves each one. When the
main process stops mid-transfer (Ctrl-C), that thread's connection is reset and Python prints
its traceback (through ``sys.excepthook``) into the user's terminal after capnet's one-line
message; it says nothing the line does not, so the worker drops it.
"""
from __future__ import annotations

import sys
import traceback
from types import TracebackType
from typing import Optional, Type

from capnet.runtime.seed import seed_worker

_default_hook = sys.excepthook


def _quiet_sharer_hook(kind: Type[BaseException], value: BaseException, tb: Optional[TracebackType]) -> None:
    """Drop a reset connection in the fd-sharing thread (which reports through ``sys.excepthook``);
    anything else is printed as usual."""
    frames = traceback.extract_tb(tb) if tb is not None else []
    if issubclass(kind, (ConnectionError, EOFError)) and any(f.filename.endswith("resource_sharer.py") for f in frames):
        return
    _default_hook(kind, value, tb)


def quiet_worker(worker_id: int) -> None:
    """``worker_init_fn`` that only installs the quiet hook (loaders whose workers draw no randomness)."""
    sys.excepthook = _quiet_sharer_hook


def init_worker(worker_id: int) -> None:
    """``worker_init_fn`` of capnet's loaders: seeds (:func:`~capnet.runtime.seed.seed_worker`) and the quiet hook."""
    seed_worker(worker_id)
    quiet_worker(worker_id)
