"""The published protocol (every training image, last epoch, thresholds without test), the
labelled per-epoch test curve, and the protocol files that the paper configs compose."""
from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from capnet.cli import main
from capnet.config import load_config

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
TINY = ["model.backbone=clip_tiny_vit.random", "model.gcn.hidden=32", "model.prompts.n_ctx=4", "train.epochs=3",
        "data.batch_size=16", "data.num_workers=0", "model.backbone_options.image_size=32"]
PAPER = sorted(p.name for p in CONFIGS.glob("*.yaml") if p.name.startswith(("voc_lt_", "coco_lt_", "nus_wide_")))


def _train(out: Path, data: Path, protocol: str, *sets: str) -> dict:
    args = ["train", "--config", str(CONFIGS / "capnet.yaml"), "--config", str(CONFIGS / "protocol" / protocol),
            "--out", str(out), "--no-cache"]
    for s in TINY + [f"data.root={data}", *sets]:
        args += ["--set", s]
    assert main(args) == 0
    return json.loads((out / "metrics.json").read_text())


def _log(run: Path) -> list:
    with open(run / "log.csv", newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def published(small_real: Path, tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("runs") / "published"
    return out, _train(out, small_real, "published.yaml")


def test_published_protocol_trains_on_every_image_and_scores_the_last_epoch(published, small_real: Path) -> None:
    run, metrics = published
    assert metrics["selected_epoch"] == 3 and metrics.get("val_mAP") is None
    split_ids = json.loads((run / "split_ids.json").read_text())
    n_train = sum(1 for _ in open(small_real / "train.csv")) - 1
    assert len(split_ids["train"]) == n_train and not split_ids.get("val")  # no image carved out
    assert set(metrics["thresholds"].values()) == {0.5}  # nothing but test is left to set them: a fixed 0.5
    report = (run / "report.md").read_text()
    assert "no validation part" in report and "thresholds 0.5" in report
    assert not any(k.startswith("val_") for k in _log(run)[0])


def test_the_test_curve_is_logged_and_labelled(published) -> None:
    run, metrics = published
    rows = _log(run)
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    curve = [float(r["test_curve_mAP"]) for r in rows]
    assert all(0.0 < v <= 100.0 for v in curve)
    assert curve[-1] == pytest.approx(metrics["mAP"], abs=1e-6)  # the last epoch is the model that was scored
    assert {"test_curve_head", "test_curve_medium", "test_curve_tail"} <= set(rows[0])
    assert "never used for any choice" in (run / "report.md").read_text()


def _weights(run: Path) -> dict:
    return {k: v for k, v in load_file(str(run / "model.safetensors")).items()}


@pytest.mark.parametrize("protocol", ["published.yaml", "val_epoch.yaml"])
def test_the_test_curve_never_changes_what_is_trained_or_selected(small_real: Path, tmp_path: Path,
                                                                  protocol: str) -> None:
    sets = ["data.val_fraction=0.25", "train.epochs=4"] if protocol == "val_epoch.yaml" else []
    on = _train(tmp_path / "on", small_real, protocol, *sets, "train.log.test_curve=true")
    off = _train(tmp_path / "off", small_real, protocol, *sets, "train.log.test_curve=false")
    assert "test_curve_mAP" in _log(tmp_path / "on")[0] and "test_curve_mAP" not in _log(tmp_path / "off")[0]
    assert on["selected_epoch"] == off["selected_epoch"]
    assert on["mAP"] == off["mAP"] and on["thresholds"] == off["thresholds"]
    a, b = _weights(tmp_path / "on"), _weights(tmp_path / "off")
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    for row_on, row_off in zip(_log(tmp_path / "on"), _log(tmp_path / "off")):
        assert row_on["train_loss"] == row_off["train_loss"] and row_on.get("val_mAP") == row_off.get("val_mAP")


@pytest.mark.parametrize("name", PAPER)
def test_paper_configs_compose_the_published_protocol(name: str) -> None:
    cfg = load_config([CONFIGS / name])
    assert (cfg.data.val_fraction, cfg.train.select, cfg.train.refit) == (0.0, "last", False)
    assert cfg.train.log.test_curve is True


def test_protocol_files_compose_over_any_recipe() -> None:
    demo = load_config([CONFIGS / "demo.yaml"])
    assert (demo.data.val_fraction, demo.train.select) == (0.15, "val")  # the demo keeps its measured default
    published = load_config([CONFIGS / "demo.yaml", CONFIGS / "protocol" / "published.yaml"])
    assert (published.data.val_fraction, published.train.select, published.train.log.test_curve) == (0.0, "last", True)
    refit = load_config([CONFIGS / "voc_lt_rn50.yaml", CONFIGS / "protocol" / "val_refit.yaml"])
    assert (refit.data.val_fraction, refit.train.select, refit.train.refit) == (0.1, "val", True)
    assert refit.model == load_config([CONFIGS / "voc_lt_rn50.yaml"]).model  # a protocol file touches no recipe key


def test_protocol_choice_benchmark_quick_mode_runs_sealed(small_real: Path, tmp_path: Path) -> None:
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    from benchmarks import protocol_choice

    with pytest.raises(SystemExit):
        protocol_choice.main(["--rows", "refit"])  # refit needs val's chosen epoch
    sets = [a for s in TINY + [f"data.root={small_real}", "data.val_fraction=0.25"] for a in ("--set", s)]
    out = tmp_path / "q.json"
    assert protocol_choice.main(["--quick", "--config", str(CONFIGS / "capnet.yaml"), *sets, "--json", str(out),
                                 "--runs-dir", str(tmp_path / "runs"), "--cache-dir", str(tmp_path / "cache")]) == 0
    res = json.loads(out.read_text())
    assert set(res["rows"]) == set(protocol_choice.ROWS)
    assert res["sealed_outer_test_images"] == 24 and res["n_folds"] == 2
    assert res["n_train"] + res["n_test"] == 48  # inner folds partition the outer-train part only
    refit, val = res["rows"]["refit"], res["rows"]["val"]
    assert refit["selected_epochs"] == val["selected_epochs"]  # refit trains for val's chosen epoch count
    for name, c in res["comparisons"].items():
        assert len(c["mAP"]["fold_diffs"]) == 2, name
