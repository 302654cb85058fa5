"""Where capnet keeps what it derives and can derive again: ``$CAPNET_CACHE`` or ``~/.cache/capnet``.

Image features, the extracted MiniLM, weight digests, the text bridge's keys and stratified
split indices live under it; deleting it costs time, never results.
"""
from __future__ import annotations

import os
from pathlib import Path


def capnet_cache_dir() -> Path:
    """``$CAPNET_CACHE`` (``~`` expanded) or ``~/.cache/capnet``."""
    root = os.environ.get("CAPNET_CACHE")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "capnet"
