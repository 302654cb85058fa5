"""Every ablation row / baseline config builds its model and takes a training step."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from capnet.config import load_config
from capnet.losses import build_loss
from capnet.models.build import build_model

REPO = Path(__file__).resolve().parents[1]
EXPERIMENTS = sorted((REPO / "configs" / "experiments").glob("*.yaml"))
CLASSES = ["cat", "dog", "person", "potted_plant"]
LABELS = np.array([[1, 0, 1, 0], [0, 1, 0, 0], [1, 1, 0, 1], [0, 0, 1, 0]], dtype=np.float32)
TINY = ["model.backbone=clip_tiny_vit.random", "model.gcn.hidden=16", "model.prompts.n_ctx=4"]


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.stem)
def test_experiment_builds_and_steps(path: Path) -> None:
    # the ViT recipe brings its PEFT (adaptformer) into rows that keep the recipe's PEFT
    cfg = load_config([REPO / "configs" / "voc_lt_vit_b16.yaml", path], TINY)
    if cfg.model.peft.method == "conv_adapter":  # a CNN adapter: the tiny ResNet tower instead
        cfg = load_config([REPO / "configs" / "voc_lt_rn50.yaml", path], TINY + ["model.backbone=clip_tiny_rn.random"])
    model = build_model(cfg, CLASSES, LABELS)
    loss_fn = build_loss(cfg.loss.name, cfg.loss.options, LABELS.sum(0).astype(int) + 1, len(LABELS) + 2)
    params = [p for group in model.param_groups().values() for p in group]
    if cfg.model.kind == "zeroshot":
        assert not params and torch.isfinite(model(torch.randn(2, 3, 32, 32))).all()
        return
    assert params, "every other experiment trains something"
    before = [p.detach().clone() for p in params]
    opt = torch.optim.SGD(params, lr=0.5)
    size = model.backbone.spec.image_size
    images = torch.randn(4, 3, size, size)
    loss = loss_fn(model(images), torch.from_numpy(LABELS))
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)
    assert any(not torch.equal(b, p) for b, p in zip(before, params))
    expected = {"prompts"} if cfg.model.kind == "capnet" and cfg.model.prompts.enabled else set()
    if cfg.model.gcn.enabled and cfg.model.kind == "capnet":
        expected.add("gcn")
    if cfg.model.peft.method != "none":
        expected.add("peft")
    assert expected <= set(model.param_groups())
