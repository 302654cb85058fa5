"""Logits for a whole loader (views averaged in logit space, ranks gathered) and the mAP report.

Rankings (AP) are computed on float32 logits, never on sigmoid probabilities: a cosine head at
scale 20-100 puts many logits where float32 ``sigmoid`` rounds to exactly 1.0, and bf16 logits
tie far sooner, so both would turn distinct scores into ties. The models compute their logits in
float32 even under autocast; probabilities are taken only for thresholds and predictions.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from capnet.errors import CapnetError
from capnet.features.loaders import FeatureDataset, feature_depth
from capnet.models.heads import ClassifierBase, ModelForward
from capnet.runtime import distributed
from capnet.runtime.precision import autocast


def batch_logits(forward: nn.Module, inputs: torch.Tensor, depth: Optional[int], tte: bool,
                 feature_views: bool = False, class_embeddings: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(B, C) float32 logits; a batch of views ((B, V, 3, H, W) images, or (B, V, ...) cached
    features when ``feature_views``) is averaged over V in logit space."""
    if (depth is None and inputs.ndim == 5) or feature_views:
        b, v = inputs.shape[:2]
        if v > 1 and not tte:
            raise CapnetError(f"the loader yields {v} views per image but tte=False: enable TTE or use a single view")
        return forward(inputs.flatten(0, 1), depth, class_embeddings).float().view(b, v, -1).mean(dim=1)
    return forward(inputs, depth, class_embeddings).float()


def predict_scores(model: ClassifierBase, loader: DataLoader, device: torch.device, amp: str = "none",
                   tte: bool = False) -> Tuple[np.ndarray, np.ndarray]:
    """Logits (float32) and targets (N, C), in dataset order, gathered over processes.

    The loader yields ``(images | views | cached features, target, index)``; rows are placed
    by ``index`` so padding added by a DistributedSampler is dropped and every sample appears
    once. The class embeddings are computed once (float32, as the heads compute them) and shared
    by every batch. The model's train/eval mode is restored afterwards.
    """
    depth = feature_depth(loader)
    feature_views = isinstance(loader.dataset, FeatureDataset) and loader.dataset.multi_view
    forward = ModelForward(model)
    was_training = model.training
    model.eval()
    device = torch.device(device)
    scores, targets, indices = [], [], []
    try:
        with torch.inference_mode(), autocast(device, amp):
            with torch.autocast(device.type, enabled=False):
                class_embeddings = model.class_embeddings()
            for inputs, target, index in loader:
                logits = batch_logits(forward, inputs.to(device, non_blocking=True), depth, tte, feature_views,
                                      class_embeddings)
                scores.append(logits.float().cpu().numpy())
                targets.append(np.asarray(target, dtype=np.float32))
                indices.append(np.asarray(index, dtype=np.int64))
    finally:
        model.train(was_training)
    if not scores:
        raise CapnetError("evaluation loader is empty: no samples to score")
    return distributed.gather_predictions(np.concatenate(scores), np.concatenate(targets), np.concatenate(indices))


def _map_report() -> Callable[..., Dict[str, Any]]:
    """capnet.metrics.map_report (imported lazily: metrics is a sibling component)."""
    from capnet.metrics import map_report

    return map_report


def evaluate(model: nn.Module, loader: DataLoader, groups: Dict[str, np.ndarray], class_names: Sequence[str], *,
             device: torch.device, amp: str = "none", tte: bool = False) -> Dict[str, Any]:
    """mAP overall / head / medium / tail (``capnet.metrics.map_report``) of ``model`` on ``loader``."""
    scores, targets = predict_scores(model, loader, device, amp, tte)
    return _map_report()(scores, targets, groups, list(class_names))
