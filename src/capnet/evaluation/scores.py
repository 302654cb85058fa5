"""Scores of a whole split under the test-time views (image views and, for models with a text
branch, prompt templates): what validation, thresholds, test and predict all judge, in float32
(``runtime.precision.SCORE_AMP``).
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator, Tuple

import numpy as np

from capnet.evaluation.predict import predict_scores
from capnet.features.loaders import FeatureDataset, build_loader
from capnet.features.plan import FeaturePlan
from capnet.features.views import eval_views, split_features
from capnet.models.heads import ClassifierBase
from capnet.runtime.precision import SCORE_AMP


@contextlib.contextmanager
def test_time_templates(model: ClassifierBase, templates: bool) -> Iterator[None]:
    """Score with the deployed text side (``tte.templates``), then restore training's.

    Training steps fit the prompt classifier alone; epoch selection and thresholds must judge the
    classifier that ships (prompts averaged with the template ensemble), not the training one.
    """
    before = model.set_test_time(templates)
    try:
        yield
    finally:
        model.set_test_time(before)


def split_scores(model: ClassifierBase, split: Any, plan: FeaturePlan) -> Tuple[np.ndarray, np.ndarray]:
    """Logits (view-averaged) and targets of one split under the plan's test-time views."""
    from capnet.data import ImageDataset

    transform = eval_views(model, plan)
    if plan.cached_depth > 0:
        feats = split_features(model, split.image_paths, transform, plan)
        loader = build_loader(FeatureDataset(feats, split.labels, depth=plan.cached_depth, multi_view=True),
                              plan.eval_batch_size, False, plan.seed, 0, plan.device)
    else:
        loader = build_loader(ImageDataset(split, transform), plan.eval_batch_size, False, plan.seed,
                              plan.num_workers, plan.device)
    return predict_scores(model, loader, plan.device, SCORE_AMP, tte=True)
