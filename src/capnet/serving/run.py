"""Using a finished run: load it, evaluate it on any labelled set, label new images.

``load_run`` rebuilds the model of a run directory from its config and ``model.safetensors``
(trained tensors, label graph, feature mean; the frozen backbone is checked by sha256). A run
copied to another machine re-points its backbone weights with ``overrides`` (``model.weights=...``,
``capnet ... --weights``) or ``$CAPNET_WEIGHTS_DIR`` (a file of the recorded name there); only
SERVING_KEYS may be overridden, never what was trained.
``evaluate_run`` scores the classes a dataset shares with the run; ``predict_images`` labels
images at the run's validation-chosen thresholds, decoding each image once for all its views.
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence

import numpy as np
import torch
from torch import nn

from capnet.config import SERVING_KEYS, Config, ConfigError, DataConfig, config_hash, is_key_under, load_config
from capnet.data.lt_stats import GROUP_NAMES
from capnet.errors import CheckpointError, DataError, check_state
from capnet.evaluation.scores import split_scores
from capnet.features.cache import prefix_features
from capnet.features.views import eval_views
from capnet.plans import feature_plan, resolve_runtime
from capnet.runtime import distributed
from capnet.runtime.precision import autocast
from capnet.run_files import EXTRA_STATE_KEYS, load_extra_state, load_file, split_prefix

log = logging.getLogger(__name__)


def load_eval_dataset(data: DataConfig, split: str):
    """Only the split to score (a folder with classes.txt, test.csv and images/ is enough).

    ``val`` is the layout's own val split if it has one, else carved from train exactly as in
    training (same fraction and seed).
    """
    from capnet.data import load_dataset, set_max_image_pixels

    set_max_image_pixels(data.max_image_pixels)
    options = dict(data.reader_options)
    if split != "val":
        return load_dataset(data.reader, data.root, split_dir=data.split_dir, splits=(split,), **options)
    ds = load_dataset(data.reader, data.root, split_dir=data.split_dir, **options)
    return ds if "val" in ds.splits else ds.with_val_split(data.val_fraction, data.val_seed)




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
    added_classes: List[str] = dataclasses.field(default_factory=list)  # open-vocabulary names (the last columns)
    config_sha256: Optional[str] = None  # hash of the config as trained (before any serving override)

    def with_classes(self, names: Sequence[str], keep_old: bool = True) -> "LoadedRun":
        """This run over its classes plus ``names`` scored open-vocabulary (models/open_vocab.py).

        Threshold of an added class (it has no validation data): the median of the trained
        classes' validation-chosen thresholds (ADDED_THRESHOLD_POLICY); trained classes keep theirs.
        """
        from capnet.models.build import extend_model

        if self.added_classes:
            raise CheckpointError("this run already has added classes; add all names in one call")
        self.model.set_test_time(self.cfg.tte.templates)
        model = extend_model(self.cfg.model, self.model, self.classes, names, keep_old=keep_old)
        added = list(model.added)
        thr = np.concatenate([self.thresholds, np.full(len(added), added_threshold(self.thresholds))])
        return dataclasses.replace(self, model=model.to(self.device).eval(), classes=self.classes + added,
                                   thresholds=thr, added_classes=added)


ADDED_THRESHOLD_POLICY = "median of the trained classes' validation-chosen thresholds"


def added_threshold(trained: np.ndarray) -> float:
    """Threshold for an open-vocabulary class: the median trained threshold (ADDED_THRESHOLD_POLICY)."""
    return float(np.median(trained)) if len(trained) else 0.5


def check_serving_overrides(overrides: Sequence[str], run_dir: Path) -> None:
    """Refuse, in one line, an override that would change the trained model (only SERVING_KEYS pass)."""
    for item in overrides:
        key = item.split("=", 1)[0].strip()
        if "=" not in item:
            raise ConfigError(f"--set {item!r} must look like key.path=value")
        if not is_key_under(key, SERVING_KEYS):
            raise ConfigError(f"--set {key}: a finished run ({run_dir}) keeps what it was trained with; only "
                              f"where and how it runs may change: {', '.join(SERVING_KEYS)}")


def _recorded_weights(cfg: Config, meta: Dict[str, Any]) -> Optional[str]:
    """The backbone weights file the run was trained with (metadata of newer runs, else the config)."""
    return meta.get("backbone_weights") or cfg.model.weights


def relocate_weights(cfg: Config, meta: Dict[str, Any], run_dir: Path, repointed: bool) -> Config:
    """``cfg`` with its backbone weights found on this machine: as given (``repointed``), as recorded,
    or a file of the recorded name in ``$CAPNET_WEIGHTS_DIR``; else a CheckpointError saying how."""
    import os

    weights = cfg.model.weights
    if repointed or not weights or weights == "random" or not _looks_local(weights) or Path(weights).expanduser().exists():
        return cfg
    env = os.environ.get("CAPNET_WEIGHTS_DIR")
    if env and (Path(env).expanduser() / Path(weights).name).exists():
        moved = str(Path(env).expanduser() / Path(weights).name)
        log.info("backbone weights %s not found; using %s from $CAPNET_WEIGHTS_DIR", weights, moved)
        return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, weights=moved))
    sha = meta.get("backbone_sha256") or "unknown"
    where = f"$CAPNET_WEIGHTS_DIR ({env}) has no {Path(weights).name}" if env else "$CAPNET_WEIGHTS_DIR is not set"
    raise CheckpointError(f"{run_dir}: the backbone weights it was trained with, {_recorded_weights(cfg, meta)} "
                          f"(sha256 {sha}), are not on this machine; pass --weights PATH (the same file; its "
                          f"sha256 is checked) or set $CAPNET_WEIGHTS_DIR to a folder holding {Path(weights).name} "
                          f"({where})")


def _looks_local(weights: str) -> bool:
    """A local path rather than a pretrained tag or an ``hf-hub:`` name."""
    return not weights.startswith("hf-hub:") and ("/" in weights or "\\" in weights or Path(weights).suffix != "")


def load_run(run_dir: Path, device: str = "auto", add_classes: Optional[Sequence[str]] = None,
             overrides: Sequence[str] = ()) -> LoadedRun:
    """Rebuild the model of ``run_dir`` and load its trained tensors (checks the backbone sha256).

    ``add_classes``: names scored open-vocabulary after the trained ones (``LoadedRun.with_classes``);
    ``overrides``: ``key=value`` for SERVING_KEYS only, e.g. ``model.weights=/new/place/ViT-B-16.pt``.
    """
    import json

    from capnet.models.build import build_model

    run_dir = Path(run_dir)
    for name in ("config.yaml", "model.safetensors"):
        if not (run_dir / name).is_file():
            raise CheckpointError(f"{run_dir}: not a capnet run directory (missing {name})")
    check_serving_overrides(overrides, run_dir)
    recorded = load_config([run_dir / "config.yaml"])
    tensors, meta = load_file(run_dir / "model.safetensors")
    repointed = any(o.split("=", 1)[0].strip() == "model.weights" for o in overrides)
    cfg = relocate_weights(load_config([run_dir / "config.yaml"], list(overrides)), meta, run_dir, repointed)
    cfg = resolve_runtime(cfg)  # a saved null worker count would reach DataLoader
    classes = list(meta.get("classes", []))
    dev = distributed.resolve_device(device if device != "auto" else cfg.train.device)
    labels = np.eye(len(classes), dtype=np.float32)  # placeholder: the saved graph replaces it
    try:
        model = build_model(cfg, classes, labels)
    except CheckpointError as err:  # e.g. nothing found by name on this machine: say what the run needs
        if repointed or not meta.get("backbone_sha256"):
            raise
        raise CheckpointError(f"{err} [{run_dir} was trained on {_recorded_weights(recorded, meta) or cfg.model.backbone} "
                              f"(sha256 {meta['backbone_sha256']}): pass --weights PATH]") from None
    found = model.backbone.spec.weights_sha256
    if meta.get("backbone_sha256") and found and meta["backbone_sha256"] != found:
        raise CheckpointError(f"{run_dir}: trained on backbone weights {_recorded_weights(recorded, meta)} "
                              f"(sha256 {meta['backbone_sha256']}), but {model.backbone.spec.weights} has sha256 "
                              f"{found}: point --weights / $CAPNET_WEIGHTS_DIR at the file the run was trained with")
    extra = {k: tensors.pop(k) for k in EXTRA_STATE_KEYS if k in tensors}
    weights = model.upgrade_state(split_prefix(tensors, "model."))
    check_state(model.trainable_state_dict(), weights, run_dir / "model.safetensors")
    model.load_trainable_state_dict(weights)
    load_extra_state(model, extra)
    metrics_path = run_dir / "metrics.json"
    thr = np.full(len(classes), 0.5)
    if metrics_path.is_file():
        saved = json.loads(metrics_path.read_text()).get("thresholds", {})
        thr = np.array([saved.get(c, 0.5) for c in classes], dtype=np.float64)
    run = LoadedRun(cfg, model.to(dev).eval(), classes, thr, dev,
                    class_groups=meta.get("class_groups"), train_class_freq=meta.get("train_class_freq"),
                    config_sha256=config_hash(recorded))
    return run.with_classes(add_classes) if add_classes else run


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
    run.model.set_test_time(run.cfg.tte.templates)
    scores, targets = split_scores(run.model, ds.splits[split], feature_plan(run.cfg, run.model, run.device, cache_dir))
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


def predict_images(run: LoadedRun, paths: Sequence[Path], batch_size: int = 16) -> Iterator[Dict[str, Any]]:
    """One dict per image: labels above the per-class thresholds and every class score.

    An image that cannot be read gets ``{"image": path, "error": why}`` in its place and the
    others are scored as usual (a batch is one batch fewer images, not lost).

    Each image is decoded once and all its test-time views go through the model in one batch.
    Scores follow the one precision policy (``runtime.precision``): the cacheable frozen prefix
    at the run's extraction precision, rounded as the cache stores it, the rest in float32, so an
    image scores here exactly as ``capnet eval`` scored it from the feature cache.
    """
    from capnet.data import load_image

    plan = feature_plan(run.cfg, run.model, run.device)
    depth = plan.cached_depth
    prefix_amp = autocast(run.device, plan.extract_amp)
    views_of = eval_views(run.model, plan)
    run.model.set_test_time(run.cfg.tte.templates)
    added = {"classes": run.added_classes, "threshold": round(float(run.thresholds[-1]), 6),
             "threshold_policy": ADDED_THRESHOLD_POLICY} if run.added_classes else None
    for start in range(0, len(paths), batch_size):
        rows: List[Dict[str, Any]] = []  # the batch's rows in input order; an unreadable image's is its error
        chunk, decoded = [], []
        for path in paths[start:start + batch_size]:
            try:
                decoded.append(views_of(load_image(path)))
                chunk.append(len(rows))
                rows.append({"image": str(path)})
            except DataError as err:  # one bad file among many: report it in place, score the rest
                rows.append({"image": str(path), "error": str(err)})
        if chunk:
            views = torch.stack(decoded).to(run.device)
            b, v = views.shape[:2]
            with torch.inference_mode():
                flat = views.flatten(0, 1)
                if depth > 0:
                    with prefix_amp:
                        flat = prefix_features(run.model.backbone, flat, depth)
                    logits = run.model.forward_features(flat.to(run.device).float(), depth)
                else:
                    logits = run.model(flat)
                logits = logits.float().view(b, v, -1).mean(dim=1)
            probs = torch.sigmoid(logits.double()).cpu().numpy()
            for i, p in zip(chunk, probs):
                rows[i]["labels"] = [c for c, s, t in zip(run.classes, p, run.thresholds) if s >= t]
                rows[i]["scores"] = {c: round(float(s), 6) for c, s in zip(run.classes, p)}
                if added is not None:
                    rows[i]["open_vocab"] = added
        yield from rows
