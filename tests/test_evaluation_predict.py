"""predict_scores: views averaged in logit space, feature loaders, dataset order; evaluate()."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from capnet.runtime.distributed import gather_predictions
from capnet.evaluation.predict import evaluate, predict_scores
from capnet.features.loaders import FeatureDataset
from capnet.errors import CapnetError

from _toys import CLASS_NAMES, GROUPS, ToyModel, toy_data

CPU = torch.device("cpu")


def _model():
    torch.manual_seed(0)
    return ToyModel(dropout=0.5)


def test_scores_are_eval_mode_logits_in_dataset_order():
    model = _model().train()
    data = toy_data(10)
    loader = DataLoader(data, batch_size=3, sampler=list(reversed(range(10))))  # any order in, index order out
    scores, targets = predict_scores(model, loader, CPU)
    assert model.training  # mode restored
    model.eval()
    with torch.no_grad():
        expected = model(data.tensors[0]).numpy()
    np.testing.assert_allclose(scores, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(targets, data.tensors[1].numpy())


def test_views_average_logits_not_probabilities():
    model = _model()
    x = torch.rand(4, 3, 3, 8, 8)  # (B, V, 3, H, W)
    y = torch.ones(4, 4)
    loader = DataLoader(TensorDataset(x, y, torch.arange(4)), batch_size=2)
    scores, _ = predict_scores(model, loader, CPU, tte=True)
    model.eval()
    with torch.no_grad():
        logits = model(x.flatten(0, 1)).view(4, 3, -1)
    np.testing.assert_allclose(scores, logits.mean(1).numpy(), rtol=1e-5, atol=1e-6)
    with pytest.raises(CapnetError, match="tte=False"):
        predict_scores(model, loader, CPU, tte=False)


def test_feature_loader_uses_forward_features():
    model = _model()
    data = toy_data(6)
    with torch.no_grad():
        feats = model.backbone.image_prefix(data.tensors[0], 1)
    loader = DataLoader(FeatureDataset(feats, data.tensors[1].numpy(), depth=1), batch_size=4)
    model.calls.clear()
    scores, _ = predict_scores(model, loader, CPU)
    assert model.calls == ["features@1", "features@1"]
    image_scores, _ = predict_scores(model, DataLoader(data, batch_size=4), CPU)
    np.testing.assert_allclose(scores, image_scores, rtol=1e-5, atol=1e-6)


def test_logits_rank_where_float32_sigmoid_ties():
    """A cosine head at scale 100 gives logits where float32 sigmoid rounds to exactly 1.0."""
    from capnet.metrics import average_precision

    logits = np.array([[30.0], [25.0], [20.0], [18.0]], dtype=np.float32)
    targets = np.array([[1.0], [0.0], [1.0], [0.0]])
    probs = torch.sigmoid(torch.from_numpy(logits)).numpy()
    assert len(set(probs[:, 0].tolist())) < 4  # ties in probability space
    assert average_precision(logits, targets)[0] == pytest.approx((1 + 2 / 3) / 2)


def test_evaluate_reports_map_and_groups():
    model = _model()
    report = evaluate(model, DataLoader(toy_data(16), batch_size=8), GROUPS, CLASS_NAMES, device=CPU)
    assert 0.0 < report["mAP"] <= 100.0
    assert set(report["per_class"]) == set(CLASS_NAMES)
    assert report["tail"] == pytest.approx(report["per_class"]["c3"])


def test_gather_single_process_dedupes_and_orders():
    scores = np.array([[0.3], [0.1], [0.2], [0.1]])
    targets = np.array([[1.0], [0.0], [1.0], [0.0]])
    s, t = gather_predictions(scores, targets, np.array([2, 0, 1, 0]))
    np.testing.assert_array_equal(s[:, 0], [0.1, 0.2, 0.3])
    np.testing.assert_array_equal(t[:, 0], [0.0, 1.0, 1.0])
