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
from typing import Any, Callable, Union

import torch
from torch import nn

from capnet.features.cache import FeatureCache, feature_rows
from capnet.features.plan import FeaturePlan
from capnet.features.store import ConcatViews, FeatureRows
from capnet.runtime import distributed


# The single view ignores the resize scale, but its description (part of the feature-cache key)
# records it: the value tte.resize_scale defaults to, so existing caches stay valid.
SINGLE_RESIZE_SCALE = 1.15


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


def eval_views(model: nn.Module, plan: FeaturePlan) -> Callable:
    """The (V, 3, H, W) test-time view set of ``plan.views`` on the backbone's eval transform."""
    from capnet.models.tte import view_set

    return view_set(plan.views, plan.resize_scale, model.backbone.spec, model.backbone.transform(train=False))


def single_view(model: nn.Module) -> Callable:
    """The backbone's eval transform as a one-view stack (what training validates with)."""
    from capnet.models.tte import view_set

    return view_set("single", SINGLE_RESIZE_SCALE, model.backbone.spec, model.backbone.transform(train=False))


def split_features(model: nn.Module, paths: Any, transform: Callable, plan: FeaturePlan) -> FeatureRows:
    """(N, V, ...) cached prefix features of ``paths`` under a stacked-view ``transform``.

    Rows are read from the on-disk cache per batch (``FeatureRows``): ``feats[i]`` and
    ``feats[a:b, 0]`` give float32 tensors. Under DDP every rank extracts its shard of the
    missing images (``capnet.features.cache.fill_missing``) and then reads the whole array.
    """
    cache = FeatureCache(plan.cache_dir) if plan.cache_dir is not None else None
    return feature_rows(model.backbone, paths, transform, plan.cached_depth,
                        batch_size=plan.eval_batch_size, num_workers=plan.num_workers,
                        device=plan.device, cache=cache, progress=distributed.is_main(),
                        amp=plan.extract_amp, stopwatch=plan.stopwatch)


def train_features(model: nn.Module, split: Any, plan: FeaturePlan) -> Union[FeatureRows, ConcatViews]:
    """(N, 1 + K, ...): the eval view, then ``plan.augment_views`` cached augmentations (read lazily)."""
    eval_view = split_features(model, split.image_paths, single_view(model), plan)
    if plan.augment_views == 0:
        return eval_view
    aug = AugmentedViews(model.backbone.transform(train=True), plan.augment_views, plan.augment_seed)
    return ConcatViews([eval_view, split_features(model, split.image_paths, aug, plan)])
