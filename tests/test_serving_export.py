"""`capnet export`: ONNX (onnxruntime) and TorchScript graphs reproduce `capnet predict`."""
from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from capnet.cli import main
from capnet.config import replace
from capnet.serving.export import resolve_tte
from capnet.serving.exported import load_exported, preprocess_transform
from capnet.serving.run import load_run, predict_images
from capnet.errors import CapnetError, CheckpointError

REPO = Path(__file__).resolve().parents[1]
FORMATS = {"onnx": "model.onnx", "torchscript": "model.pt"}
TINY_CLIP = [
    "model.backbone=clip_tiny_vit.random", "model.peft.method=lora", "model.gcn.hidden=32",
    "model.prompts.n_ctx=4", "train.epochs=1", "data.batch_size=16", "data.num_workers=0",
    "model.backbone_options.image_size=32", "data.val_fraction=0.25", "tte.views=flip",
    "tte.templates=true", "train.refit=false", "train.extract_amp=none",
]  # export is float32 end to end: parity with predict needs a float32 prefix (runtime.precision)
OFFLINE = ["model.backbone_options.image_size=64", "train.epochs=2", "data.num_workers=0",
           "data.val_fraction=0.25", "train.refit=false", "train.extract_amp=none"]  # the demo's backbone, small images


def _train(out: Path, data: Path, sets) -> Path:
    args = [a for s in sets + [f"data.root={data}"] for a in ("--set", s)]
    assert main(["train", "--config", str(REPO / "configs" / "demo.yaml"), "--out", str(out), "--no-cache", *args]) == 0
    return out


@pytest.fixture(scope="module")
def clip_run(small_real: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _train(tmp_path_factory.mktemp("runs") / "clip", small_real, TINY_CLIP)


def _images(data: Path, n: int = 5):
    return sorted((data / "images").iterdir())[:n]


def _score_matrix(rows, classes):
    return np.array([[r["scores"][c] for c in classes] for r in rows])


def _export(run: Path, fmt: str, out: Path, *extra: str) -> Path:
    assert main(["export", "--run", str(run), "--format", fmt, "--out", str(out), *extra]) == 0
    return out


def _check_equal_to_predict(run_dir: Path, data: Path, tmp_path: Path, add=None, extra=()):
    images = _images(data)
    run = load_run(run_dir, device="cpu", add_classes=add)
    want = _score_matrix(predict_images(run, images), run.classes)
    for fmt, name in FORMATS.items():
        exported = load_exported(_export(run_dir, fmt, tmp_path / name, *extra))
        assert exported.classes == run.classes
        for batch_size in (1, 3):  # the batch axis is dynamic
            got = _score_matrix(exported.predict(images, batch_size=batch_size), exported.classes)
            np.testing.assert_allclose(got, want, atol=1e-4, err_msg=f"{fmt}, batch {batch_size}")
        assert [r["labels"] for r in exported.predict(images)] == [r["labels"] for r in predict_images(run, images)]
    return run, exported


def test_tiny_clip_exports_equal_predict(clip_run: Path, small_real: Path, tmp_path: Path) -> None:
    """Prompts + template ensemble + GCN + LoRA + flip TTE, folded into one graph per format."""
    run, exported = _check_equal_to_predict(clip_run, small_real, tmp_path)
    meta = exported.meta
    assert meta["tte"] == "flip" and meta["resize"] == "crop" and meta["image_size"] == 32
    assert meta["thresholds"] == pytest.approx(list(run.thresholds), abs=1e-6)
    assert meta["source_run"] == str(clip_run.resolve()) and len(meta["config_hash"]) == 64
    assert meta["mean"] == pytest.approx(list(run.model.backbone.spec.mean))
    assert meta["capnet_version"] and meta["backbone"] == "clip_tiny_vit.random"


def test_exported_input_is_the_eval_transform_without_normalisation(clip_run: Path, small_real: Path) -> None:
    from capnet.data import load_image

    run = load_run(clip_run, device="cpu")
    spec = run.model.backbone.spec
    meta = {"image_size": spec.image_size, "interpolation": spec.interpolation, "resize": "crop"}
    image = load_image(_images(small_real, 1)[0])
    mean, std = torch.tensor(spec.mean).view(3, 1, 1), torch.tensor(spec.std).view(3, 1, 1)
    torch.testing.assert_close((preprocess_transform(meta)(image) - mean) / std,
                               run.model.backbone.transform(train=False)(image), rtol=0, atol=1e-6)


def test_added_classes_are_baked_in(clip_run: Path, small_real: Path, tmp_path: Path) -> None:
    run, exported = _check_equal_to_predict(clip_run, small_real, tmp_path, add=["zebra", "potted plant"],
                                            extra=("--add-classes", "zebra, potted plant"))
    assert exported.classes[-2:] == ["zebra", "potted plant"]
    assert exported.meta["added_classes"] == ["zebra", "potted plant"]
    assert "median" in exported.meta["added_threshold_policy"]


def test_tte_none_drops_the_mirror(clip_run: Path, small_real: Path, tmp_path: Path) -> None:
    """--tte none: the graph scores the one eval view (predict with tte.views=single)."""
    run = load_run(clip_run, device="cpu")
    run.cfg = replace(run.cfg, tte=replace(run.cfg.tte, views="single"))
    images = _images(small_real)
    want = _score_matrix(predict_images(run, images), run.classes)
    exported = load_exported(_export(clip_run, "onnx", tmp_path / "m.onnx", "--tte", "none"))
    assert exported.meta["tte"] == "none"
    np.testing.assert_allclose(_score_matrix(exported.predict(images), exported.classes), want, atol=1e-4)


@pytest.mark.slow
def test_offline_default_exports_equal_predict(small_real: Path, tmp_path: Path) -> None:
    """The demo's backbone (EfficientNet-Lite0 + MiniLM bridge, whole-image resize): no text tower
    in the file, scores equal to predict."""
    run_dir = _train(tmp_path / "run", small_real, OFFLINE)
    _, exported = _check_equal_to_predict(run_dir, small_real, tmp_path)
    assert exported.meta["resize"] == "whole" and exported.meta["backbone"].startswith("efficientnet_lite0")
    assert (tmp_path / "model.onnx").stat().st_size < 30 * 2**20  # image tower only (MiniLM alone is ~90 MB)


def test_crop_views_need_an_explicit_tte() -> None:
    run = SimpleNamespace(cfg=SimpleNamespace(tte=SimpleNamespace(views="ten_crop")))
    with pytest.raises(CapnetError, match="--tte none or --tte flip"):
        resolve_tte(run, None)
    assert resolve_tte(run, "flip") == "flip"
    with pytest.raises(CapnetError, match="can fold in"):
        resolve_tte(run, "five_crop")


def test_export_errors_are_one_line(clip_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["export", "--run", str(tmp_path / "nope"), "--format", "onnx", "--out", str(tmp_path / "m")]) == 1
    err = capsys.readouterr().err.strip()
    assert "not a capnet run directory" in err and "\n" not in err
    assert main(["export", "--run", str(clip_run), "--format", "onnx", "--out", str(tmp_path / "m"),
                 "--add-classes", "cat"]) == 1
    assert "already a trained class" in capsys.readouterr().err
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    with pytest.raises(CheckpointError, match="junk.onnx"):
        load_exported(tmp_path / "junk.onnx")
    with pytest.raises(CheckpointError, match="no such exported model"):
        load_exported(tmp_path / "missing.pt")


def test_exported_files_are_readable_by_others(clip_run: Path, tmp_path: Path) -> None:
    """Atomic writes keep the umask's permissions (not mkstemp's 0600): exports get shared."""
    old = os.umask(0o022)
    try:
        path = _export(clip_run, "torchscript", tmp_path / "m.pt")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert json.loads(json.dumps(load_exported(path).meta))["classes"]


def test_linear_probe_run_exports_equal_predict(small_real: Path, tmp_path: Path) -> None:
    """A run without a text branch (the scikit-learn probe's linear head) exports too."""
    args = [a for s in TINY_CLIP[:1] + ["model.backbone_options.image_size=32", "data.num_workers=0",
                                        "data.val_fraction=0.25", "train.extract_amp=none", "tte.views=single",
                                        f"data.root={small_real}"] for a in ("--set", s)]
    run_dir = tmp_path / "probe"
    assert main(["train", "--config", str(REPO / "configs" / "demo.yaml"), "--config",
                 str(REPO / "configs" / "experiments" / "linear_probe.yaml"), "--out", str(run_dir), "--no-cache", *args]) == 0
    _, exported = _check_equal_to_predict(run_dir, small_real, tmp_path)
    assert exported.meta["model"] == "linear_probe" and exported.meta["tte"] == "none"


def test_flip_on_odd_crop_margins_equals_predict(clip_run: Path, tmp_path: Path) -> None:
    """Short side to 32 leaves an odd centre-crop margin (225 x 305 -> 32 x 43: 11 pixels), where a
    mirror taken before the crop shifts a pixel. TTE mirrors after the crop, as the graph does."""
    from PIL import Image

    rng = np.random.default_rng(0)
    images = []
    for k, (w, h) in enumerate([(225, 305), (305, 225), (225, 320), (227, 333)]):
        path = tmp_path / "odd" / f"{k}.png"
        path.parent.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
        images.append(path)
    run = load_run(clip_run, device="cpu")
    assert run.cfg.tte.views == "flip" and resize_mode_of(run) == "crop" and run.model.backbone.spec.image_size == 32
    rows = list(predict_images(run, images))
    want = _score_matrix(rows, run.classes)
    for fmt, name in FORMATS.items():
        exported = load_exported(_export(clip_run, fmt, tmp_path / name))
        got = list(exported.predict(images, batch_size=2))
        np.testing.assert_allclose(_score_matrix(got, exported.classes), want, atol=1e-4, err_msg=fmt)
        assert [r["labels"] for r in got] == [r["labels"] for r in rows]


def resize_mode_of(run) -> str:
    from capnet.serving.export import resize_mode

    return resize_mode(run)
