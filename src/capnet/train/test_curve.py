"""The per-epoch test curve (``train.log.test_curve``): test mAP after every epoch, for reading only.

CAPNET's closest relatives report the best *test* epoch (LMPT, LT-GCN) or the last epoch of a
fixed schedule (DB). capnet never chooses anything on test; this curve lets a user put capnet's
per-epoch test mAP beside such numbers. It is a ``fit`` callback: it runs after an epoch's
checkpoint and selection are final, scores the test split exactly as the final evaluation does
(test-time views and templates, EMA weights when ``train.ema`` is set) and writes the columns
``test_curve_mAP`` / ``_head`` / ``_medium`` / ``_tail`` into ``log.csv``. It forks every random
generator and restores the model's mode and weights, so a run trains and selects the same
weights with the curve on or off (tested). The values are kept in ``test_curve.csv`` too, so a
resumed run's ``log.csv`` keeps the curve of the epochs before the interruption.
"""
from __future__ import annotations

import contextlib
import csv
import io
import logging
import random
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, Iterator, List, Mapping, Optional, Sequence

import numpy as np
import torch
from torch import nn

from capnet.features.plan import FeaturePlan
from capnet.fileio import atomic_write_bytes
from capnet.runtime import distributed

if TYPE_CHECKING:  # the loop's plan, a type only (the loop does not import this module)
    from capnet.train.loop import FitPlan

log = logging.getLogger(__name__)

PREFIX = "test_curve_"  # log.csv columns: test_curve_mAP, test_curve_head, test_curve_medium, test_curve_tail
CURVE_FILE = "test_curve.csv"
KEYS = ("mAP", "head", "medium", "tail")
LABEL = ("test_curve_* columns: test mAP after each epoch, logged for comparison with papers that report "
         "the best test epoch; never used for any choice (epoch, thresholds and weights come from train/val only)")


@contextlib.contextmanager
def _untouched_rng(device: torch.device) -> Iterator[None]:
    """Python, numpy and torch (CPU and this CUDA device) generators restored on exit."""
    py, npy = random.getstate(), np.random.get_state()
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            random.setstate(py)
            np.random.set_state(npy)


class TestCurve:
    """``fit`` callback scoring ``split`` (the test split) after every epoch into ``run_dir/log.csv``."""

    __test__ = False  # not a pytest test class

    def __init__(self, model: nn.Module, split: Any, plan: FeaturePlan, run_dir: Path, templates: bool,
                 ema: Optional[float], groups: Mapping[str, np.ndarray], class_names: Sequence[str]) -> None:
        self.model, self.split, self.plan, self.run_dir = model, split, plan, Path(run_dir)
        self.templates, self.ema = templates, ema  # tte.templates and train.ema: what the shipped model scores with
        self.groups, self.class_names = dict(groups), list(class_names)

    def __call__(self, row: Dict[str, Any]) -> None:
        values = self.score()
        row.update({PREFIX + k: v for k, v in values.items()})  # FitResult.history (report.md) carries them too
        if distributed.is_main():
            self._write(int(row["epoch"]), values)
            log.info("epoch %s: test curve mAP %.2f (tail %.2f), never used for a choice", row["epoch"],
                     values["mAP"], values.get("tail", float("nan")))

    def score(self) -> Dict[str, float]:
        """Test mAP overall/head/medium/tail of the weights that would ship after this epoch."""
        from capnet.evaluation.scores import split_scores, test_time_templates
        from capnet.metrics import map_report

        with _untouched_rng(self.plan.device), self._shipped_weights(), test_time_templates(self.model, self.templates):
            logits, targets = split_scores(self.model, self.split, self.plan)
        report = map_report(logits, targets, self.groups, self.class_names)
        return {k: float(report[k]) for k in KEYS if k in report}

    @contextlib.contextmanager
    def _shipped_weights(self) -> Iterator[None]:
        """The EMA averages of the epoch's checkpoint when ``train.ema`` is set, else the raw weights."""
        if self.ema is None:
            yield
            return
        from safetensors.torch import load_file

        from capnet.run_files import split_prefix
        from capnet.train.ema import EMA

        ema = EMA(self.model.trainable_state_dict(), self.ema)
        ema.load_state_dict(split_prefix(load_file(str(self.run_dir / "last.safetensors")), "ema."))
        with ema.applied(self.model):
            yield

    def _write(self, epoch: int, values: Dict[str, float]) -> None:
        """Add this epoch to test_curve.csv, then merge every recorded epoch into log.csv."""
        curve = {r["epoch"]: r for r in _read_csv(self.run_dir / CURVE_FILE)}
        curve[str(epoch)] = {"epoch": str(epoch), **{PREFIX + k: f"{v}" for k, v in values.items()}}
        _write_csv(self.run_dir / CURVE_FILE, [curve[e] for e in sorted(curve, key=int)])
        rows = _read_csv(self.run_dir / "log.csv")
        for r in rows:
            r.update({k: v for k, v in curve.get(r["epoch"], {}).items() if k != "epoch"})
        if rows:
            _write_csv(self.run_dir / "log.csv", rows)


def _read_csv(path: Path) -> List[Dict[str, str]]:
    if not path.is_file():
        return []
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _write_csv(path: Path, rows: List[Dict[str, str]]) -> None:
    columns: List[str] = []
    for r in rows:
        columns += [c for c in r if c not in columns]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n", restval="")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_bytes(buf.getvalue().encode(), path)


def test_curve_callbacks(model: nn.Module, ds: Any, fit: "FitPlan", run_dir: Path,
                         plan: FeaturePlan) -> List[TestCurve]:
    """``[TestCurve(...)]`` when ``train.log.test_curve`` is on and ``ds`` has a test split, else ``[]``."""
    if not fit.train.log.test_curve or "test" not in ds.splits:
        return []
    return [TestCurve(model, ds.splits["test"], plan, run_dir, fit.test_time_templates, fit.train.ema, ds.groups(),
                      ds.classes)]


test_curve_callbacks.__test__ = False  # type: ignore[attr-defined]
