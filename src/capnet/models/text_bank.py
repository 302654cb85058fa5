"""The budgeted text branch: per-step text cost that does not grow with the class count.

With class-specific prompts the exact text branch runs all C prompts through the text tower,
forward and backward, every optimiser step (``capnet.py``): linear in C. The budgeted branch
runs only ``budget`` classes per step, chosen by ``select_classes`` (the batch's positives, then
the top-scored negatives, then random classes), and keeps a :class:`TextBank` of every class's
rows: the GCN inputs (prompt-tower outputs) and the head outputs (GCN + projection, before the
per-class residual).

``BudgetedCAPNET`` is CAPNET with this branch: ``model.kind=capnet`` builds it when the
``model.text_budget`` section resolves to a budget below the class count (never below 100
classes by default), so the exact model and the training loop carry no budget code.

One step (``BudgetedCAPNET.step_class_embeddings``):
  fresh = prompts(rows)                              (text tower on len(rows) sequences, with grad)
  P     = bank.prompt with rows <- fresh             (neighbours' GCN inputs from the bank, detached)
  H_s   = head(P)[rows] + owed gradient              (GCN on the receptive field of rows only, gcn.py)
  H     = bank.head (a leaf) with rows <- H_s        (every class; see "deferred gradient")
  W     = normalize(normalize(H) + R)                (the class residual R: every row, exact gradient)
  bank.prompt[rows], bank.head[rows] <- fresh, H_s   (the bank is refreshed as we go)

Deferred gradient: the loss's gradient with respect to the bank rows of classes outside the
subset is not dropped: it is summed per class (``TextBank.pending``) and added to the gradient
of that class's head output the next time the class is in a subset, so it reaches the class's
prompt then (backpropagated through the text tower once, for all the steps it waited). With
class-specific prompts a row's prompt does not change between its visits (the model's
``around_optimizer_step`` keeps rows outside the subset, ``lazy_rows.KeepRows``), so the text tower's part of that
accumulated gradient is exact. The per-class residual is cheap (C x D) and always gets its
exact gradient.

The bank is filled by one no-grad pass over all classes (in chunks) at every epoch's start, and
again every ``refresh_every`` steps when asked. With rows = all classes this is the exact branch.
"""
from __future__ import annotations

import contextlib
from typing import Any, ContextManager, Dict, Optional

import torch
from torch import nn

from capnet.errors import CapnetError
from capnet.models.capnet import CAPNET
from capnet.models.heads import StepInputs
from capnet.models.lazy_rows import KeepRows


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


class _AddGrad(torch.autograd.Function):
    """Identity forward; backward adds a fixed tensor (a class's deferred gradient) to the gradient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, extra: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(extra)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        (extra,) = ctx.saved_tensors
        return grad + extra.to(grad.dtype), None


class TextBank(nn.Module):
    """Per-class rows of the text branch, for the classes a budgeted step does not run.

    ``prompt``: (C, text_dim) prompt-tower outputs (the GCN's inputs), None without prompts;
    ``head``: (C, D) head outputs (GCN, projection; before the class residual); ``pending``:
    (C, D) the gradient owed to each class's head output since it last ran (module docstring).
    ``prompt`` and ``head`` are recomputed from the parameters at every full refresh; ``pending``
    is not, so a resumed run needs it (``BudgetedCAPNET.resume_state``). None of them is in the weights.
    """

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("prompt", None, persistent=False)
        self.register_buffer("head", None, persistent=False)
        self.register_buffer("pending", None, persistent=False)
        self.steps = 0  # budgeted steps since the last full refresh

    @property
    def ready(self) -> bool:
        """Whether the bank holds a row for every class."""
        return self.head is not None

    def fill(self, prompt: Optional[torch.Tensor], head: torch.Tensor) -> None:
        """Replace every row (a full refresh); the owed gradient is kept."""
        self.prompt = None if prompt is None else prompt.detach().float().clone()
        self.head = head.detach().float().clone()
        if self.pending is None or self.pending.shape != self.head.shape:
            self.pending = torch.zeros_like(self.head)
        self.steps = 0

    @torch.no_grad()
    def update(self, rows: torch.Tensor, prompt: Optional[torch.Tensor], head: torch.Tensor) -> None:
        """Overwrite the rows of the classes just computed."""
        if self.prompt is not None and prompt is not None:
            self.prompt.index_copy_(0, rows, prompt.detach().to(self.prompt.dtype))
        self.head.index_copy_(0, rows, head.detach().to(self.head.dtype))
        self.steps += 1

    def settle(self, rows: torch.Tensor, head: torch.Tensor) -> torch.Tensor:
        """``head`` (the fresh rows' outputs) whose backward also carries the rows' owed gradient,
        which is then cleared."""
        if self.pending is None or not head.requires_grad:
            return head
        owed = self.pending.index_select(0, rows)
        self.pending.index_fill_(0, rows, 0.0)
        return _AddGrad.apply(head, owed)

    def leaf(self) -> torch.Tensor:
        """The bank's head rows as a fresh leaf whose gradient is owed to its classes (``pending``)."""
        leaf = self.head.detach().requires_grad_(torch.is_grad_enabled())
        if leaf.requires_grad:
            leaf.register_hook(self._owe)
        return leaf

    @torch.no_grad()
    def _owe(self, grad: torch.Tensor) -> None:
        # A non-finite gradient (a skipped fp16 step) is not carried into later steps; chosen on
        # the device, without a host sync per step.
        if self.pending is not None:
            grad = grad.to(self.pending.dtype)
            self.pending.add_(torch.where(torch.isfinite(grad).all(), grad, torch.zeros_like(grad)))


class BudgetedCAPNET(CAPNET):
    """CAPNET whose training steps run ``budget`` classes through the text tower (module docstring).

    Evaluation, export and every saved tensor are the exact model's: only training steps differ.
    """

    def __init__(self, *args, budget: int, hard_fraction: float = 0.5, refresh_every: int = 0,
                 defer: bool = True, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if budget < 1:
            raise CapnetError(f"CAPNET: text budget ({budget}) must be >= 1")
        self.text_budget = int(budget)
        self.text_hard_fraction, self.text_refresh_every = float(hard_fraction), int(refresh_every)
        self.text_defer = bool(defer)
        self.text_bank = TextBank()
        self._generator: Optional[torch.Generator] = None
        self._step_rows: Optional[torch.Tensor] = None

    def start_epoch(self, seed: int) -> None:
        """A full bank and a fresh class-sampling generator: a resumed run starts each epoch from
        the same bank and draws as an uninterrupted one."""
        self._generator = torch.Generator().manual_seed(seed)
        self.refresh_text_bank()

    def refresh_text_bank(self) -> None:
        """Recompute every bank row without grad (text tower in chunks of ``text_chunk`` classes)."""
        with torch.no_grad():
            prompt = None if self.prompt_learner is None else self.text.all_prompts()
            self.text_bank.fill(prompt, self.text.embed_head(prompt))

    def step_class_embeddings(self, step: StepInputs) -> torch.Tensor:
        """Budgeted: ``text_budget`` classes chosen from the step's positives, the last step's
        scores (their max ranks the negatives) and the epoch's generator (random fill); every
        other row from the bank. Eval mode or no grad: the exact ``class_embeddings()``."""
        if not self.training or not torch.is_grad_enabled():
            return self.class_embeddings()
        positives = step.positives().reshape(-1, self.num_classes).gt(0).any(0)
        hardness = step.hardness()
        hardness = None if hardness is None else hardness.reshape(-1, self.num_classes).amax(0)
        rows = select_classes(positives, hardness, self.text_budget, self.text_hard_fraction, self._generator)
        return self.budgeted_embeddings(rows)

    def budgeted_embeddings(self, rows: torch.Tensor) -> torch.Tensor:
        """Every class's embedding: ``rows`` recomputed with grad, the rest from the bank."""
        bank = self.text_bank
        if not bank.ready or (self.text_refresh_every and bank.steps >= self.text_refresh_every):
            self.refresh_text_bank()
        rows = torch.unique(rows.long()).to(bank.head.device)
        fresh_prompt = None if self.prompt_learner is None else self.prompt_learner(rows).float()
        prompt = None if fresh_prompt is None else bank.prompt.index_copy(0, rows, fresh_prompt)
        fresh = self.text.embed_head(prompt, rows).float()
        bank.update(rows, fresh_prompt, fresh)
        self._step_rows = rows
        if self.text_defer:
            head = bank.leaf().index_copy(0, rows, bank.settle(rows, fresh))
        else:  # the ablation: the gradient of classes outside the subset is dropped
            head = bank.head.index_copy(0, rows, fresh)
        return self.text.with_residual(head)

    def around_optimizer_step(self, optimizer: torch.optim.Optimizer) -> ContextManager[Any]:
        """Step only the last budgeted step's rows of the per-class parameters only they train.

        Every other row of these parameters (and its optimiser moments) stays as it was: with
        Adam-style moments and decoupled weight decay, a row outside the subset would otherwise
        keep moving without a gradient (``lazy_rows.KeepRows``), and its owed gradient would no
        longer match its prompt. The class residual gets its gradient on every row, every step,
        so it is not among them.
        """
        if self._step_rows is None or self.prompt_learner is None:
            return contextlib.nullcontext()
        ctx = self.prompt_learner.ctx
        if not (isinstance(ctx, nn.Parameter) and ctx.requires_grad and ctx.dim() >= 1
                and ctx.shape[0] == self.num_classes):
            return contextlib.nullcontext()
        return KeepRows(self._step_rows, [ctx], optimizer)

    def resume_state(self) -> Dict[str, torch.Tensor]:
        """The owed gradient (the bank's rows are recomputed at the next epoch's start)."""
        pending = self.text_bank.pending
        return {} if pending is None else {"text_bank.pending": pending.detach().cpu()}

    def load_resume_state(self, state: Dict[str, torch.Tensor]) -> None:
        """Restore what ``resume_state`` returned."""
        if "text_bank.pending" in state:
            self.text_bank.pending = state["text_bank.pending"].float().to(self.log_logit_scale.device)
