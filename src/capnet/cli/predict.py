"""``capnet predict --run DIR IMAGE_OR_DIR...``: one JSON line per image (labels + all scores).

A directory contributes its files with an image suffix; every other entry is listed on stderr
as skipped. Nothing to predict is an error (exit 1). An image that cannot be read (truncated,
corrupt, empty) does not stop the others: it is named on stderr and gets a JSON line with an
``error`` field instead of ``labels``/``scores``, and the exit status is then 3 (every readable
image was scored). Exit status: 0 all scored, 3 some images could not be read, 1 nothing scored
(bad run, no images), 130 interrupted. ``--add-classes "zebra,giraffe"`` scores
new class names next to the trained ones (docs/open_vocab.md); each line then carries an
``open_vocab`` field naming them, their threshold and how it was set.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import List, Tuple

from capnet.errors import DataError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}


def collect_images(inputs: List[str]) -> Tuple[List[Path], List[Path]]:
    """(images, skipped): directories expand to their image files (sorted, not recursive); the
    other entries of a directory are skipped. A missing path is an error, not skipped."""
    images: List[Path] = []
    skipped: List[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            for entry in sorted(path.iterdir()):
                (images if entry.is_file() and entry.suffix.lower() in IMAGE_SUFFIXES else skipped).append(entry)
        elif path.is_file():
            images.append(path)
        else:
            raise DataError(f"{path}: no such image or directory")
    return images, skipped


def parse_class_list(text: str) -> List[str]:
    """ "zebra, giraffe" -> ["zebra", "giraffe"]; an empty entry is an error (not silently dropped)."""
    names = [n.strip() for n in text.split(",")]
    if not any(names) or not all(names):
        raise DataError(f"--add-classes {text!r}: give comma-separated class names, none empty")
    return names


def run(args: argparse.Namespace) -> int:
    """Print a JSON line per image: labels above the per-class (validation-chosen) thresholds."""
    from capnet.cli._common import run_overrides
    from capnet.plans import tune_process
    from capnet.serving.run import load_run, predict_images

    images, skipped = collect_images(args.images)
    if skipped:
        names = ", ".join(f"{p}/" if p.is_dir() else str(p) for p in skipped)
        print(f"capnet: skipped {len(skipped)} entr{'y' if len(skipped) == 1 else 'ies'} that are not image files "
              f"(suffix not {'/'.join(sorted(IMAGE_SUFFIXES))}): {names}", file=sys.stderr)
    if not images:
        raise DataError(f"no images to predict in {', '.join(args.images)}")
    added = parse_class_list(args.add_classes) if args.add_classes is not None else None
    loaded = load_run(Path(args.run), device=args.device, add_classes=added, overrides=run_overrides(args))
    tune_process(loaded.cfg)  # threads and allocator, once per process
    failed = 0
    for row in predict_images(loaded, images, batch_size=args.batch_size):
        if "error" in row:
            failed += 1
            print(f"capnet: error: {row['error']}", file=sys.stderr, flush=True)
        print(json.dumps(row), flush=True)
    if failed:
        print(f"capnet: {failed} of {len(images)} image(s) could not be read (their JSON lines have an "
              f"\"error\" field); the other {len(images) - failed} were scored", file=sys.stderr)
        return SOME_FAILED
    return 0


SOME_FAILED = 3  # exit status when some images could not be read and every other one was scored


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``predict`` to the top-level parser."""
    p = subparsers.add_parser("predict", help="label images with a trained run", description=__doc__)
    from capnet.cli._common import add_run_args

    add_run_args(p)
    p.add_argument("images", nargs="+", help="image files or directories of images")
    p.add_argument("--add-classes", default=None, metavar="NAMES",
                   help='comma-separated new class names scored open-vocabulary, e.g. "zebra,giraffe"')
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.set_defaults(func=run)
