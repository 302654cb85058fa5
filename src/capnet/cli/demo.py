"""``capnet demo [--out DIR]``: offline CAPNET on the bundled real VOC-LT images, end to end.

Trains the recipe of configs/demo.yaml on data/voc_real_lt with the offline EfficientNet-Lite0
backbone: the CAPNET candidate that won inner validation on the bundled train split under the
sealed protocol (docs/results.md) — the fixed template classifier through MiniLM and the ImageNet
text bridge (no soft prompts: they did not win), a per-class residual, text graph + GCN, BCE,
flip + template test-time ensembling. It selects the epoch on the validation split (no refit),
evaluates on test once and prints the table. The first run extracts and caches the image
features; repeated runs read them back (the README quotes measured times).
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from capnet.cli._common import is_rank_zero, repo_root
from capnet.errors import CapnetError, Interrupted


def run(args: argparse.Namespace) -> int:
    """Resolve the demo config and data inside the checkout, then train and report."""
    from capnet.config import load_config
    from capnet.experiment import default_cache_dir, train_run
    from capnet.plans import tune_process
    from capnet.report import summary_table

    root = repo_root()
    config = Path(args.config) if args.config else (root / "configs" / "demo.yaml" if root else None)
    if config is None or not config.is_file():
        raise CapnetError("capnet demo needs the source checkout (configs/demo.yaml and data/voc_real_lt); "
                          "run it from a clone of the capnet repository")
    overrides = list(args.overrides)
    if root is not None and not Path("data/voc_real_lt").is_dir():
        overrides.insert(0, f"data.root={root / 'data' / 'voc_real_lt'}")
    cfg = load_config([config], overrides)
    cache = Path(args.cache_dir) if args.cache_dir else default_cache_dir()
    t0 = time.perf_counter()
    tune_process(cfg)  # threads and allocator, once per process
    try:
        metrics = train_run(cfg, Path(args.out), cache_dir=cache)
    except Interrupted as err:  # `capnet demo` has no --resume: name the train command that continues it
        sets = "".join(f" --set {o}" for o in overrides)
        then = (f"`capnet train --config {config} --out {args.out}{sets} --resume` continues from epoch {err.finished + 1}"
                if err.finished else "no epoch had finished")
        raise KeyboardInterrupt(f"interrupted in epoch {err.epoch}; {then}") from None
    if not is_rank_zero():
        return 0
    print()
    print(f"CAPNET demo on {cfg.data.root} with {cfg.model.backbone} (test split, mAP %)")
    print(summary_table(metrics))
    print(f"finished in {time.perf_counter() - t0:.0f} s; run directory: {args.out} (report.md, metrics.json, plots)")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``demo`` to the top-level parser."""
    p = subparsers.add_parser("demo", help="offline end-to-end demo on bundled real images", description=__doc__)
    p.add_argument("--out", default="runs/demo", help="run directory (default: runs/demo)")
    p.add_argument("--config", default=None, help="config to use instead of configs/demo.yaml")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                   help="override a config value, e.g. --set train.epochs=5")
    p.add_argument("--cache-dir", default=None, help="feature cache (default $CAPNET_CACHE/features)")
    p.set_defaults(func=run)
