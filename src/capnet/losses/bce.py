"""Plain binary cross-entropy on logits: the multi-label baseline every other loss extends."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from capnet.registry import LOSSES


def check_shapes(logits: torch.Tensor, targets: torch.Tensor, name: str) -> None:
    """Fail early, naming the loss, when logits and multi-hot targets disagree."""
    if logits.dim() != 2 or logits.shape != targets.shape:
        raise ValueError(
            f"loss '{name}': expected logits and targets of the same (B, C) shape, "
            f"got {tuple(logits.shape)} and {tuple(targets.shape)}"
        )


@LOSSES.register("bce")
class BCELoss(nn.Module):
    """Mean over all B*C elements of the sigmoid binary cross-entropy."""

    def __init__(self, loss_weight: float = 1.0) -> None:
        super().__init__()
        self.loss_weight = float(loss_weight)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """(B, C) logits, (B, C) multi-hot targets -> scalar."""
        check_shapes(logits, targets, "bce")
        loss = F.binary_cross_entropy_with_logits(logits, targets.to(logits.dtype), reduction="mean")
        return self.loss_weight * loss
