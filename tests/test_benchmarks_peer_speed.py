"""benchmarks/peer_speed.py runs end to end in --quick mode (tiny random CLIPs, one round).

Without --peers the peer column is the reference layout written in the benchmark; with the peers'
checkouts at $CAPNET_PEERS_DIR (LIFT/, LMPT/; never vendored) the same rows run their own code.
"""
from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `benchmarks` lives at the repo root, outside the installed package
    sys.path.insert(0, str(REPO))

from benchmarks import peer_speed  # noqa: E402

ROWS = ["vit_adaptformer_train", "rn50_prompt_train", "vit_adaptformer_inference"]


def _run(tmp_path: Path, *extra: str) -> dict:
    assert peer_speed.main(["--quick", "--out", str(tmp_path), "--rows", *ROWS, *extra]) == 0
    results = json.loads((tmp_path / "peer_speed_cpu_quick.json").read_text())
    assert (tmp_path / "peer_speed_cpu_quick.md").read_text().count("| vit_adaptformer_train") == 1
    return results


def _check_rows(results: dict, peers: dict) -> None:
    assert results["machine"]["cpu"] and results["machine"]["torch_threads"] == 2
    assert len(results["load_average_end"]) == 3 and results["command"].startswith("python -m benchmarks.peer_speed")
    rows = {r["row"]: r for r in results["rows"]}
    assert list(rows) == ROWS and {k: r["peer"] for k, r in rows.items()} == peers
    for r in rows.values():
        assert r["times"]["peer"]["median_s"] > 0 and r["times"]["capnet"]["median_s"] > 0
        assert math.isfinite(r["ratio"]["capnet"]["median_of_paired"])
    prompts = rows["rn50_prompt_train"]
    assert prompts["trainable"]["capnet"] == prompts["trainable"]["peer"] == 20 * 16 * 32  # same prompts
    assert "capnet_feature_cache" in prompts["ratio"]
    adapt = rows["vit_adaptformer_train"]["trainable"]  # AdaptFormer + head; heads differ by a bias/scale
    assert abs(adapt["capnet"] - adapt["peer"]) <= 64
    assert rows["vit_adaptformer_inference"]["images_per_s"]["peer"] > 0


def test_quick_run_against_the_reference_layout(tmp_path: Path) -> None:
    results = _run(tmp_path)
    assert results["peer_source"].startswith("reference layout")
    _check_rows(results, dict.fromkeys(ROWS, "reference"))
    md = tmp_path / "peer_speed_cpu_quick.md"
    first = md.read_text()
    md.unlink()
    assert peer_speed.main(["--render", str(tmp_path / "peer_speed_cpu_quick.json")]) == 0
    assert md.read_text() == first  # the markdown is a pure function of the JSON


@pytest.mark.skipif(not os.environ.get("CAPNET_PEERS_DIR"), reason="set CAPNET_PEERS_DIR to LIFT/ + LMPT/ checkouts")
def test_quick_run_against_the_peers_code(tmp_path: Path) -> None:
    results = _run(tmp_path, "--peers", os.environ["CAPNET_PEERS_DIR"])
    assert all(results["peer_commits"].values())
    _check_rows(results, {"vit_adaptformer_train": "LIFT", "rn50_prompt_train": "LMPT", "vit_adaptformer_inference": "LIFT"})


def test_missing_peer_checkout_is_named(tmp_path: Path) -> None:
    (tmp_path / "LIFT" / "models").mkdir(parents=True)
    with pytest.raises(SystemExit, match="LIFT/models/peft_vit.py not found"):
        peer_speed.main(["--quick", "--peers", str(tmp_path), "--out", str(tmp_path / "out")])
