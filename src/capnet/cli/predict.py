"""``capnet predict --run DIR IMAGE_OR_DIR...``: one JSON line per image (labels + all scores)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import List

from capnet.errors import DataError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}


def collect_images(inputs: List[str]) -> List[Path]:
    """Expand directories (sorted, images only); a missing path is an error, not skipped."""
    out: List[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            out.extend(sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES))
        elif path.is_file():
            out.append(path)
        else:
            raise DataError(f"{path}: no such image or directory")
    if not out:
        raise DataError(f"no images found in {', '.join(inputs)}")
    return out


def run(args: argparse.Namespace) -> int:
    """Print a JSON line per image: labels above the per-class (validation-chosen) thresholds."""
    from capnet.engine.runs import load_run, predict_images

    loaded = load_run(Path(args.run), device=args.device)
    for row in predict_images(loaded, collect_images(args.images), batch_size=args.batch_size):
        print(json.dumps(row), flush=True)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``predict`` to the top-level parser."""
    p = subparsers.add_parser("predict", help="label images with a trained run", description=__doc__)
    p.add_argument("--run", required=True, help="run directory written by train/demo")
    p.add_argument("images", nargs="+", help="image files or directories of images")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.set_defaults(func=run)
