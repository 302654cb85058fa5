"""benchmarks/ablation.py: the sealed protocol runs its rows through the real pipeline, no outer-test
id reaches any choice, the out-of-fold scores pool to one score per image, and a rerun resumes."""
from __future__ import annotations

import copy
import importlib
import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _module():
    sys.path.insert(0, str(REPO))  # benchmarks/ is a package at the repository root, not installed
    return importlib.import_module("benchmarks.ablation")


TINY = ["model.backbone=clip_tiny_vit.random", "model.backbone_options.image_size=32", "model.gcn.hidden=16",
        "model.prompts.n_ctx=4", "train.epochs=2", "data.num_workers=0", "data.val_fraction=0.25"]
ROWS = ["full", "no_gcn", "zeroshot", "linear_probe", "zs_linear_probe", "clap"]


@pytest.mark.slow  # the whole sealed protocol: a minute on 2 cores
def test_sealed_protocol_keeps_outer_test_ids_out_of_every_choice(small_real: Path, tmp_path: Path) -> None:
    ablation = _module()
    from benchmarks import _protocol as P

    runs = tmp_path / "runs"
    args = ["--protocols", "cv", "fixed", "--folds", "2", "--fold-seeds", "1", "--rows", *ROWS,
            "--runs-dir", str(runs), "--cache-dir", str(tmp_path / "cache"), "--n-boot", "50",
            "--json", str(tmp_path / "a.json"), "--doc", str(tmp_path / "docs" / "results.md")]
    args += [x for s in TINY + [f"data.root={small_real}"] for x in ("--set", s)]
    assert ablation.main(args) == 0

    all_ids = set()
    for split in ("train", "test"):
        all_ids |= {line.split(",")[0] for line in (small_real / f"{split}.csv").read_text().splitlines()[1:]}
    folds = sorted((runs / "cv").glob("*/fold.json"))
    assert [f.parent.name for f in folds] == ["s1f0", "s1f1"]
    tests = [json.loads((runs / "cv" / f"s1f{k}" / "fold.json").read_text())["outer_test_ids"] for k in (0, 1)]
    assert sorted(tests[0] + tests[1]) == sorted(all_ids)  # every image in exactly one outer test part
    for path in folds + [runs / "fixed" / "fixed" / "fold.json"]:
        rec = json.loads(path.read_text())
        test = set(rec["outer_test_ids"])
        assert test and set(rec["bridge"]["seen_ids"]).isdisjoint(test)
        assert rec["recipe"]["chosen"] in ("full", "no_gcn") and set(rec["recipe"]["seen_ids"]).isdisjoint(test)
        assert set(rec["rows"]) == set(ROWS)
        for name, row in rec["rows"].items():
            assert row["fit_ids"] and set(row["fit_ids"]).isdisjoint(test), name
            assert set(row["choice_ids"]).isdisjoint(test) and set(row["choice_ids"]).isdisjoint(row["fit_ids"]), name
            assert set(row["test_ids"]) == test, name
            assert set(row["fit_ids"]) | set(row["choice_ids"]) | test <= all_ids
            # what the run directory itself recorded agrees with fold.json
            ids = json.loads((path.parent / name / "split_ids.json").read_text())
            assert set(ids["val"]) == set(row["choice_ids"]) and set(ids["test"]) == test
        assert P.leaked_ids(rec) == []
        leaky = copy.deepcopy(rec)  # the check can fail: one outer-test id in a choice is caught
        leaky["rows"]["linear_probe"]["choice_ids"].append(sorted(test)[0])
        assert P.leaked_ids(leaky) == [sorted(test)[0]]

    data = json.loads((tmp_path / "a.json").read_text())
    cv = data["protocols"]["cv"]
    assert set(cv["rows"]) == {"recipe", *ROWS} and len(cv["splits"]) == 2
    probe = cv["rows"]["linear_probe"]["recipe_minus_this"]["mAP"]
    assert probe["folds"]["n"] == 2 and probe["pooled"]["n_boot"] == 50
    recipe = cv["rows"]["recipe"]["per_split"]
    diffs = [recipe[s]["mAP"] - cv["rows"]["linear_probe"]["per_split"][s]["mAP"] for s in recipe]
    assert abs(probe["folds"]["mean"] - sum(diffs) / 2) < 1e-9
    assert all(c["leaked_ids"] == 0 for c in cv["choices"].values())
    doc = (tmp_path / "docs" / "results.md").read_text()
    assert "Protocol `cv` (primary)" in doc and "Inner-validation winner on the fixed split" in doc
    assert "The goal, checked" in doc and "| CLAP" in doc and "| ZS-LP" in doc

    # resumable: finished splits are read back, nothing is retrained
    before = {p: p.stat().st_mtime_ns for p in runs.rglob("metrics.json")}
    assert ablation.main(args) == 0
    assert before == {p: p.stat().st_mtime_ns for p in runs.rglob("metrics.json")}
