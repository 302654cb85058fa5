"""Run lifecycle: train -> select on val -> thresholds on val -> (refit) -> test -> run directory.

A run directory holds ``config.yaml`` (resolved), ``model.safetensors`` (trainable tensors, the
label graph and the feature mean; the frozen backbone is referenced by name and sha256 in its
metadata), ``metrics.json`` (with the ``config_sha256`` of the config that produced it and a
breakdown of where the time went), ``report.md``, PNG plots, ``log.csv``, the training
checkpoints (``refit/`` for the train + val refit) and, when bad images were skipped,
``skipped_images.txt``. Frozen-tower features are cached per image, so a repeated run does no
image-tower work at all.
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch

from capnet.config import Config, DataConfig, LossConfig, config_hash, replace, save_config
from capnet.data import Split
from capnet.errors import DataError
from capnet.run_files import save_model, write_run_record
from capnet.evaluation.scores import split_scores
from capnet.features.loaders import make_loaders
from capnet.features.plan import FeaturePlan
from capnet.data.check import (
    SKIPPED_FILE,
    preflight_images,
    skipped_summary,
    write_skipped,
)
from capnet.features.views import single_view, split_features
from capnet.fileio import capnet_cache_dir, write_json_atomic
from capnet.report import write_report
from capnet.runtime import distributed
from capnet.models.heads import ClassifierBase
from capnet.plans import feature_plan, fit_plan, resolve_runtime
from capnet.registry import FEATURE_FITS
from capnet.runtime.precision import resolve_amp
from capnet.runtime.seed import seed_everything
from capnet.runtime.stopwatch import Stopwatch
from capnet.train.feature_fit import fit_on_features
from capnet.train.loop import FitPlan, fit

log = logging.getLogger(__name__)

TRAINING_SPLITS = ("train", "test")  # what training needs; a val split is read too when the layout has one


def default_cache_dir() -> Path:
    """``$CAPNET_CACHE/features`` (default ``~/.cache/capnet/features``)."""
    return capnet_cache_dir() / "features"


DROPPED_FILE = "dropped_images.txt"  # rows the reader left out (data.reader_options, e.g. NUS-WIDE drop_missing)


def prepare_dataset(data: DataConfig):
    """Read the dataset for training (train and test, val if present), cut it to ``data.subset``
    and carve val from train."""
    from capnet.data import load_dataset, set_max_image_pixels

    set_max_image_pixels(data.max_image_pixels)
    options = dict(data.reader_options)
    ds = load_dataset(data.reader, data.root, split_dir=data.split_dir, **options)
    if any(s not in ds.splits for s in TRAINING_SPLITS):
        load_dataset(data.reader, data.root, split_dir=data.split_dir, splits=TRAINING_SPLITS, **options)  # names the file
        raise DataError(f"{data.root}: training needs a train and a test split, found {', '.join(ds.splits)}")
    if data.subset is not None:
        ds = ds.subset(data.subset, data.val_seed)
        log.info("data.subset=%s: %s", data.subset, ", ".join(f"{k} {len(v)}" for k, v in ds.splits.items()))
    if data.resplit_folds:
        ds = ds.kfold(data.resplit_folds, data.resplit_fold, data.resplit_seed)
    # Classes are removed after the splits are drawn: the same images land in train/val/test as
    # in a run over all classes, so the two runs compare class by class.
    return ds.with_val_split(data.val_fraction, data.val_seed).without_classes(data.exclude_classes)


def train_statistics(ds: Any) -> Dict[str, Any]:
    """The training class counts and head/medium/tail groups (by name), kept with the model so a
    later evaluation on data without a train split still reports groups the way training did."""
    groups = ds.groups()
    return {"train_class_freq": [int(n) for n in ds.class_freq("train")],
            "class_groups": {g: [ds.classes[i] for i in idx] for g, idx in groups.items()}}


def merged_train(ds: Any) -> Any:
    """``ds`` with val folded back into train (for the refit), groups kept from the original train."""
    train, val = ds.splits["train"], ds.splits["val"]
    both = Split(train.image_ids + val.image_ids, train.image_paths + val.image_paths,
                 np.concatenate([train.labels, val.labels]))
    splits = {k: v for k, v in ds.splits.items() if k not in ("train", "val")}
    return dataclasses.replace(ds, splits={"train": both, **splits}, class_groups=ds.class_groups)


def _center(model: ClassifierBase, ds: Any, plan: FeaturePlan) -> None:
    """Give a centring model the mean final image feature of the training split (eval view)."""
    if not model.needs_feature_mean():
        return
    depth, device = plan.cached_depth, plan.device
    split = ds.splits["train"]
    with torch.inference_mode():
        if depth > 0:
            feats = split_features(model, split.image_paths, single_view(model), plan)
            final = [model.backbone.image_suffix(feats[i:i + 256, 0].to(device), depth).float()
                     for i in range(0, len(feats), 256)]
        else:  # no cache: one pass of the (still zero-initialised) image branch over train
            from capnet.data import ImageDataset
            from capnet.features.loaders import build_loader

            loader = build_loader(ImageDataset(split, model.backbone.transform(train=False)), plan.eval_batch_size,
                                  False, plan.seed, plan.num_workers, device)
            final = [model.image_features(x.to(device)).float() for x, _, _ in loader]
    model.set_feature_mean(torch.cat(final).mean(dim=0))


def _train(model: ClassifierBase, ds: Any, loss: LossConfig, fit_with: FitPlan, run_dir: Path, plan: FeaturePlan,
           resume: bool) -> Any:
    """Gradient training with validation selection (``fit``); returns its FitResult."""
    from capnet.losses import build_loss
    from capnet.train.test_curve import test_curve_callbacks  # train.log.test_curve: read-only test scores

    model.set_test_time(False)  # template ensembling is a test-time step
    loss_fn = build_loss(loss.name, loss.options, ds.class_freq("train"), len(ds.splits["train"]),
                         class_names=ds.classes)
    # Only train/val here: test is scored once, after selection, with its test-time views.
    loaders = make_loaders(ds, model, plan, splits=("train", "val"))
    _center(model, ds, plan)
    return fit(model, loss_fn, loaders["train"], loaders.get("val"), fit_with, run_dir, resume=resume,
               callbacks=test_curve_callbacks(model, ds, fit_with, run_dir, plan),
               groups=ds.groups(), class_names=ds.classes, device=plan.device)


def fit_and_select(model: ClassifierBase, ds: Any, cfg: Config, run_dir: Path, plan: FeaturePlan,
                   resume: bool = False) -> Tuple[List[Dict[str, Any]], Dict[str, Any]]:
    """Fit ``model`` on train and select on val: the probe's C, or the epoch of gradient training.

    ``plan`` is ``plans.feature_plan`` of ``cfg`` for ``model``. Returns the per-epoch history and
    a record with ``val_mAP`` (of the selection) plus either ``probe`` or ``selected_epoch``. Test
    is not touched (``benchmarks/sweep_val.py`` relies on it).
    """
    if cfg.model.kind in FEATURE_FITS:
        probe = fit_on_features(model, ds, cfg.model.kind, plan, cfg.train.refit)
        return [], {"probe": probe, "val_mAP": probe.get("val_mAP")}
    if not any(p.requires_grad for p in model.parameters()):
        return [], {}
    result = _train(model, ds, cfg.loss, fit_plan(cfg), run_dir, plan, resume)
    best = next((h for h in result.history if h["epoch"] == result.best_epoch), {})
    record = {"selected_epoch": result.best_epoch, "val_mAP": result.best_val_map,
              "val": {k: best.get(f"val_{k}") for k in ("mAP", "head", "medium", "tail")}}
    return result.history, record


def _thresholds(model: ClassifierBase, ds: Any, plan: FeaturePlan, templates: bool) -> np.ndarray:
    """Per-class F1-optimal probability thresholds on val (0.5 without val), test-time views on."""
    from capnet.metrics import best_thresholds

    if "val" not in ds.splits:
        return np.full(ds.num_classes, 0.5)
    model.set_test_time(templates)
    logits, targets = split_scores(model, ds.splits["val"], plan)
    return 1.0 / (1.0 + np.exp(-best_thresholds(logits.astype(np.float64), targets, default=0.0)))


def evaluate_and_write(model: ClassifierBase, ds: Any, plan: FeaturePlan, templates: bool, run_dir: Path,
                       history: List[Dict[str, float]], header: Dict[str, Any],
                       thresholds: np.ndarray) -> Dict[str, Any]:
    """Metrics on test (mAP on logits; F1 at the val thresholds), then metrics.json + report.md + plots."""
    from capnet.metrics import f1_report, map_report

    model.set_test_time(templates)
    groups = ds.groups()
    logits, targets = split_scores(model, ds.splits["test"], plan)
    metrics = map_report(logits, targets, groups, list(ds.classes))
    metrics["thresholds"] = {c: float(t) for c, t in zip(ds.classes, thresholds)}
    f1 = f1_report(1.0 / (1.0 + np.exp(-logits.astype(np.float64))), targets, thresholds)
    metrics["f1"] = {k: f1[k] for k in ("CP", "CR", "CF1", "OP", "OR", "OF1") if k in f1}
    if distributed.is_main():
        write_run_record(run_dir, ds, logits, targets)  # split ids + per-image test logits (capnet.run_files)
        write_json_atomic(run_dir / "metrics.json", metrics)
        write_report(run_dir, metrics, ds.classes, ds.class_freq("train"),
                     {k: list(map(int, v)) for k, v in groups.items()}, history, header)
    return metrics


def train_run(cfg: Config, run_dir: Path, *, resume: bool = False, cache_dir: Optional[Path] = None,
              skip_bad_images: bool = False) -> Dict[str, Any]:
    """Train per ``cfg``, select on val, evaluate on test, write the run directory; returns metrics.

    Every image is decoded first (:func:`preflight_images`); a bad one fails the run before any
    work unless ``skip_bad_images``, which drops it and lists it in skipped_images.txt. With
    ``train.refit`` the model is retrained on train + val for the selected number of epochs
    (thresholds stay those of the selected model on val, the only data it has not seen).
    """
    from capnet.models.build import build_model

    clock, run_dir = Stopwatch(), Path(run_dir)
    run_cfg = resolve_runtime(cfg)
    seed_everything(cfg.train.seed)
    device = distributed.init_distributed(cfg.train.device, cfg.train.dist_timeout_s).device
    ds = prepare_dataset(cfg.data)
    ds, skipped = preflight_images(ds, skip_bad_images, cache_dir)
    clock.lap("read and check the data")
    model = build_model(cfg, ds.classes, ds.splits["train"].labels).to(device)
    if distributed.is_main():
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
        if skipped:
            write_skipped(skipped, run_dir / SKIPPED_FILE)
        if ds.dropped:
            write_skipped(ds.dropped, run_dir / DROPPED_FILE)
            log.warning("the %s reader dropped %d image(s) (%s); listed in %s", cfg.data.reader, len(ds.dropped),
                        ds.dropped[0][1], run_dir / DROPPED_FILE)
    clock.lap("build the model")
    plan = feature_plan(run_cfg, model, device, cache_dir, clock)  # training and scoring (the refit's too)
    history, extra = fit_and_select(model, ds, run_cfg, run_dir, plan, resume)
    thresholds = _thresholds(model, ds, plan, cfg.tte.templates)
    if cfg.train.refit and "selected_epoch" in extra and "val" in ds.splits:
        seed_everything(cfg.train.seed)
        model = build_model(cfg, ds.classes, ds.splits["train"].labels).to(device)  # same graph as selection
        refit_cfg = replace(run_cfg, train=replace(run_cfg.train, epochs=max(1, extra["selected_epoch"]), select="last"))
        refit = _train(model, merged_train(ds), cfg.loss, fit_plan(refit_cfg), run_dir / "refit", plan, resume)
        history = history + [{**row, "refit": 1} for row in refit.history]
    clock.lap("train")
    if distributed.is_main():
        save_model(model, run_dir / "model.safetensors", ds.classes, train_statistics(ds))
    header = {"name": run_dir.name, "dataset": f"{ds.name} ({cfg.data.root})", "backbone": cfg.model.backbone,
              "model": cfg.model.kind, "loss": cfg.loss.name, "PEFT": cfg.model.peft.method,
              "test-time views": cfg.tte.views, "feature precision": plan.extract_amp,
              "training precision": resolve_amp(cfg.train.amp, device),
              "train/val/test images":
              "/".join(str(len(ds.splits[s])) for s in ("train", "val", "test") if s in ds.splits)}
    if cfg.data.resplit_folds:
        header["dataset"] += f", fold {cfg.data.resplit_fold} of a {cfg.data.resplit_folds}-fold re-split (seed {cfg.data.resplit_seed})"
    header["selection"] = selection_note(cfg, ds)
    if cfg.train.log.test_curve and "selected_epoch" in extra:
        from capnet.train.test_curve import LABEL

        header["test curve"] = f"log.csv {LABEL}"
    if cfg.train.refit:
        header["refit"] = f"on train + val for {extra.get('selected_epoch', '-')} epochs (thresholds from the selected model)"
    if skipped:
        header["skipped images"] = skipped_summary(skipped)
    if ds.dropped:
        header["dropped by the reader"] = f"{len(ds.dropped)} (listed in {DROPPED_FILE})"
    metrics = evaluate_and_write(model, ds, plan, cfg.tte.templates,
                                 run_dir, history, header, thresholds)
    clock.lap("evaluate on test")
    metrics.update(extra)
    metrics["seconds"] = clock.total()
    metrics["time_breakdown"] = clock.breakdown()
    metrics["skipped_images"] = len(skipped)
    metrics["dropped_images"] = len(ds.dropped)
    metrics["config_sha256"] = config_hash(cfg)
    if distributed.is_main():
        write_json_atomic(run_dir / "metrics.json", metrics)
        from capnet.report import append_time_breakdown

        append_time_breakdown(run_dir / "report.md", metrics["time_breakdown"])
    distributed.cleanup()
    return metrics


def selection_note(cfg: Config, ds: Any) -> str:
    """One line for report.md: how the epoch and the F1 thresholds were chosen (never on test)."""
    chosen = (f"model.kind={cfg.model.kind}'s own choices (e.g. the probe's C)" if cfg.model.kind in FEATURE_FITS
              else f"train.select={cfg.train.select}")
    if "val" not in ds.splits:
        return (f"{chosen} on every training image, no validation part; "
                "F1 thresholds 0.5 for every class (test is never used to set them)")
    return (f"{chosen} on a validation part of {len(ds.splits['val'])} images (never trained on before any refit); "
            "F1 thresholds per class F1-optimal on validation")


def finished_run(run_dir: Path, cfg: Config) -> Optional[Dict[str, Any]]:
    """The metrics of ``run_dir`` if it finished training exactly ``cfg`` (same config_sha256), else None."""
    import json

    path = Path(run_dir) / "metrics.json"
    try:
        metrics = json.loads(path.read_text())
    except (OSError, ValueError):  # absent, unreadable or half-written: not finished
        return None
    if not isinstance(metrics, dict) or metrics.get("config_sha256") != config_hash(cfg):
        return None
    return metrics
