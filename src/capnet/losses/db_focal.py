"""Distribution-balanced focal loss (Wu et al., ECCV 2020) with CAPNET's class-aware re-weighting.

Per element (sample k, class i), following the reference ``ResampleLoss`` of
wutong16/DistributionBalancedLoss (docs/losses.md has the derivation and the traps):

1. re-balanced weighting (Sec. 3.2): ``r_ki = (1/n_i) / sum_{j in pos(k)} 1/n_j`` and the smoothed
   ``r_hat = map_alpha + sigmoid(map_beta * (r_ki - map_mu))``;
2. negative-tolerant regularisation (NTR, Sec. 3.3): a class-specific logit shift
   ``b_i = init_bias * log(p_i / (1 - p_i))`` with ``p_i = n_i / N`` (divided by ``neg_scale``
   when ``bias_divided_by_neg_scale``, as the published code does), ``z' = z + b``; negatives use
   ``neg_scale * z'`` and a ``1 / neg_scale`` weight;
3. focal modulation per element: ``focal_balance * (1 - p_t)^gamma`` with p_t from the same
   shifted/scaled logits;
4. CAPNET class-aware re-weighting: ``w_i = (n_max / n_i)^q`` normalised to mean 1 over classes.

loss = loss_weight * mean_{k,i}( w_i * r_hat_ki * focal_ki * BCE(z''_ki, y_ki) ).
"""
from __future__ import annotations

import math
import warnings
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from capnet.losses.bce import check_shapes
from capnet.losses.focal import focal_factor
from capnet.registry import LOSSES

REWEIGHT_FUNCS = ("rebalance", "none")


def clean_class_freq(class_freq: Sequence[int], train_num: int,
                     class_names: Optional[Sequence[str]] = None) -> List[float]:
    """Validate counts; a count of 0 (or N) would give an infinite weight/bias, so clamp to [1, N-1].

    The clamped classes are named in ONE warning (by ``class_names`` when given, else by index):
    COCO-LT style data can have dozens of classes without a training positive.
    """
    if train_num < 2:
        raise ValueError(f"loss 'db_focal': train_num must be >= 2, got {train_num}")
    if class_names is not None and len(class_names) != len(class_freq):
        raise ValueError(f"loss 'db_focal': {len(class_names)} class names for {len(class_freq)} class counts")
    freq: List[float] = []
    clamped: Dict[int, List[int]] = {}  # original count (0 or N) -> class indices
    for index, count in enumerate(class_freq):
        if count < 0 or count > train_num:
            raise ValueError(
                f"loss 'db_focal': class {index} has {count} positives, outside [0, train_num={train_num}]"
            )
        value = min(max(int(count), 1), train_num - 1)
        if value != count:
            clamped.setdefault(int(count), []).append(index)
        freq.append(float(value))
    if not freq:
        raise ValueError("loss 'db_focal': class_freq is empty")
    if clamped:
        warnings.warn(_clamp_message(clamped, train_num, class_names), stacklevel=3)
    return freq


def _clamp_message(clamped: Dict[int, List[int]], train_num: int, class_names: Optional[Sequence[str]]) -> str:
    """e.g. "3 classes (a, b, c) have 0 of 88 training positives (counted as 1)"; by index without names."""
    parts = []
    for count, indices in sorted(clamped.items()):
        if class_names is None:
            who = f"class {indices[0]}" if len(indices) == 1 else f"classes {', '.join(map(str, indices))}"
        else:
            named = ", ".join(class_names[i] for i in indices)
            who = f"class {named}" if len(indices) == 1 else f"{len(indices)} classes ({named})"
        verb = "has" if len(indices) == 1 else "have"
        parts.append(f"{who} {verb} {count} of {train_num} training positives "
                     f"(counted as {min(max(count, 1), train_num - 1)})")
    return f"loss 'db_focal': {'; '.join(parts)}, so weights and NTR biases stay finite"


def class_aware_weights(class_freq: Sequence[float], power: float) -> torch.Tensor:
    """CAPNET re-weighting: (n_max / n_c)^power normalised to mean 1 (power 0 -> all ones), float64."""
    freq = torch.tensor(list(class_freq), dtype=torch.float64)
    weights = (freq.max() / freq) ** power
    return weights / weights.mean()


@LOSSES.register("db_focal")
class DistributionBalancedLoss(nn.Module):
    """DB-Focal loss; every piece (re-balancing, NTR, focal, class weights) can be switched off."""

    def __init__(
        self,
        class_freq: Sequence[int],
        train_num: int,
        reweight_func: str = "rebalance",
        map_alpha: float = 0.1,
        map_beta: float = 10.0,
        map_mu: float = 0.2,
        use_ntr: bool = True,
        neg_scale: float = 5.0,
        init_bias: float = 0.05,
        bias_divided_by_neg_scale: bool = True,
        focal: bool = True,
        gamma: float = 2.0,
        focal_balance: float = 2.0,
        class_weight_power: float = 0.5,
        loss_weight: float = 1.0,
        class_names: Optional[Sequence[str]] = None,
    ) -> None:
        super().__init__()
        if reweight_func not in REWEIGHT_FUNCS:
            raise ValueError(
                f"loss 'db_focal': reweight_func must be one of {REWEIGHT_FUNCS}, got {reweight_func!r}"
            )
        if neg_scale <= 0:
            raise ValueError(f"loss 'db_focal': neg_scale must be > 0, got {neg_scale}")
        freq = clean_class_freq(class_freq, int(train_num), class_names)
        self.num_classes = len(freq)
        self.reweight_func = reweight_func
        self.map_alpha, self.map_beta, self.map_mu = float(map_alpha), float(map_beta), float(map_mu)
        self.use_ntr = bool(use_ntr)
        self.neg_scale = float(neg_scale)
        self.focal = bool(focal)
        self.gamma = float(gamma)
        self.focal_balance = float(focal_balance)
        self.loss_weight = float(loss_weight)
        self.class_weight_power = float(class_weight_power)

        freq_t = torch.tensor(freq, dtype=torch.float64)
        # b_i = init_bias * logit(p_i) = -init_bias * log(N / n_i - 1)   (reference code's sign)
        bias = -torch.log(float(train_num) / freq_t - 1.0) * init_bias
        if bias_divided_by_neg_scale:
            bias = bias / self.neg_scale
        self.register_buffer("freq_inv", 1.0 / freq_t, persistent=False)  # float64: cast at use
        self.register_buffer("ntr_bias", bias, persistent=False)
        self.register_buffer(
            "class_weight", class_aware_weights(freq, self.class_weight_power), persistent=False
        )

    def rebalance_weight(self, y: torch.Tensor) -> torch.Tensor:
        """Smoothed re-balancing weight r_hat (B, C); a sample without positives gets alpha + 1."""
        freq_inv = self.freq_inv.to(y.dtype)
        repeat_rate = (y * freq_inv).sum(dim=1, keepdim=True)
        ratio = torch.where(
            repeat_rate > 0,
            freq_inv / repeat_rate.clamp_min(torch.finfo(y.dtype).tiny),
            torch.full_like(repeat_rate, math.inf),
        )
        return torch.sigmoid(self.map_beta * (ratio - self.map_mu)) + self.map_alpha

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """(B, C) logits, (B, C) multi-hot targets -> scalar."""
        check_shapes(logits, targets, "db_focal")
        if logits.shape[1] != self.num_classes:
            raise ValueError(
                f"loss 'db_focal': built for {self.num_classes} classes, got logits with {logits.shape[1]}"
            )
        y = targets.to(logits.dtype)
        weight = torch.ones_like(logits)
        if self.reweight_func == "rebalance":
            weight = self.rebalance_weight(y).to(logits.dtype)
        z = logits
        if self.use_ntr:
            scale = y + (1.0 - y) * self.neg_scale  # 1 for positives, lambda for negatives
            z = (logits + self.ntr_bias.to(logits.dtype)) * scale
            weight = weight / scale
        bce = F.binary_cross_entropy_with_logits(z, y, reduction="none")
        loss = weight * bce
        if self.focal:
            loss = self.focal_balance * focal_factor(bce, self.gamma) * loss
        loss = loss * self.class_weight.to(logits.dtype)
        return self.loss_weight * loss.mean()
