"""`capnet train` before and after the long work: the image pre-flight, --skip-bad-images, the
DB-loss class warning, log.csv column order on resume, the config hash of a finished run."""
from __future__ import annotations

import csv
import json
import warnings
from pathlib import Path

import pytest

from capnet.cli import main
from capnet.config import config_hash, load_config
from capnet.train import loop as train_module
from capnet.experiment import finished_run

REPO = Path(__file__).resolve().parents[1]
CLASSES = ["cat", "dog", "person", "horse"]  # horse: no training positive
ROWS = {
    "train": [(f"{k:04d}", labels) for k, labels in enumerate(
        ["cat", "dog person", "cat dog", "", "person", "cat person", "dog", "cat", "person dog", "cat"])],
    "test": [("0101", "dog"), ("0102", "cat horse"), ("0103", "person dog"), ("0104", "cat")],
}
ZEROSHOT = ["model.kind=zeroshot", "model.backbone=clip_tiny_rn.random", "model.peft.method=none",
            "tte.views=single", "tte.templates=false", "data.num_workers=0", "data.val_fraction=0.3"]
# Gradient-trained: fixed template classifiers with a trainable per-class residual and scale.
TRAINED = ["model.kind=capnet", "model.backbone=clip_tiny_rn.random", "model.peft.method=none",
           "model.prompts.enabled=false", "model.gcn.enabled=false", "model.graph.source=none",
           "model.class_residual=true", "tte.views=single", "tte.templates=false", "data.num_workers=0",
           "data.val_fraction=0.3", "loss.name=db_focal", "train.epochs=2", "data.batch_size=4", "train.refit=false"]


def _train(data: Path, out: Path, sets, *extra: str) -> int:
    args = ["train", "--config", str(REPO / "configs" / "capnet.yaml"), "--out", str(out), "--no-cache"]
    return main(args + [a for s in sets + [f"data.root={data}"] for a in ("--set", s)] + list(extra))


@pytest.fixture
def data(tmp_path: Path, make_folder_tree) -> Path:
    return make_folder_tree(tmp_path / "data", ROWS, CLASSES)


def _damage(data: Path, write_jpeg) -> list:
    cut = data / "images" / "0102.jpg"  # a test image: would only be met after training
    full = write_jpeg(cut, seed=1, size=64).read_bytes()
    cut.write_bytes(full[: len(full) // 2])
    empty = data / "images" / "0003.jpg"
    empty.write_bytes(b"")
    return [cut, empty]


def test_train_checks_every_image_before_any_work(data: Path, tmp_path: Path, capsys, write_jpeg) -> None:
    cut, empty = _damage(data, write_jpeg)
    out = tmp_path / "run"
    assert _train(data, out, ZEROSHOT) == 1
    err = capsys.readouterr().err
    assert f"capnet: bad image: {cut}: " in err and f"capnet: bad image: {empty}: empty file (0 bytes)" in err
    assert "2 image(s) cannot be decoded" in err and "--skip-bad-images" in err
    assert "features" not in err  # no feature extraction started
    assert not out.exists()  # nothing was written


def test_skip_bad_images_lists_them_in_the_run(data: Path, tmp_path: Path, capsys, write_jpeg) -> None:
    cut, empty = _damage(data, write_jpeg)
    out = tmp_path / "run"
    assert _train(data, out, ZEROSHOT, "--skip-bad-images") == 0
    assert "skipped 2 image(s)" in capsys.readouterr().err
    listed = (out / "skipped_images.txt").read_text().splitlines()
    assert sorted(line.split(": ")[0] for line in listed) == sorted([str(cut), str(empty)])
    report = (out / "report.md").read_text()
    assert "skipped images**: 2 that cannot be decoded (all in skipped_images.txt)" in report
    assert f"`{empty}`: empty file (0 bytes)" in report and f"`{cut}`: " in report
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["skipped_images"] == 2


def test_training_needs_a_train_split(data: Path, tmp_path: Path, capsys) -> None:
    (data / "train.csv").unlink()
    assert _train(data, tmp_path / "run", ZEROSHOT) == 1
    assert f"label file not found: {data / 'train.csv'}" in capsys.readouterr().err


def test_db_loss_names_the_classes_without_positives_in_one_warning(data: Path, tmp_path: Path) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert _train(data, tmp_path / "run", TRAINED) == 0
    messages = [str(w.message) for w in caught if "training positives" in str(w.message)]
    assert messages == [messages[0]] and "class horse has 0 of" in messages[0]


def _log(path: Path) -> tuple:
    with open(path, newline="") as fh:
        rows = list(csv.reader(fh))
    return rows[0], [[v for c, v in zip(rows[0], r) if c != "seconds"] for r in rows[1:]]


class Killed(Exception):
    pass


@pytest.mark.filterwarnings("ignore:loss 'db_focal'")
def test_resume_keeps_the_log_columns_and_values(data: Path, tmp_path: Path, monkeypatch) -> None:
    assert _train(data, tmp_path / "straight", TRAINED) == 0
    real = train_module.train_one_epoch
    calls = []

    def dies_in_epoch_2(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise Killed  # as if killed during epoch 2, after epoch 1's checkpoint
        return real(*args, **kwargs)

    monkeypatch.setattr(train_module, "train_one_epoch", dies_in_epoch_2)
    with pytest.raises(Killed):
        _train(data, tmp_path / "resumed", TRAINED)
    monkeypatch.setattr(train_module, "train_one_epoch", real)
    assert _train(data, tmp_path / "resumed", TRAINED, "--resume") == 0
    header, values = _log(tmp_path / "resumed" / "log.csv")
    assert (header, values) == _log(tmp_path / "straight" / "log.csv")
    assert header[:2] == ["epoch", "lr_head"] and header[-1] == "seconds"


def test_a_finished_run_records_its_config_hash(data: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert _train(data, out, ZEROSHOT) == 0
    cfg = load_config([out / "config.yaml"])
    assert json.loads((out / "metrics.json").read_text())["config_sha256"] == config_hash(cfg)
    assert finished_run(out, cfg)["mAP"] == json.loads((out / "metrics.json").read_text())["mAP"]
    changed = load_config([out / "config.yaml"], ["optim.lr=0.123"])
    assert finished_run(out, changed) is None


def test_images_that_decoded_before_are_not_decoded_again(data: Path, tmp_path: Path, monkeypatch) -> None:
    from capnet.data import check

    decoded = []
    real = check.image_problem
    monkeypatch.setattr(check, "image_problem", lambda p: decoded.append(p) or real(p))
    args = ["train", "--config", str(REPO / "configs" / "capnet.yaml"), "--cache-dir", str(tmp_path / "cache")]
    sets = [a for s in ZEROSHOT + [f"data.root={data}"] for a in ("--set", s)]
    assert main(args + ["--out", str(tmp_path / "a")] + sets) == 0
    assert len(decoded) == 14  # every image, once
    assert main(args + ["--out", str(tmp_path / "b")] + sets) == 0
    assert len(decoded) == 14  # unchanged files: known good
    (data / "images" / "0101.jpg").write_bytes(b"")  # a changed file is decoded again, and fails
    assert main(args + ["--out", str(tmp_path / "c")] + sets) == 1
    assert decoded[-1].name == "0101.jpg" and len(decoded) == 15
