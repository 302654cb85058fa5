"""Run lifecycle: train -> select on val -> thresholds on val -> test (with TTE) -> run directory.

A run directory holds ``config.yaml`` (resolved), ``model.safetensors`` (trainable tensors and the
label graph; the frozen backbone is referenced by name and sha256 in its metadata),
``metrics.json`` (with the ``config_sha256`` of the config that produced it), ``report.md``, PNG
plots, ``log.csv``, the training checkpoints and, when bad images were skipped, ``skipped_images.txt``.
Test-time views are cached like training features when the visual prefix is frozen, so a
repeated run does no image-tower work at all.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn
from torchvision.transforms.functional import to_tensor

from capnet.config import Config, DataConfig, config_hash, load_config, save_config
from capnet.data.lt_stats import GROUP_NAMES
from capnet.engine import checkpoint, distributed
from capnet.engine.evaluate import predict_scores
from capnet.engine.feature_cache import FeatureCache, compute_features
from capnet.engine.loaders import FeatureDataset, build_loader, make_loaders
from capnet.engine.preflight import SKIPPED_FILE, preflight_images, skipped_summary, write_skipped
from capnet.engine.seed import seed_everything
from capnet.engine.train import fit
from capnet.errors import CheckpointError, DataError
from capnet.fileio import write_json_atomic
from capnet.report import write_report

log = logging.getLogger(__name__)


def default_cache_dir() -> Path:
    """``$CAPNET_CACHE/features`` (default ``~/.cache/capnet/features``)."""
    return Path(os.environ.get("CAPNET_CACHE", Path.home() / ".cache" / "capnet")) / "features"


TRAINING_SPLITS = ("train", "test")  # what training needs; a val split is read too when the layout has one


def prepare_dataset(data: DataConfig):
    """Read the dataset for training (train and test, val if present) and carve val from train."""
    from capnet.data import load_dataset

    ds = load_dataset(data.reader, data.root, split_dir=data.split_dir)
    if any(s not in ds.splits for s in TRAINING_SPLITS):
        load_dataset(data.reader, data.root, split_dir=data.split_dir, splits=TRAINING_SPLITS)  # names the file
        raise DataError(f"{data.root}: training needs a train and a test split, found {', '.join(ds.splits)}")
    return ds.with_val_split(data.val_fraction, data.val_seed)


def load_eval_dataset(data: DataConfig, split: str):
    """Only the split to score (a folder with classes.txt, test.csv and images/ is enough).

    ``val`` is the layout's own val split if it has one, else carved from train exactly as in
    training (same fraction and seed).
    """
    from capnet.data import load_dataset

    if split != "val":
        return load_dataset(data.reader, data.root, split_dir=data.split_dir, splits=(split,))
    ds = load_dataset(data.reader, data.root, split_dir=data.split_dir)
    return ds if "val" in ds.splits else ds.with_val_split(data.val_fraction, data.val_seed)


class _OneView:
    """Picks view ``v`` of a multi-view transform, with a stable repr for the feature-cache key."""

    def __init__(self, stack: Any, v: int, description: str) -> None:
        self.stack, self.v, self.description = stack, v, description

    def __call__(self, image: Any) -> torch.Tensor:
        # Only view v is converted and normalised (crops are cheap; tensors are not), so
        # extracting V views costs V conversions per image, not V * V.
        return self.stack.normalize(to_tensor(self.stack.views(image)[self.v]))

    def __repr__(self) -> str:
        return f"view {self.v} of {self.description}"


class _ViewAverage(nn.Module):
    """Wraps a model so cached (B, V, ...) view features give logits averaged over V."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)

    def forward_features(self, features: torch.Tensor, start: int) -> torch.Tensor:
        b, v = features.shape[:2]
        return self.model.forward_features(features.flatten(0, 1), start).float().view(b, v, -1).mean(dim=1)


def view_transforms(model: nn.Module, cfg: Config) -> List[Any]:
    """One eval transform per test-time view (a single one for ``tte.views=single``)."""
    from capnet.models.tte import build_view_transform, num_views

    if cfg.tte.views == "single":
        return [model.backbone.transform(train=False)]
    spec = model.backbone.spec
    stack = build_view_transform(cfg.tte, spec)
    desc = f"{cfg.tte.views}(size={spec.image_size}, resize_scale={cfg.tte.resize_scale}, mean={spec.mean}, " \
           f"std={spec.std}, interpolation={spec.interpolation})"
    return [_OneView(stack, v, desc) for v in range(num_views(cfg.tte.views))]


def split_scores(model: nn.Module, split: Any, cfg: Config, device: torch.device,
                 cache_dir: Optional[Path]) -> Tuple[np.ndarray, np.ndarray]:
    """Sigmoid scores of one split with the configured test-time views (logit-averaged)."""
    from capnet.data import ImageDataset

    depth = model.frozen_image_stages() if cfg.train.feature_cache else 0
    transforms = view_transforms(model, cfg)
    if depth > 0:
        cache = FeatureCache(cache_dir) if cache_dir is not None else None
        feats = torch.stack([
            compute_features(model.backbone, split.image_paths, t, depth, batch_size=cfg.data.eval_batch_size,
                             num_workers=cfg.data.num_workers, device=device, cache=cache,
                             progress=distributed.is_main())
            for t in transforms], dim=1)
        loader = build_loader(FeatureDataset(feats, split.labels, start=depth), cfg.data.eval_batch_size,
                              False, cfg.train.seed, 0, device)
        return predict_scores(_ViewAverage(model), loader, device, cfg.train.amp)
    if len(transforms) == 1:
        loader = build_loader(ImageDataset(split, transforms[0]), cfg.data.eval_batch_size, False,
                              cfg.train.seed, cfg.data.num_workers, device)
        return predict_scores(model, loader, device, cfg.train.amp)
    stack = transforms[0].stack
    loader = build_loader(ImageDataset(split, stack), cfg.data.eval_batch_size, False,
                          cfg.train.seed, cfg.data.num_workers, device)
    return predict_scores(model, loader, device, cfg.train.amp, tte=True)


def _extra_state(model: nn.Module) -> Dict[str, torch.Tensor]:
    """Non-trainable tensors a run needs to be rebuilt anywhere (the label graph)."""
    adj = getattr(model, "adjacency", None)
    return {} if adj is None else {"graph.adjacency": adj.detach().cpu().contiguous()}


def train_statistics(ds: Any) -> Dict[str, Any]:
    """The training class counts and head/medium/tail groups (by name), kept with the model so a
    later evaluation on data without a train split still reports groups the way training did."""
    groups = ds.groups()
    return {"train_class_freq": [int(n) for n in ds.class_freq("train")],
            "class_groups": {g: [ds.classes[i] for i in idx] for g, idx in groups.items()}}


def save_model(model: nn.Module, path: Path, classes: Sequence[str],
               statistics: Optional[Dict[str, Any]] = None) -> None:
    """model.safetensors: trainable tensors + label graph, backbone identity (and the training
    statistics) in the metadata."""
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.trainable_state_dict().items()}
    tensors.update(_extra_state(model))
    meta = {**checkpoint.model_identity(model), "classes": list(classes), **(statistics or {})}
    checkpoint.save_file(tensors, meta, path)


def evaluate_and_write(model: nn.Module, ds: Any, cfg: Config, run_dir: Path, device: torch.device,
                       cache_dir: Optional[Path], history: List[Dict[str, float]], header: Dict[str, Any]) -> Dict[str, Any]:
    """Thresholds on val, metrics on test, then metrics.json + report.md + plots (rank 0)."""
    from capnet.metrics import best_thresholds, f1_report, map_report

    if hasattr(model, "ensemble_templates") and getattr(model, "template_embeddings", None) is not None:
        model.ensemble_templates = cfg.tte.templates and getattr(model, "prompt_learner", None) is not None
    groups = ds.groups()
    thresholds = np.full(ds.num_classes, 0.5)
    if "val" in ds.splits:
        val_scores, val_targets = split_scores(model, ds.splits["val"], cfg, device, cache_dir)
        thresholds = best_thresholds(val_scores, val_targets)
    scores, targets = split_scores(model, ds.splits["test"], cfg, device, cache_dir)
    metrics = map_report(scores, targets, groups, list(ds.classes))
    metrics["thresholds"] = {c: float(t) for c, t in zip(ds.classes, thresholds)}
    f1 = f1_report(scores, targets, thresholds)
    metrics["f1"] = {k: f1[k] for k in ("CP", "CR", "CF1", "OP", "OR", "OF1") if k in f1}
    if distributed.is_main():
        write_json_atomic(run_dir / "metrics.json", metrics)
        write_report(run_dir, metrics, ds.classes, ds.class_freq("train"),
                     {k: list(map(int, v)) for k, v in groups.items()}, history, header)
    return metrics


def train_run(cfg: Config, run_dir: Path, *, resume: bool = False, cache_dir: Optional[Path] = None,
              skip_bad_images: bool = False) -> Dict[str, Any]:
    """Train per ``cfg``, select on val, evaluate on test, write the run directory; returns metrics.

    Every image is decoded first (:func:`preflight_images`); a bad one fails the run before any
    work unless ``skip_bad_images``, which drops it and lists it in skipped_images.txt.
    """
    from capnet.losses import build_loss
    from capnet.models.build import build_model

    run_dir = Path(run_dir)
    seed_everything(cfg.train.seed)
    info = distributed.init_distributed(cfg.train.device)
    device = info.device
    t0 = time.perf_counter()
    ds = prepare_dataset(cfg.data)
    ds, skipped = preflight_images(ds, skip_bad_images)
    model = build_model(cfg, ds.classes, ds.splits["train"].labels).to(device)
    if distributed.is_main():
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
        if skipped:
            write_skipped(skipped, run_dir / SKIPPED_FILE)
    history: List[Dict[str, float]] = []
    if any(p.requires_grad for p in model.parameters()):
        if hasattr(model, "ensemble_templates"):
            model.ensemble_templates = False  # template ensembling is a test-time step
        loss_fn = build_loss(cfg.loss.name, cfg.loss.options, ds.class_freq("train"), len(ds.splits["train"]),
                             class_names=ds.classes)
        # Only train/val here: test is scored once, after selection, with its test-time views.
        loaders = make_loaders(ds, model, cfg, cache_dir=cache_dir, device=device, splits=("train", "val"))
        result = fit(model, loss_fn, loaders["train"], loaders.get("val"), cfg, run_dir, resume=resume,
                     groups=ds.groups(), class_names=ds.classes, device=device)
        history = result.history
    if distributed.is_main():
        save_model(model, run_dir / "model.safetensors", ds.classes, train_statistics(ds))
    header = {"name": run_dir.name, "dataset": f"{ds.name} ({cfg.data.root})", "backbone": cfg.model.backbone,
              "model": cfg.model.kind, "loss": cfg.loss.name, "PEFT": cfg.model.peft.method,
              "test-time views": cfg.tte.views, "train/val/test images":
              "/".join(str(len(ds.splits[s])) for s in ("train", "val", "test") if s in ds.splits)}
    if skipped:
        header["skipped images"] = skipped_summary(skipped)
    metrics = evaluate_and_write(model, ds, cfg, run_dir, device, cache_dir, history, header)
    metrics["seconds"] = time.perf_counter() - t0
    metrics["skipped_images"] = len(skipped)
    metrics["config_sha256"] = config_hash(cfg)
    if distributed.is_main():
        write_json_atomic(run_dir / "metrics.json", metrics)
    distributed.cleanup()
    return metrics


@dataclasses.dataclass
class LoadedRun:
    """A trained run ready for evaluation or prediction."""

    cfg: Config
    model: nn.Module
    classes: List[str]
    thresholds: np.ndarray
    device: torch.device
    class_groups: Optional[Dict[str, List[str]]] = None  # head/medium/tail by name, from training
    train_class_freq: Optional[List[int]] = None  # training positives per class (None: older run)


def load_run(run_dir: Path, device: str = "auto") -> LoadedRun:
    """Rebuild the model of ``run_dir`` and load its trained tensors (checks the backbone sha256)."""
    import json

    from capnet.models.build import build_model

    run_dir = Path(run_dir)
    for name in ("config.yaml", "model.safetensors"):
        if not (run_dir / name).is_file():
            raise CheckpointError(f"{run_dir}: not a capnet run directory (missing {name})")
    cfg = load_config([run_dir / "config.yaml"])
    tensors, meta = checkpoint.load_file(run_dir / "model.safetensors")
    classes = list(meta.get("classes", []))
    dev = distributed.resolve_device(device if device != "auto" else cfg.train.device)
    labels = np.eye(len(classes), dtype=np.float32)  # placeholder: the saved graph replaces it
    model = build_model(cfg, classes, labels)
    found = model.backbone.spec.weights_sha256
    if meta.get("backbone_sha256") and found and meta["backbone_sha256"] != found:
        raise CheckpointError(f"{run_dir / 'model.safetensors'}: trained on backbone weights sha256 "
                              f"{meta['backbone_sha256'][:12]}…, but {cfg.model.backbone} loaded {found[:12]}…")
    weights = checkpoint.split_prefix(tensors, "model.")
    checkpoint.check_compatible(model.trainable_state_dict(), weights, run_dir / "model.safetensors")
    model.load_trainable_state_dict(weights)
    if "graph.adjacency" in tensors and getattr(model, "adjacency", None) is not None:
        model.adjacency = tensors["graph.adjacency"].float()
    metrics_path = run_dir / "metrics.json"
    thr = np.full(len(classes), 0.5)
    if metrics_path.is_file():
        saved = json.loads(metrics_path.read_text()).get("thresholds", {})
        thr = np.array([saved.get(c, 0.5) for c in classes], dtype=np.float64)
    return LoadedRun(cfg, model.to(dev).eval(), classes, thr, dev,
                     class_groups=meta.get("class_groups"), train_class_freq=meta.get("train_class_freq"))


def evaluate_run(run: LoadedRun, ds: Any, split: str, cache_dir: Optional[Path],
                 class_map: Optional[Dict[str, str]] = None) -> Dict[str, Any]:
    """mAP (overall / head / medium / tail) of a loaded run on ``split`` of ``ds``.

    Classes are matched by name (:func:`capnet.data.class_match.match_classes`, ``class_map``
    for names that differ) and only the shared ones are scored; ``metrics["classes"]`` lists
    what was left out. Head/medium/tail are the run's training groups.
    """
    from capnet.data.class_match import match_classes
    from capnet.metrics import map_report

    match = match_classes(run.classes, ds.classes, class_map, where=str(ds.root))
    if split not in ds.splits:
        raise DataError(f"{ds.root}: no split '{split}' (have {', '.join(ds.splits)})")
    if hasattr(run.model, "ensemble_templates") and getattr(run.model, "template_embeddings", None) is not None:
        run.model.ensemble_templates = run.cfg.tte.templates and getattr(run.model, "prompt_learner", None) is not None
    scores, targets = split_scores(run.model, ds.splits[split], run.cfg, run.device, cache_dir)
    names = [run.classes[i] for i in match.run_index]
    metrics = map_report(scores[:, match.run_index], targets[:, match.data_index], _eval_groups(run, ds, match), names)
    metrics["classes"] = {"scored": len(names), "absent_from_data": match.absent,
                          "unknown_to_run": match.unknown, "renamed": match.renamed}
    return metrics


def _eval_groups(run: LoadedRun, ds: Any, match: Any) -> Dict[str, np.ndarray]:
    """Head/medium/tail as positions among the scored classes: the run's own groups; for a run
    saved before they were stored, the dataset's (or none, with a warning)."""
    if run.class_groups is not None:
        group_of = {name: g for g, names in run.class_groups.items() for name in names}
        keys = [group_of.get(run.classes[i]) for i in match.run_index]
    elif ds.has_groups:
        data_group = {int(j): g for g, idx in ds.groups().items() for j in idx}
        keys = [data_group.get(j) for j in match.data_index]
    else:
        log.warning("%s: the run stores no training groups and the data has no train split: "
                    "head/medium/tail are not reported", ds.root)
        keys = []
    return {g: np.array([k for k, key in enumerate(keys) if key == g], dtype=np.int64) for g in GROUP_NAMES}


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


def predict_images(run: LoadedRun, paths: Sequence[Path], batch_size: int = 16) -> Iterator[Dict[str, Any]]:
    """One dict per image: labels above the per-class thresholds and every class score."""
    from capnet.data import load_image

    transforms = view_transforms(run.model, run.cfg)
    # (V, 3, H, W) per image: the multi-view stack, or the single eval view
    per_image = transforms[0].stack if isinstance(transforms[0], _OneView) else (lambda im: transforms[0](im)[None])
    for start in range(0, len(paths), batch_size):
        chunk = list(paths[start:start + batch_size])
        views = torch.stack([per_image(load_image(p)) for p in chunk]).to(run.device)
        with torch.inference_mode():
            logits = torch.stack([run.model(views[:, v]).float() for v in range(views.shape[1])]).mean(dim=0)
        probs = torch.sigmoid(logits).cpu().numpy()
        for path, p in zip(chunk, probs):
            yield {"image": str(path),
                   "labels": [c for c, s, t in zip(run.classes, p, run.thresholds) if s >= t],
                   "scores": {c: round(float(s), 6) for c, s in zip(run.classes, p)}}
