"""Sigmoid focal loss (Lin et al., ICCV 2017, eq. 5), applied per element then averaged."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from capnet.losses.bce import check_shapes
from capnet.registry import LOSSES


def focal_factor(bce: torch.Tensor, gamma: float) -> torch.Tensor:
    """(1 - p_t)^gamma from the element-wise BCE (p_t = exp(-bce)); per element, never batch-averaged."""
    return (1.0 - torch.exp(-bce)) ** gamma


@LOSSES.register("focal")
class FocalLoss(nn.Module):
    """alpha_t * (1 - p_t)^gamma * BCE per element, mean over all B*C elements."""

    def __init__(self, gamma: float = 2.0, alpha: Optional[float] = None, loss_weight: float = 1.0) -> None:
        super().__init__()
        if gamma < 0:
            raise ValueError(f"loss 'focal': gamma must be >= 0, got {gamma}")
        if alpha is not None and not 0.0 <= alpha <= 1.0:
            raise ValueError(f"loss 'focal': alpha must be in [0, 1] or None, got {alpha}")
        self.gamma = float(gamma)
        self.alpha = alpha
        self.loss_weight = float(loss_weight)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """(B, C) logits, (B, C) multi-hot targets -> scalar."""
        check_shapes(logits, targets, "focal")
        y = targets.to(logits.dtype)
        bce = F.binary_cross_entropy_with_logits(logits, y, reduction="none")
        loss = focal_factor(bce, self.gamma) * bce
        if self.alpha is not None:
            loss = (self.alpha * y + (1.0 - self.alpha) * (1.0 - y)) * loss
        return self.loss_weight * loss.mean()
