"""The speed benchmark runs end to end (tiny random CLIPs, one repeat) and its helpers compute right."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `benchmarks` lives at the repo root, outside the installed package
    sys.path.insert(0, str(REPO))

from benchmarks import speed  # noqa: E402
from benchmarks._timing import measure, paired_ratio, summarize, unstable  # noqa: E402


def test_paired_ratio_and_summary() -> None:
    num, den = [2.0, 4.0, 3.0], [1.0, 2.0, 3.0]
    ratio = paired_ratio(num, den)
    assert ratio["median_of_paired"] == pytest.approx(2.0)  # per round: 2, 2, 1
    assert ratio["of_medians"] == pytest.approx(3.0 / 2.0)
    assert ratio["of_minimums"] == pytest.approx(2.0)
    stats = summarize([3.0, 1.0, 2.0])
    assert (stats["median_s"], stats["min_s"], stats["max_s"], stats["repeats"]) == (2.0, 1.0, 3.0, 3)
    assert unstable({"steady": [1.0, 1.1], "noisy": [1.0, 2.0]}) == ["noisy (max/min 2.0)"]


def test_measure_interleaves_after_warmup() -> None:
    calls = []
    times = measure({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, repeats=2, warmup=1,
                    device=speed.torch.device("cpu"))
    assert calls == ["a", "b", "a", "b", "b", "a"]  # warm-up a, b; round 0 a b; round 1 rotated
    assert {k: len(v) for k, v in times.items()} == {"a": 2, "b": 2}


@pytest.mark.slow  # benchmark runs in fresh processes
def test_smoke_run_writes_json_and_markdown(tmp_path: Path) -> None:
    assert speed.main(["--smoke", "--device", "cpu", "--out", str(tmp_path), "--text-limit", "4"]) == 0
    results = json.loads((tmp_path / "speed_cpu_smoke.json").read_text())
    assert results["machine"]["torch_threads"] >= 1 and results["machine"]["cpu"]
    rows = results["train"]
    assert [(r["arch"], r["classes"], r["measured"]) for r in rows] == [
        ("clip_tiny_vit.random", 4, True), ("clip_tiny_vit.random", 12, False),
        ("clip_tiny_rn.random", 4, True), ("clip_tiny_rn.random", 12, False),
    ]
    measured, estimated = rows[0], rows[1]
    for key in ("capnet_step", "bare_step", "text_branch", "image_branch", "eval_text_uncached", "eval_text_cached"):
        assert measured["times"][key]["median_s"] > 0
    assert math.isfinite(measured["step_ratio"]["median_of_paired"])
    # the bare twin trains exactly CAPNET's PEFT tensors plus its own linear head
    assert 0 < measured["trainable"]["bare"] < measured["trainable"]["capnet"]
    assert estimated["estimate_s"]["text_branch"] == pytest.approx(3 * measured["times"]["text_branch"]["median_s"])
    assert {r["arch"] for r in results["inference"]} == {"clip_tiny_vit.random", "clip_tiny_rn.random"}
    assert set(results["inference"][0]["tte"]["time_per_view_vs_single"]) == {"flip", "five_crop", "ten_crop"}
    assert all(r["infer_images_per_s"] > 0 for r in results["throughput"])
    assert any("GPU parts skipped" in n for n in results["notes"])
    markdown = (tmp_path / "speed_cpu_smoke.md").read_text()
    assert "Training step: CAPNET vs bare encoder" in markdown and "clip_tiny_rn.random" in markdown


def test_demo_times_are_merged(tmp_path: Path) -> None:
    demo = tmp_path / "demo.json"
    demo.write_text(json.dumps({"demo_total_s": 12.5}))
    assert speed.merge_demo_times(demo) == {"source": str(demo), "times": {"demo_total_s": 12.5}}
    assert "does not exist" in speed.merge_demo_times(tmp_path / "missing.json")["note"]


KEPT = {"arch": "clip_tiny_rn.random", "variant": "fp32", "error": "a row of an earlier run"}


@pytest.mark.slow  # benchmark runs in fresh processes
def test_scale_section_rows_and_merge(tmp_path: Path) -> None:
    """Issue 24 scale section: a bare row and an auto (budgeted at 150 classes) row, each from its own
    subprocess with a peak memory; a second --merge run keeps the first run's rows and other sections."""
    (tmp_path / "speed_cpu_smoke.json").write_text(json.dumps({"throughput": [KEPT], "notes": [], "machine": {}}))
    args = ["--smoke", "--device", "cpu", "--out", str(tmp_path), "--sections", "scale", "--merge",
            "--archs", "clip_tiny_rn.random", "--classes", "150"]
    assert speed.main(args) == 0
    results = json.loads((tmp_path / "speed_cpu_smoke.json").read_text())
    assert results["throughput"] == [KEPT] and len(results["previous_runs"]) == 1
    rows = {r["mode"]: r for r in results["scale"]}
    assert set(rows) == {"bare", "auto"}
    assert rows["auto"]["text_budget"] == 32 and rows["auto"]["bank_refresh_s"] > 0
    assert 32 <= rows["auto"]["graph"]["gcn_inputs_for_budget"] <= 150 and rows["auto"]["graph"]["nonzeros"] > 150
    assert all(r["peak_mib"] > 0 and r["image_size"] > 0 for r in rows.values())
    assert rows["auto"]["peak_above_bare_mib"] == pytest.approx(rows["auto"]["peak_mib"] - rows["bare"]["peak_mib"])
    assert math.isfinite(rows["auto"]["ratio"]["median_of_paired"])
    merged = speed.merge_results(results, {"scale": [{**rows["bare"], "classes": 7}], "notes": []}, ["scale"])
    assert len(merged["scale"]) == 3  # new key added, old rows kept
    assert "Class-count scaling" in (tmp_path / "speed_cpu_smoke.md").read_text()


def test_merge_drops_notes_of_runs_it_replaces() -> None:
    """Old notes go when every section of their run is rerun; scale runs' notes stay (their rows may)."""
    old = {"notes": ["first run's note", "(run of sections ['train']) train note",
                     "(run of sections ['scale']) scale note"], "machine": {}}
    merged = speed.merge_results(old, {"notes": ["new"], "train": []}, ["train", "inference", "throughput", "offline"])
    assert merged["notes"] == ["(run of sections ['scale']) scale note",
                               "(run of sections ['train', 'inference', 'throughput', 'offline']) new"]
    kept = speed.merge_results(old, {"notes": [], "train": []}, ["train"])
    assert kept["notes"] == ["first run's note", "(run of sections ['scale']) scale note"]
