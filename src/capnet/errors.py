"""Errors a user can act on. Each message names the file, key or class at fault."""
from __future__ import annotations

from typing import Any, Mapping, Optional


class CapnetError(Exception):
    """Base class: the CLI prints these as one line and exits 1 (no traceback)."""


class DataError(CapnetError, ValueError):
    """A dataset problem: missing/corrupt image, unknown class, malformed row, duplicate id."""


class CheckpointError(CapnetError, ValueError):
    """A checkpoint that is missing, of the wrong architecture, or of the wrong shapes."""


def check_state(expected: Mapping[str, Any], found: Mapping[str, Any], where: Any) -> None:
    """Raise CheckpointError naming ``where`` and every missing / unexpected / mis-shaped tensor of
    ``found`` against ``expected`` (both name -> tensor)."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    shapes = [f"{k}: checkpoint {tuple(found[k].shape)} vs model {tuple(expected[k].shape)}"
              for k in sorted(set(expected) & set(found)) if tuple(found[k].shape) != tuple(expected[k].shape)]
    parts = [f"missing keys {missing}" if missing else "", f"unexpected keys {unexpected}" if unexpected else "",
             f"shape mismatches [{'; '.join(shapes)}]" if shapes else ""]
    if any(parts):
        raise CheckpointError(f"{where}: does not match the model: " + ", ".join(p for p in parts if p))


class FeatureRangeError(CapnetError, ValueError):
    """Image features beyond float16's range, which the feature cache stores (and rounds every run to)."""


class TrainingError(CapnetError, RuntimeError):
    """Training cannot continue (e.g. a non-finite loss); the last good checkpoint is kept."""


class DiskFullError(CapnetError, OSError):
    """A write found no space (ENOSPC) or no quota (EDQUOT); the file it was replacing is intact."""

    def __init__(self, path: str, errno_: int) -> None:
        super().__init__(errno_, f"no space left on the device to write {path} (the previous version, if any, "
                                 f"is intact)")
        self.path = path

    def __str__(self) -> str:
        return str(self.strerror)


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during training, annotated with where: the CLI prints one line and exits 130.

    ``epoch`` is the epoch that was running, ``finished`` the last epoch whose checkpoint was
    written (``--resume`` continues after it).
    """

    def __init__(self, epoch: int, finished: int) -> None:
        super().__init__(epoch, finished)
        self.epoch, self.finished = epoch, finished

    def __str__(self) -> str:
        return (f"interrupted in epoch {self.epoch}; `--resume` continues from epoch {self.finished + 1}"
                if self.finished else f"interrupted in epoch {self.epoch}; no epoch had finished (rerun to start again)")


WORKER_TRACEBACK = "\nOriginal Traceback (most recent call last):\n"  # torch's DataLoader re-raise


def _worker_message(text: str, kind: type) -> Optional[str]:
    """The original message inside torch's re-raise text: after the last ``<module>.<Type>: ``."""
    prefixes = (f"{kind.__module__}.{kind.__qualname__}: ", f"{kind.__qualname__}: ")
    lines = text.splitlines()
    for k in range(len(lines) - 1, -1, -1):
        prefix = next((p for p in prefixes if lines[k].startswith(p)), None)
        if prefix is not None:
            return "\n".join([lines[k][len(prefix):], *lines[k + 1:]])
    return None


def one_line(err: BaseException) -> str:
    """The message of ``err`` as the user should see it, on one line.

    An error raised in a DataLoader worker comes back re-raised with the same type but a message
    of "Caught DataError in DataLoader worker process 0." plus the worker's whole traceback, the
    line naming the file last; this returns that original message alone.
    """
    text = str(err)
    if WORKER_TRACEBACK in text:
        text = _worker_message(text, type(err)) or text
    return " ".join(part.strip() for part in text.splitlines() if part.strip())
