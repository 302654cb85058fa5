"""Image views for the frozen tower: test-time view sets, cached training augmentations, scores.

Every split becomes (N, V, ...) features, one decode per image: V test-time views (``tte.views``)
for val/test; for train the eval view plus ``train.augment_views`` augmentations seeded by the
image's pixels (the same in any split, re-split or cache state), one drawn per image per epoch
(``FeatureDataset``). Scoring averages logits over the test-time views.
"""
from __future__ import annotations

import hashlib
from typing import Any, Callable, Optional

import torch
from torch import nn

from capnet.features.cache import FeatureCache, feature_rows
from capnet.features.plan import FeaturePlan
from capnet.features.store import FeatureRows
from capnet.runtime import distributed


class AugmentedViews:
    """PIL image -> (K, 3, H, W): ``k`` draws of ``transform``, seeded from the image and ``seed``,
    after the (V, 3, H, W) views of ``first`` if given (training's eval view: one cache entry).

    The seed comes from a hash of the decoded pixels, so it does not depend on where the image
    sits in a split; the global RNG is forked, so nothing outside sees the draws.
    """

    def __init__(self, transform: Callable, k: int, seed: int = 0, first: Optional[Callable] = None) -> None:
        if k < 1:
            raise ValueError(f"AugmentedViews needs k >= 1, got {k}")
        self.transform, self.k, self.seed, self.first = transform, int(k), int(seed), first

    def __call__(self, image: Any) -> torch.Tensor:
        digest = hashlib.sha256(image.tobytes() + f"|{image.size}|{self.seed}".encode()).digest()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int.from_bytes(digest[:8], "little"))
            draws = torch.stack([self.transform(image) for _ in range(self.k)])
        return draws if self.first is None else torch.cat([self.first(image), draws])

    def __repr__(self) -> str:
        inner = repr(self.transform).replace("\n", " ")
        first = "" if self.first is None else ", first=" + repr(self.first).replace("\n", " ")
        return f"AugmentedViews(k={self.k}, seed={self.seed}, transform={inner}{first})"


def eval_views(model: nn.Module, plan: FeaturePlan) -> Callable:
    """The (V, 3, H, W) test-time view set of ``plan.views`` on the backbone's eval transform."""
    from capnet.models.tte import view_set

    return view_set(plan.views, plan.resize_scale, model.backbone.spec, model.backbone.transform(train=False))


def single_view(model: nn.Module) -> Callable:
    """The backbone's eval transform as a one-view stack (what training validates with)."""
    from capnet.models.tte import view_set

    return view_set("single", 1.0, model.backbone.spec, model.backbone.transform(train=False))


def split_features(model: nn.Module, paths: Any, transform: Callable, plan: FeaturePlan) -> FeatureRows:
    """(N, V, ...) prefix features of ``paths`` under a stacked-view ``transform``, float32 rows read
    per batch (``feats[i]``, ``feats[a:b, 0]``) from the cache, each DDP rank extracting its share."""
    cache = FeatureCache(plan.cache_dir) if plan.cache_dir is not None else None
    return feature_rows(model.backbone, paths, transform, plan.cached_depth,
                        batch_size=plan.eval_batch_size, num_workers=plan.num_workers,
                        device=plan.device, cache=cache, progress=distributed.is_main(),
                        amp=plan.extract_amp, stopwatch=plan.stopwatch)


def train_features(model: nn.Module, split: Any, plan: FeaturePlan) -> FeatureRows:
    """(N, 1 + K, ...): the eval view, then ``plan.augment_views`` cached augmentations (read lazily)."""
    views = single_view(model)
    if plan.augment_views:
        views = AugmentedViews(model.backbone.transform(train=True), plan.augment_views, plan.augment_seed, views)
    return split_features(model, split.image_paths, views, plan)
