"""Zero-shot-initialised linear probes on cached final features: ZS-LP and CLAP (multi-label).

Silva-Rodriguez et al. (CVPR 2024, "A Closer Look at the Few-Shot Adaptation of Large
Vision-Language Models") found two baselines that most CLIP-adaptation methods fail to beat:

* **ZS-LP**: a linear head on L2-normalised image features, started at the zero-shot text
  classifier and trained with the task loss. Here: sigmoid BCE, an L2 penalty on ``w``
  (weight decay), the learning rate, the decay and the number of steps chosen on validation mAP.
* **CLAP**: the same head with a class-adaptive penalty ``mean_c lambda_c |w_c - w_c^zs|^2``
  that keeps each class near its zero-shot prototype in proportion to how well zero-shot already
  does on that class's training images. CLAP's rule for softmax is ``lambda_c`` = the mean
  zero-shot probability of class c over the training images of class c. The multi-label
  analogue used here: ``lambda_c`` = the mean zero-shot *sigmoid* probability of class c over its
  positive training images, with the zero-shot logit shifted by the prior-matching bias below
  (a sigmoid of raw cosine logits has no meaning without a bias). Only the learning rate and the
  number of steps are chosen on validation; lambda is not tuned (CLAP's point).

Both heads get a per-class bias (a sigmoid needs one), initialised so that the mean training
logit of class c equals the log-odds of its training prior (Lin et al., 2017): before any step the
head ranks exactly like zero-shot. The data term is BCE summed over classes and averaged over
images, the per-image analogue of the cross-entropy the paper uses. Full-batch Adam; the features
of one split fit in memory (N x 1280 floats here).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from capnet.errors import CapnetError
from capnet.registry import FEATURE_FITS

ZS_LRS = (1e-4, 3e-4, 1e-3, 3e-3)  # Adam learning rates tried on validation
ZS_DECAYS = (0.0, 0.01, 0.1)  # ZS-LP: L2 strength on w (mean over classes of |w_c|^2), tried on validation
MAX_STEPS = 300  # full-batch steps; the step is chosen on validation every EVAL_EVERY
EVAL_EVERY = 10


@dataclass
class ZSFit:
    """The fitted head, what validation chose, and the validation mAP of every setting tried."""

    weight: np.ndarray  # (C, D)
    bias: np.ndarray  # (C,)
    lr: float
    decay: float
    steps: int
    val_map: float
    multipliers: Optional[np.ndarray] = None  # CLAP's lambda_c
    tried: Dict[str, float] = field(default_factory=dict)

    def record(self) -> Dict[str, Any]:
        out = {"lr": self.lr, "decay": self.decay, "steps": self.steps, "val_mAP": self.val_map,
               "val_mAP_by_setting": self.tried}
        if self.multipliers is not None:
            out["lambda"] = [round(float(v), 4) for v in self.multipliers]
        return out


def normalise(features: np.ndarray) -> torch.Tensor:
    """float32 rows (or (N, V, D) views) divided by their L2 norm."""
    return F.normalize(torch.as_tensor(np.asarray(features), dtype=torch.float32), dim=-1)


def prior_bias(zs_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(C,) bias making the mean training logit of each class its training log-odds (prior clipped
    to [1/(N+2), 1 - 1/(N+2)] so an empty or full class stays finite)."""
    n = labels.shape[0]
    prior = ((labels.sum(0) + 1.0) / (n + 2.0)).clamp(1.0 / (n + 2), 1.0 - 1.0 / (n + 2))
    return torch.log(prior / (1 - prior)) - zs_logits.mean(0)


def clap_multipliers(zs_logits: torch.Tensor, labels: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """lambda_c: mean zero-shot sigmoid probability of class c over its positive training images
    (CLAP's softmax rule, one-vs-rest); a class without positives gets the mean of the others."""
    return mean_over_positives(torch.sigmoid(zs_logits + bias), labels)


def mean_over_positives(prob: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(C,) mean of ``prob[:, c]`` over the rows where class c is positive; a class without
    positives gets the mean of the others (1 when no class has one)."""
    pos = labels.sum(0)
    lam = (prob * labels).sum(0) / pos.clamp(min=1.0)
    if (pos == 0).any():
        fill = lam[pos > 0].mean() if (pos > 0).any() else torch.tensor(1.0)
        lam = torch.where(pos > 0, lam, fill)
    return lam


def _val_map(weight: torch.Tensor, bias: torch.Tensor, scale: float, val_x: torch.Tensor, val_y: np.ndarray) -> float:
    from capnet.metrics import average_precision

    with torch.no_grad():
        logits = (scale * val_x @ weight.T + bias).mean(dim=1)  # (M, V, C) -> views averaged
    return float(np.nanmean(average_precision(logits.numpy(), val_y)) * 100.0)


def _train(x: torch.Tensor, y: torch.Tensor, w0: torch.Tensor, b0: torch.Tensor, scale: float, lr: float,
           pull: torch.Tensor, anchor: torch.Tensor, val: Optional[Tuple[torch.Tensor, np.ndarray]],
           steps: int) -> Tuple[Dict[int, float], Dict[int, Tuple[torch.Tensor, torch.Tensor]]]:
    """Full-batch Adam; returns val mAP and (w, b) at every EVAL_EVERY steps (or only the last without val)."""
    weight, bias = w0.clone().requires_grad_(True), b0.clone().requires_grad_(True)
    opt = torch.optim.Adam([weight, bias], lr=lr)
    scores: Dict[int, float] = {}
    states: Dict[int, Tuple[torch.Tensor, torch.Tensor]] = {}
    for step in range(1, steps + 1):
        opt.zero_grad(set_to_none=True)
        logits = scale * x @ weight.T + bias
        data = F.binary_cross_entropy_with_logits(logits, y, reduction="none").sum(1).mean()
        penalty = (pull * (weight - anchor).pow(2).sum(1)).mean()
        (data + penalty).backward()
        opt.step()
        if step % EVAL_EVERY == 0 or step == steps:
            if val is not None:
                scores[step] = _val_map(weight.detach(), bias.detach(), scale, *val)
                states[step] = (weight.detach().clone(), bias.detach().clone())
            elif step == steps:
                states[step] = (weight.detach().clone(), bias.detach().clone())
    return scores, states


def fit_zs_probe(train: Tuple[np.ndarray, np.ndarray], val: Optional[Tuple[np.ndarray, np.ndarray]],
                 zs_weight: np.ndarray, scale: float, clap: bool = False, lrs: Sequence[float] = ZS_LRS,
                 decays: Sequence[float] = ZS_DECAYS, max_steps: int = MAX_STEPS, seed: int = 0) -> ZSFit:
    """Fit ZS-LP (``clap=False``) or CLAP on (N, D) train features; choose lr (ZS-LP: and decay) and
    the step on (M, V, D) validation features, logits averaged over the V views.

    Without validation: the middle learning rate, no decay and ``max_steps`` (nothing is chosen).
    """
    torch.manual_seed(seed)
    x = normalise(train[0])
    y = torch.as_tensor(np.asarray(train[1]) > 0, dtype=torch.float32)
    w0 = F.normalize(torch.as_tensor(zs_weight, dtype=torch.float32), dim=-1)
    zs_logits = scale * x @ w0.T
    b0 = prior_bias(zs_logits, y)
    lam = clap_multipliers(zs_logits, y, b0) if clap else None
    vx = None
    if val is not None:
        v = np.asarray(val[0])
        vx = normalise(v if v.ndim == 3 else v[:, None, :])
    settings = [(lr, 0.0) for lr in lrs] if clap else [(lr, d) for lr in lrs for d in decays]
    if val is None:
        settings = [(lrs[len(lrs) // 2], 0.0)]
    best: Optional[Tuple[float, float, float, int, Tuple[torch.Tensor, torch.Tensor]]] = None
    tried: Dict[str, float] = {}
    for lr, decay in settings:
        pull = lam if clap else torch.full((w0.shape[0],), float(decay))
        anchor = w0 if clap else torch.zeros_like(w0)
        scores, states = _train(x, y, w0, b0, scale, lr, pull, anchor,
                                None if vx is None else (vx, np.asarray(val[1])), max_steps)
        if not scores:
            step = max(states)
            best = (float("nan"), lr, decay, step, states[step])
            continue
        step = max(scores, key=lambda s: (scores[s], -s))  # ties: the earlier step
        tried[f"lr={lr:g},decay={decay:g}"] = round(scores[step], 4)
        if best is None or scores[step] > best[0]:
            best = (scores[step], lr, decay, step, states[step])
    assert best is not None
    val_map, lr, decay, step, (weight, bias) = best
    return ZSFit(weight.numpy(), bias.numpy(), lr, decay, step, val_map,
                 None if lam is None else lam.numpy(), tried)


def _fit_kind(clap: bool):
    def fit(model: Any, train: Tuple[np.ndarray, np.ndarray], val: Optional[Tuple[np.ndarray, np.ndarray]],
            refit: bool = False, seed: int = 0) -> Dict[str, Any]:
        kind = "clap" if clap else "zs_linear_probe"
        if refit:
            raise CapnetError(f"model.kind={kind} chooses its step on validation and is not refitted: set train.refit=false")
        fitted = fit_zs_probe(train, val, model.zeroshot_weight.cpu().numpy(), float(model.fixed_logit_scale),
                              clap=clap, seed=seed)
        model.load_fit(fitted.weight, fitted.bias)
        return {**fitted.record(), "refit": False}

    fit.__doc__ = f"{'CLAP' if clap else 'ZS-LP'} on cached final features (``fit_zs_probe``), loaded into the head."
    return fit


FEATURE_FITS.register("zs_linear_probe")(_fit_kind(clap=False))
FEATURE_FITS.register("clap")(_fit_kind(clap=True))
