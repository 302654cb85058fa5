"""A full disk under the feature cache: the cache is an optimisation, so the run goes on without it.

Every cached value is also computable (features from the tower, image checks by decoding), and
the cache stores features rounded exactly as an uncached run rounds them, so a run whose cache
cannot be written gives the same numbers, only slower. The warning is printed once per cache
folder and process; under DDP the ranks could no longer agree on the cache's state, so there
a full disk stops the run with one line instead.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Set, Union

from capnet.errors import CapnetError
from capnet.fileio import is_disk_full
from capnet.runtime import distributed

log = logging.getLogger(__name__)
_WARNED: Set[str] = set()


def go_on_without_cache(root: Union[str, Path], err: BaseException) -> None:
    """Warn (once per ``root``) that the cache could not be written, or re-raise ``err``.

    Re-raises anything that is not a full disk or quota, and a full disk under DDP (as a
    one-line CapnetError naming the file).
    """
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
