"""The training loop: epochs of (accumulated, autocast) steps, validation, checkpoints, CSV log.

Files in ``run_dir`` (written by rank 0 only, each atomically):
  ``last.safetensors``  full training state after every epoch (``resume=True`` continues from it
                        and reproduces an uninterrupted run exactly)
  ``best.safetensors``  the SELECTED trainable weights: best validation mAP (``train.select=val``,
                        earliest epoch on ties) or the final epoch (``train.select=last``); EMA
                        weights when ``train.ema`` is set, since those are what was evaluated
  ``log.csv``           one row per epoch: epoch, lr per group, train loss, val mAP
                        (overall/head/medium/tail), seconds
  ``tb/``               the same scalars as TensorBoard events (``train.log.tensorboard``)
Each epoch is also one log line (``capnet.train.tracking``), and W&B gets the scalars when
``train.log.wandb`` is set. ``train.compile`` / ``train.grad_checkpointing`` change how the
forward runs, not what it computes. The loop calls only the hooks ``ClassifierBase`` declares
(models/heads.py): ``start_epoch``, ``step_class_embeddings``, ``around_optimizer_step`` and
``after_optimizer_step`` (CLIP's cap on the logit scale) around every optimiser step.
Model selection only ever sees the validation loader; the test split is never passed here.
On return the model holds the selected weights.
"""
from __future__ import annotations

import contextlib
import csv
import io
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from capnet.config import RUNTIME_KEYS, OptimConfig, TrainConfig, is_key_under
from capnet.errors import CapnetError, CheckpointError, Interrupted, TrainingError
from capnet.evaluation.predict import evaluate
from capnet.evaluation.scores import test_time_templates
from capnet.features.loaders import feature_depth
from capnet.models.heads import ClassifierBase, ModelForward, StepInputs
from capnet.fileio import atomic_write_bytes
from capnet.runtime import distributed
from capnet.runtime.precision import SCORE_AMP, autocast, resolve_amp
from capnet.runtime.progress import on_terminal
from capnet.runtime.seed import epoch_seed, reseed_loader, seed_everything
from capnet.train import checkpoint
from capnet.train.ema import EMA
from capnet.train.optim import build_optimizer, build_scheduler, group_lrs
from capnet.train.tracking import EpochLog

log = logging.getLogger(__name__)

Callback = Callable[[Dict[str, Any]], None]


@dataclass
class FitResult:
    """Outcome of ``fit``: the selected epoch, its val mAP and one dict per epoch."""

    best_epoch: int
    best_val_map: Optional[float]
    history: List[Dict[str, Any]] = field(default_factory=list)
    best_path: Optional[Path] = None  # file holding the selected trainable weights
    last_path: Optional[Path] = None  # full training state of the last finished epoch


@dataclass(frozen=True)
class FitPlan:
    """What ``fit`` reads of a run's config (built by ``capnet.plans.fit_plan``)."""

    train: TrainConfig  # epochs, seed, precision, accumulation, EMA, selection, logging
    optim: OptimConfig  # optimiser, learning-rate groups, schedule
    test_time_templates: bool = False  # validate the deployed text side (tte.templates)
    record: Mapping[str, Any] = field(default_factory=dict)  # the resolved config saved with checkpoints; resume compares it


@dataclass
class _Parts:
    """What one optimisation step touches (kept together so helpers take one argument)."""

    forward: nn.Module
    model: nn.Module
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: Any
    ema: Optional[EMA]
    device: torch.device
    amp: str  # train.amp resolved for the device (``auto`` -> bf16 or none)
    sync: nn.Module  # the DDP-wrapped forward (``forward`` may be its torch.compile wrapper)


def _flat(d: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and k != "options" and k != "lr_scale" and k != "backbone_options":
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _check_same_config(saved: Dict[str, Any], record: Mapping[str, Any], path: Path) -> None:
    """Resuming under another config would not reproduce anything: refuse, naming the keys."""
    now, before = _flat(dict(record)), _flat(saved)
    diff = sorted(k for k in set(now) | set(before)
                  if not is_key_under(k, RUNTIME_KEYS) and now.get(k) != before.get(k))
    if diff:
        shown = ", ".join(f"{k}: {before.get(k)!r} -> {now.get(k)!r}" for k in diff[:8])
        raise CheckpointError(f"{path} was written with a different config ({shown}); resume with the same config")


def _write_log(history: Sequence[Dict[str, Any]], path: Path) -> None:
    """Rewrite log.csv from the history (so a resumed run never duplicates or loses rows).

    Columns follow the newest row, which ``_run_epoch`` has just built in its own order: rows
    restored on resume come back from the checkpoint's JSON with their keys sorted.
    """
    columns: List[str] = []
    for row in list(history[-1:]) + list(history):
        columns += [c for c in row if c not in columns]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(history)
    atomic_write_bytes(buf.getvalue().encode(), path)


def _non_finite(epoch: int, step: int, value: float, last_path: Path) -> TrainingError:
    kept = f"last good checkpoint kept at {last_path}" if last_path.is_file() else "no checkpoint was written yet"
    return TrainingError(
        f"non-finite loss ({value}) at epoch {epoch} step {step}; {kept}. "
        "Try a lower optim.lr or train.amp=none"
    )


class _TextPass:
    """The class embeddings of one optimiser step, computed once for all its micro-batches.

    Micro-batches read a detached leaf copy; their backward passes accumulate its gradient, and
    ``backward`` sends the summed gradient through the text branch once (averaged over
    processes, since DDP ignores the text parameters). Models without a text branch skip it.
    What the step's text pass runs is the model's choice (``step_class_embeddings``; e.g. the
    budgeted CAPNET picks classes from ``StepInputs``, reduced over processes so every rank agrees).
    """

    def __init__(self, model: ClassifierBase, step: StepInputs) -> None:
        self.output = model.step_class_embeddings(step)
        self.leaf = None
        if self.output is not None:
            self.leaf = self.output.detach().requires_grad_(self.output.requires_grad)

    def backward(self) -> None:
        if self.output is None or not self.output.requires_grad or self.leaf.grad is None:
            return
        grad = self.leaf.grad
        if distributed.world_size() > 1:
            grad = distributed.all_reduce_sum(grad) / distributed.world_size()
        self.output.backward(grad)


def train_one_epoch(parts: _Parts, loader: DataLoader, plan: FitPlan, epoch: int, last_path: Path) -> float:
    """One pass over ``loader`` with gradient accumulation; returns the mean batch loss.

    The text branch (prompts through the text tower, GCN) runs once per optimiser step, not once
    per micro-batch: its input does not depend on the images.
    """
    parts.forward.train()
    depth, accum, n = feature_depth(loader), plan.train.grad_accum, len(loader)
    total, seen = 0.0, 0
    text: Optional[_TextPass] = None
    scores: Optional[torch.Tensor] = None  # the last step's logits (StepInputs)
    with torch.no_grad(), autocast(parts.device, parts.amp):
        parts.model.start_epoch(epoch_seed(plan.train.seed, epoch, stream=3))
    parts.optimizer.zero_grad(set_to_none=True)
    bar = tqdm(loader, desc=f"epoch {epoch}/{plan.train.epochs}", leave=False, miniters=plan.train.log_every,
               disable=not (distributed.is_main() and on_terminal()))
    for step, (inputs, target, _) in enumerate(bar, start=1):
        group_start = (step - 1) // accum * accum
        group_size = min(accum, n - group_start)  # the last group may be shorter
        boundary = step - group_start == group_size
        with autocast(parts.device, parts.amp):
            if step - 1 == group_start:
                text = _TextPass(parts.model, StepInputs(target.to(parts.device), scores))
        with distributed.no_sync(parts.sync, skip=not boundary):
            with autocast(parts.device, parts.amp):
                logits = parts.forward(inputs.to(parts.device, non_blocking=True), depth, text.leaf)
            loss = parts.loss_fn(logits.float(), target.to(parts.device, non_blocking=True))
            mean_loss = distributed.all_reduce_sum(loss.detach().float()).item() / distributed.world_size()
            if not math.isfinite(mean_loss):
                raise _non_finite(epoch, step, mean_loss, last_path)
            parts.scaler.scale(loss / group_size).backward()
            scores = logits.detach()
        if boundary:
            text.backward()
            with parts.model.around_optimizer_step(parts.optimizer):
                parts.scaler.step(parts.optimizer)
                parts.scaler.update()
            parts.model.after_optimizer_step()
            parts.optimizer.zero_grad(set_to_none=True)
            parts.scheduler.step()
            if parts.ema is not None:
                parts.ema.update(parts.model.trainable_state_dict())
        total, seen = total + mean_loss, seen + 1
        if step % plan.train.log_every == 0:
            bar.set_postfix(loss=f"{total / seen:.4f}")
    return total / max(seen, 1)


def _validate(parts: _Parts, loader: Optional[DataLoader], plan: FitPlan, groups: Optional[Dict[str, np.ndarray]],
              class_names: Optional[Sequence[str]]) -> Dict[str, float]:
    """Val mAP overall/head/medium/tail of the classifier that ships: EMA weights when enabled,
    test-time templates on, float32 scores (``SCORE_AMP``); empty without a loader."""
    if loader is None:
        return {}
    names = list(class_names) if class_names is not None else None
    if names is None:
        names = [f"class_{i}" for i in range(len(loader.dataset[0][1]))]
    ema = parts.ema.applied(parts.model) if parts.ema is not None else contextlib.nullcontext()
    with ema, test_time_templates(parts.model, plan.test_time_templates):
        report = evaluate(parts.model, loader, groups or {}, names, device=parts.device, amp=SCORE_AMP, tte=True)
    return {f"val_{k}": float(report[k]) for k in ("mAP", "head", "medium", "tail") if k in report}


def _selected_weights(parts: _Parts) -> Dict[str, torch.Tensor]:
    """The weights model selection judges: the EMA when enabled, else the raw ones."""
    return parts.ema.state_dict() if parts.ema is not None else parts.model.trainable_state_dict()


def enable_grad_checkpointing(model: ClassifierBase) -> None:
    """Switch on activation checkpointing in the image tower (open_clip and timm towers implement
    ``set_grad_checkpointing``); a tower without it is a one-line error, one that ignores it a warning."""
    visual = model.backbone.visual
    setters = [m for m in visual.modules() if hasattr(m, "set_grad_checkpointing")]  # open_clip / timm towers
    if not setters:
        name = model.backbone.spec.name
        raise CapnetError(f"train.grad_checkpointing=true: the image tower of {name} has no set_grad_checkpointing")
    setters[0].set_grad_checkpointing(True)
    if not any(getattr(m, "grad_checkpointing", False) or getattr(m, "grad_checkpoint", False) for m in visual.modules()):
        log.warning("train.grad_checkpointing=true has no effect on %s (its set_grad_checkpointing is a no-op, "
                    "e.g. open_clip's ModifiedResNet)", type(setters[0]).__name__)


def _build_parts(model: ClassifierBase, loss_fn: Any, plan: FitPlan, steps_per_epoch: int, device: torch.device) -> _Parts:
    """Optimizer, scheduler, scaler, EMA and the (DDP-wrapped, optionally compiled) forward for ``model``."""
    amp = resolve_amp(plan.train.amp, device)
    autocast(device, amp)  # fail now, not at the first step, on e.g. fp16 without CUDA
    model.to(device)
    if isinstance(loss_fn, nn.Module):
        loss_fn.to(device)
    optimizer = build_optimizer(model.param_groups(), plan.optim)
    scheduler = build_scheduler(optimizer, plan.optim, steps_per_epoch, plan.train.epochs)
    scaler = torch.amp.GradScaler("cuda", enabled=plan.train.amp == "fp16")
    ema = EMA(model.trainable_state_dict(), plan.train.ema) if plan.train.ema is not None else None
    text_names = [f"model.{n}" for n in model.text_parameter_names()]
    if plan.train.grad_checkpointing:
        enable_grad_checkpointing(model)
    sync = distributed.wrap_ddp(ModelForward(model), device, ignore=text_names)
    forward = torch.compile(sync) if plan.train.compile else sync  # after DDP: compile sees its buckets
    return _Parts(forward, model, loss_fn, optimizer, scheduler, scaler, ema, device, amp, sync)


def fit(model: ClassifierBase, loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], train_loader: DataLoader,
        val_loader: Optional[DataLoader], plan: FitPlan, run_dir: Path, *, resume: bool = False,
        callbacks: Optional[Sequence[Callback]] = None, groups: Optional[Dict[str, np.ndarray]] = None,
        class_names: Optional[Sequence[str]] = None, device: Optional[torch.device] = None) -> FitResult:
    """Train ``model``'s trainable parameters; select on validation mAP; checkpoint every epoch.

    ``groups`` / ``class_names`` feed the head/medium/tail report (``dataset.groups()``,
    ``dataset.classes``). ``device`` defaults to ``train.device`` (this rank's GPU under
    torchrun). ``callbacks`` get each epoch's log row, on every process, after its checkpoint.
    """
    if plan.train.select == "val" and val_loader is None:
        raise TrainingError("train.select=val needs a validation loader (data.val_fraction > 0)")
    run_dir = Path(run_dir)
    best_path, last_path = run_dir / "best.safetensors", run_dir / "last.safetensors"
    if device is None:
        device = distributed.resolve_device(plan.train.device, int(os.environ.get("LOCAL_RANK", "0")))
    steps_per_epoch = math.ceil(len(train_loader) / plan.train.grad_accum)
    parts = _build_parts(model, loss_fn, plan, steps_per_epoch, device)
    progress: Dict[str, Any] = {"epoch": 0, "best_epoch": 0, "best_val_map": None, "history": []}
    if resume and last_path.is_file():
        saved = checkpoint.load_training_state(last_path, model=model, optimizer=parts.optimizer,
                                               scheduler=parts.scheduler, scaler=parts.scaler, ema=parts.ema)
        _check_same_config(saved["config"], plan.record, last_path)
        progress = {k: saved[k] for k in progress}
        if distributed.is_main():
            log.info("resumed from %s after epoch %d of %d", last_path, progress["epoch"], plan.train.epochs)
    else:
        if resume:
            log.warning("resume requested but %s does not exist: starting from epoch 1", last_path)
        seed_everything(plan.train.seed)
    if distributed.is_main():
        run_dir.mkdir(parents=True, exist_ok=True)
    epoch_log = EpochLog(plan.train.epochs, plan.train.log, plan.record, run_dir, distributed.is_main())
    try:
        for epoch in range(progress["epoch"] + 1, plan.train.epochs + 1):
            _run_epoch(parts, train_loader, val_loader, plan, epoch, progress, run_dir, groups, class_names)
            if distributed.is_main():
                epoch_log.epoch(progress["history"][-1], progress["best_epoch"], progress["best_val_map"])
            for callback in callbacks or ():
                callback(progress["history"][-1])
    except KeyboardInterrupt:  # Ctrl-C: say where (the CLI prints it as one line, status 130)
        raise Interrupted(progress["epoch"] + 1, progress["epoch"]) from None
    finally:
        epoch_log.close()
    distributed.barrier()
    if best_path.is_file():
        checkpoint.load_weights(model, best_path)
    else:  # select=val with a NaN val mAP in every epoch: nothing was ever selected
        log.warning("no epoch had a finite val mAP; %s was not written, the model keeps its final weights", best_path)
    return FitResult(progress["best_epoch"], progress["best_val_map"], progress["history"], best_path, last_path)


def _run_epoch(parts: _Parts, train_loader: DataLoader, val_loader: Optional[DataLoader], plan: FitPlan, epoch: int,
               progress: Dict[str, Any], run_dir: Path, groups: Optional[Dict[str, np.ndarray]],
               class_names: Optional[Sequence[str]]) -> None:
    """Train, validate, select, then write best / last / log.csv (rank 0) and update ``progress``."""
    tic = time.perf_counter()
    reseed_loader(train_loader, plan.train.seed, epoch)
    lrs = {f"lr_{name}": lr for name, lr in group_lrs(parts.optimizer).items()}
    train_loss = train_one_epoch(parts, train_loader, plan, epoch, run_dir / "last.safetensors")
    metrics = _validate(parts, val_loader, plan, groups, class_names)
    val_map = metrics.get("val_mAP")
    if plan.train.select == "val":
        best = progress["best_val_map"]
        improved = val_map is not None and not math.isnan(val_map) and (best is None or val_map > best)
    else:
        improved = epoch == plan.train.epochs
    if improved:
        progress["best_epoch"], progress["best_val_map"] = epoch, val_map
    row = {"epoch": epoch, **lrs, "train_loss": train_loss, **metrics, "seconds": round(time.perf_counter() - tic, 3)}
    progress["history"].append(row)
    progress["epoch"] = epoch
    if distributed.is_main():
        meta = {"epoch": epoch, "val_mAP": val_map, "select": plan.train.select, "config": dict(plan.record)}
        if improved:  # best before last: a crash in between just repeats this epoch on resume
            checkpoint.save_weights(parts.model, run_dir / "best.safetensors", meta, state=_selected_weights(parts))
        checkpoint.save_training_state(
            run_dir / "last.safetensors", model=parts.model, optimizer=parts.optimizer, scheduler=parts.scheduler,
            scaler=parts.scaler, ema=parts.ema, progress={**progress, "config": dict(plan.record)},
        )
        _write_log(progress["history"], run_dir / "log.csv")
    distributed.barrier()
