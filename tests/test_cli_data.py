"""`capnet data stats` and `capnet data check` on tiny trees: bad images, Excel CSVs, test-only
and native layouts, --write, and the dataset flags spelt as everywhere else."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from capnet.cli import main

from _native_trees import coco_val_only, voc_test_only

BUNDLED = Path(__file__).resolve().parents[1] / "data" / "voc_real_lt"


def test_data_check_reports_every_bad_file(folder_tree: Path, capsys, write_jpeg) -> None:
    assert main(["data", "check", str(folder_tree)]) == 0
    assert "every image decodes (train 6, test 4)" in capsys.readouterr().out
    cut = folder_tree / "images" / "0102.jpg"
    full = write_jpeg(cut, seed=2, size=64).read_bytes()
    cut.write_bytes(full[: len(full) // 2])
    empty = folder_tree / "images" / "0004.jpg"
    empty.write_bytes(b"")
    assert main(["data", "check", str(folder_tree), "--workers", "2"]) == 1
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert lines[0] == f"{empty}: empty file (0 bytes)"
    assert lines[1].startswith(f"{cut}: ") and "truncated" in lines[1].lower()
    assert "2 bad image(s) (train 1, test 1) among train 6, test 4" in captured.err


def test_data_check_native_layouts(tmp_path: Path, capsys, write_jpeg) -> None:
    voc = voc_test_only(tmp_path / "VOCdevkit", write_jpeg)
    (voc / "VOC2007" / "JPEGImages" / "000004.jpg").write_bytes(b"")
    assert main(["data", "check", str(voc), "--reader", "voc"]) == 1
    assert "000004.jpg: empty file" in capsys.readouterr().out
    coco = coco_val_only(tmp_path / "coco", write_jpeg)
    assert main(["data", "check", "--data-dir", str(coco), "--data", "coco"]) == 0
    assert "every image decodes (test 3)" in capsys.readouterr().out


def test_data_stats_on_an_excel_csv_with_bom_and_crlf(folder_tree: Path, capsys) -> None:
    (folder_tree / "train.csv").write_bytes(
        b"\xef\xbb\xbfimage_id,labels\r\n0001,cat\r\n0002,dog person\r\n0003,cat dog\r\n0004,\r\n"
        b"0005,person\r\n0006,cat person\r\n")
    assert main(["data", "stats", str(folder_tree)]) == 0
    out = capsys.readouterr().out
    assert next(line for line in out.splitlines() if line.startswith("cat ")).split() == ["cat", "3", "2", "tail"]


def test_data_stats_on_a_test_only_folder_and_trees(folder_tree: Path, tmp_path: Path, capsys, write_jpeg) -> None:
    (folder_tree / "train.csv").unlink()
    assert main(["data", "stats", str(folder_tree)]) == 0
    out = capsys.readouterr().out
    assert "groups: none (no train split and no class_split.json)" in out and "imbalance" not in out
    assert main(["data", "stats", str(voc_test_only(tmp_path / "VOCdevkit", write_jpeg)), "--reader", "voc"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert next(line for line in lines if line.startswith("test ")).split() == ["test", "3"]
    assert next(line for line in lines if line.startswith("person ")).split() == ["person", "2", "-"]
    assert main(["data", "stats", str(coco_val_only(tmp_path / "coco", write_jpeg)), "--data", "coco"]) == 0
    assert "traffic_light" in capsys.readouterr().out


def test_data_stats_write_matches_the_bundled_format(tmp_path: Path, capsys) -> None:
    data = tmp_path / "mine"
    data.mkdir()
    for name in ("classes.txt", "train.csv", "test.csv"):
        shutil.copy(BUNDLED / name, data / name)
    (data / "images").symlink_to(BUNDLED / "images")
    assert main(["data", "stats", str(data), "--write"]) == 0
    assert f"wrote {data / 'class_freq.json'}" in capsys.readouterr().out
    for name in ("class_freq.json", "class_split.json"):
        assert (data / name).read_text() == (BUNDLED / name).read_text(), name
    assert main(["data", "stats", str(data), "--write"]) == 1  # never overwrites silently
    assert "class_freq.json exists; pass --force" in capsys.readouterr().err
    assert main(["data", "stats", str(data), "--write", "--force"]) == 0


def test_data_stats_write_needs_train(folder_tree: Path, capsys) -> None:
    (folder_tree / "train.csv").unlink()
    assert main(["data", "stats", str(folder_tree), "--write"]) == 1
    assert "no train split" in capsys.readouterr().err
    assert not (folder_tree / "class_freq.json").exists()


def test_dataset_flags_are_spelt_one_way(folder_tree: Path, capsys) -> None:
    for args in ([str(folder_tree)], ["--data-dir", str(folder_tree)], [str(folder_tree), "--reader", "folder"],
                 [str(folder_tree), "--data", "folder"]):
        assert main(["data", "stats", *args]) == 0, args
    capsys.readouterr()
    assert main(["data", "stats"]) == 1
    assert "no dataset given" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse: invalid choice, with the valid ones listed
        main(["data", "stats", str(folder_tree), "--reader", "foldr"])
