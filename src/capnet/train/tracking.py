"""Where each epoch's scalars go besides ``log.csv``: the console line, TensorBoard and W&B.

The library only logs through ``logging.getLogger(__name__)``; the CLI decides what is shown
(``capnet -q`` / ``-v``). TensorBoard (``train.log.tensorboard``, the ``log`` extra) writes
``<run>/tb/``; W&B (``train.log.wandb``: ``wandb.init`` keyword arguments) is imported only when
asked for and is never a dependency. Only the main rank writes.
"""
from __future__ import annotations

import importlib
import logging
import math
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

from capnet.config import LogConfig
from capnet.errors import CapnetError

log = logging.getLogger(__name__)

TB_DIR = "tb"  # under the run directory
GROUPS = ("mAP", "head", "medium", "tail")


def _pct(value: Optional[float]) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.2f}"


def epoch_line(row: Dict[str, Any], total: int, best_epoch: int, best_val_map: Optional[float]) -> str:
    """``epoch 3/20  train loss 0.4123  val mAP 61.20 (tail 40.10)  12.4 s  best 61.20 @ 3``."""
    parts = [f"epoch {row['epoch']}/{total}", f"train loss {row['train_loss']:.4f}"]
    if "val_mAP" in row:
        tail = f" (tail {_pct(row.get('val_tail'))})" if "val_tail" in row else ""
        parts.append(f"val mAP {_pct(row['val_mAP'])}{tail}")
    parts.append(f"{row['seconds']:.1f} s")
    if best_epoch:
        parts.append(f"best {_pct(best_val_map)} @ {best_epoch}" if best_val_map is not None else f"selected @ {best_epoch}")
    return "  ".join(parts)


def scalars(row: Dict[str, Any]) -> Dict[str, float]:
    """TensorBoard / W&B tags of one ``log.csv`` row: loss/train, val/<group>, lr/<group>, time/epoch_s."""
    out: Dict[str, float] = {"loss/train": float(row["train_loss"]), "time/epoch_s": float(row["seconds"])}
    for g in GROUPS:
        if f"val_{g}" in row and row[f"val_{g}"] is not None:
            out[f"val/{g}"] = float(row[f"val_{g}"])
    for key, value in row.items():
        if key.startswith("lr_"):
            out[f"lr/{key[3:]}"] = float(value)
    return out


class _TensorBoard:
    def __init__(self, folder: Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # torch raises ImportError("TensorBoard logging requires TensorBoard ...")
            raise CapnetError('train.log.tensorboard=true needs the tensorboard package: pip install "capnet[log]"') from None
        self.writer = SummaryWriter(log_dir=str(folder))

    def write(self, values: Dict[str, float], step: int) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class _WandB:
    def __init__(self, options: Dict[str, Any], record: Mapping[str, Any], run_dir: Path) -> None:
        try:
            wandb = importlib.import_module("wandb")
        except ImportError:
            raise CapnetError("train.log.wandb is set but wandb is not installed: pip install wandb "
                              "(or set train.log.wandb=null)") from None
        kwargs = {"dir": str(run_dir), "config": dict(record), "name": run_dir.name, **options}
        self.run = wandb.init(**kwargs)

    def write(self, values: Dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def close(self) -> None:
        self.run.finish()


class EpochLog:
    """The epoch sinks of one ``fit``: the console line (``logging``), TensorBoard and W&B."""

    def __init__(self, epochs: int, options: LogConfig, record: Mapping[str, Any], run_dir: Path, main: bool) -> None:
        self.total = epochs
        self.sinks: List[Any] = []
        if not main:
            return
        if options.tensorboard:
            self.sinks.append(_TensorBoard(Path(run_dir) / TB_DIR))
        if options.wandb is not None:
            self.sinks.append(_WandB(dict(options.wandb), record, Path(run_dir)))

    def epoch(self, row: Dict[str, Any], best_epoch: int, best_val_map: Optional[float]) -> None:
        """Log one finished epoch everywhere (main rank only)."""
        log.info("%s", epoch_line(row, self.total, best_epoch, best_val_map))
        values = scalars(row)
        for sink in self.sinks:
            sink.write(values, int(row["epoch"]))

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()
        self.sinks = []
