"""``capnet eval --run DIR (--data-dir DATASET_DIR | --data ...) [--split test]``."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from capnet.cli._common import with_data_root


def run(args: argparse.Namespace) -> int:
    """Evaluate a trained run on a dataset split; prints the table and optionally writes JSON."""
    from capnet.config import load_config
    from capnet.engine.runs import default_cache_dir, evaluate_run, load_run, prepare_dataset
    from capnet.fileio import write_json_atomic
    from capnet.report import summary_table

    run_obj = load_run(Path(args.run), device=args.device)
    overrides = with_data_root([], args.data_dir, args.reader, args.split_dir)
    data_cfg = load_config([Path(args.run) / "config.yaml"], overrides).data
    ds = prepare_dataset(data_cfg)
    cache = Path(args.cache_dir) if args.cache_dir else default_cache_dir()
    metrics = evaluate_run(run_obj, ds, args.split, cache)
    print(summary_table(metrics, title=args.split))
    if args.json:
        write_json_atomic(Path(args.json), metrics)
    else:
        print(json.dumps({k: metrics[k] for k in ("mAP", "head", "medium", "tail")}))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``eval`` to the top-level parser."""
    p = subparsers.add_parser("eval", help="evaluate a trained run", description=__doc__)
    p.add_argument("--run", required=True, help="run directory written by train/demo")
    p.add_argument("--data-dir", default=None, help="dataset root (default: the run's data.root)")
    p.add_argument("--data", "--reader", dest="reader", default=None,
                   help="dataset layout: folder | voc | coco | nus_wide (default: the run's)")
    p.add_argument("--split-dir", default=None, help="VOC-LT / COCO-LT split folder for native layouts")
    p.add_argument("--split", default="test", help="split to evaluate (default: test)")
    p.add_argument("--json", default=None, help="also write the full metrics to this JSON file")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--cache-dir", default=None, help="feature cache (default $CAPNET_CACHE/features)")
    p.set_defaults(func=run)
