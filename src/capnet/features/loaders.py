"""DataLoaders for train / val / test: image pipelines, or cached frozen-prefix features.

When the plan caches a frozen visual prefix (``FeaturePlan.cached_depth > 0``: ``train.feature_cache``
on and ``model.cached_depth() > 0``), each split's prefix features are computed once per image
(``src/capnet/features/views.py``; stored under ``cache_dir`` when given). Training features are (N, V, ...):
the eval view plus ``train.augment_views`` cached augmentations, of which each epoch draws one per
image (``FeatureDataset.set_epoch``), so cached training still sees augmentation.

A feature loader's dataset carries the stage its features start at (``FeatureDataset.depth``);
``models.heads.ModelForward`` routes a batch to ``model(images)`` or
``model.forward_features(x, depth)``, so ``fit`` / ``evaluate`` handle both kinds of loader.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from capnet.features.plan import FeaturePlan
from capnet.runtime import distributed
from capnet.runtime.seed import EpochSampler, epoch_seed, make_generator
from capnet.runtime.workers import init_worker

SPLITS = ("train", "val", "test")


class FeatureDataset(Dataset):
    """Cached prefix features of one split: item i -> (features[i], target[i], i).

    With ``sample_views`` the features are (N, V, ...) and item i is one of its V views, drawn
    per epoch from ``(seed, epoch)`` (``set_epoch``): the cached-augmentation training set.
    With ``multi_view`` they are (N, V, ...) and item i is all V views (test-time views, whose
    logits evaluation averages). Otherwise each row is one sample.
    """

    def __init__(self, features: torch.Tensor, targets: np.ndarray, depth: int,
                 sample_views: bool = False, seed: int = 0, multi_view: bool = False) -> None:
        if sample_views and multi_view:
            raise ValueError("a FeatureDataset samples one view or yields all of them, not both")
        if len(features) != len(targets):
            raise ValueError(f"{len(features)} feature rows for {len(targets)} targets")
        self.features = features
        self.targets = torch.from_numpy(np.ascontiguousarray(targets, dtype=np.float32))
        self.depth = depth  # the stage the features come out of: forward_features(x, depth)
        self.sample_views, self.seed, self.multi_view = sample_views, seed, multi_view
        self._views: Optional[torch.Tensor] = None
        if sample_views:
            self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        """Draw this epoch's view of every item (a no-op without ``sample_views``)."""
        if self.sample_views:
            gen = torch.Generator().manual_seed(epoch_seed(self.seed, epoch, stream=1))
            self._views = torch.randint(self.features.shape[1], (len(self.features),), generator=gen)

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, i: int) -> Tuple[torch.Tensor, torch.Tensor, int]:
        x = self.features[i] if self._views is None else self.features[i, int(self._views[i])]
        return x, self.targets[i], i

    def __getitems__(self, indices: List[int]) -> List[Tuple[torch.Tensor, torch.Tensor, int]]:
        """A whole batch in one read (DataLoader's batched fetch): one positional read per run
        of consecutive rows of an on-disk cache instead of one per item (with sampled views the
        batch's rows are read whole and each item's view picked after: the views are few)."""
        rows = np.asarray(indices, dtype=np.int64)
        x = self.features[rows]
        if self._views is not None:
            x = x[torch.arange(len(rows)), self._views.index_select(0, torch.from_numpy(rows))]
        return list(zip(x.unbind(0), self.targets.index_select(0, torch.from_numpy(rows)).unbind(0), indices))


def feature_depth(loader: DataLoader) -> Optional[int]:
    """The stage a loader's cached features come out of, or None when it yields images."""
    return loader.dataset.depth if isinstance(loader.dataset, FeatureDataset) else None


def _sampler(size: int, train: bool, seed: int) -> Optional[Sampler]:
    """Epoch-seeded shuffling for train; across processes each rank takes its (padded) shard."""
    if distributed.world_size() > 1:
        return EpochSampler(size, seed=seed, shuffle=train, rank=distributed.rank(), world_size=distributed.world_size())
    return EpochSampler(size, seed=seed) if train else None


def build_loader(dataset: Dataset, batch_size: int, train: bool, seed: int, num_workers: int,
                 device: torch.device) -> DataLoader:
    """A deterministic DataLoader (seeded sampler, generator and worker init)."""
    # init_worker seeds, and keeps a worker quiet if the main process stops first (Ctrl-C); the
    # train loader is iterated every epoch, so its workers persist.
    return DataLoader(dataset, batch_size=batch_size, sampler=_sampler(len(dataset), train, seed),
                      num_workers=num_workers, pin_memory=torch.device(device).type == "cuda",
                      worker_init_fn=init_worker, generator=make_generator(seed), drop_last=False,
                      persistent_workers=train and num_workers > 0)


def make_loaders(dataset: Any, model: Any, plan: FeaturePlan, splits: Sequence[str] = SPLITS) -> Dict[str, DataLoader]:
    """Loaders for those of ``splits`` that ``dataset`` has: train with its cached views (or the
    train transform on images), val/test with the test-time views, so model selection judges
    the model as it will be used (``capnet.evaluation.scores.split_scores`` scores test the same way).

    ``plan.batch_size`` is the global batch of one optimisation step: with N processes each
    loads ``batch_size // N``.
    """
    from capnet.data import ImageDataset
    from capnet.features.views import eval_views, split_features, train_features

    depth, world = plan.cached_depth, distributed.world_size()
    loaders: Dict[str, DataLoader] = {}
    for name in splits:
        if name not in dataset.splits:
            continue
        split, train = dataset.splits[name], name == "train"
        if depth > 0:
            if train:
                data: Dataset = FeatureDataset(train_features(model, split, plan), split.labels, depth,
                                               sample_views=True, seed=plan.seed)
            else:
                feats = split_features(model, split.image_paths, eval_views(model, plan), plan)
                data = FeatureDataset(feats, split.labels, depth, multi_view=True)
            workers = 0  # rows in memory or read by positional reads: no decoding to spread
        else:
            data = ImageDataset(split, model.backbone.transform(train=True) if train else eval_views(model, plan))
            workers = plan.num_workers
        batch = max(1, plan.batch_size // world) if train else plan.eval_batch_size
        loaders[name] = build_loader(data, batch, train, plan.seed, workers, plan.device)
    return loaders
