"""The config resolved once: the plans ``experiment`` and ``serving`` hand to the layers below.

Nothing under features/, evaluation/ or train/ reads the whole ``Config``: they take a
``FeaturePlan`` (images -> model inputs), a ``FitPlan`` (the training loop) or plain values,
built here from the config, the model and the device. Process tuning (torch threads, glibc's
allocator) is applied by the command line once per process (``tune_process``); a library caller
gets the same resolved values without the side effects (``resolve_runtime``).
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Optional

import torch

from capnet.config import Config, replace, to_dict
from capnet.features.plan import FeaturePlan
from capnet.models.heads import ClassifierBase
from capnet.runtime.precision import resolve_amp
from capnet.runtime.resources import apply_budget, budget, resolve_budget
from capnet.runtime.stopwatch import Stopwatch

if TYPE_CHECKING:  # serving imports this module for feature_plan alone: no training package there
    from capnet.train.loop import FitPlan


def resolve_runtime(cfg: Config) -> Config:
    """``cfg`` with ``data.num_workers`` / ``train.threads`` resolved for this machine, nothing applied.

    Saved configs keep ``null`` (the run is portable); every path that runs a model resolves them.
    """
    plan = resolve_budget(cfg.data.num_workers, cfg.train.threads)
    return replace(cfg, data=replace(cfg.data, num_workers=plan.workers), train=replace(cfg.train, threads=plan.threads))


def tune_process(cfg: Config) -> Config:
    """Apply the thread / worker budget and the allocator setting to this process; the resolved ``cfg``."""
    plan = apply_budget(cfg.data.num_workers, cfg.train.threads, cfg.train.keep_freed_memory)
    return replace(cfg, data=replace(cfg.data, num_workers=plan.workers), train=replace(cfg.train, threads=plan.threads))


def feature_plan(cfg: Config, model: ClassifierBase, device: torch.device, cache_dir: Optional[Path] = None,
                 stopwatch: Optional[Stopwatch] = None) -> FeaturePlan:
    """How ``model`` gets its inputs under ``cfg`` on ``device`` (workers: resolved, or this machine's
    budget when unset)."""
    workers = cfg.data.num_workers if cfg.data.num_workers is not None else budget().workers
    return FeaturePlan(
        cached_depth=model.cached_depth() if cfg.train.feature_cache else 0,
        views=cfg.tte.views, resize_scale=cfg.tte.resize_scale,
        batch_size=cfg.data.batch_size, eval_batch_size=cfg.data.eval_batch_size, num_workers=workers,
        extract_amp=resolve_amp(cfg.train.extract_amp, device),
        augment_views=cfg.train.augment_views, augment_seed=cfg.train.augment_seed, seed=cfg.train.seed,
        device=torch.device(device), cache_dir=None if cache_dir is None else Path(cache_dir), stopwatch=stopwatch,
    )


def fit_plan(cfg: Config) -> "FitPlan":
    """What the training loop needs of ``cfg``: its train and optim sections, the deployed text side
    (``tte.templates``, for validation) and the resolved config saved with each checkpoint."""
    from capnet.train.loop import FitPlan

    return FitPlan(train=cfg.train, optim=cfg.optim, test_time_templates=cfg.tte.templates, record=to_dict(cfg))
