"""``capnet export --run DIR --format onnx|torchscript --out FILE``: one servable graph.

The graph maps float32 RGB images (N, 3, S, S) in [0, 1] to per-class sigmoid scores; the class
embeddings are computed once and folded in, and so is flip TTE (``--tte``; default: the run's
own views when they are single or flip). The file carries its metadata (classes, image size,
resize mode, thresholds, capnet version, source run, config hash): ONNX ``metadata_props`` key
``capnet`` / TorchScript extra file ``capnet.json``. ``--add-classes`` bakes open-vocabulary
classes in (docs/open_vocab.md). Run it with ``capnet.serving.exported.load_exported`` or any
ONNX runtime (docs/export.md).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from capnet.cli._common import add_run_args, run_overrides
from capnet.cli.predict import parse_class_list


def run(args: argparse.Namespace) -> int:
    """Export the run and print a one-line summary (the metadata with --json)."""
    from capnet.serving.export import export_run
    from capnet.serving.run import load_run

    added = parse_class_list(args.add_classes) if args.add_classes is not None else None
    loaded = load_run(Path(args.run), device="cpu", add_classes=added, overrides=run_overrides(args))
    meta = export_run(loaded, args.format, Path(args.out), tte=args.tte, run_dir=Path(args.run))
    size = Path(args.out).stat().st_size / 2**20
    print(f"capnet: wrote {args.out} ({args.format}, {size:.1f} MiB): {len(meta['classes'])} classes, "
          f"input (N, 3, {meta['image_size']}, {meta['image_size']}) in [0, 1] after resize={meta['resize']}, "
          f"tte={meta['tte']}", file=sys.stderr)
    if args.json:
        print(json.dumps(meta))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``export`` to the top-level parser."""
    from capnet.serving.export import EXPORT_TTE

    p = subparsers.add_parser("export", help="write a run as one ONNX or TorchScript graph", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_args(p)
    p.add_argument("--format", required=True, choices=("onnx", "torchscript"))
    p.add_argument("--out", required=True, help="file to write (e.g. model.onnx, model.pt)")
    p.add_argument("--tte", default=None, choices=EXPORT_TTE,
                   help="fold in flip TTE or not (default: as the run tests, when single or flip)")
    p.add_argument("--add-classes", default=None, metavar="NAMES",
                   help='comma-separated new class names baked in open-vocabulary, e.g. "zebra,giraffe"')
    p.add_argument("--json", action="store_true", help="print the stored metadata as JSON on stdout")
    p.set_defaults(func=run)
