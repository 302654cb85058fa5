"""``capnet eval --run DIR [--data-dir DATASET] [--reader R] [--split test] [--class-map RUN=DATA,...]``.

Scores a trained run on its own test split or on any labelled set. Only the split to score is
read, so classes.txt, test.csv and images/ are enough. The run's classes are matched to the
data's by name, ignoring case, spaces and underscores (dining_table = diningtable); --class-map
pairs names that differ (motorbike=motorcycle). Shared classes are scored, the others listed;
head/medium/tail are the groups of the run's training data. Every image of the split is decoded
first (as ``train`` does): a bad one stops the command before any scoring, naming each, unless
--skip-bad-images leaves them out.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any, Dict, Mapping, Optional

from capnet.cli._common import add_data_args, add_run_args, run_overrides, with_data_root
from capnet.errors import CapnetError


def parse_class_map(text: Optional[str]) -> Dict[str, str]:
    """``"motorbike=motorcycle,tvmonitor=tv"`` -> {"motorbike": "motorcycle", "tvmonitor": "tv"}."""
    out: Dict[str, str] = {}
    for item in (text or "").split(","):
        if not item.strip():
            continue
        run_name, sep, data_name = item.partition("=")
        if not sep or not run_name.strip() or not data_name.strip():
            raise CapnetError(f"--class-map entry '{item}' must look like run_class=data_class")
        if run_name.strip() in out:
            raise CapnetError(f"--class-map maps '{run_name.strip()}' twice")
        out[run_name.strip()] = data_name.strip()
    return out


def report_classes(classes: Mapping[str, Any], num_run_classes: int) -> None:
    """Say on stderr which classes were matched under another name, left out or ignored."""
    if classes.get("renamed"):
        pairs = ", ".join(f"{a} -> {b}" for a, b in classes["renamed"].items())
        print(f"capnet: note: run classes matched to data classes of another name: {pairs}", file=sys.stderr)
    if classes.get("absent_from_data"):
        absent = classes["absent_from_data"]
        print(f"capnet: note: {len(absent)} of the run's {num_run_classes} classes are not in the data and "
              f"were not scored: {', '.join(absent)}", file=sys.stderr)
    if classes.get("unknown_to_run"):
        unknown = classes["unknown_to_run"]
        print(f"capnet: note: {len(unknown)} data class(es) unknown to the run were ignored: {', '.join(unknown)}",
              file=sys.stderr)


def check_split_images(ds: Any, split: str, skip: bool, cache: Optional[Path]) -> Any:
    """Decode every image of ``split`` before scoring (as ``train`` does): a bad one stops here,
    naming each, or with ``skip`` is left out with a warning."""
    from capnet.data.check import BadImagesError, drop_images
    from capnet.data.check import preflight_images

    if split not in ds.splits:
        return ds  # evaluate_run names the missing split
    scored = dataclasses.replace(ds, splits={split: ds.splits[split]})
    try:
        _, problems = preflight_images(scored, skip, cache)
    except BadImagesError as err:
        for path, reason in err.problems:
            print(f"capnet: bad image: {path}: {reason}", file=sys.stderr)
        raise CapnetError(f"{len(err.problems)} image(s) cannot be decoded (listed above); nothing was scored. "
                          "Fix or remove them, or pass --skip-bad-images to score without them") from None
    for path, reason in problems:
        print(f"capnet: skipped bad image: {path}: {reason}", file=sys.stderr)
    return drop_images(ds, [path for path, _ in problems]) if problems else ds


def run(args: argparse.Namespace) -> int:
    """Evaluate a trained run on a dataset split; prints the table and optionally writes JSON."""
    from capnet.config import load_config
    from capnet.plans import tune_process
    from capnet.serving.run import evaluate_run, load_eval_dataset, load_run
    from capnet.experiment import default_cache_dir
    from capnet.fileio import write_json_atomic
    from capnet.report import summary_table

    class_map = parse_class_map(args.class_map)
    run_obj = load_run(Path(args.run), device=args.device, overrides=run_overrides(args))
    tune_process(run_obj.cfg)  # threads and allocator, once per process
    overrides = with_data_root(list(args.overrides), args.data_dir, args.reader, args.split_dir)
    if args.data_dir and not args.split_dir:
        overrides.append("data.split_dir=null")  # the run's split folder belongs to the run's data
    data_cfg = load_config([Path(args.run) / "config.yaml"], overrides).data
    if args.reader and args.reader != run_obj.cfg.data.reader:  # the run's reader options are not this reader's
        data_cfg = dataclasses.replace(data_cfg, reader_options={})
    ds = load_eval_dataset(data_cfg, args.split)
    cache = Path(args.cache_dir) if args.cache_dir else default_cache_dir()
    ds = check_split_images(ds, args.split, args.skip_bad_images, cache)
    metrics = evaluate_run(run_obj, ds, args.split, cache, class_map=class_map)
    report_classes(metrics["classes"], len(run_obj.classes))
    print(summary_table(metrics, title=args.split))
    if args.json:
        write_json_atomic(Path(args.json), metrics)
    else:
        print(json.dumps({k: metrics[k] for k in ("mAP", "head", "medium", "tail")}))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``eval`` to the top-level parser."""
    p = subparsers.add_parser("eval", help="evaluate a trained run", description=__doc__)
    add_run_args(p)
    add_data_args(p, positional_root=False, reader_default=None)
    p.add_argument("--split", default="test", help="split to evaluate (default: test)")
    p.add_argument("--class-map", default=None, metavar="RUN=DATA,...",
                   help="pair run classes with data classes of another name, e.g. motorbike=motorcycle")
    p.add_argument("--json", default=None, help="also write the full metrics to this JSON file")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--cache-dir", default=None, help="feature cache (default $CAPNET_CACHE/features)")
    p.add_argument("--skip-bad-images", action="store_true",
                   help="score without the images that cannot be decoded (each is named in a warning)")
    p.set_defaults(func=run)
