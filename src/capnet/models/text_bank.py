"""The budgeted text branch: per-step text cost that does not grow with the class count.

With class-specific prompts the exact text branch runs all C prompts through the text tower,
forward and backward, every optimiser step (``capnet.py``): linear in C. The budgeted branch
runs only ``budget`` classes per step, chosen by ``select_classes`` (the batch's positives, then
the top-scored negatives, then random classes), and keeps a :class:`TextBank` of detached rows
for every class: the GCN inputs (prompt-tower outputs) and the final class embeddings.

One step (``CAPNET.class_embeddings(rows)``):
  fresh = prompts(rows)                              (text tower on len(rows) sequences, with grad)
  P     = bank.prompt with rows <- fresh             (neighbours' GCN inputs from the bank, detached)
  E     = head(P)[rows]                              (GCN on the receptive field of rows only, gcn.py)
  W     = bank.out with rows <- E                    (logits over all C; gradient only through rows)
  bank.prompt[rows], bank.out[rows] <- fresh, E      (detached: the bank is refreshed as we go)
The bank is filled by one no-grad pass over all classes (in chunks) at the first step, and
again every ``refresh_every`` steps when asked. With rows = all classes this is the exact branch.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from capnet.errors import CapnetError


def resolve_text_budget(num_classes: int, budget: Optional[int], exact_up_to: int, auto_budget: int) -> Optional[int]:
    """Classes per step for the budgeted branch, or None for the exact one.

    ``budget`` None is auto: exact up to ``exact_up_to`` classes, else ``auto_budget``. A budget
    of C or more is the exact branch (same classes, without the bank).
    """
    if budget is not None and budget < 1:
        raise CapnetError(f"model.text_budget={budget} must be >= 1 (or null for auto)")
    if budget is None:
        budget = None if num_classes <= exact_up_to else auto_budget
    return None if budget is None or budget >= num_classes else int(budget)


def select_classes(positives: torch.Tensor, hardness: Optional[torch.Tensor], budget: int, hard_fraction: float,
                   generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Sorted indices of ``budget`` classes: positives first (a random subset if there are more),
    then ``hard_fraction`` of the remaining slots to the negatives of highest ``hardness``, then random.

    ``positives``: (C,) bool, classes present in the step's targets; ``hardness``: (C,) scores of the
    classes (e.g. the last batch's max logit), None to fill with random classes only.
    """
    positives = positives.detach().bool().cpu()
    c = positives.numel()
    budget = min(int(budget), c)
    pos = positives.nonzero().flatten()
    if len(pos) >= budget:
        return pos[torch.randperm(len(pos), generator=generator)[:budget]].sort().values
    taken = positives.clone()
    rest = budget - len(pos)
    picks = [pos]
    n_hard = int(round(rest * hard_fraction)) if hardness is not None else 0
    if n_hard > 0:
        score = hardness.detach().float().cpu().masked_fill(taken, float("-inf"))
        hard = score.topk(n_hard).indices
        taken[hard] = True
        picks.append(hard)
    free = (~taken).nonzero().flatten()
    picks.append(free[torch.randperm(len(free), generator=generator)[: budget - int(taken.sum())]])
    return torch.cat(picks).sort().values


class TextBank(nn.Module):
    """Detached per-class rows of the text branch, for the classes a budgeted step does not run.

    ``prompt``: (C, text_dim) prompt-tower outputs (the GCN's inputs), None without prompts;
    ``out``: (C, D) final unit-norm class embeddings. Non-persistent buffers: never saved, refilled
    at the first budgeted step of a process.
    """

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("prompt", None, persistent=False)
        self.register_buffer("out", None, persistent=False)
        self.steps = 0  # budgeted steps since the last full refresh

    @property
    def ready(self) -> bool:
        """Whether the bank holds a row for every class."""
        return self.out is not None

    def fill(self, prompt: Optional[torch.Tensor], out: torch.Tensor) -> None:
        """Replace every row (a full refresh)."""
        self.prompt = None if prompt is None else prompt.detach().float().clone()
        self.out = out.detach().float().clone()
        self.steps = 0

    @torch.no_grad()
    def update(self, rows: torch.Tensor, prompt: Optional[torch.Tensor], out: torch.Tensor) -> None:
        """Overwrite the rows of the classes just computed."""
        if self.prompt is not None and prompt is not None:
            self.prompt.index_copy_(0, rows, prompt.detach().to(self.prompt.dtype))
        self.out.index_copy_(0, rows, out.detach().to(self.out.dtype))
        self.steps += 1
