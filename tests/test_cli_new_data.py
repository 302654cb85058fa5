"""What a new user meets, through the real entry point: eval on any labelled set, predict's
skipped files, one-line errors from DataLoader workers, the dataset flags spelt one way."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from capnet.cli import main

from _native_trees import coco_val_only, voc_test_only

REPO = Path(__file__).resolve().parents[1]
RUN_CLASSES = ["person", "motorcycle", "dining_table", "car"]  # COCO-style names
TRAIN_ROWS = {
    "train": [(f"t{k:02d}", labels) for k, labels in enumerate(
        ["person", "person car", "motorcycle person", "dining_table", "car", "person dining_table",
         "motorcycle", "car person", "person", "dining_table car", "motorcycle car", "person"])],
    "test": [("s01", "person"), ("s02", "car motorcycle"), ("s03", "dining_table"), ("s04", "person car")],
}
ZEROSHOT = ["model.kind=zeroshot", "model.backbone=clip_tiny_rn.random", "model.peft.method=none",
            "tte.views=single", "tte.templates=false", "data.num_workers=1", "data.val_fraction=0.25"]


def _sets(items):
    return [a for item in items for a in ("--set", item)]


@pytest.fixture(scope="module")
def trees(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("trees")


@pytest.fixture(scope="module")
def zs_run(trees: Path) -> Path:
    """A finished (zero-shot, untrained) run over RUN_CLASSES with fixed training groups."""
    from conftest import write_folder_tree

    data = write_folder_tree(trees / "train_data", TRAIN_ROWS, RUN_CLASSES)
    (data / "class_split.json").write_text(json.dumps(
        {"head": ["person"], "medium": ["car"], "tail": ["motorcycle", "dining_table"]}))
    out = trees / "run"
    assert main(["train", "--config", str(REPO / "configs" / "capnet.yaml"), "--out", str(out), "--no-cache",
                 *_sets(ZEROSHOT + [f"data.root={data}"])]) == 0
    return out


def _eval(run: Path, tmp_path: Path, *args: str) -> int:
    return main(["eval", "--run", str(run), "--cache-dir", str(tmp_path / "cache"), *args])


def test_eval_on_a_test_only_folder(zs_run: Path, trees: Path, tmp_path: Path, capsys, make_folder_tree,
                                    write_jpeg) -> None:
    data = make_folder_tree(tmp_path / "new", {"test": [("n1", "Person"), ("n2", "dining table cat"),
                                                      ("n3", "cat"), ("n4", "Person dining table")]},
                            ["Person", "cat", "dining table"])
    (data / "classes.txt").write_text("Person\ncat\ndining table\n")
    (data / "test.csv").write_text("image_id,labels\nn1,Person\nn2,cat\nn3,cat\nn4,Person\n")
    out = tmp_path / "m.json"
    assert _eval(zs_run, tmp_path, "--data-dir", str(data), "--json", str(out)) == 0
    err = capsys.readouterr().err
    assert "2 of the run's 4 classes are not in the data and were not scored: motorcycle, car" in err
    assert "1 data class(es) unknown to the run were ignored: cat" in err
    metrics = json.loads(out.read_text())
    assert set(metrics["per_class"]) == {"person", "dining_table"}
    assert metrics["classes"]["renamed"] == {"person": "Person", "dining_table": "dining table"}
    # head/medium/tail are the run's training groups (a test-only set has no train counts)
    assert metrics["head"] == pytest.approx(metrics["per_class"]["person"])
    assert metrics["excluded"] == ["dining_table"]  # no positive in this test.csv


def test_eval_on_a_voc2007_test_only_tree_with_a_class_map(zs_run: Path, tmp_path: Path, capsys,
                                                           write_jpeg) -> None:
    voc = voc_test_only(tmp_path / "VOCdevkit", write_jpeg)
    out = tmp_path / "m.json"
    assert _eval(zs_run, tmp_path, "--data-dir", str(voc), "--reader", "voc", "--class-map", "motorcycle=motorbike",
                 "--json", str(out)) == 0
    err = capsys.readouterr().err
    assert "not in the data" not in err  # every run class is scored
    assert "motorcycle -> motorbike" in err and "dining_table -> diningtable" in err
    metrics = json.loads(out.read_text())
    assert set(metrics["per_class"]) == set(RUN_CLASSES)
    assert metrics["classes"]["scored"] == 4 and len(metrics["classes"]["unknown_to_run"]) == 16
    assert metrics["medium"] == pytest.approx(metrics["per_class"]["car"])


def test_eval_on_a_coco_val_only_tree(zs_run: Path, tmp_path: Path, capsys, write_jpeg) -> None:
    coco = coco_val_only(tmp_path / "coco", write_jpeg)
    assert _eval(zs_run, tmp_path, "--data-dir", str(coco), "--data", "coco") == 0  # --data: alias of --reader
    captured = capsys.readouterr()
    assert "not scored: motorcycle, dining_table" in captured.err
    assert "ignored: traffic_light" in captured.err
    assert "| test |" in captured.out


def test_eval_errors_when_no_class_is_shared(zs_run: Path, tmp_path: Path, capsys, make_folder_tree) -> None:
    data = make_folder_tree(tmp_path / "pets", {"test": [("p1", "cat"), ("p2", "dog")]}, ["cat", "dog"])
    assert _eval(zs_run, tmp_path, "--data-dir", str(data)) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "none of the run's 4 classes" in err and "cat, dog" in err
    assert _eval(zs_run, tmp_path, "--data-dir", str(data), "--class-map", "person=human") == 1
    assert "'human' is not a class of" in capsys.readouterr().err


@pytest.mark.parametrize("damage", ["truncate", "empty"])
def test_a_bad_image_met_during_eval_is_one_line(zs_run: Path, tmp_path: Path, capsys, make_folder_tree,
                                                 write_jpeg, damage: str) -> None:
    data = make_folder_tree(tmp_path / "bad", {"test": [("b1", "person"), ("b2", "car"), ("b3", "person")]},
                            RUN_CLASSES)
    bad = data / "images" / "b2.jpg"
    if damage == "truncate":
        full = write_jpeg(bad, seed=3, size=64).read_bytes()
        bad.write_bytes(full[: len(full) // 2])
    else:
        bad.write_bytes(b"")
    assert _eval(zs_run, tmp_path, "--data-dir", str(data)) == 1  # the run loads with data.num_workers=1
    err = capsys.readouterr().err
    assert "Traceback" not in err and "DataLoader worker" not in err
    lines = [line for line in err.split("\n") if line.strip() and "\r" not in line  # "\r": progress bars
             and not line.startswith("capnet: feature cache:")]  # the CLI's INFO progress line
    # checked before scoring, as train does (issue 30): the file named on its own line, then one error
    assert len(lines) == 2 and lines[0].startswith(f"capnet: bad image: {bad}: "), err
    assert lines[1].startswith("capnet: error: 1 image(s) cannot be decoded") and "--skip-bad-images" in lines[1]
    assert ("truncated" in err.lower()) if damage == "truncate" else ("empty file (0 bytes)" in err)


def test_eval_still_reads_the_runs_own_data(zs_run: Path, tmp_path: Path, capsys) -> None:
    saved = json.loads((zs_run / "metrics.json").read_text())
    out = tmp_path / "m.json"
    assert _eval(zs_run, tmp_path, "--json", str(out)) == 0
    assert json.loads(out.read_text())["mAP"] == pytest.approx(saved["mAP"], abs=1e-6)
    assert _eval(zs_run, tmp_path, "--split", "val") == 0  # val carved from train as in training
    assert "| val |" in capsys.readouterr().out


def test_predict_lists_what_it_skips(zs_run: Path, tmp_path: Path, capsys, write_jpeg) -> None:
    folder = tmp_path / "imgs"
    write_jpeg(folder / "a.jpg", seed=1)
    write_jpeg(folder / "b.PNG", seed=2, fmt="PNG")
    (folder / "notes.txt").write_text("hello")
    (folder / "sub").mkdir()
    assert main(["predict", "--run", str(zs_run), str(folder)]) == 0
    captured = capsys.readouterr()
    assert [json.loads(l)["image"] for l in captured.out.splitlines()] == [str(folder / "a.jpg"), str(folder / "b.PNG")]
    assert "skipped 2 entries that are not image files" in captured.err
    assert str(folder / "notes.txt") in captured.err and f"{folder / 'sub'}/" in captured.err
    only_text = tmp_path / "text"
    only_text.mkdir()
    (only_text / "readme.md").write_text("x")
    assert main(["predict", "--run", str(zs_run), str(only_text)]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "readme.md" in captured.err and "no images to predict" in captured.err


def test_eval_of_a_run_saved_with_the_machine_budget(zs_run: Path, tmp_path: Path, make_folder_tree) -> None:
    """Runs save ``data.num_workers: null`` (the demo does); loading one must resolve it before
    any image is decoded, not hand None to the DataLoader."""
    import shutil

    run = shutil.copytree(zs_run, tmp_path / "run")
    cfg = run / "config.yaml"
    cfg.write_text(cfg.read_text().replace("num_workers: 1", "num_workers: null"))
    assert "num_workers: null" in cfg.read_text()
    data = make_folder_tree(tmp_path / "new", {"test": [("n1", "person"), ("n2", "car"), ("n3", "person car")]},
                            RUN_CLASSES)
    out = tmp_path / "m.json"
    assert _eval(run, tmp_path, "--data-dir", str(data), "--json", str(out)) == 0
    metrics = json.loads(out.read_text())
    assert metrics["classes"]["scored"] == len(RUN_CLASSES) and set(metrics["excluded"]) == {"motorcycle", "dining_table"}
