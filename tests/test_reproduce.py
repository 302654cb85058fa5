"""``capnet reproduce``: every paper table end to end on tiny random CLIPs and tiny native trees (CPU)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from capnet.cli import main
from capnet.reproduce import list_tables, load_published

from _native_trees import native_trees

TINY = ["*.rn50.*:model.backbone=clip_tiny_rn.random", "*.vit_b16.*:model.backbone=clip_tiny_vit.random",
        "model.backbone_options.image_size=32", "model.gcn.hidden=16", "train.epochs=1", "data.batch_size=8",
        "data.num_workers=0", "tte.views=flip", "train.augment_views=1", "voc_lt.*:data.split_dir=null",
        "coco_lt.*:data.split_dir=null"]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    from conftest import _write_jpeg

    root = tmp_path_factory.mktemp("datasets")
    native_trees(root, _write_jpeg, n_train=24, n_test=8)
    split = root / "nus_wide_lt"
    assert main(["data", "lt-split", str(root / "nus_wide"), "--reader", "nus_wide", "--max-count", "16",
                 "--out", str(split)]) == 0
    return root


def _reproduce(table, data_root, out, *extra):
    sets = [a for s in TINY + [f"nus_wide.*:data.split_dir={data_root / 'nus_wide_lt'}"] for a in ("--set", s)]
    return main(["reproduce", table, "--data-root", str(data_root), "--out", str(out), "--no-cache", *sets, *extra])


def test_list_names_every_table_and_row(capsys):
    assert main(["reproduce", "--list"]) == 0
    out = capsys.readouterr().out
    tables = {t.name: t for t in list_tables()}
    assert {"main", "ablation", "peft", "nus_wide"} <= set(tables)
    for table in tables.values():
        assert f"capnet reproduce {table.name} --data-root DIR" in out
        assert all(row.name in out for row in table.rows)
    methods = {r.method for r in tables["main"].rows}
    assert {"zeroshot", "coop", "lmpt_style", "linear_probe", "clap_authors", "clap", "capnet"} == methods
    assert {r.setting for r in tables["main"].rows} == {"voc_lt.rn50", "voc_lt.vit_b16", "coco_lt.rn50", "coco_lt.vit_b16"}


def test_published_figures_carry_sources():
    published = load_published()
    for key, entry in published.items():
        assert entry["source"], key
        if entry["source"] == "not found":
            assert all(entry[m] is None for m in ("mAP", "head", "medium", "tail")), key
        else:
            assert entry.get("second_hand") is not None, key
    names = {f"{r.published}.{r.setting}" for t in list_tables() for r in t.rows if r.published}
    assert names <= set(published)  # every row that names a published figure finds its entry


@pytest.mark.parametrize("table,rows", [
    ("main", ["voc_lt.vit_b16.*", "coco_lt.rn50.capnet", "coco_lt.rn50.clap_authors"]),  # every method; the COCO reader
    ("ablation", ["voc_lt.vit_b16.*", "voc_lt.rn50.no_peft"]),
    ("peft", []),
    ("nus_wide", ["nus_wide.rn50.*", "nus_wide.vit_b16.capnet"]),
])
def test_table_end_to_end(table, rows, data_root, tmp_path, capsys):
    out = tmp_path / table
    flags = [a for r in rows for a in ("--rows", r)]
    assert _reproduce(table, data_root, out, *flags) == 0, capsys.readouterr().err
    result = json.loads((out / "table.json").read_text(), parse_constant=pytest.fail)  # strict JSON: no NaN
    assert result["failed"] == [] and result["rows"]
    for row in result["rows"]:
        assert row["status"] == "ok"
        assert row["metrics"]["mAP"] is not None and (Path(row["run_dir"]) / "metrics.json").is_file()
        assert row["recipe"]["backbone"].startswith("clip_tiny")
    md = (out / "table.md").read_text()
    assert all(f"| {row['name']} |" in md for row in result["rows"])
    assert md in capsys.readouterr().out
    if table == "main":
        kinds = {r["method"]: r["recipe"]["kind"] for r in result["rows"]}
        assert kinds["clap_authors"] == "clap_authors" and kinds["zeroshot"] == "zeroshot"
        lmpt = next(r for r in result["rows"] if r["name"] == "voc_lt.vit_b16.lmpt_style")
        assert lmpt["published"]["mAP"] == 87.88 and lmpt["published"]["second_hand"] is True
        assert "87.88*" in md


def test_resume_reads_finished_rows_and_a_failed_row_does_not_stop_the_others(data_root, tmp_path, capsys):
    out = tmp_path / "main"
    rows = ["--rows", "voc_lt.rn50.zeroshot", "--rows", "voc_lt.rn50.coop", "--rows", "voc_lt.rn50.capnet"]
    broken = ["--set", "voc_lt.rn50.coop:model.peft.method=no_such_method"]
    assert _reproduce("main", data_root, out, *rows, *broken) == 1
    err = capsys.readouterr().err
    assert "1 of 3 row(s) failed (voc_lt.rn50.coop)" in err
    result = json.loads((out / "table.json").read_text())
    status = {r["name"]: r["status"] for r in result["rows"]}
    assert status == {"voc_lt.rn50.zeroshot": "ok", "voc_lt.rn50.coop": "failed", "voc_lt.rn50.capnet": "ok"}
    assert "no_such_method" in next(r["error"] for r in result["rows"] if r["status"] == "failed")
    before = (out / "voc_lt.rn50.capnet" / "metrics.json").stat().st_mtime_ns
    assert _reproduce("main", data_root, out, *rows) == 0  # the fixed row runs, the others are read back
    result = json.loads((out / "table.json").read_text())
    assert {r["name"]: r["status"] for r in result["rows"]} == {
        "voc_lt.rn50.zeroshot": "reused", "voc_lt.rn50.coop": "ok", "voc_lt.rn50.capnet": "reused"}
    assert (out / "voc_lt.rn50.capnet" / "metrics.json").stat().st_mtime_ns == before


def test_unknown_table_and_no_matching_row_are_one_line(capsys, tmp_path):
    assert main(["reproduce", "nope", "--out", str(tmp_path)]) == 1
    assert "capnet reproduce --list" in capsys.readouterr().err
    assert main(["reproduce", "main", "--out", str(tmp_path), "--rows", "zzz*"]) == 1
    assert "no row of table main matches zzz*" in capsys.readouterr().err


def test_row_overrides_aim_data_weights_and_sets_at_the_right_rows(tmp_path):
    from capnet.reproduce import find_table, row_overrides
    from capnet.cli.reproduce import _weights

    rows = {r.name: r for r in find_table("main").rows}
    weights = _weights(["rn50=/w/RN50.pt", "vit_b16=/w/ViT-B-16.pt"])
    sets = ["*.vit_b16.*:data.batch_size=4", "train.epochs=2"]
    rn50 = row_overrides(rows["coco_lt.rn50.capnet"], tmp_path, weights, sets)
    vit = row_overrides(rows["voc_lt.vit_b16.zeroshot"], tmp_path, weights, sets)
    assert f"data.root={tmp_path / 'coco'}" in rn50 and "model.weights=/w/RN50.pt" in rn50
    assert "data.batch_size=4" not in rn50 and rn50[-1] == "train.epochs=2"
    assert f"data.root={tmp_path / 'VOCdevkit'}" in vit and "model.weights=/w/ViT-B-16.pt" in vit
    assert vit[-2:] == ["data.batch_size=4", "train.epochs=2"]  # the user's overrides come last
    # no root: the config's own data.root; the table's common views stay
    assert row_overrides(rows["voc_lt.rn50.coop"], None, {}, []) == ["tte.views=five_crop"]
