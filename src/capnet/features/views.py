"""Image views for the frozen tower: test-time view sets, cached training augmentations, scores.

Every split is turned into (N, V, ...) features with one decode per image: V test-time views
(``tte.views``) for val/test, and for train the eval view plus ``train.augment_views`` random
augmentations (the backbone's train transform), each seeded by the image's own pixels so the
same image gets the same augmentations in any split, re-split or cache state. Training draws
one of the train views per image per epoch (``FeatureDataset``); scoring averages logits over
the test-time views.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Callable, MutableMapping, Optional, Union

import torch
from torch import nn

from capnet.config import Config
from capnet.features.cache import FeatureCache, feature_rows
from capnet.features.store import ConcatViews, FeatureRows
from capnet.runtime import distributed


class AugmentedViews:
    """PIL image -> (K, 3, H, W): ``k`` draws of ``transform``, seeded from the image and ``seed``.

    The seed comes from a hash of the decoded pixels, so it does not depend on where the image
    sits in a split; the global RNG is forked, so nothing outside sees the draws.
    """

    def __init__(self, transform: Callable, k: int, seed: int = 0) -> None:
        if k < 1:
            raise ValueError(f"AugmentedViews needs k >= 1, got {k}")
        self.transform, self.k, self.seed = transform, int(k), int(seed)

    def __call__(self, image: Any) -> torch.Tensor:
        digest = hashlib.sha256(image.tobytes() + f"|{image.size}|{self.seed}".encode()).digest()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int.from_bytes(digest[:8], "little"))
            return torch.stack([self.transform(image) for _ in range(self.k)])

    def __repr__(self) -> str:
        inner = repr(self.transform).replace("\n", " ")
        return f"AugmentedViews(k={self.k}, seed={self.seed}, transform={inner})"


def eval_views(model: nn.Module, cfg: Config) -> Callable:
    """The (V, 3, H, W) test-time view set of ``cfg.tte.views`` on the backbone's eval transform."""
    from capnet.models.tte import build_view_transform

    backbone = model.backbone
    return build_view_transform(cfg.tte, backbone.spec, backbone.transform(train=False))


def single_view(model: nn.Module) -> Callable:
    """The backbone's eval transform as a one-view stack (what training validates with)."""
    from capnet.config import TTEConfig
    from capnet.models.tte import build_view_transform

    backbone = model.backbone
    return build_view_transform(TTEConfig(views="single"), backbone.spec, backbone.transform(train=False))


def cache_depth(model: nn.Module, cfg: Config) -> int:
    """How deep the frozen prefix is cached (0: no cache, images every time)."""
    return model.frozen_image_stages() if cfg.train.feature_cache else 0


def split_features(model: nn.Module, paths: Any, transform: Callable, cfg: Config, device: torch.device,
                   cache_dir: Optional[Path], timings: Optional[MutableMapping[str, float]] = None) -> FeatureRows:
    """(N, V, ...) cached prefix features of ``paths`` under a stacked-view ``transform``.

    Rows are read from the on-disk cache per batch (``FeatureRows``): ``feats[i]`` and
    ``feats[a:b, 0]`` give float32 tensors. Under DDP every rank extracts its shard of the
    missing images (``capnet.features.cache.fill_missing``) and then reads the whole array.
    """
    from capnet.runtime.precision import extraction_amp

    cache = FeatureCache(cache_dir) if cache_dir is not None else None
    return feature_rows(model.backbone, paths, transform, cache_depth(model, cfg),
                        batch_size=cfg.data.eval_batch_size, num_workers=cfg.data.num_workers,
                        device=device, cache=cache, progress=distributed.is_main(),
                        amp=extraction_amp(cfg, device), timings=timings)


def train_features(model: nn.Module, split: Any, cfg: Config, device: torch.device, cache_dir: Optional[Path],
                   timings: Optional[MutableMapping[str, float]] = None) -> Union[FeatureRows, ConcatViews]:
    """(N, 1 + K, ...): the eval view, then ``train.augment_views`` cached augmentations (read lazily)."""
    eval_view = split_features(model, split.image_paths, single_view(model), cfg, device, cache_dir, timings)
    if cfg.train.augment_views == 0:
        return eval_view
    aug = AugmentedViews(model.backbone.transform(train=True), cfg.train.augment_views, cfg.train.augment_seed)
    return ConcatViews([eval_view, split_features(model, split.image_paths, aug, cfg, device, cache_dir, timings)])


