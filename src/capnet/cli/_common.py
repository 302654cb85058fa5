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


RUN_DEFAULT = "the run's"


def add_data_args(parser: argparse.ArgumentParser, positional_root: bool, reader_default: Optional[str]) -> None:
    """The dataset flags, spelt the same on every command: DIR / --data-dir, --reader (alias
    --data), --split-dir."""
    from capnet.data import list_readers

    if positional_root:
        parser.add_argument("dir", nargs="?", default=None, metavar="DIR",
                            help="dataset root (folder layout, VOCdevkit, COCO or NUS-WIDE folder)")
    root_default = " (same as DIR)" if positional_root else " (default: the run's data.root)"
    parser.add_argument("--data-dir", default=None, metavar="DIR", help="dataset root" + root_default)
    parser.add_argument("--reader", "--data", dest="reader", default=reader_default, choices=list_readers(),
                        help=f"dataset layout (default: {reader_default or RUN_DEFAULT}); --data is an alias")
    parser.add_argument("--split-dir", default=None, metavar="DIR",
                        help="VOC-LT / COCO-LT split folder for the native layouts (e.g. data/splits/voc_lt)"
                             + ("" if positional_root else "; default: the run's, unless --data-dir is given"))


def data_root(args: argparse.Namespace) -> str:
    """The dataset root of a command taking DIR or --data-dir (one of them, not two that differ)."""
    from capnet.errors import CapnetError

    given = {p for p in (getattr(args, "dir", None), args.data_dir) if p}
    if not given:
        raise CapnetError("no dataset given: pass DIR (or --data-dir DIR)")
    if len(given) > 1:
        raise CapnetError(f"two dataset roots given ({', '.join(sorted(given))}): pass DIR or --data-dir, not both")
    return given.pop()


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


def add_run_args(parser: argparse.ArgumentParser) -> None:
    """--run DIR, --weights PATH and --set KEY=VALUE for commands that use a finished run."""
    parser.add_argument("--run", required=True, help="run directory written by train/demo")
    parser.add_argument("--weights", default=None, metavar="PATH",
                        help="backbone weights on this machine (model.weights; the run's sha256 is checked). "
                             "Default: as recorded, else a file of that name in $CAPNET_WEIGHTS_DIR")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                        help="change how the run executes, e.g. --set train.device=cpu --set data.eval_batch_size=8 "
                             "(runtime keys only: what was trained cannot change)")


def run_overrides(args: argparse.Namespace) -> List[str]:
    """The --set items plus --weights as ``model.weights=PATH`` (resolved to an absolute path)."""
    extra = [f"model.weights={Path(args.weights).expanduser().resolve()}"] if args.weights else []
    return list(args.overrides) + extra
