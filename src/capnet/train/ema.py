"""Exponential moving average of the trainable tensors (evaluation uses it when enabled)."""
from __future__ import annotations

import contextlib
from typing import Any, Dict, Iterator, Mapping

import torch


class EMA:
    """``ema <- decay * ema + (1 - decay) * current`` after every optimizer step.

    Only the model's trainable tensors are tracked (its ``trainable_state_dict``), so the copy is
    as small as the checkpoint. Non-floating tensors (counters) are copied, not averaged.
    """

    def __init__(self, state: Mapping[str, torch.Tensor], decay: float) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.shadow: Dict[str, torch.Tensor] = {k: v.detach().clone() for k, v in state.items()}

    @torch.no_grad()
    def update(self, state: Mapping[str, torch.Tensor]) -> None:
        """Blend the current weights into the average."""
        for key, value in state.items():
            avg = self.shadow[key]
            if avg.is_floating_point():
                avg.mul_(self.decay).add_(value.detach().to(avg.dtype), alpha=1.0 - self.decay)
            else:
                avg.copy_(value)

    def state_dict(self) -> Dict[str, torch.Tensor]:
        """The averaged tensors (same keys as the model's trainable_state_dict)."""
        return dict(self.shadow)

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Replace the averages (used on resume)."""
        for key, value in state.items():
            self.shadow[key].copy_(value)

    @contextlib.contextmanager
    def applied(self, model: Any) -> Iterator[None]:
        """Temporarily load the averages into ``model`` (restores the raw weights on exit)."""
        raw = {k: v.detach().clone() for k, v in model.trainable_state_dict().items()}
        model.load_trainable_state_dict(self.state_dict())
        try:
            yield
        finally:
            model.load_trainable_state_dict(raw)
