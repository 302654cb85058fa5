"""Every GRAPHS entry and every MODEL_KINDS entry, built and run on a tiny random CLIP.

Parametrized over the registries: a graph builds a usable adjacency (dense and sparse agree) that
trains a CAPNET end to end; a model kind trains through `capnet train`, and its saved run scores
the same through `capnet eval` and scores every class through `capnet predict`."""
from __future__ import annotations

import json
from pathlib import Path
from typing import List

import numpy as np
import pytest
import torch

import capnet.models.backbones  # noqa: F401  (fills BACKBONES)
from capnet.cli import main
from capnet.config import load_config
from capnet.models.build import MODEL_KINDS, build_model
from capnet.models.label_graph import GraphInputs
from capnet.registry import GRAPHS

from conftest import FOLDER_CLASSES, FOLDER_ROWS, write_folder_tree

REPO = Path(__file__).resolve().parents[1]
TINY = ["model.backbone=clip_tiny_rn.random", "model.peft.method=none", "model.gcn.hidden=8",
        "model.prompts.n_ctx=4", "train.epochs=1", "data.num_workers=0", "data.val_fraction=0.34",
        "tte.views=single", "tte.templates=false"]


def _labels() -> np.ndarray:
    rows = FOLDER_ROWS["train"]
    return np.array([[float(c in labels.split()) for c in FOLDER_CLASSES] for _, labels in rows], dtype=np.float32)


def _sets(items: List[str]) -> List[str]:
    return [a for item in items for a in ("--set", item)]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_folder_tree(tmp_path_factory.mktemp("data") / "tiny")


def _train(out: Path, data: Path, *items: str) -> int:
    return main(["train", "--config", str(REPO / "configs" / "capnet.yaml"), "--out", str(out), "--no-cache",
                 *_sets(TINY + [f"data.root={data}", *items])])


# ---------------------------------------------------------------------------------- GRAPHS

@pytest.mark.parametrize("source", GRAPHS.names())
def test_graph_builds_the_same_adjacency_dense_and_sparse(source: str) -> None:
    torch.manual_seed(0)
    emb = torch.randn(len(FOLDER_CLASSES), 16)
    inputs = GraphInputs(len(FOLDER_CLASSES), lambda: emb, _labels())
    options = dict(topk=2, threshold=None, p=0.2, tau=0.3)
    dense = GRAPHS.build(source, inputs, sparse=False, **options)
    sparse = GRAPHS.build(source, inputs, sparse=True, **options)
    assert dense.shape == (len(FOLDER_CLASSES),) * 2 and not dense.is_sparse and sparse.is_sparse
    torch.testing.assert_close(sparse.to_dense(), dense)
    assert torch.isfinite(dense).all() and (dense >= 0).all()
    assert (dense.diagonal() > 0).all()  # every class keeps its own embedding


@pytest.mark.parametrize("source", GRAPHS.names())
def test_graph_drives_a_capnet_forward_and_backward(source: str) -> None:
    cfg = load_config([], [*TINY, f"model.graph.source={source}", "model.graph.topk=2"])
    torch.manual_seed(0)
    model = build_model(cfg, FOLDER_CLASSES, _labels())
    model.train()
    size = model.backbone.spec.image_size
    logits = model(torch.randn(3, 3, size, size))
    assert logits.shape == (3, len(FOLDER_CLASSES)) and torch.isfinite(logits).all()
    torch.nn.functional.binary_cross_entropy_with_logits(logits, torch.tensor(_labels()[:3])).backward()
    gcn = model.param_groups()["gcn"]
    assert gcn and any(p.grad is not None and p.grad.abs().sum() > 0 for p in gcn)


@pytest.mark.parametrize("source", GRAPHS.names())
def test_graph_trains_end_to_end(source: str, data: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert _train(out, data, f"model.graph.source={source}", "model.graph.topk=2") == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0.0 <= metrics["mAP"] <= 100.0 and set(metrics["per_class"]) == set(FOLDER_CLASSES)


# ----------------------------------------------------------------------------- MODEL_KINDS

def test_every_feature_fit_belongs_to_a_model_kind() -> None:
    """A closed-loop fitter is looked up by its model kind's name: one for no kind is dead code."""
    import capnet.evaluation  # noqa: F401  (fills FEATURE_FITS)
    from capnet.registry import FEATURE_FITS

    assert FEATURE_FITS.names() and set(FEATURE_FITS.names()) <= set(MODEL_KINDS.names())


@pytest.mark.parametrize("kind", MODEL_KINDS.names())
def test_model_kind_trains_evaluates_and_predicts(kind: str, data: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "run"
    assert _train(out, data, f"model.kind={kind}") == 0
    saved = json.loads((out / "metrics.json").read_text())
    assert set(saved["per_class"]) == set(FOLDER_CLASSES) and 0.0 <= saved["mAP"] <= 100.0
    again = tmp_path / "eval.json"
    assert main(["eval", "--run", str(out), "--data-dir", str(data), "--json", str(again)]) == 0
    assert json.loads(again.read_text())["mAP"] == pytest.approx(saved["mAP"], abs=1e-4)
    capsys.readouterr()
    images = sorted((data / "images").iterdir())[:2]
    assert main(["predict", "--run", str(out), *map(str, images)]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert [line["image"] for line in lines] == [str(p) for p in images]
    assert all(set(line["scores"]) == set(FOLDER_CLASSES) for line in lines)
