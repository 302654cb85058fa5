"""benchmarks/ablation.py runs its rows through the real pipeline and writes its outputs."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _module():
    spec = importlib.util.spec_from_file_location("ablation", REPO / "benchmarks" / "ablation.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_ablation_rows_run_and_aggregate(small_real: Path, tmp_path: Path) -> None:
    ablation = _module()
    tiny = ["model.backbone=clip_tiny_vit.random", "model.backbone_options.image_size=32", "model.gcn.hidden=16",
            "model.prompts.n_ctx=4", "train.epochs=1", "data.num_workers=0", "data.val_fraction=0.25",
            f"data.root={small_real}", "model.peft.method=lora"]
    args = ["--seeds", "0", "1", "--rows", "linear_probe", "full", "--protocols", "fixed", "cv", "--folds", "2",
            "--runs-dir", str(tmp_path / "runs"),
            "--cache-dir", str(tmp_path / "cache"), "--json", str(tmp_path / "a.json"),
            "--doc", str(tmp_path / "docs" / "results.md")] + [x for s in tiny for x in ("--set", s)]
    assert ablation.main(args) == 0
    data = json.loads((tmp_path / "a.json").read_text())
    fixed, cv = data["protocols"]["fixed"], data["protocols"]["cv"]
    assert set(fixed["rows"]) == set(cv["rows"]) == {"linear_probe", "full"}
    full = fixed["rows"]["full"]
    assert len(full["runs"]) == 2 and len(cv["rows"]["full"]["runs"]) == 4  # 2 seeds; 2 folds x 2 seeds
    assert abs(full["mean"]["mAP"] - sum(r["mAP"] for r in full["runs"].values()) / 2) < 1e-9
    diffs = [full["runs"][k]["mAP"] - fixed["rows"]["linear_probe"]["runs"][k]["mAP"] for k in full["runs"]]
    assert abs(full["vs_probe"]["mAP"]["mean"] - sum(diffs) / 2) < 1e-9 and full["vs_probe"]["mAP"]["n"] == 2
    assert set(fixed["sklearn_reference"]) == {"mAP", "head", "medium", "tail"}
    doc = (tmp_path / "docs" / "results.md").read_text()
    assert "| Linear probe" in doc and "The goal, checked" in doc and "Protocol `cv`" in doc
    assert (tmp_path / "docs" / "img" / "ablation_groups.png").stat().st_size > 1000
    # finished runs are skipped: a rerun reads metrics.json instead of training again
    done = tmp_path / "runs" / "fixed" / "full" / "fixed" / "seed0" / "metrics.json"
    before = done.stat().st_mtime_ns
    assert ablation.main(args) == 0
    assert done.stat().st_mtime_ns == before


def test_ablation_reuses_a_run_only_for_the_same_config(small_real: Path, tmp_path: Path) -> None:
    ablation = _module()
    tiny = ["model.backbone=clip_tiny_rn.random", "train.epochs=1", "data.num_workers=0",
            "data.val_fraction=0.25", f"data.root={small_real}"]
    args = ["--seeds", "0", "--rows", "linear_probe", "--protocols", "fixed", "--runs-dir", str(tmp_path / "runs"),
            "--cache-dir", str(tmp_path / "cache"), "--json", str(tmp_path / "a.json"),
            "--doc", str(tmp_path / "docs" / "results.md")]
    sets = lambda extra: [x for s in tiny + extra for x in ("--set", s)]  # noqa: E731
    metrics = tmp_path / "runs" / "fixed" / "linear_probe" / "fixed" / "seed0" / "metrics.json"
    assert ablation.main(args + sets([])) == 0
    first = metrics.stat().st_mtime_ns
    assert ablation.main(args + sets(["data.num_workers=1"])) == 0  # a runtime key: same experiment
    assert metrics.stat().st_mtime_ns == first
    assert ablation.main(args + sets(["optim.lr=0.05"])) == 0  # another config: the old result is stale
    assert metrics.stat().st_mtime_ns != first
    from capnet.config import config_hash, load_config

    saved = json.loads(metrics.read_text())["config_sha256"]
    assert saved == config_hash(load_config([metrics.parent / "config.yaml"]))
