"""Every DATASETS reader over its fake tree (tests/_native_trees.READER_TREES): the labels it reads,
the splits it is asked for, `capnet data check` finding a broken image, and one tiny training run.

Parametrized over the registry, so a reader registered without a fake tree fails here."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

import capnet.data  # noqa: F401  (registers the readers)
from capnet.errors import DataError
from capnet.cli import main
from capnet.config import load_config
from capnet.data import load_dataset, load_image
from capnet.registry import DATASETS

from _native_trees import READER_TREES, FakeTree

REPO = Path(__file__).resolve().parents[1]
READERS = DATASETS.names()


def test_every_registered_reader_has_a_fake_tree() -> None:
    missing = sorted(set(READERS) - set(READER_TREES))
    stale = sorted(set(READER_TREES) - set(READERS))
    assert not missing, f"DATASETS readers without a fake tree in tests/_native_trees.READER_TREES: {missing}"
    assert not stale, f"READER_TREES entries for readers no longer registered: {stale}"


def _tree(reader: str, root: Path, write_jpeg: Callable[..., Path]) -> FakeTree:
    if reader not in READER_TREES:
        pytest.fail(f"reader '{reader}' has no fake tree in tests/_native_trees.READER_TREES")
    tree = READER_TREES[reader](root / reader, write_jpeg)
    assert tree.reader == reader
    return tree


@pytest.mark.parametrize("reader", READERS)
def test_reader_reads_its_tree(reader: str, tmp_path: Path, write_jpeg) -> None:
    tree = _tree(reader, tmp_path, write_jpeg)
    ds = load_dataset(reader, tree.root, **tree.options)
    assert ds.classes == tree.classes
    assert set(ds.splits) == set(tree.rows)
    for name, want in tree.rows.items():
        split = ds.splits[name]
        assert split.labels.shape == (len(want), len(tree.classes))
        got = {i: frozenset(ds.classes[j] for j in np.flatnonzero(row)) for i, row in zip(split.image_ids, split.labels)}
        assert got == want, name
        for path in split.image_paths:
            assert load_image(path).size == (8, 8)
    assert ds.class_freq("train").sum() == sum(len(labels) for labels in tree.rows["train"].values())


@pytest.mark.parametrize("reader", READERS)
def test_reader_reads_only_the_split_asked_for(reader: str, tmp_path: Path, write_jpeg) -> None:
    tree = _tree(reader, tmp_path, write_jpeg)
    ds = load_dataset(reader, tree.root, splits=("test",), **tree.options)
    assert list(ds.splits) == ["test"] and set(ds.splits["test"].image_ids) == set(tree.rows["test"])
    with pytest.raises(DataError, match="no_such_option"):
        load_dataset(reader, tree.root, no_such_option=1, **tree.options)


@pytest.mark.parametrize("reader", READERS)
def test_data_check_finds_a_broken_image_in_every_layout(reader: str, tmp_path: Path, write_jpeg,
                                                         capsys: pytest.CaptureFixture) -> None:
    tree = _tree(reader, tmp_path, write_jpeg)
    args = ["data", "check", str(tree.root), "--reader", reader, "--workers", "1"]
    assert main(args) == 0
    victim = load_dataset(reader, tree.root, **tree.options).splits["test"].image_paths[1]
    victim.write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    capsys.readouterr()
    assert main(args) == 1
    captured = capsys.readouterr()
    assert victim.name in captured.out + captured.err


@pytest.mark.parametrize("reader", READERS)
def test_a_tiny_run_trains_on_every_layout(reader: str, tmp_path: Path, write_jpeg) -> None:
    """One epoch of a tiny random CAPNET through `capnet train`: the reader feeds the whole pipeline."""
    tree = _tree(reader, tmp_path, write_jpeg)
    out = tmp_path / "run"
    sets = ["model.backbone=clip_tiny_rn.random", "model.peft.method=none", "model.gcn.hidden=8",
            "model.prompts.n_ctx=4", "train.epochs=1", "data.num_workers=0", "data.val_fraction=0.34",
            "tte.views=single", "tte.templates=false", f"data.reader={reader}", f"data.root={tree.root}"]
    sets += [f"data.reader_options.{k}={json.dumps(v)}" for k, v in tree.options.items()]
    assert main(["train", "--config", str(REPO / "configs" / "capnet.yaml"), "--out", str(out), "--no-cache",
                 *[a for s in sets for a in ("--set", s)]]) == 0
    saved = load_config([str(out / "config.yaml")], [])
    assert saved.data.reader == reader and dict(saved.data.reader_options) == tree.options
    metrics = json.loads((out / "metrics.json").read_text())
    test_positives = {c for labels in tree.rows["test"].values() for c in labels}
    assert list(metrics["per_class"]) == tree.classes  # the model was built over the reader's classes
    scored = {c for c, ap in metrics["per_class"].items() if ap is not None}
    assert scored == test_positives and set(metrics["excluded"]) == set(tree.classes) - test_positives
    assert metrics["mAP"] == pytest.approx(np.mean([metrics["per_class"][c] for c in scored]))
