"""Fitting a baseline head on cached final image features (``FEATURE_FITS``: the scikit-learn
probe, ZS-LP, CLAP and the authors' CLAP), with its choices made on validation under the
test-time views, so it is judged as it will be scored. Test is never read here.
"""
from __future__ import annotations

from typing import Any, Dict, Tuple

import numpy as np

from capnet.errors import CapnetError
from capnet.features.plan import FeaturePlan
from capnet.features.views import eval_views, single_view, split_features, train_features
from capnet.models.heads import ClassifierBase
from capnet.registry import FEATURE_FITS


def fit_on_features(model: ClassifierBase, ds: Any, kind: str, plan: FeaturePlan, refit: bool) -> Dict[str, Any]:
    """Fit ``model`` (of model kind ``kind``) on train, choosing on val; returns its selection record."""
    if plan.cached_depth != model.backbone.num_image_stages:
        raise CapnetError(f"model.kind={kind} reads cached final features: set train.feature_cache=true "
                          "and model.peft.method=none")

    def features(name: str, views: Any) -> Tuple[np.ndarray, np.ndarray]:
        split = ds.splits[name]
        feats = split_features(model, split.image_paths, views, plan)
        return feats[:].numpy(), split.labels  # FeatureRows: read every row (final features are small)

    train = ds.splits["train"]
    if plan.augment_views and getattr(FEATURE_FITS.get(kind), "fits_train_views", False):  # e.g. clap_authors
        x = train_features(model, train, plan)[:].numpy()  # (N, 1 + K, D): eval view + cached augmentations
    else:
        x = features("train", single_view(model))[0][:, 0]
    val = features("val", eval_views(model, plan)) if "val" in ds.splits else None
    return FEATURE_FITS.build(kind, model, (x, train.labels), val, refit=refit, seed=plan.seed)
