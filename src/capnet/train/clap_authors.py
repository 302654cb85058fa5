"""CLAP fitted as its authors fit it (model kind ``clap_authors``): nothing chosen on validation.

Read in jusiro/CLAP@dbdf4095b3d824546474c725539b9f4efff3ca0e:

* ``trainers/adapters.py:232-251`` (``init_lagrangian_multipliers``, ``CONSTRAINT=l2``, formula at 242-243): before
  training, ``lambda_c`` = the mean zero-shot *softmax* probability of class c over the training
  samples of class c (``diag(softmax(logits).T @ onehot) / onehot.sum(0)``); fixed afterwards;
* ``trainers/adapters.py:219-230`` (``zero_shot_constraint``): penalty
  ``mean_c lambda_c * |p_c - t_c|^2``, ``t_c`` the raw template-mean text embedding;
* ``trainers/adapters.py:679-705`` (``forward_backward``): loss = cross-entropy + penalty;
* ``trainers/adapters.py:421-458`` (``run_epoch``): each epoch shuffles every training feature row
  (all augmented passes) and takes ``len(train_loader_x)`` batches of 256 from the front (431-432,
  450-456): as many steps as the *image* loader has (Dassl's ``build_data_loader``: ``drop_last``
  when there are at least 256 images, so ``N // 256``, else one batch), so an epoch sees about one
  pass's worth of rows; the lr schedule steps once per epoch (720-721);
* ``configs/trainers/SGD_lr1e-1_B256_ep300.yaml``: SGD, lr 0.1, batch 256, 300 epochs, cosine,
  one constant warm-up epoch at 1e-5, weight decay 0; Dassl's ``build_lr_scheduler``
  (KaiyangZhou/Dassl.pytorch ``dassl/optim/lr_scheduler.py``): ``CosineAnnealingLR(T_max=300)``
  behind the warm-up. Momentum 0.9 (Dassl's default ``OPTIM.MOMENTUM``);
* ``trainers/adapters.py:142-143, 536-538``: the training set is 20 augmented passes of the
  training images (random resized crop + flip). Here the training rows are whatever views the
  engine caches: the eval view, plus ``train.augment_views`` augmentations when set
  (``configs/experiments/clap_authors.yaml`` asks for 20).

The one change multi-label data forces: the softmax cross-entropy takes the multi-hot row
normalised to sum 1 as its target (Mahajan et al., ECCV 2018), and ``lambda_c`` averages the
softmax probability of c over the images that contain c; both reduce to the authors' exactly on
single-label data. Images without a positive label carry no target and are left out of the fit; a
class without a training positive gets the mean ``lambda`` of the others.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from capnet.registry import FEATURE_FITS
from capnet.train.zs_probe import mean_over_positives

LR, EPOCHS, BATCH_SIZE, MOMENTUM = 0.1, 300, 256, 0.9  # SGD_lr1e-1_B256_ep300.yaml (+ Dassl's momentum)
WARMUP_EPOCHS, WARMUP_LR = 1, 1e-5  # constant warm-up


@dataclass
class ClapAuthorsFit:
    """The fitted prototypes, the fixed multipliers and the mean loss of each epoch."""

    prototypes: np.ndarray  # (C, D), unnormalised (the head normalises them in its forward)
    multipliers: np.ndarray  # (C,) lambda_c
    epoch_loss: List[float] = field(default_factory=list)
    steps_per_epoch: int = 0
    rows: int = 0  # training rows: labelled images x views

    def record(self) -> Dict[str, Any]:
        return {"recipe": "jusiro/CLAP: SGD lr 0.1, batch 256, cosine, 300 epochs, nothing chosen on val",
                "epochs": len(self.epoch_loss), "final_loss": self.epoch_loss[-1] if self.epoch_loss else None,
                "steps_per_epoch": self.steps_per_epoch, "train_rows": self.rows,
                "lambda": [round(float(v), 4) for v in self.multipliers]}


def epoch_lr(epoch: int, lr: float = LR, epochs: int = EPOCHS) -> float:
    """Learning rate of (0-based) ``epoch``: constant warm-up, then cosine over ``epochs`` (Dassl)."""
    if epoch < WARMUP_EPOCHS:
        return WARMUP_LR
    return 0.5 * lr * (1.0 + math.cos(math.pi * (epoch - WARMUP_EPOCHS) / epochs))


def soft_targets(labels: torch.Tensor) -> torch.Tensor:
    """Multi-hot rows normalised to sum 1 (a one-hot row stays itself)."""
    return labels / labels.sum(dim=1, keepdim=True).clamp(min=1.0)


def lagrangian_multipliers(zs_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """lambda_c = mean softmax probability of class c over the samples containing c (adapters.py:242-243)."""
    return mean_over_positives(torch.softmax(zs_logits, dim=-1), labels)


def _rows(features: np.ndarray, labels: np.ndarray) -> Tuple[torch.Tensor, torch.Tensor, int]:
    """(N, D) or (N, V, D) features -> one row per view with its image's labels, and the number of
    images; images without a positive label are left out."""
    x = torch.as_tensor(np.asarray(features), dtype=torch.float32)
    y = torch.as_tensor(np.asarray(labels) > 0, dtype=torch.float32)
    keep = y.sum(1) > 0
    x, y = x[keep], y[keep]
    images = int(keep.sum())
    if x.ndim == 3:
        views = x.shape[1]
        x, y = x.reshape(-1, x.shape[-1]), y.repeat_interleave(views, dim=0)
    return x, y, images


def steps_per_epoch(images: int, batch_size: int = BATCH_SIZE) -> int:
    """Batches per epoch of the authors' image loader: ``images // batch_size`` (drop_last), or 1."""
    return images // batch_size if images >= batch_size else 1


def fit_clap_authors(features: np.ndarray, labels: np.ndarray, anchor: np.ndarray, logit_scale: float,
                     epochs: int = EPOCHS, lr: float = LR, batch_size: int = BATCH_SIZE, seed: int = 0) -> ClapAuthorsFit:
    """Fit CLAP's prototypes on cached final image features (see the module docstring)."""
    gen = torch.Generator().manual_seed(seed)
    x, y, images = _rows(features, labels)
    if len(x) == 0:
        raise ValueError("clap_authors: no training image has a positive label")
    x = F.normalize(x, dim=-1)
    t = torch.as_tensor(np.asarray(anchor), dtype=torch.float32)
    prototypes = t.clone().requires_grad_(True)
    with torch.no_grad():
        lam = lagrangian_multipliers(logit_scale * x @ F.normalize(t, dim=-1).T, y)
    target = soft_targets(y)
    opt = torch.optim.SGD([prototypes], lr=lr, momentum=MOMENTUM, weight_decay=0.0)
    losses: List[float] = []
    steps = steps_per_epoch(images, batch_size)
    for epoch in range(epochs):
        for group in opt.param_groups:
            group["lr"] = epoch_lr(epoch, lr, epochs)
        order = torch.randperm(len(x), generator=gen)
        total, seen = 0.0, 0
        for step in range(steps):
            idx = order[step * batch_size:(step + 1) * batch_size]
            logits = logit_scale * x[idx] @ F.normalize(prototypes, dim=-1).T
            loss = F.cross_entropy(logits, target[idx]) + (lam * (prototypes - t).pow(2).sum(-1)).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total, seen = total + float(loss.detach()) * len(idx), seen + len(idx)
        losses.append(total / seen)
    return ClapAuthorsFit(prototypes.detach().numpy(), lam.numpy(), losses, steps, len(x))


def val_map(prototypes: np.ndarray, logit_scale: float, features: np.ndarray, labels: np.ndarray) -> float:
    """Validation mAP of fitted prototypes (logits averaged over a view axis); a record, never a choice."""
    from capnet.metrics import average_precision

    x = F.normalize(torch.as_tensor(np.asarray(features), dtype=torch.float32), dim=-1)
    x = x if x.ndim == 3 else x[:, None, :]
    p = F.normalize(torch.as_tensor(prototypes, dtype=torch.float32), dim=-1)
    logits = (logit_scale * x @ p.T).mean(dim=1)
    return float(np.nanmean(average_precision(logits.numpy(), np.asarray(labels))) * 100.0)


@FEATURE_FITS.register("clap_authors")
def fit_clap_authors_head(model: Any, train: Tuple[np.ndarray, np.ndarray], val: Optional[Tuple[np.ndarray, np.ndarray]],
                          refit: bool = False, seed: int = 0) -> Dict[str, Any]:
    """Fit ``model``'s prototypes (``models.clap_authors.CosinePrototypeProbe``) and load them; val, if
    any, is scored for the record only and ``refit`` has nothing to refit (nothing is chosen)."""
    scale = float(model.fixed_logit_scale)
    fitted = fit_clap_authors(*train, model.anchor.cpu().numpy(), scale, seed=seed)
    model.load_fit(fitted.prototypes, np.zeros(len(fitted.prototypes), dtype=np.float32))
    return {**fitted.record(), "refit": False, "val_mAP": None if val is None else val_map(fitted.prototypes, scale, *val)}


fit_clap_authors_head.fits_train_views = True  # type: ignore[attr-defined]  # the engine hands it (N, 1 + K, D): every cached view
