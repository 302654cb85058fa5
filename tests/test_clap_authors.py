"""CLAP as its authors define it (model kind clap_authors): the cosine head, the multipliers, the
fixed recipe, and that it is not capnet's tuned clap."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from capnet.cli import main
from capnet.config import load_config
from capnet.evaluation.clap_authors import epoch_lr, fit_clap_authors, lagrangian_multipliers, steps_per_epoch
from capnet.evaluation.zs_probe import fit_zs_probe
from capnet.metrics import average_precision
from capnet.models.build import MODEL_KINDS, build_model

REPO = Path(__file__).resolve().parents[1]
CLASSES = ["cat", "dog", "person"]
TINY = ["model.backbone=clip_tiny_vit.random", "model.backbone_options.image_size=32", "data.num_workers=0",
        "data.val_fraction=0", "train.select=last", "train.augment_views=2"]


def _data(seed: int, n: int, d: int = 16, c: int = 3):
    fixed = np.random.default_rng(7)
    true = np.linalg.qr(fixed.normal(size=(d, d)))[0][:c]
    other = np.linalg.qr(fixed.normal(size=(d, d)))[0][:c]
    rng = np.random.default_rng(seed)
    y = (rng.random((n, c)) < 0.35).astype(np.float32)
    x = 0.3 * rng.normal(size=(n, d)) + y @ true
    anchor = 3.0 * (0.4 * true + 0.6 * other)  # raw text embeddings are not unit vectors
    return x.astype(np.float32), y, anchor.astype(np.float32)


def _map(logits: np.ndarray, y: np.ndarray) -> float:
    return float(np.nanmean(average_precision(logits, y)) * 100)


def test_head_is_a_cosine_classifier_started_at_the_raw_template_mean() -> None:
    assert "clap_authors" in MODEL_KINDS.names()
    cfg = load_config([], ["model.kind=clap_authors", "model.backbone=clip_tiny_vit.random"])
    head = build_model(cfg, CLASSES)
    zs = build_model(load_config([], ["model.kind=zeroshot", "model.backbone=clip_tiny_vit.random"]), CLASSES)
    assert torch.equal(head.weight.detach(), head.anchor)
    assert not torch.allclose(head.anchor.norm(dim=-1), torch.ones(3))  # raw, not unit
    feats = torch.randn(5, head.backbone.image_dim)
    assert torch.allclose(head.logits_from_image_features(feats), zs.logits_from_image_features(feats), atol=1e-4)
    with torch.no_grad():
        head.weight.mul_(torch.tensor([[2.0], [0.5], [7.0]]))  # prototype norms do not change a cosine
    assert torch.allclose(head.logits_from_image_features(feats), zs.logits_from_image_features(feats), atol=1e-4)


def test_multipliers_are_the_authors_rule_on_single_label_data() -> None:
    logits = torch.tensor([[3.0, 0.0, -1.0], [0.0, 2.0, 0.0], [1.0, 1.0, 4.0], [2.0, 0.0, 0.0]])
    labels = torch.tensor([0, 1, 2, 0])
    onehot = F.one_hot(labels).float()
    authors = torch.diag(torch.softmax(logits, -1).t() @ onehot) / onehot.sum(0)  # adapters.py:240-242
    assert torch.allclose(lagrangian_multipliers(logits, onehot), authors)
    assert epoch_lr(0) == 1e-5 and epoch_lr(1) == pytest.approx(0.1) and epoch_lr(299) < 0.001
    assert (steps_per_epoch(100), steps_per_epoch(256), steps_per_epoch(600)) == (1, 1, 2)  # the image loader's batches


def test_fit_trains_and_is_not_capnets_tuned_clap() -> None:
    x, y, anchor = _data(0, 240)
    xt, yt, _ = _data(1, 200)
    fit = fit_clap_authors(x, y, anchor, logit_scale=20.0, epochs=60)
    assert fit.epoch_loss[-1] < fit.epoch_loss[1] and not np.allclose(fit.prototypes, anchor)
    unit = lambda a: a / np.linalg.norm(a, axis=1, keepdims=True)  # noqa: E731
    xt_n = unit(xt)
    zs_map, fitted = _map(xt_n @ unit(anchor).T, yt), _map(xt_n @ unit(fit.prototypes).T, yt)
    assert fitted > zs_map + 5
    tuned = fit_zs_probe((x, y), None, anchor, scale=20.0, clap=True, lrs=(1e-2,), max_steps=100)
    assert not np.allclose(unit(fit.prototypes), unit(tuned.weight), atol=1e-2)
    assert not np.allclose(fit.multipliers, tuned.multipliers, atol=1e-3)  # softmax vs sigmoid rule
    views = fit_clap_authors(np.stack([x, x + 0.05], axis=1), y, anchor, logit_scale=20.0, epochs=3)
    assert views.prototypes.shape == anchor.shape and views.steps_per_epoch == 1  # (N, V, D): rows, not steps, grow


def test_train_cli_end_to_end_on_tiny_clip(folder_tree: Path, tmp_path: Path) -> None:
    runs = {}
    for name in ("clap_authors", "clap"):
        out = tmp_path / name
        sets = [a for s in TINY for a in ("--set", s)]
        assert main(["train", "--config", str(REPO / "configs/capnet.yaml"), "--config",
                     str(REPO / f"configs/experiments/{name}.yaml"), "--set", f"data.root={folder_tree}",
                     *sets, "--out", str(out), "--no-cache"]) == 0
        runs[name] = json.loads((out / "metrics.json").read_text())
    assert runs["clap_authors"]["probe"]["epochs"] == 300 and len(runs["clap_authors"]["probe"]["lambda"]) == 3
    assert runs["clap_authors"]["probe"]["train_rows"] == 5 * 3  # 5 labelled train images x (eval view + 2 augmentations)
    assert runs["clap_authors"]["per_class"] != runs["clap"]["per_class"]
