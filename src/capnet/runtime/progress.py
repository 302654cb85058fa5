"""Progress bars only where someone watches them: on a terminal.

Redirected to a file (a cluster job, ``nohup``, a CI log), tqdm's carriage-return redraws land in
the log as fragments between the epoch lines; there the bars stay off and the one-line log
messages (each epoch, each cache fill) say the same.
"""
from __future__ import annotations

import sys


def on_terminal() -> bool:
    """Whether ``sys.stderr`` (where tqdm draws) is a terminal now."""
    stream = sys.stderr
    try:
        return bool(stream is not None and stream.isatty())
    except (AttributeError, ValueError):  # a closed or odd stream
        return False
