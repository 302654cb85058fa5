"""A run copied to another machine: eval / predict / export re-point the backbone weights
(--weights, $CAPNET_WEIGHTS_DIR), the recorded sha256 still guards them, and --set only takes
runtime keys."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from safetensors.torch import save_file

from capnet.cli import main
import capnet.models.backbones  # noqa: F401  (fills BACKBONES)
from capnet.registry import BACKBONES

REPO = Path(__file__).resolve().parents[1]
WEIGHTS_NAME = "tiny_vit_32.safetensors"
TINY = [
    "model.backbone=clip_tiny_vit.random", "model.gcn.hidden=32", "model.prompts.n_ctx=4", "train.epochs=1",
    "data.batch_size=16", "data.num_workers=0", "model.backbone_options.image_size=32", "data.val_fraction=0.25",
    "tte.views=flip", "train.refit=false",
]


def _sets(items):
    return [a for item in items for a in ("--set", item)]


def _write_weights(path: Path, bump: float = 0.0) -> Path:
    """The tiny ViT's seeded random towers as an open_clip-layout safetensors file."""
    state = {k: v.detach().clone().contiguous() for k, v in BACKBONES.build("clip_tiny_vit.random", image_size=32).state_dict().items()}
    state["visual.proj"] += bump  # another file, another sha256
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path))
    return path


@pytest.fixture(scope="module")
def moved(small_real: Path, tmp_path_factory: pytest.TempPathFactory):
    """Train with weights in dir A, predict there, then move the run to B and the weights to C."""
    base = tmp_path_factory.mktemp("machines")
    weights = _write_weights(base / "A" / WEIGHTS_NAME)
    run = base / "A" / "run"
    rc = main(["train", "--config", str(REPO / "configs" / "capnet.yaml"), "--out", str(run), "--no-cache", "-q",
               *_sets(TINY + [f"model.weights={weights}", f"data.root={small_real}"])])
    assert rc == 0
    images = [str(p) for p in sorted((small_real / "images").iterdir())[:3]]
    before = _predict(run, images)
    (base / "B").mkdir()
    (base / "C").mkdir()
    shutil.move(str(run), str(base / "B" / "run"))
    shutil.move(str(weights), str(base / "C" / WEIGHTS_NAME))
    assert not weights.exists()
    return {"run": base / "B" / "run", "weights": base / "C" / WEIGHTS_NAME, "images": images, "before": before,
            "base": base}


def _predict(run: Path, images, *extra: str):
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(["predict", "--run", str(run), *extra, *images]) == 0
    return [json.loads(line) for line in buf.getvalue().splitlines()]


def _error(argv, capsys) -> str:
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_moved_run_without_weights_says_what_to_do(moved, capsys, monkeypatch) -> None:
    monkeypatch.delenv("CAPNET_WEIGHTS_DIR", raising=False)
    line = _error(["predict", "--run", str(moved["run"]), *moved["images"]], capsys)
    sha = json.loads(json.dumps(_meta(moved["run"])))["backbone_sha256"]
    assert WEIGHTS_NAME in line and sha in line and "--weights" in line and "CAPNET_WEIGHTS_DIR" in line


def _meta(run: Path):
    from capnet.run_files import load_file

    return load_file(run / "model.safetensors")[1]


def test_predict_eval_export_with_weights_flag(moved, small_real: Path, tmp_path: Path, capsys) -> None:
    flag = ["--weights", str(moved["weights"])]
    assert _predict(moved["run"], moved["images"], *flag) == moved["before"]
    assert main(["eval", "--run", str(moved["run"]), *flag, "--data-dir", str(small_real)]) == 0
    assert "| test |" in capsys.readouterr().out
    assert main(["export", "--run", str(moved["run"]), *flag, "--format", "torchscript",
                 "--out", str(tmp_path / "m.pt")]) == 0
    assert (tmp_path / "m.pt").stat().st_size > 0


def test_capnet_weights_dir_is_honoured(moved, monkeypatch) -> None:
    monkeypatch.setenv("CAPNET_WEIGHTS_DIR", str(moved["weights"].parent))
    assert _predict(moved["run"], moved["images"], "--set", "data.eval_batch_size=2") == moved["before"]


def test_other_weights_are_refused_in_one_line(moved, capsys) -> None:
    other = _write_weights(moved["base"] / "D" / WEIGHTS_NAME, bump=0.5)
    line = _error(["predict", "--run", str(moved["run"]), "--weights", str(other), *moved["images"]], capsys)
    assert "sha256" in line and str(other) in line and _meta(moved["run"])["backbone_sha256"] in line


def test_set_refuses_keys_of_the_trained_model(moved, capsys) -> None:
    line = _error(["predict", "--run", str(moved["run"]), "--weights", str(moved["weights"]),
                   "--set", "model.gcn.layers=3", *moved["images"]], capsys)
    assert "model.gcn.layers" in line and "model.weights" in line
