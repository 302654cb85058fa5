"""End to end through the real entry point: train / eval / predict / demo, and their errors."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from capnet.cli import main

REPO = Path(__file__).resolve().parents[1]
KEEP = ["cat", "dog", "person", "horse"]  # the classes of the small_real fixture (conftest)
TINY_CAPNET = [
    "model.backbone=clip_tiny_vit.random", "model.peft.method=lora", "model.gcn.hidden=32",
    "model.prompts.n_ctx=4", "train.epochs=2", "data.batch_size=16", "data.num_workers=0",
    "model.backbone_options.image_size=32",
    "data.val_fraction=0.25", "tte.views=flip", "optim.lr=0.01",
]


def _sets(items):
    return [a for item in items for a in ("--set", item)]


@pytest.fixture(scope="module")
def tiny_run(small_real: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "tiny"
    rc = main(["train", "--config", str(REPO / "configs" / "capnet.yaml"), "--out", str(out), "--no-cache",
               *_sets(TINY_CAPNET + [f"data.root={small_real}"])])
    assert rc == 0
    return out


def test_train_writes_a_complete_run_directory(tiny_run: Path) -> None:
    for name in ("config.yaml", "model.safetensors", "metrics.json", "report.md", "log.csv",
                 "ap_vs_frequency.png", "group_map.png", "training_curves.png"):
        assert (tiny_run / name).is_file(), name
    metrics = json.loads((tiny_run / "metrics.json").read_text())
    assert set(KEEP) == set(metrics["per_class"]) == set(metrics["thresholds"])
    assert 0.0 <= metrics["mAP"] <= 100.0
    rows = list(csv.DictReader(open(tiny_run / "log.csv")))
    assert [int(r["epoch"]) for r in rows] == [1, 2]


def test_eval_reproduces_the_run_metrics(tiny_run: Path, small_real: Path, capsys: pytest.CaptureFixture,
                                         tmp_path: Path) -> None:
    out = tmp_path / "m.json"
    assert main(["eval", "--run", str(tiny_run), "--data-dir", str(small_real), "--json", str(out)]) == 0
    again = json.loads(out.read_text())
    saved = json.loads((tiny_run / "metrics.json").read_text())
    assert again["mAP"] == pytest.approx(saved["mAP"], abs=1e-6)
    assert "| test |" in capsys.readouterr().out


def test_predict_prints_one_json_line_per_image(tiny_run: Path, small_real: Path,
                                                capsys: pytest.CaptureFixture) -> None:
    images = sorted((small_real / "images").iterdir())[:3]
    assert main(["predict", "--run", str(tiny_run), *map(str, images)]) == 0
    lines = [json.loads(l) for l in capsys.readouterr().out.strip().splitlines()]
    assert [l["image"] for l in lines] == [str(p) for p in images]
    for line in lines:
        assert set(line["scores"]) == set(KEEP)
        assert set(line["labels"]) <= set(KEEP)


def test_predict_on_a_corrupt_image_names_the_file(tiny_run: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture) -> None:
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    assert main(["predict", "--run", str(tiny_run), str(bad)]) == 1
    assert "broken.jpg" in capsys.readouterr().err


def test_user_errors_are_one_line_messages(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["eval", "--run", str(tmp_path / "nope"), "--data-dir", str(tmp_path)]) == 1
    assert "not a capnet run directory" in capsys.readouterr().err
    assert main(["train", "--config", str(REPO / "configs" / "capnet.yaml"), "--out", str(tmp_path / "r"),
                 "--set", "model.gcm.layers=2"]) == 1
    assert "did you mean 'gcn'" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed")
    assert main(["train", "--config", str(bad), "--out", str(tmp_path / "r")]) == 1
    assert "bad.yaml" in capsys.readouterr().err


def test_zeroshot_clip_runs_end_to_end(small_real: Path, tmp_path: Path) -> None:
    """The first baseline of the paper's tables: no training, template ensemble, same metric."""
    out = tmp_path / "zs"
    rc = main(["train", "--config", str(REPO / "configs" / "capnet.yaml"), "--out", str(out), "--no-cache",
               *_sets(["model.kind=zeroshot", "model.backbone=clip_tiny_rn.random", "model.peft.method=none", "tte.views=single",
                       "tte.templates=false", f"data.root={small_real}", "data.num_workers=0"])])
    assert rc == 0
    assert json.loads((out / "metrics.json").read_text())["mAP"] >= 0.0


@pytest.mark.slow
def test_demo_runs_offline_and_reuses_its_cache(small_real: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture) -> None:
    """`capnet demo` with the real offline backbone (tiny images, 2 epochs); the rerun hits the cache."""
    args = ["demo", "--cache-dir", str(tmp_path / "cache"),
            *_sets([f"data.root={small_real}", "model.backbone_options.image_size=32", "train.epochs=2",
                    "data.num_workers=0", "data.val_fraction=0.25"])]
    assert main(args + ["--out", str(tmp_path / "a")]) == 0
    first = capsys.readouterr().out
    assert "| test |" in first and "CAPNET demo" in first
    cached = sorted((tmp_path / "cache").rglob("*.safetensors"))
    assert cached, "the first run must fill the feature cache"
    mtimes = [p.stat().st_mtime_ns for p in cached]
    assert main(args + ["--out", str(tmp_path / "b")]) == 0
    assert [p.stat().st_mtime_ns for p in cached] == mtimes  # read, not rewritten
    a = json.loads((tmp_path / "a" / "metrics.json").read_text())
    b = json.loads((tmp_path / "b" / "metrics.json").read_text())
    assert a["mAP"] == pytest.approx(b["mAP"], abs=1e-9)  # seeded: the rerun is identical


@pytest.mark.slow
def test_torchrun_two_processes_on_cpu(small_real: Path, tmp_path: Path) -> None:
    """`torchrun --nproc_per_node 2 -m capnet train` (gloo on CPU) writes one complete run."""
    import os
    import subprocess
    import sys

    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "capnet", "train", "--config", str(REPO / "configs" / "capnet.yaml"), "--out", str(out),
           "--no-cache", *_sets(TINY_CAPNET + [f"data.root={small_real}", "tte.views=single"])]
    env = {**os.environ, "TQDM_DISABLE": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("| test |") == 1  # only rank 0 prints
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["per_class"]) == set(KEEP)
    assert [int(r["epoch"]) for r in csv.DictReader(open(out / "log.csv"))] == [1, 2]


@pytest.mark.slow  # a benchmark in a fresh process
def test_export_parity_benchmark_compares_predict_and_onnx(small_real: Path, tmp_path: Path) -> None:
    """benchmarks/export_parity.py on a tiny float32-extracted run: every test image scored by
    predict and by the ONNX export, which must agree (a bf16-extracted run may not)."""
    import sys

    sys.path.insert(0, str(REPO))
    from benchmarks.export_parity import markdown, measure_parity

    run = tmp_path / "fp32"
    assert main(["train", "--config", str(REPO / "configs" / "capnet.yaml"), "--out", str(run), "--no-cache",
                 *_sets(TINY_CAPNET + [f"data.root={small_real}", "train.extract_amp=none"])]) == 0
    r = measure_parity(run, tmp_path)
    assert r["extraction_precision"] == "none" and r["images"] == 24 and r["classes"] == len(KEEP)
    assert r["abs_score_diff"]["max"] < 1e-4 and r["label_decisions"] == {"total": 24 * len(KEEP), "flipped": 0,
                                                                          "images_with_a_flip": 0}
    assert r["test_mAP"]["predict"]["mAP"] == pytest.approx(r["test_mAP"]["onnx"]["mAP"], abs=1e-3)
    assert "| max abs score difference |" in markdown({**r, "run_label": "tiny"})
