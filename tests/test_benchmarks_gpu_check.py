"""benchmarks/gpu_check.py runs end to end on CPU (--quick: tiny random CLIPs) and writes
well-formed JSON + markdown; the full run is for one GPU session."""
from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks import gpu_check  # noqa: E402


def test_quick_run_writes_json_and_markdown(tmp_path: Path) -> None:
    assert gpu_check.main(["--quick", "--device", "cpu", "--out", str(tmp_path), "--archs", "clip_tiny_vit.random"]) == 0
    results = json.loads((tmp_path / "gpu_check_quick_cpu.json").read_text())
    (row,) = results["rows"]
    assert (row["arch"], row["peft"], row["batch"], row["variant"]) == ("clip_tiny_vit.random", "adaptformer", 2, "fp32")
    assert all(v > 0 for v in row["images_per_s"].values())
    assert row["ratio"]["train_step"]["median_of_paired"] > 0 and row["peak_memory_bytes"]["train"]["capnet"] is None
    assert results["settings"]["repeats"] == 2 and results["machine"]["torch"]
    markdown = (tmp_path / "gpu_check_quick_cpu.md").read_text()
    assert "| clip_tiny_vit.random | adaptformer | 2 | fp32 |" in markdown


def test_rows_over_budget_are_skipped_not_lost(tmp_path: Path) -> None:
    assert gpu_check.main(["--quick", "--device", "cpu", "--out", str(tmp_path), "--archs", "clip_tiny_rn.random",
                           "--budget-s", "0"]) == 0
    (row,) = json.loads((tmp_path / "gpu_check_quick_cpu.json").read_text())["rows"]
    assert "budget" in row["skipped"]
