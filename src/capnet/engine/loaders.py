"""DataLoaders for train / val / test: image pipelines, or cached frozen-prefix features.

When ``train.feature_cache`` is on and the model has a cacheable frozen visual prefix
(``model.frozen_image_stages() > 0``), each split's prefix features are computed ONCE with the
backbone's *eval* transform (and stored under ``cache_dir`` when given). Training on cached
features therefore sees no train-time augmentation: every epoch reuses the same deterministic
features, which is the price of skipping the backbone forward pass.

A feature loader's dataset carries the stage its features start at (``FeatureDataset.start``);
:class:`ModelForward` routes a batch to ``model(images)`` or ``model.forward_features(x, start)``
so ``fit`` / ``evaluate`` handle both kinds of loader transparently (and DDP still sees one
``forward`` call).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from capnet.config import Config
from capnet.engine import distributed
from capnet.engine.seed import EpochSampler, make_generator, seed_worker

SPLITS = ("train", "val", "test")


class FeatureDataset(Dataset):
    """Cached prefix features of one split: item i -> (features[i], target[i], i)."""

    def __init__(self, features: torch.Tensor, targets: np.ndarray, start: int) -> None:
        if len(features) != len(targets):
            raise ValueError(f"{len(features)} feature rows for {len(targets)} targets")
        self.features = features
        self.targets = torch.from_numpy(np.ascontiguousarray(targets, dtype=np.float32))
        self.start = start  # the stage the features come out of: forward_features(x, start)

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, i: int) -> Tuple[torch.Tensor, torch.Tensor, int]:
        return self.features[i], self.targets[i], i


def feature_start(loader: DataLoader) -> Optional[int]:
    """The stage a loader's cached features start at, or None when it yields images."""
    return getattr(loader.dataset, "start", None) if isinstance(loader.dataset, FeatureDataset) else None


class ModelForward(nn.Module):
    """``forward(inputs, start)``: images -> ``model(inputs)``; features -> ``forward_features``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, inputs: torch.Tensor, start: Optional[int] = None) -> torch.Tensor:
        if start is None:
            return self.model(inputs)
        return self.model.forward_features(inputs, start)


def _sampler(size: int, train: bool, seed: int) -> Optional[Sampler]:
    """Epoch-seeded shuffling for train; DistributedSampler (which pads) across processes."""
    if distributed.world_size() > 1:
        return DistributedSampler(range(size), shuffle=train, seed=seed, drop_last=False)
    return EpochSampler(size, seed=seed) if train else None


def build_loader(dataset: Dataset, batch_size: int, train: bool, seed: int, num_workers: int,
                 device: torch.device) -> DataLoader:
    """A deterministic DataLoader (seeded sampler, generator and worker init)."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=_sampler(len(dataset), train, seed),
        num_workers=num_workers,
        pin_memory=torch.device(device).type == "cuda",
        worker_init_fn=seed_worker,
        generator=make_generator(seed),
        drop_last=False,
    )


def _split_features(dataset: Any, model: Any, name: str, depth: int, cfg: Config,
                    cache_dir: Optional[Path], device: torch.device) -> FeatureDataset:
    """Prefix features of one split (rank 0 fills the cache first, the others then read it)."""
    from capnet.engine.feature_cache import FeatureCache, compute_features

    split = dataset.splits[name]
    cache = FeatureCache(Path(cache_dir)) if cache_dir is not None else None
    with distributed.main_first():
        features = compute_features(
            model.backbone, split.image_paths, model.backbone.transform(train=False), depth,
            batch_size=cfg.data.eval_batch_size, num_workers=cfg.data.num_workers, device=device,
            cache=cache, progress=distributed.is_main(),
        )
    return FeatureDataset(features, split.labels, start=depth)


def make_loaders(dataset: Any, model: Any, cfg: Config, *, cache_dir: Optional[Path], device: torch.device,
                 splits: Sequence[str] = SPLITS) -> Dict[str, DataLoader]:
    """Loaders for those of ``splits`` that ``dataset`` has (single view; test-time views are
    scored by ``capnet.engine.runs.split_scores``).

    ``data.batch_size`` is the global batch of one optimisation step: with N processes each
    loads ``batch_size // N``.
    """
    from capnet.data import ImageDataset

    depth = model.frozen_image_stages() if cfg.train.feature_cache else 0
    world = distributed.world_size()
    loaders: Dict[str, DataLoader] = {}
    for name in splits:
        if name not in dataset.splits:
            continue
        train = name == "train"
        if depth > 0:
            data: Dataset = _split_features(dataset, model, name, depth, cfg, cache_dir, device)
            workers = 0  # tensors already in memory
        else:
            data = ImageDataset(dataset.splits[name], model.backbone.transform(train=train))
            workers = cfg.data.num_workers
        batch = max(1, cfg.data.batch_size // world) if train else cfg.data.eval_batch_size
        loaders[name] = build_loader(data, batch, train, cfg.train.seed, workers, device)
    return loaders
