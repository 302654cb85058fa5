"""Argument helpers shared by the run commands (config files, overrides, paths)."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import List, Optional, Sequence

from capnet.config import Config, load_config


def repo_root() -> Optional[Path]:
    """The source checkout holding configs/ and data/ (None for an installed wheel)."""
    for parent in Path(__file__).resolve().parents:
        if (parent / "configs" / "demo.yaml").is_file():
            return parent
    return None


def is_rank_zero() -> bool:
    """True unless this is a non-zero rank under torchrun (only rank 0 prints results)."""
    import os

    return int(os.environ.get("RANK", "0")) == 0


def add_config_args(parser: argparse.ArgumentParser, required: bool) -> None:
    """--config FILE (repeatable, merged in order) and --set key=value (repeatable)."""
    parser.add_argument("--config", action="append", default=[], required=required, metavar="FILE",
                        help="YAML config; repeat to merge several in order (later wins)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                        help="override one config value, e.g. --set train.epochs=5 (after all files)")


def resolve_config(files: Sequence[str], overrides: Sequence[str]) -> Config:
    """Merge the files then the overrides (order documented in capnet.config)."""
    return load_config(list(files), list(overrides))


def with_data_root(overrides: List[str], root: Optional[str], reader: Optional[str],
                   split_dir: Optional[str]) -> List[str]:
    """Turn --data-dir/--reader/--split-dir flags into config overrides."""
    extra = []
    if root:
        extra.append(f"data.root={root}")
    if reader:
        extra.append(f"data.reader={reader}")
    if split_dir:
        extra.append(f"data.split_dir={split_dir}")
    return list(overrides) + extra
