"""``capnet data stats DIR [--write]``, ``capnet data check DIR``, ``capnet data lt-split DIR --out SPLIT``.

stats: split sizes, per-class counts, head/medium/tail and imbalance ratio; ``--write`` saves
class_freq.json and class_split.json (the format of data/voc_real_lt) beside the data.
check: decode every image of every split and list every file that does not decode (exit 1).
lt-split: a long-tailed training subset built as VOC-LT / COCO-LT were (capnet.data.lt_split),
written as a split folder (``--split-dir`` / ``data.split_dir``) with its parameters and seed.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from capnet.cli._common import add_data_args, data_root
from capnet.errors import CapnetError


def _load(args: argparse.Namespace):
    from capnet.data import load_dataset

    return load_dataset(args.reader, data_root(args), split_dir=args.split_dir)


def stats(args: argparse.Namespace) -> int:
    """Print the dataset's long-tail statistics; with --write also save them as JSON files."""
    from capnet.data import describe
    from capnet.data.summary import stat_files
    from capnet.fileio import atomic_write_bytes

    dataset = _load(args)
    print(describe(dataset))
    if args.write:
        folder = Path(args.split_dir or data_root(args))  # where the reader looks for class_split.json
        files = stat_files(dataset)
        existing = [folder / name for name in files if (folder / name).exists()]
        if existing and not args.force:
            raise CapnetError(f"{existing[0]} exists; pass --force to overwrite it")
        for name, text in files.items():
            atomic_write_bytes(text.encode(), folder / name)
            print(f"wrote {folder / name}")
    return 0


def check(args: argparse.Namespace) -> int:
    """Decode every image; print each bad one as 'path: reason' and exit 1 if there is any."""
    from capnet.data import check_dataset

    dataset = _load(args)
    bad = check_dataset(dataset, workers=args.workers, progress=True)
    for problems in bad.values():
        for path, reason in problems:
            print(f"{path}: {reason}")
    sizes = ", ".join(f"{name} {len(split)}" for name, split in dataset.splits.items())
    total = sum(len(p) for p in bad.values())
    if total:
        per_split = ", ".join(f"{name} {len(p)}" for name, p in bad.items())
        print(f"{dataset.root}: {total} bad image(s) ({per_split}) among {sizes}", file=sys.stderr)
        return 1
    print(f"{dataset.root}: every image decodes ({sizes})")
    return 0


def lt_split(args: argparse.Namespace) -> int:
    """Write a DB-style long-tailed split of the dataset's train split to --out."""
    from capnet.data import describe, load_dataset
    from capnet.data.lt_split import write_longtail_split

    dataset = _load(args)
    source = {"reader": args.reader, **({"split_dir": str(args.split_dir)} if args.split_dir else {})}
    sel = write_longtail_split(dataset, Path(args.out), args.max_count, args.min_count, args.pareto_b,
                               args.tail_quantile, args.seed, source=source, force=args.force)
    if sel.short:
        few = ", ".join(f"{dataset.classes[c]} -{n}" for c, n in sel.short.items())
        print(f"capnet: {len(sel.short)} class(es) have fewer images than their reference count ({few}); "
              "a smaller --max-count fits this data better", file=sys.stderr)
    print(describe(load_dataset(args.reader, data_root(args), split_dir=args.out)))
    print(f"wrote {args.out} (parameters and seed in {Path(args.out) / 'lt_split.json'})")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``data`` and its sub-commands to the top-level parser."""
    parser = subparsers.add_parser("data", help="inspect datasets", description=__doc__)
    sub = parser.add_subparsers(dest="data_command", metavar="ACTION")
    parser.set_defaults(func=lambda args: parser.print_help() or 2)
    p = sub.add_parser("stats", help="print split sizes, per-class counts and head/medium/tail groups")
    add_data_args(p, positional_root=True, reader_default="folder")
    p.add_argument("--write", action="store_true",
                   help="also write class_freq.json and class_split.json into DIR (or the --split-dir)")
    p.add_argument("--force", action="store_true", help="with --write: overwrite existing files")
    p.set_defaults(func=stats)
    p = sub.add_parser("check", help="decode every image of every split; list the bad files (exit 1 if any)")
    add_data_args(p, positional_root=True, reader_default="folder")
    p.add_argument("--workers", type=int, default=None, help="decoding threads (default: min(8, CPUs))")
    p.set_defaults(func=check)
    from capnet.data.lt_split import MIN_COUNT, PARETO_B, TAIL_QUANTILE, VOC_LT_MAX

    p = sub.add_parser("lt-split", help="write a long-tailed train subset (VOC-LT / COCO-LT construction) as a split folder",
                       epilog="VOC-LT used --max-count 800, COCO-LT 1200 (Wu et al., ECCV 2020). Train with "
                              "--set data.split_dir=OUT (and the same reader and root).")
    add_data_args(p, positional_root=True, reader_default="folder")
    p.add_argument("--out", required=True, help="split folder to write (classes.txt, train.csv, test.csv, lt_split.json, ...)")
    p.add_argument("--max-count", type=int, default=VOC_LT_MAX, help=f"images of the first-ranked class (default {VOC_LT_MAX})")
    p.add_argument("--min-count", type=int, default=MIN_COUNT, help=f"floor of the Pareto reference (default {MIN_COUNT})")
    p.add_argument("--pareto-b", type=float, default=PARETO_B, help=f"Pareto shape (default {PARETO_B:g})")
    p.add_argument("--tail-quantile", type=float, default=TAIL_QUANTILE,
                   help=f"quantile the last class sits at (default {TAIL_QUANTILE})")
    p.add_argument("--seed", type=int, default=0, help="seed of the random draws (default 0)")
    p.add_argument("--force", action="store_true", help="overwrite a split already in --out")
    p.set_defaults(func=lt_split)
