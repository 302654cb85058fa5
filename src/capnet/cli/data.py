"""``capnet data stats DIR``: split sizes, per-class counts, head/medium/tail, imbalance ratio."""
from __future__ import annotations

import argparse

from capnet.data import describe, list_readers, load_dataset


def stats(args: argparse.Namespace) -> int:
    """Load the dataset with the chosen reader and print its long-tail statistics."""
    dataset = load_dataset(args.reader, args.dir, split_dir=args.split_dir)
    print(describe(dataset))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``data`` and its sub-commands to the top-level parser."""
    parser = subparsers.add_parser("data", help="inspect datasets", description=__doc__)
    sub = parser.add_subparsers(dest="data_command", metavar="ACTION")
    parser.set_defaults(func=lambda args: parser.print_help() or 2)
    p = sub.add_parser("stats", help="print split sizes, per-class counts and head/medium/tail groups")
    p.add_argument("dir", help="dataset root (folder layout, VOCdevkit, COCO or NUS-WIDE folder)")
    p.add_argument("--reader", default="folder", choices=list_readers(), help="dataset reader (default: folder)")
    p.add_argument("--split-dir", default=None, help="VOC-LT / COCO-LT split folder (e.g. data/splits/voc_lt)")
    p.set_defaults(func=stats)
