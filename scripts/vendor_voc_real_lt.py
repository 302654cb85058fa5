#!/usr/bin/env python
"""Vendor the real-image VOC-LT set and the VOC-LT / COCO-LT split files into ``data/``.

Why: the shared build (``voc_real_lt``, 320 px JPEG q90, ~94 MB) is too large to ship with
the repository, so the images are re-encoded smaller (longer side <= 224 px, JPEG q80) and
the label files are copied byte for byte. The result is deterministic: same input, same bytes.

    python scripts/vendor_voc_real_lt.py --src /work/shared/data --dst data
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path
from typing import List, Optional

from PIL import Image

LABEL_FILES = ("classes.txt", "train.csv", "test.csv", "class_split.json", "class_freq.json")
SPLIT_SETS = ("voc_lt", "coco_lt")


def reencode(src: Path, dst: Path, max_side: int, quality: int) -> None:
    """Convert to RGB, shrink (LANCZOS) so the longer side is <= max_side, save as optimised JPEG."""
    with Image.open(src) as im:
        im = im.convert("RGB")
        w, h = im.size
        scale = max_side / max(w, h)
        if scale < 1.0:
            im = im.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.LANCZOS)
        im.save(dst, format="JPEG", quality=quality, optimize=True)


def copy_labels(src_dir: Path, dst_dir: Path) -> None:
    """Copy the label files that exist in ``src_dir`` (every one of LABEL_FILES is expected)."""
    dst_dir.mkdir(parents=True, exist_ok=True)
    for name in LABEL_FILES:
        path = src_dir / name
        if not path.is_file():
            raise SystemExit(f"missing label file: {path}")
        shutil.copyfile(path, dst_dir / name)


def vendor(src: Path, dst: Path, max_side: int, quality: int) -> int:
    """Write dst/voc_real_lt (re-encoded images + labels) and dst/splits/{voc_lt,coco_lt}."""
    real_src, real_dst = src / "voc_real_lt", dst / "voc_real_lt"
    copy_labels(real_src, real_dst)
    (real_dst / "images").mkdir(parents=True, exist_ok=True)
    images = sorted((real_src / "images").glob("*.jpg"))
    if not images:
        raise SystemExit(f"no images under {real_src / 'images'}")
    for path in images:
        reencode(path, real_dst / "images" / path.name, max_side, quality)
    for name in SPLIT_SETS:
        copy_labels(src / "splits" / name, dst / "splits" / name)
    return len(images)


def main(argv: Optional[List[str]] = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--src", type=Path, default=Path("/work/shared/data"), help="shared data folder")
    parser.add_argument("--dst", type=Path, default=Path("data"), help="repository data folder")
    parser.add_argument("--max-side", type=int, default=224, help="longer image side in pixels")
    parser.add_argument("--quality", type=int, default=80, help="JPEG quality")
    args = parser.parse_args(argv)
    n = vendor(args.src, args.dst, args.max_side, args.quality)
    print(f"re-encoded {n} images into {args.dst / 'voc_real_lt' / 'images'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
