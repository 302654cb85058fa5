"""Training you can watch: one line per epoch, where a resume starts, TensorBoard events, W&B."""
from __future__ import annotations

import re
import sys
import types
from pathlib import Path

import pytest

from capnet.cli import main

REPO = Path(__file__).resolve().parents[1]
TINY = [
    "model.backbone=clip_tiny_vit.random", "model.gcn.hidden=32", "model.prompts.n_ctx=4", "train.epochs=2",
    "data.batch_size=16", "data.num_workers=0", "model.backbone_options.image_size=32", "data.val_fraction=0.25",
    "train.refit=false", "train.log.tensorboard=true", "train.log.wandb={project: capnet-test, mode: offline}",
]
EPOCH_LINE = re.compile(r"^capnet: epoch (\d)/2  train loss \d+\.\d{4}  val mAP \d+\.\d\d \(tail \d+\.\d\d\)  "
                        r"\d+\.\d s  best \d+\.\d\d @ \d$")


class _FakeWandB(types.ModuleType):
    """Stands in for wandb: records init kwargs and logged rows."""

    def __init__(self) -> None:
        super().__init__("wandb")
        self.inits, self.rows, self.finished = [], [], 0

    def init(self, **kwargs):
        self.inits.append(kwargs)
        module = self

        class Run:
            def log(self, values, step):
                module.rows.append((step, dict(values)))

            def finish(self):
                module.finished += 1

        return Run()


def _train(out: Path, data: Path, *extra: str) -> int:
    sets = [a for s in TINY + [f"data.root={data}"] for a in ("--set", s)]
    return main(["train", "--config", str(REPO / "configs" / "capnet.yaml"), "--out", str(out), "--no-cache",
                 *sets, *extra])


@pytest.fixture(scope="module")
def trained(small_real: Path, tmp_path_factory: pytest.TempPathFactory):
    fake = _FakeWandB()
    saved = sys.modules.get("wandb")
    sys.modules["wandb"] = fake
    capture = tmp_path_factory.mktemp("err") / "stderr.txt"
    out = tmp_path_factory.mktemp("runs") / "watched"
    old = sys.stderr
    try:
        with open(capture, "w") as fh:
            sys.stderr = fh
            assert _train(out, small_real) == 0
    finally:
        sys.stderr = old
        if saved is None:
            sys.modules.pop("wandb", None)
        else:
            sys.modules["wandb"] = saved
    return out, capture.read_text(), fake


def test_one_line_per_epoch(trained) -> None:
    _, err, _ = trained
    lines = [l for l in err.splitlines() if l.startswith("capnet: epoch ")]
    assert [EPOCH_LINE.match(l).group(1) for l in lines] == ["1", "2"], err


def test_tensorboard_events_hold_the_scalars(trained) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run, _, _ = trained
    assert list((run / "tb").glob("events.out.tfevents.*"))
    acc = EventAccumulator(str(run / "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"loss/train", "val/mAP", "val/head", "val/tail", "time/epoch_s"} <= tags
    assert any(t.startswith("lr/") for t in tags)
    assert [e.step for e in acc.Scalars("val/mAP")] == [1, 2]
    import csv

    rows = list(csv.DictReader(open(run / "log.csv")))
    assert [e.value for e in acc.Scalars("loss/train")] == pytest.approx([float(r["train_loss"]) for r in rows])


def test_wandb_gets_the_same_scalars(trained) -> None:
    run, _, fake = trained
    assert fake.inits[0]["project"] == "capnet-test" and fake.inits[0]["dir"] == str(run)
    assert [step for step, _ in fake.rows] == [1, 2] and "val/mAP" in fake.rows[0][1]
    assert fake.finished == 1


def test_resume_says_where(trained, small_real: Path, capsys: pytest.CaptureFixture) -> None:
    run, _, _ = trained
    assert _train(run, small_real, "--resume", "--set", "train.log.tensorboard=false",
                  "--set", "train.log.wandb=null") == 0
    err = capsys.readouterr().err
    assert f"capnet: resumed from {run / 'last.safetensors'} after epoch 2 of 2" in err
    assert "capnet: epoch " not in err  # nothing left to train


def test_quiet_hides_epoch_lines(trained, small_real: Path, capsys: pytest.CaptureFixture) -> None:
    run, _, _ = trained
    assert _train(run, small_real, "--resume", "-q", "--set", "train.log.tensorboard=false",
                  "--set", "train.log.wandb=null") == 0
    assert "resumed from" not in capsys.readouterr().err


def test_missing_tensorboard_is_one_line(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from capnet.config import load_config
    from capnet.errors import CapnetError
    from capnet.train.tracking import EpochLog

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import now raises ImportError
    with pytest.raises(CapnetError, match=r'pip install "capnet\[log\]"'):
        cfg = load_config([], ["train.log.tensorboard=true"])
        EpochLog(cfg.train.epochs, cfg.train.log, {}, tmp_path, main=True)
