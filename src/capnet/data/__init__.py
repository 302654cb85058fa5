"""Multi-label datasets: one in-memory form (``MultiLabelDataset``) and registered readers.

Importing this package registers every reader in ``capnet.registry.DATASETS``:
``folder`` (the repository layout of data/voc_real_lt), ``voc`` (VOCdevkit, VOC-LT with a
split folder), ``coco`` (COCO 2017, COCO-LT with a split folder) and ``nus_wide``.
"""
from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any, Optional, Sequence, Union

from capnet.data import coco, folder, nus_wide, voc  # noqa: F401  (register the readers)
from capnet.data.base import ImageDataset, MultiLabelDataset, Split, image_problem, load_image, set_max_image_pixels
from capnet.data.check import check_dataset, check_images, drop_images
from capnet.data.class_match import match_classes
from capnet.data.lt_stats import GROUP_NAMES, assign_groups, class_freq, imbalance_ratio
from capnet.data.summary import describe
from capnet.errors import DataError
from capnet.registry import DATASETS

PathLike = Union[str, Path]


def load_dataset(reader: str, root: PathLike, split_dir: Optional[PathLike] = None,
                 splits: Optional[Sequence[str]] = None, **options: Any) -> MultiLabelDataset:
    """Build a dataset with the DATASETS reader ``reader`` (options go to that reader).

    ``splits`` names the splits to read, each of which must exist (e.g. ``("test",)`` to
    evaluate on a folder without train.csv); None reads every split present on disk.
    """
    try:
        build = DATASETS.get(reader)
    except KeyError as err:
        raise DataError(str(err.args[0])) from None
    accepted = set(inspect.signature(build).parameters) - {"root", "split_dir", "splits"}
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise DataError(f"the {reader} reader has no option {', '.join(unknown)} (data.reader_options; "
                        f"it takes: {', '.join(sorted(accepted)) or 'none'})")
    split_dir = None if split_dir is None else Path(split_dir)
    return build(Path(root), split_dir=split_dir, splits=None if splits is None else tuple(splits), **options)


def list_readers() -> list:
    """Names of the registered dataset readers."""
    return DATASETS.names()


__all__ = [
    "DATASETS", "GROUP_NAMES", "ImageDataset", "MultiLabelDataset", "Split", "assign_groups",
    "check_dataset", "check_images", "class_freq", "describe", "drop_images", "image_problem",
    "imbalance_ratio", "list_readers", "load_dataset", "load_image", "match_classes", "set_max_image_pixels",
]
