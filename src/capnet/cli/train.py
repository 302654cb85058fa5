"""``capnet train --config FILE [--set key=value ...] --out DIR [--resume] [--skip-bad-images]``."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from capnet.cli._common import add_config_args, is_rank_zero, resolve_config
from capnet.errors import CapnetError, DiskFullError


def run(args: argparse.Namespace) -> int:
    """Check every image, train, select on validation, evaluate on test and write the run directory."""
    from capnet.data.check import BadImagesError
    from capnet.data.check import SKIPPED_FILE
    from capnet.experiment import default_cache_dir, train_run
    from capnet.plans import tune_process
    from capnet.report import summary_table

    cfg = resolve_config(args.config, args.overrides)
    cache = None if args.no_cache else Path(args.cache_dir) if args.cache_dir else default_cache_dir()
    tune_process(cfg)  # threads and allocator, once per process
    try:
        metrics = train_run(cfg, Path(args.out), resume=args.resume, cache_dir=cache,
                            skip_bad_images=args.skip_bad_images)
    except DiskFullError as err:
        if not Path(err.path).resolve().is_relative_to(Path(args.out).resolve()):
            raise
        hint = ("free space, then rerun this command with --resume: it continues after the last finished epoch"
                if (Path(args.out) / "last.safetensors").is_file() else "free space, then rerun this command")
        raise CapnetError(f"{err}; {hint}") from None
    except BadImagesError as err:
        if is_rank_zero():
            for path, reason in err.problems:
                print(f"capnet: bad image: {path}: {reason}", file=sys.stderr)
        raise CapnetError(f"{len(err.problems)} image(s) cannot be decoded (listed above); nothing was "
                          "trained. Fix or remove them, or pass --skip-bad-images to train without them") from None
    if is_rank_zero():
        print(summary_table(metrics))
        print(f"run directory: {args.out}")
        if metrics.get("skipped_images"):
            print(f"capnet: skipped {metrics['skipped_images']} image(s) that cannot be decoded; "
                  f"listed in {Path(args.out) / SKIPPED_FILE} and report.md", file=sys.stderr)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``train`` to the top-level parser."""
    p = subparsers.add_parser(
        "train", help="train a model from a config", description=__doc__,
        epilog="Config merge order (later wins): dataclass defaults, each --config file in order "
               "(a file's `base:` list first), then each --set. Unknown keys are errors. "
               "Every image is decoded before training starts; a bad one stops the run there.")
    add_config_args(p, required=True)
    p.add_argument("--out", required=True, help="run directory to write")
    p.add_argument("--resume", action="store_true", help="continue from OUT/last.safetensors")
    p.add_argument("--cache-dir", default=None, help="feature cache (default $CAPNET_CACHE/features)")
    p.add_argument("--no-cache", action="store_true", help="do not read or write the feature cache")
    p.add_argument("--skip-bad-images", action="store_true",
                   help="leave out images that cannot be decoded (listed in OUT/skipped_images.txt and report.md)")
    p.set_defaults(func=run)
