"""Scores of a whole split under the configured test-time views (image views and, for models
with a text branch, prompt templates): what validation, thresholds, test and predict all judge, in float32 (``runtime.precision.SCORE_AMP``).
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Iterator, MutableMapping, Optional, Tuple

import numpy as np
import torch
from torch import nn

from capnet.config import Config
from capnet.evaluation.predict import predict_scores
from capnet.features.loaders import FeatureDataset, build_loader
from capnet.features.views import cache_depth, eval_views, split_features
from capnet.runtime.precision import SCORE_AMP


def set_test_time_templates(model: nn.Module, cfg: Config) -> None:
    """Switch on the text side of test-time ensembling when the config asks and the model can."""
    if hasattr(model, "ensemble_templates") and getattr(model, "template_embeddings", None) is not None:
        model.ensemble_templates = cfg.tte.templates and getattr(model, "prompt_learner", None) is not None


@contextlib.contextmanager
def test_time_templates(model: nn.Module, cfg: Config) -> Iterator[None]:
    """Score with the deployed text side (templates per ``tte.templates``), then restore training's.

    Training steps fit the prompt classifier alone; epoch selection and thresholds must judge the
    classifier that ships (prompts averaged with the template ensemble), not the training one.
    """
    before = getattr(model, "ensemble_templates", None)
    set_test_time_templates(model, cfg)
    try:
        yield
    finally:
        if before is not None and getattr(model, "ensemble_templates", None) != before:
            model.ensemble_templates = before


def split_scores(model: nn.Module, split: Any, cfg: Config, device: torch.device, cache_dir: Optional[Path],
                 timings: Optional[MutableMapping[str, float]] = None) -> Tuple[np.ndarray, np.ndarray]:
    """Logits (view-averaged) and targets of one split under the configured test-time views."""
    from capnet.data import ImageDataset

    transform = eval_views(model, cfg)
    depth = cache_depth(model, cfg)
    if depth > 0:
        feats = split_features(model, split.image_paths, transform, cfg, device, cache_dir, timings)
        loader = build_loader(FeatureDataset(feats, split.labels, start=depth, multi_view=True),
                              cfg.data.eval_batch_size, False, cfg.train.seed, 0, device)
        return predict_scores(model, loader, device, SCORE_AMP, tte=True)
    loader = build_loader(ImageDataset(split, transform), cfg.data.eval_batch_size, False,
                          cfg.train.seed, cfg.data.num_workers, device)
    return predict_scores(model, loader, device, SCORE_AMP, tte=True)
