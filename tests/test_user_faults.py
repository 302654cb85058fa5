"""What a user's machine does to a run (issue 30): a full disk under the run or the feature cache,
Ctrl-C, one unreadable image among many in predict/eval, a misspelt backbone or tag, progress bars
in a log file, provenance in the run, the speed benchmark's scratch output. All through main(argv)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import capnet
from _faults import fill_disk, needs_proc_fd
from capnet.cli import main
from capnet.run_files import load_file

REPO = Path(__file__).resolve().parents[1]
SRC = str(Path(capnet.__file__).resolve().parents[1])  # subprocesses run the capnet under test
CLASSES = ["cat", "dog", "person"]
ROWS = {
    "train": [(f"{k:04d}", labels) for k, labels in enumerate(
        ["cat", "dog person", "cat dog", "", "person", "cat person", "dog", "cat", "person dog", "cat"])],
    "test": [("0101", "dog"), ("0102", "cat"), ("0103", "person dog"), ("0104", "cat")],
}
# Gradient-trained on a frozen tiny CLIP (its image features go through the feature cache).
TRAINED = ["model.kind=capnet", "model.backbone=clip_tiny_rn.random", "model.peft.method=none",
           "model.prompts.enabled=false", "model.gcn.enabled=false", "model.graph.source=none",
           "model.class_residual=true", "tte.views=single", "tte.templates=false", "data.num_workers=0",
           "data.val_fraction=0.3", "loss.name=bce", "train.epochs=3", "data.batch_size=4", "train.refit=false"]


def _train_args(data: Path, out: Path, sets=TRAINED, *extra: str) -> list:
    args = ["train", "--config", str(REPO / "configs" / "capnet.yaml"), "--out", str(out)]
    return args + [a for s in list(sets) + [f"data.root={data}"] for a in ("--set", s)] + list(extra)


def _lines(text: str) -> list:
    return [line for line in text.splitlines() if line.strip()]


def _errors(text: str) -> list:
    """stderr lines that are not progress (epoch / resume / cache) messages."""
    quiet = ("capnet: epoch ", "capnet: resumed", "capnet: feature cache: computing")
    return [line for line in _lines(text) if not line.startswith(quiet)]


@pytest.fixture
def data(tmp_path: Path, make_folder_tree) -> Path:
    return make_folder_tree(tmp_path / "data", ROWS, CLASSES)


def _metrics(run: Path) -> dict:
    m = json.loads((run / "metrics.json").read_text())
    return {k: m[k] for k in ("mAP", "head", "medium", "tail", "thresholds")}


# ------------------------------------------------------------------ 1. a full disk under the run

@needs_proc_fd
def test_full_disk_under_the_run_is_one_line_and_resume_continues(data, tmp_path, capsys, monkeypatch) -> None:
    out = tmp_path / "run"
    disk = fill_disk(monkeypatch, out, name="last.safetensors", allow=1)  # epoch 1's checkpoint fits, epoch 2's not
    assert main(_train_args(data, out, TRAINED, "--no-cache")) == 1
    err = capsys.readouterr().err
    assert disk.failed, "the fault was never hit"
    [line] = _errors(err)
    assert line.startswith("capnet: error: no space left on the device to write ") and str(out / "last.safetensors") in line
    assert "--resume" in line and "Traceback" not in err
    _, meta = load_file(out / "last.safetensors")  # the last good checkpoint is intact
    assert meta["progress"]["epoch"] == 1
    assert not list(out.glob(".*.tmp"))  # no half-written temporary files left behind
    monkeypatch.undo()  # room again
    assert main(_train_args(data, out, TRAINED, "--no-cache", "--resume")) == 0
    assert f"resumed from {out / 'last.safetensors'} after epoch 1 of 3" in capsys.readouterr().err
    assert main(_train_args(data, tmp_path / "straight", TRAINED, "--no-cache")) == 0
    assert _metrics(out) == _metrics(tmp_path / "straight")


# --------------------------------------------------------- 2. a full disk under the feature cache

@needs_proc_fd
def test_full_feature_cache_warns_once_and_gives_the_same_results(data, tmp_path, capsys, monkeypatch) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    assert main(_train_args(data, tmp_path / "cached", TRAINED, "--cache-dir", str(tmp_path / "cache_ok"))) == 0
    capsys.readouterr()
    disk = fill_disk(monkeypatch, cache)  # nothing fits under the cache
    assert main(_train_args(data, tmp_path / "full", TRAINED, "--cache-dir", str(cache))) == 0
    err = capsys.readouterr().err
    assert disk.failed, "the fault was never hit"
    warned = [line for line in _lines(err) if "no space left" in line]
    assert len(warned) == 1 and f"feature cache {cache}" in warned[0] and "going on without the cache" in warned[0]
    assert "Traceback" not in err
    assert _metrics(tmp_path / "full") == _metrics(tmp_path / "cached")


# ------------------------------------------------------------------------------- 3. Ctrl-C

def _children(pid: int) -> set:
    kids = set()
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            kids |= {int(c) for c in (task / "children").read_text().split()}
        except OSError:
            pass
    return kids


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@needs_proc_fd
def test_ctrl_c_during_training_is_one_line_status_130_and_no_workers_left(tmp_path, make_folder_tree) -> None:
    labels = ["cat", "dog person", "cat dog", "person", "cat person", "dog"]
    rows = {"train": [(f"{k:04d}", labels[k % 6]) for k in range(60)], "test": ROWS["test"]}
    data = make_folder_tree(tmp_path / "data", rows, CLASSES)
    out = tmp_path / "run"
    drop = ("data.num_workers", "train.epochs", "model.peft", "data.batch_size", "data.val_fraction")
    sets = [s for s in TRAINED if not s.startswith(drop)]
    # BitFit trains the tower, so the training loader decodes images in its 2 (persistent) worker
    # processes. No validation split: its loader would fork workers every epoch, and a signal landing
    # in a fork is swallowed by CPython's at-fork handlers (in any Python program; a user would press
    # Ctrl-C again), which would make this test flaky rather than wrong.
    sets += ["data.num_workers=2", "train.epochs=50", "model.peft.method=bitfit", "data.batch_size=1",
             "data.val_fraction=0", "train.select=last"]
    log = tmp_path / "stderr.txt"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")])}
    with open(log, "wb") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "capnet", *_train_args(data, out, sets, "--no-cache")],
                                stdout=subprocess.DEVNULL, stderr=fh, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while "capnet: epoch 1/50" not in log.read_text() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert proc.poll() is None, log.read_text()
        workers = set()
        while not workers and time.monotonic() < deadline:  # the next epoch's loader workers
            workers = _children(proc.pid)
            time.sleep(0.05)
        assert workers, "no DataLoader workers seen"
        time.sleep(0.3)  # past the fork, inside the epoch
        before = len(log.read_text())
        os.killpg(proc.pid, signal.SIGINT)  # as a terminal's Ctrl-C: to the whole process group
        rc = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    after = log.read_text()[before:]
    assert rc == 130, after
    assert "Traceback" not in after and "KeyboardInterrupt" not in after
    [line] = [l for l in _lines(after) if not l.startswith("capnet: epoch ")]
    assert line.startswith("capnet: interrupted in epoch ") and "`--resume` continues from epoch " in line
    running, resume_from = int(line.split("epoch ")[1].split(";")[0]), int(line.rsplit("epoch ", 1)[1])
    _, meta = load_file(out / "last.safetensors")
    assert resume_from == meta["progress"]["epoch"] + 1 and running >= resume_from - 1
    time.sleep(0.5)
    assert not [pid for pid in workers if _alive(pid)], "DataLoader workers outlived the run"


# -------------------------------------------------- 4. predict / eval with one unreadable image

@pytest.fixture
def trained(data: Path, tmp_path: Path, capsys) -> Path:
    run = tmp_path / "trained"
    sets = [s if not s.startswith("train.epochs") else "train.epochs=1" for s in TRAINED]
    assert main(_train_args(data, run, sets, "--no-cache")) == 0
    capsys.readouterr()
    return run


def test_predict_scores_every_readable_image_and_reports_the_bad_one(trained, tmp_path, capsys, write_jpeg) -> None:
    folder = tmp_path / "photos"
    good = [write_jpeg(folder / f"good{k}.jpg", seed=k, size=24) for k in range(5)]
    broken = folder / "broken.jpg"
    broken.write_bytes(write_jpeg(tmp_path / "whole.jpg", seed=9, size=64).read_bytes()[:300])
    assert main(["predict", "--run", str(trained), "--batch-size", "4", str(folder)]) == 3
    captured = capsys.readouterr()
    rows = [json.loads(line) for line in _lines(captured.out)]
    assert sorted(r["image"] for r in rows) == sorted(str(p) for p in [*good, broken])
    bad = [r for r in rows if "error" in r]
    assert [r["image"] for r in bad] == [str(broken)] and "scores" not in bad[0]
    assert all(set(r["scores"]) == set(CLASSES) for r in rows if "error" not in r)
    assert f"capnet: error: {bad[0]['error']}" in captured.err and str(broken) in bad[0]["error"]
    assert "1 of 6 image(s) could not be read" in captured.err
    # the good images score as they do without the bad one
    assert main(["predict", "--run", str(trained), "--batch-size", "4", *map(str, good)]) == 0
    alone = {r["image"]: r["scores"] for r in map(json.loads, _lines(capsys.readouterr().out))}
    for r in rows:
        if "error" not in r:
            assert r["scores"] == pytest.approx(alone[r["image"]], abs=1e-5)
    # one row per image, in the order given, the bad one in its place inside its batch
    order = [good[0], broken, good[1], good[2]]
    assert main(["predict", "--run", str(trained), "--batch-size", "4", *map(str, order)]) == 3
    assert [json.loads(line)["image"] for line in _lines(capsys.readouterr().out)] == [str(p) for p in order]


def test_eval_names_bad_images_before_scoring_and_can_skip_them(trained, data, tmp_path, capsys, write_jpeg) -> None:
    cut = data / "images" / "0102.jpg"
    cut.write_bytes(write_jpeg(tmp_path / "whole.jpg", seed=1, size=64).read_bytes()[:300])
    args = ["eval", "--run", str(trained), "--data-dir", str(data), "--cache-dir", str(tmp_path / "cache")]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert f"capnet: bad image: {cut}: " in err and "--skip-bad-images" in err and "nothing was scored" in err
    assert "feature cache: computing" not in err  # said before any scoring
    assert main(args + ["--skip-bad-images", "--json", str(tmp_path / "skipped.json")]) == 0
    assert f"capnet: skipped bad image: {cut}: " in capsys.readouterr().err
    test_csv = data / "test.csv"  # the same scores as a test split without that row
    test_csv.write_text("".join(line for line in test_csv.read_text().splitlines(True) if not line.startswith("0102,")))
    assert main(args + ["--json", str(tmp_path / "without.json")]) == 0
    skipped, without = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("skipped", "without"))
    assert skipped["per_class"] == without["per_class"]


# ---------------------------------------------------------------- 5. a misspelt backbone or tag

@pytest.mark.parametrize("sets, closest", [
    (["model.backbone=ViT-B-61.laion2b_s34b_b88k"], "'ViT-B-16.laion2b_s34b_b88k'"),
    (["model.backbone=clip_vit_b61.openai"], "'clip_vit_b16.openai'"),
    (["model.backbone=clip_vit_b16.laion2b_s34b_b8k"], "'laion2b_s34b_b88k'"),
    (["model.backbone=clip_vit_b16.openai", "model.weights=laion2b_s34b_b8k"], "'laion2b_s34b_b88k'"),
    (["model.backbone=hf_hub:laion/CLIP-ViT-B-16-laion2B-s34B-b88K"], "'hf-hub:laion/CLIP-ViT-B-16-laion2B-s34B-b88K'"),
])
def test_misspelt_backbone_or_tag_is_one_line_with_the_closest_name(tmp_path, capsys, sets, closest) -> None:
    missing = tmp_path / "no_such_data"  # the name must fail first, before any data is looked for
    assert main(_train_args(missing, tmp_path / "run", [*TRAINED, *sets])) == 1
    [line] = _lines(capsys.readouterr().err)
    assert line.startswith("capnet: error: ") and f"id you mean {closest}" in line
    assert str(missing) not in line and not (tmp_path / "run").exists()


def test_registries_are_complete_after_import_capnet() -> None:
    code = ("from capnet import BACKBONES, DATASETS, GRAPHS, LOSSES, PEFT\n"
            "BACKBONES.get('clip_vit_b16.laion2b_s34b_b88k')\n"  # the docs/weights.md command, without the download
            "print(len(BACKBONES), sorted(LOSSES), sorted(DATASETS), sorted(GRAPHS), len(PEFT))")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=str(REPO / "tests"))
    assert done.returncode == 0, done.stderr
    count, rest = done.stdout.split(" ", 1)
    assert int(count) >= 9 and "'db_focal'" in rest and "'folder'" in rest and "'text'" in rest


# ------------------------------------------------------------- 7. provenance of the weights

def test_the_run_records_the_weights_provenance(trained) -> None:
    _, meta = load_file(trained / "model.safetensors")
    assert meta["backbone"] == "clip_tiny_rn.random" and meta["backbone_sha256"]
    prov = meta["backbone_provenance"]
    assert prov["quick_gelu"] is True and prov["open_clip_arch"] == "tiny-RN" and prov["open_clip_version"]
    assert "weights_format" in prov and prov["text_pool"]


@pytest.mark.slow
def test_a_local_weights_file_records_format_origin_and_sha256(data, tmp_path, capsys) -> None:
    from safetensors.torch import save_file

    from capnet import BACKBONES
    from capnet.fileio import sha256_of

    state = {k: v.detach().clone().contiguous() for k, v in BACKBONES.build("clip_tiny_rn.random").state_dict().items()}
    weights = tmp_path / "tiny_rn.safetensors"
    save_file(state, str(weights))
    sets = [s if not s.startswith("train.epochs") else "train.epochs=1" for s in TRAINED] + [f"model.weights={weights}"]
    assert main(_train_args(data, tmp_path / "run", sets, "--no-cache")) == 0
    _, meta = load_file(tmp_path / "run" / "model.safetensors")
    assert meta["backbone_weights"] == str(weights) and meta["backbone_sha256"] == sha256_of([weights])
    assert meta["backbone_provenance"]["weights_format"] == "safetensors"


# ------------------------------------------------------------------ 8. progress bars in a log

def test_no_progress_bars_when_stderr_is_a_file(data, tmp_path) -> None:
    log = tmp_path / "log.txt"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")])}
    with open(log, "wb") as fh:
        done = subprocess.run([sys.executable, "-m", "capnet", *_train_args(data, tmp_path / "run", TRAINED,
                                                                           "--cache-dir", str(tmp_path / "c"))],
                              stdout=subprocess.DEVNULL, stderr=fh, env=env, timeout=300)
    text = log.read_text()
    assert done.returncode == 0, text
    assert [l for l in _lines(text) if l.startswith("capnet: epoch ")][-1].startswith("capnet: epoch 3/3")
    assert "it/s" not in text and "%|" not in text and "\r" not in text


# ------------------------------------------------------- 9. the speed benchmark's smoke output

def test_speed_presets_write_to_a_scratch_folder_unless_told(tmp_path, monkeypatch) -> None:
    sys.path.insert(0, str(REPO))
    from benchmarks import speed

    results, scratch = tmp_path / "results", tmp_path / "scratch"
    monkeypatch.setattr(speed, "RESULTS", results)
    monkeypatch.setattr(speed, "SCRATCH", scratch)
    assert speed.output_dir(speed.parse_args(["--quick"])) == scratch
    assert speed.output_dir(speed.parse_args(["--quick", "--out", str(tmp_path / "mine")])) == tmp_path / "mine"
    assert speed.output_dir(speed.parse_args([])) == results
    assert speed.main(["--smoke", "--device", "cpu", "--text-limit", "4", "--sections", "inference"]) == 0
    assert (scratch / "speed_cpu_smoke.json").is_file() and not results.exists()
