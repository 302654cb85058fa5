"""Optimizer with named per-group learning rates, and a per-step warm-up + cosine schedule.

``adam`` is torch's Adam with the decay added to the gradient (L2, as LT-GCN trains), ``adamw``
the decoupled one. ``onecycle`` is torch's OneCycleLR (LT-GCN: Wang-zuozheng/LT-GCN train.py,
``pct_start=0.2``), its rise ``warmup_epochs`` long, each group peaking at its own lr; with Adam
it also cycles beta1 (0.95 -> 0.85 -> 0.95), as there. ``schedule_epochs`` lets the schedule span
more epochs than are trained (LT-GCN's COCO-LT: 16 of 120).

Groups are the model's ``param_groups()`` keys (``prompts``, ``gcn``, ``peft``, ``head``); each
gets ``lr * lr_scale.get(name, 1.0)``. Weight decay is applied only to tensors with two or
more dimensions: biases, normalisation scales/shifts and the scalar logit scale (all of
``ndim <= 1``) are not decayed, as in CLIP / timm practice, because shrinking them towards 0
changes the function rather than regularising it (a decayed logit scale flattens every score).
"""
from __future__ import annotations

import math
from typing import Dict, List, Sequence

from torch import nn
from torch.optim import SGD, Adam, AdamW, Optimizer
from torch.optim.lr_scheduler import LambdaLR, LRScheduler, OneCycleLR

from capnet.config import OptimConfig
from capnet.errors import TrainingError

GROUP_NAMES = ("prompts", "gcn", "peft", "head")  # the keys param_groups() may return
_OPTIMIZERS = {
    "sgd": lambda groups, cfg: SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=False),
    "adamw": lambda groups, cfg: AdamW(groups, lr=cfg.lr),
    "adam": lambda groups, cfg: Adam(groups, lr=cfg.lr),
}


def _split_decay(name: str, params: Sequence[nn.Parameter], lr: float, weight_decay: float) -> List[dict]:
    """One torch param group with decay (ndim >= 2) and one without (ndim <= 1)."""
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = []
    if decay:
        groups.append({"params": decay, "lr": lr, "weight_decay": weight_decay, "name": name, "decay": True})
    if no_decay:
        groups.append({"params": no_decay, "lr": lr, "weight_decay": 0.0, "name": name, "decay": False})
    return groups


def build_optimizer(param_groups: Dict[str, List[nn.Parameter]], cfg: OptimConfig) -> Optimizer:
    """SGD (momentum, no Nesterov) or AdamW over named groups with per-group lr scales."""
    # A scale for a known group the model lacks (e.g. gcn with the GCN switched off) is fine:
    # ablations switch components off without editing the recipe; a misspelt name is an error.
    unknown = sorted(set(cfg.lr_scale) - set(GROUP_NAMES) - set(param_groups))
    if unknown:
        raise TrainingError(
            f"optim.lr_scale names unknown parameter group(s) {unknown}; "
            f"valid groups are {', '.join(GROUP_NAMES)} (this model has {sorted(param_groups)})"
        )
    if cfg.optimizer not in _OPTIMIZERS:
        raise TrainingError(f"optim.optimizer={cfg.optimizer!r} is not one of {', '.join(_OPTIMIZERS)}")
    seen: Dict[int, str] = {}
    groups: List[dict] = []
    for name, params in param_groups.items():
        params = [p for p in params if p.requires_grad]
        for p in params:
            if id(p) in seen:
                raise TrainingError(f"a parameter is in both group '{seen[id(p)]}' and group '{name}'")
            seen[id(p)] = name
        groups += _split_decay(name, params, cfg.lr * cfg.lr_scale.get(name, 1.0), cfg.weight_decay)
    if not groups:
        raise TrainingError("the model has no trainable parameters: nothing to optimise (evaluate it instead)")
    return _OPTIMIZERS[cfg.optimizer](groups, cfg)


class WarmupSchedule:
    """lr factor per optimizer step: linear warm-up to 1, then cosine to 0 or constant.

    Step ``s < W``: ``(s + 1) / W``; afterwards cosine ``0.5 * (1 + cos(pi * (s - W) / (T - W)))``
    over the remaining ``T - W`` steps, or ``1`` for the constant schedule.
    A class (not a closure) so that LambdaLR's state_dict records its numbers.
    """

    def __init__(self, warmup_steps: int, total_steps: int, kind: str) -> None:
        if kind not in ("cosine", "constant"):
            raise TrainingError(f"optim.scheduler={kind!r} is not one of cosine, constant")
        self.warmup_steps = warmup_steps
        self.total_steps = total_steps
        self.kind = kind

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.kind == "constant":
            return 1.0
        progress = (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def build_scheduler(optimizer: Optimizer, cfg: OptimConfig, steps_per_epoch: int, epochs: int) -> LRScheduler:
    """Per-step schedule over ``cfg.schedule_epochs`` (default ``epochs``): ``cfg.warmup_epochs`` of
    linear warm-up then cosine or constant (LambdaLR), or torch's OneCycleLR."""
    total = steps_per_epoch * (cfg.schedule_epochs or epochs)
    warmup = min(cfg.warmup_epochs * steps_per_epoch, total)
    if cfg.scheduler == "onecycle":
        if total < 2:
            raise TrainingError(f"optim.scheduler=onecycle needs at least 2 steps, got {total}")
        peaks = [group["lr"] for group in optimizer.param_groups]
        return OneCycleLR(optimizer, max_lr=peaks, total_steps=total, pct_start=min(max(warmup, 1) / total, 1.0),
                          cycle_momentum=cfg.optimizer != "sgd")  # SGD keeps optim.momentum
    return LambdaLR(optimizer, WarmupSchedule(warmup, total, cfg.scheduler))


def group_lrs(optimizer: Optimizer) -> Dict[str, float]:
    """Current lr of each named group (decay and no-decay halves share it)."""
    out: Dict[str, float] = {}
    for group in optimizer.param_groups:
        out.setdefault(group.get("name", "all"), group["lr"])
    return out
