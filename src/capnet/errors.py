"""Errors a user can act on. Each message names the file, key or class at fault."""
from __future__ import annotations


class CapnetError(Exception):
    """Base class: the CLI prints these as one line and exits 1 (no traceback)."""


class DataError(CapnetError, ValueError):
    """A dataset problem: missing/corrupt image, unknown class, malformed row, duplicate id."""


class CheckpointError(CapnetError, ValueError):
    """A checkpoint that is missing, of the wrong architecture, or of the wrong shapes."""


class TrainingError(CapnetError, RuntimeError):
    """Training cannot continue (e.g. a non-finite loss); the last good checkpoint is kept."""
