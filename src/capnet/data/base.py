"""The in-memory multi-label dataset every reader returns, and the torch Dataset over one split.

A reader (folder, voc, coco, nus_wide) only has to produce image ids, image paths and an
(N, C) multi-hot array per split; everything downstream (loaders, losses, metrics, the
head/medium/tail report) works on ``MultiLabelDataset``.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image, ImageFile, UnidentifiedImageError

from capnet.data.lt_stats import GROUP_NAMES, assign_groups, class_freq
from capnet.errors import DataError


@dataclass
class Split:
    """One split: ids, image files and the multi-hot targets, all aligned by row."""

    image_ids: List[str]
    image_paths: List[Path]
    labels: np.ndarray  # (N, C) float32 in {0, 1}

    def __post_init__(self) -> None:
        self.labels = np.asarray(self.labels, dtype=np.float32)
        self.image_paths = [Path(p) for p in self.image_paths]
        n = len(self.image_ids)
        if self.labels.ndim != 2 or self.labels.shape[0] != n or len(self.image_paths) != n:
            raise DataError(
                f"split rows disagree: {n} ids, {len(self.image_paths)} paths, labels {self.labels.shape}"
            )

    def __len__(self) -> int:
        return len(self.image_ids)

    def subset(self, indices: Sequence[int]) -> "Split":
        """The rows ``indices``, in that order."""
        idx = np.asarray(indices, dtype=np.int64)
        return Split([self.image_ids[i] for i in idx], [self.image_paths[i] for i in idx], self.labels[idx])


@dataclass
class MultiLabelDataset:
    """Classes plus named splits ("train", optional "val", "test") of one dataset."""

    name: str
    root: Path
    classes: List[str]
    splits: Dict[str, Split]
    class_groups: Optional[Dict[str, List[str]]] = None  # from class_split.json when present
    dropped: List[Tuple[Path, str]] = dataclasses.field(default_factory=list)  # (image, why) rows a reader left out

    def __post_init__(self) -> None:
        for key, split in self.splits.items():
            if split.labels.shape[1] != len(self.classes):
                raise DataError(
                    f"{self.name}: split '{key}' has {split.labels.shape[1]} label columns "
                    f"for {len(self.classes)} classes"
                )
        if self.class_groups is not None:
            self._group_indices(self.class_groups)  # validate early

    @property
    def num_classes(self) -> int:
        """Number of classes C."""
        return len(self.classes)

    def class_freq(self, split: str = "train") -> np.ndarray:
        """Positive images per class in ``split`` (int64, (C,))."""
        if split not in self.splits:
            raise DataError(f"{self.name} has no split '{split}' (has: {', '.join(self.splits)})")
        return class_freq(self.splits[split].labels)

    def groups(self) -> Dict[str, np.ndarray]:
        """"head"/"medium"/"tail" -> class indices: class_split.json if given, else train thresholds."""
        if self.class_groups is not None:
            return self._group_indices(self.class_groups)
        if "train" not in self.splits:
            raise DataError(f"{self.name}: no train split to count head/medium/tail from "
                            "(and no class_split.json)")
        return assign_groups(self.class_freq("train"))

    @property
    def has_groups(self) -> bool:
        """True when :meth:`groups` can answer (fixed groups or a train split)."""
        return self.class_groups is not None or "train" in self.splits

    def _group_indices(self, class_groups: Dict[str, List[str]]) -> Dict[str, np.ndarray]:
        index = {c: i for i, c in enumerate(self.classes)}
        out: Dict[str, np.ndarray] = {}
        for group in GROUP_NAMES:
            names = class_groups.get(group, [])
            unknown = [n for n in names if n not in index]
            if unknown:
                raise DataError(f"{self.name}: class group '{group}' names unknown classes {unknown}")
            out[group] = np.array(sorted(index[n] for n in names), dtype=np.int64)
        extra = set(class_groups) - set(GROUP_NAMES)
        if extra:
            raise DataError(f"{self.name}: unknown class groups {sorted(extra)} (expected {GROUP_NAMES})")
        return out

    def without_classes(self, names: Sequence[str]) -> "MultiLabelDataset":
        """The dataset with ``names`` removed from the class list, every split's labels and the
        head/medium/tail groups; every image stays (one left with no label is a negative).

        Used to hold classes out of training and score them open-vocabulary afterwards.
        """
        names = list(names)
        unknown = [n for n in names if n not in self.classes]
        if unknown:
            raise DataError(f"{self.name}: data.exclude_classes names unknown classes {unknown} "
                            f"(classes: {', '.join(self.classes)})")
        if not names:
            return self
        keep = [i for i, c in enumerate(self.classes) if c not in names]
        if not keep:
            raise DataError(f"{self.name}: data.exclude_classes removes every class")
        splits = {k: Split(s.image_ids, s.image_paths, s.labels[:, keep]) for k, s in self.splits.items()}
        groups = None if self.class_groups is None else {
            g: [c for c in members if c not in names] for g, members in self.class_groups.items()}
        return dataclasses.replace(self, classes=[self.classes[i] for i in keep], splits=splits, class_groups=groups)

    def kfold(self, folds: int, fold: int, seed: int = 0) -> "MultiLabelDataset":
        """Re-split train + test into ``folds`` stratified folds; fold ``fold`` is the new test.

        One split of a long-tailed set leaves 3-7 test positives per tail class, too few to tell
        methods apart; K re-splits (iterative stratification, iterstrat's
        MultilabelStratifiedKFold) give every image one turn in test. The head/medium/tail
        groups stay those of the original train split, so folds report the same groups.
        """
        if folds < 2 or not 0 <= fold < folds:
            raise DataError(f"{self.name}: fold {fold} of {folds} folds is not a valid re-split (need folds >= 2, 0 <= fold < folds)")
        if "val" in self.splits or any(s not in self.splits for s in ("train", "test")):
            raise DataError(f"{self.name}: a k-fold re-split needs exactly train and test splits, has {', '.join(self.splits)}")
        from capnet.data.stratify import kfold_split

        train, test = self.splits["train"], self.splits["test"]
        both = Split(train.image_ids + test.image_ids, train.image_paths + test.image_paths,
                     np.concatenate([train.labels, test.labels]))
        rest, held = kfold_split(both.labels, folds, fold, seed)
        frozen = {g: [self.classes[i] for i in idx] for g, idx in self.groups().items()}
        return dataclasses.replace(self, splits={"train": both.subset(np.sort(rest)), "test": both.subset(np.sort(held))},
                                   class_groups=frozen)

    def subset(self, size: float, seed: int = 0) -> "MultiLabelDataset":
        """Every split cut to ``size`` rows (a whole number >= 1) or that fraction (0 < size < 1),
        drawn at random with ``seed`` and kept in their original order (for smoke runs).

        Random rather than the first rows: native lists are often sorted by class or folder.
        Head/medium/tail stay those of the full train split, as for the val carve-out.
        """
        if not (0.0 < size < 1.0 or (size >= 1 and float(size).is_integer())):
            raise DataError(f"{self.name}: subset {size} must be a whole number >= 1 or a fraction in (0, 1)")
        rng = np.random.default_rng(seed)
        splits = {}
        for name, split in self.splits.items():
            keep = int(size) if size >= 1 else max(1, int(round(size * len(split))))
            if keep >= len(split):
                splits[name] = split
                continue
            splits[name] = split.subset(np.sort(rng.choice(len(split), size=keep, replace=False)))
        groups = self.class_groups
        if groups is None and "train" in self.splits:
            groups = {g: [self.classes[i] for i in idx] for g, idx in self.groups().items()}
        return dataclasses.replace(self, splits=splits, class_groups=groups)

    def with_val_split(self, fraction: float, seed: int) -> "MultiLabelDataset":
        """Carve a stratified multi-label "val" split out of train (unless one exists).

        Deterministic for a given (fraction, seed): iterstrat's MultilabelStratifiedShuffleSplit
        keeps every class's share roughly equal in both parts. The head/medium/tail groups are
        frozen from the FULL original train counts (stored in ``class_groups``), so a class does
        not change group because a val split was held out and results stay comparable with the
        published splits. fraction == 0 or an existing "val" split returns ``self`` unchanged.
        """
        if not 0.0 <= fraction < 1.0:
            raise DataError(f"val fraction must be in [0, 1), got {fraction}")
        if fraction == 0.0 or "val" in self.splits:
            return self
        if "train" not in self.splits:
            raise DataError(f"{self.name} has no 'train' split to carve a val split from")
        from capnet.data.stratify import shuffle_split

        train = self.splits["train"]
        if len(train) < 2:
            raise DataError(f"{self.name}: train has {len(train)} image(s), too few to carve a val split")
        train_idx, val_idx = shuffle_split(train.labels, fraction, seed)  # memoised: see data/stratify.py
        groups = self.groups()
        frozen = {g: [self.classes[i] for i in idx] for g, idx in groups.items()}
        splits = dict(self.splits)
        splits["train"] = train.subset(np.sort(train_idx))
        splits["val"] = train.subset(np.sort(val_idx))
        return dataclasses.replace(self, splits=splits, class_groups=frozen)


DECODE_ERRORS = (UnidentifiedImageError, OSError, SyntaxError, ValueError,
                 Image.DecompressionBombError)  # what PIL raises on a bad file
PIL_MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS  # Pillow's own decompression-bomb limit (~89 MP)


def set_max_image_pixels(limit: Optional[int]) -> None:
    """Set the decompression-bomb limit (``data.max_image_pixels``; None: Pillow's default).

    Pillow keeps it in one process-wide setting, read by every decode thread and by DataLoader
    workers started afterwards; an image above it is a bad image, like a truncated file.
    """
    Image.MAX_IMAGE_PIXELS = PIL_MAX_IMAGE_PIXELS if limit is None else int(limit)


class _OverLimit(Image.DecompressionBombError):
    """Above the limit but below Pillow's own error threshold (2x), where Pillow only warns."""


def _refuse_truncated() -> None:
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        raise DataError(
            "PIL.ImageFile.LOAD_TRUNCATED_IMAGES is enabled; capnet refuses to load truncated images "
            "silently (something in this process set it)"
        )


def _decode(path: Path) -> Image.Image:
    # Pillow raises above twice its limit and only warns between 1x and 2x: both are bad images here.
    with Image.open(path) as im:
        limit = Image.MAX_IMAGE_PIXELS
        if limit and im.width * im.height > limit:
            raise _OverLimit(f"image of {im.width} x {im.height} pixels is over the decompression-bomb limit of "
                             f"{limit} pixels")
        im.load()
        return im.convert("RGB")


def decode_failure(path: Path, err: BaseException) -> str:
    """A short reason why ``path`` did not decode (for '<file>: <reason>' messages)."""
    if isinstance(err, FileNotFoundError):
        return "image file not found"
    if path.is_file() and path.stat().st_size == 0:
        return "empty file (0 bytes)"
    if isinstance(err, UnidentifiedImageError):
        return "not an image file PIL can identify"
    if isinstance(err, _OverLimit):
        return f"{err} (raise data.max_image_pixels if the image is genuine)"
    if isinstance(err, Image.DecompressionBombError):  # Pillow's own, above twice the limit
        return (f"image over the decompression-bomb limit of {Image.MAX_IMAGE_PIXELS} pixels ({err}); "
                "raise data.max_image_pixels if the image is genuine")
    return f"cannot decode image ({err})"  # e.g. "image file is truncated (218 bytes not processed)"


def load_image(path: Union[str, Path]) -> Image.Image:
    """Open and fully decode an image as RGB; a missing, truncated or corrupt file is a DataError."""
    path = Path(path)
    _refuse_truncated()
    try:
        return _decode(path)
    except FileNotFoundError:
        raise DataError(f"image file not found: {path}") from None
    except DECODE_ERRORS as err:
        raise DataError(f"{path}: {decode_failure(path, err)}") from None


def image_problem(path: Union[str, Path]) -> Optional[str]:
    """None when :func:`load_image` can read ``path``, else the reason it cannot (same decode)."""
    path = Path(path)
    _refuse_truncated()
    try:
        _decode(path)
    except DECODE_ERRORS as err:  # FileNotFoundError is an OSError
        return decode_failure(path, err)
    return None


class ImageDataset(torch.utils.data.Dataset):
    """torch Dataset over a Split: item i -> (transformed image, float32 target (C,), i)."""

    def __init__(self, split: Split, transform: Callable[[Image.Image], Any]) -> None:
        self.split = split
        self.transform = transform
        self.targets = torch.from_numpy(np.ascontiguousarray(split.labels, dtype=np.float32))

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int) -> Tuple[Any, torch.Tensor, int]:
        image = load_image(self.split.image_paths[i])
        return self.transform(image), self.targets[i].clone(), i
