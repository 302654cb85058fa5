"""``capnet train --config FILE [--set key=value ...] --out DIR [--resume]``."""
from __future__ import annotations

import argparse
from pathlib import Path

from capnet.cli._common import add_config_args, is_rank_zero, resolve_config


def run(args: argparse.Namespace) -> int:
    """Train, select on validation, evaluate on test and write the run directory."""
    from capnet.engine.runs import default_cache_dir, train_run
    from capnet.report import summary_table

    cfg = resolve_config(args.config, args.overrides)
    cache = None if args.no_cache else Path(args.cache_dir) if args.cache_dir else default_cache_dir()
    metrics = train_run(cfg, Path(args.out), resume=args.resume, cache_dir=cache)
    if is_rank_zero():
        print(summary_table(metrics))
        print(f"run directory: {args.out}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``train`` to the top-level parser."""
    p = subparsers.add_parser(
        "train", help="train a model from a config", description=__doc__,
        epilog="Config merge order (later wins): dataclass defaults, each --config file in order "
               "(a file's `base:` list first), then each --set. Unknown keys are errors.")
    add_config_args(p, required=True)
    p.add_argument("--out", required=True, help="run directory to write")
    p.add_argument("--resume", action="store_true", help="continue from OUT/last.safetensors")
    p.add_argument("--cache-dir", default=None, help="feature cache (default $CAPNET_CACHE/features)")
    p.add_argument("--no-cache", action="store_true", help="do not read or write the feature cache")
    p.set_defaults(func=run)
