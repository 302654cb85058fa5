"""Lazy optimiser steps for per-class rows: the budgeted text branch's ``around_optimizer_step``.

A budgeted step (``text_bank.py``) trains only a subset of the classes' prompt rows. Without
this, AdamW moves every row on its stored moments and decays it at every step, so with 4 of 16
classes per step a row moved ~3 times without a gradient for each time with one. ``KeepRows``
steps a proxy holding only the subset's rows (and their slices of the moments) in the
parameter's place, so the cost is the subset's, not C's, and writes them back after; any
optimiser whose per-parameter state tensors have the parameter's shape (SGD momentum, Adam,
AdamW) is handled, as a sparse / lazy Adam would.
"""
from __future__ import annotations

from typing import Any, Dict, List, Sequence, Tuple

import torch
from torch import nn


class KeepRows:
    """``with KeepRows(rows, params, optimizer): optimizer.step()`` steps only ``rows`` of ``params``."""

    def __init__(self, rows: torch.Tensor, params: Sequence[nn.Parameter], optimizer: torch.optim.Optimizer) -> None:
        self.rows, self.params, self.optimizer = rows, list(params), optimizer
        self.swapped: List[Tuple[nn.Parameter, torch.Tensor, torch.Tensor, Dict[str, Any], Dict[str, Any], int]] = []

    def __enter__(self) -> "KeepRows":
        optimizer = self.optimizer
        for p in self.params:
            group = next((g for g in optimizer.param_groups if any(q is p for q in g["params"])), None)
            if p.grad is None or group is None:
                continue
            r = self.rows.to(p.device)
            proxy = p.detach().index_select(0, r).requires_grad_(True)
            proxy.grad = p.grad.index_select(0, r)
            state = optimizer.state.pop(p, {})
            optimizer.state[proxy] = {k: v.index_select(0, r) if _row_state(v, p) else v for k, v in state.items()}
            index = next(i for i, q in enumerate(group["params"]) if q is p)
            group["params"][index] = proxy
            self.swapped.append((p, r, proxy, state, group, index))
        return self

    def __exit__(self, *exc: Any) -> None:
        """Write the subset's stepped rows and moments back into the full parameter and state."""
        optimizer = self.optimizer
        with torch.no_grad():
            for p, r, proxy, state, group, index in self.swapped:
                group["params"][index] = p
                p.index_copy_(0, r, proxy.detach())
                for k, v in optimizer.state.pop(proxy, {}).items():
                    if _row_state(v, proxy):
                        full = state.get(k)
                        if full is None:  # first step: rows never stepped have zero moments
                            full = torch.zeros_like(p)
                        state[k] = full.index_copy_(0, r, v)
                    else:
                        state[k] = v
                optimizer.state[p] = state
        self.swapped = []


def _row_state(value: Any, param: torch.Tensor) -> bool:
    return torch.is_tensor(value) and value.shape == param.shape
