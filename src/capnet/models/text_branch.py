"""CAPNET's text branch: prompts (or fixed templates) -> residual GCN -> projection -> class residual.

    E_prompt = PromptLearner()                       (or fixed template-ensemble embeddings)
    E        = E_prompt + residual * GCN(A, E_prompt)   (Sec. 3.3; zero-init => E = E_prompt)
    W        = normalize(proj(E))                     (proj only for unaligned towers)
    W        = normalize(W + g * R)                   (optional per-class residual R, zero-init;
                                                      g the optional per-class gate)

The residual R is LIFT's "classifier initialised from text, then fine-tuned": the branch gives
every class a prior classifier (zero-shot on aligned towers), R moves it where the labels ask,
and weight decay on R pulls it back toward the prior (strongest where labels are fewest).

Template ensembling (``ensemble_templates``, config ``tte.templates``) with prompts on: the class
embeddings are the mean of the unit-norm learned-prompt embeddings and the unit-norm
template-ensemble embeddings, both through the same GCN and projection (template rows rescaled to
the prompt rows' norms so the head sees one scale). The logits being linear in the class
embeddings, this equals the mean of the two classifiers' logits (logit-space averaging, as for
the image views in tte.py).

The output is cached in eval mode without grad, keyed on the versions of every tensor it reads,
so one evaluation runs the text tower once. Without grad the text tower runs in chunks of
``text_chunk`` classes (bounded memory at thousands of classes).
"""
from __future__ import annotations

from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from capnet.errors import CapnetError
from capnet.models.gcn import GCN
from capnet.models.prompts import EvalCache, PromptLearner


class TextBranch(nn.Module):
    """(C, D) unit-norm class embeddings from prompts or templates, the label graph and a GCN."""

    def __init__(self, num_classes: int, width: int, prompt_learner: Optional[PromptLearner] = None,
                 template_embeddings: Optional[torch.Tensor] = None, adjacency: Optional[torch.Tensor] = None,
                 gcn: Optional[GCN] = None, gcn_residual: float = 1.0, proj: Optional[nn.Module] = None,
                 class_residual: bool = False, residual_gate: Optional[torch.Tensor] = None,
                 ensemble_templates: bool = False, text_chunk: int = 1024) -> None:
        super().__init__()
        if prompt_learner is None and template_embeddings is None:
            raise CapnetError("CAPNET needs a PromptLearner or fixed template embeddings for its text branch")
        if gcn is not None and adjacency is None:
            raise CapnetError("CAPNET: a GCN needs an adjacency matrix (model.graph.source)")
        if ensemble_templates and template_embeddings is None:
            raise CapnetError("CAPNET: template ensembling needs the template embeddings")
        for name, t in (("template embeddings", template_embeddings), ("adjacency", adjacency)):
            if t is not None and t.shape[0] != num_classes:
                raise CapnetError(f"CAPNET: {name} have {t.shape[0]} rows for {num_classes} classes")
        if residual_gate is not None and (not class_residual or residual_gate.shape != (num_classes,)):
            raise CapnetError(f"CAPNET: a residual gate needs model.class_residual and one value per class ({num_classes})")
        if text_chunk < 1:
            raise CapnetError(f"CAPNET: text_chunk ({text_chunk}) must be >= 1")
        self.num_classes, self.text_chunk = num_classes, text_chunk
        self.prompt_learner = prompt_learner
        self.gcn = gcn
        self.gcn_residual = float(gcn_residual)
        self.register_buffer("template_embeddings", None if template_embeddings is None else template_embeddings.detach().float(), persistent=False)
        self.register_buffer("adjacency", None if adjacency is None else adjacency.detach().float(), persistent=False)
        self.proj = proj
        self.class_residual = nn.Parameter(torch.zeros(num_classes, width)) if class_residual else None
        # (C,) scale of each class's residual (model.residual_gate); saved with the run (CAPNET.run_state)
        self.register_buffer("residual_gate", None if residual_gate is None else residual_gate.detach().float())
        self._ensemble_templates = bool(ensemble_templates)
        self._cache = EvalCache()

    @property
    def ensemble_templates(self) -> bool:
        """Average learned-prompt and template-ensemble classifiers (test-time, text side)."""
        return self._ensemble_templates

    @ensemble_templates.setter
    def ensemble_templates(self, value: bool) -> None:
        if value and self.template_embeddings is None:
            raise CapnetError("CAPNET: template ensembling needs the template embeddings (build with tte.templates=true)")
        if bool(value) != self._ensemble_templates:
            self._ensemble_templates = bool(value)
            self._cache.clear()

    def set_adjacency(self, adjacency: torch.Tensor) -> None:
        """Replace the label graph (a saved run's, dense or sparse)."""
        self.adjacency = adjacency
        self._cache.clear()

    def head(self, emb: torch.Tensor, adjacency: Optional[torch.Tensor] = None,
             rows: Optional[torch.Tensor] = None) -> torch.Tensor:
        """GCN refinement (residual) then projection then L2 normalisation.

        ``adjacency`` replaces the trained label graph (open-vocabulary rows, ``open_vocab.py``);
        ``rows``: the output of those classes only, from the GCN on their receptive field.
        """
        emb = emb.float()
        base = emb if rows is None else emb[rows]
        if self.gcn is not None:
            adj = self.adjacency if adjacency is None else adjacency
            emb = base + self.gcn_residual * self.gcn(adj.to(emb.device), emb, rows=rows)
        else:
            emb = base
        if self.proj is not None:
            emb = self.proj(emb)
        return F.normalize(emb, dim=-1)

    def tensors(self) -> List[torch.Tensor]:
        """Everything the branch depends on (the eval cache key)."""
        mods = [m for m in (self.prompt_learner, self.gcn, self.proj) if m is not None]
        bufs = [b for b in (self.template_embeddings, self.adjacency, self.class_residual, self.residual_gate) if b is not None]
        return [p for m in mods for p in m.parameters()] + bufs

    def all_prompts(self) -> torch.Tensor:
        """(C, text_dim) prompt-tower outputs; without grad in chunks of ``text_chunk`` classes (bounded memory)."""
        if torch.is_grad_enabled() or self.num_classes <= self.text_chunk:
            return self.prompt_learner().float()
        idx = torch.arange(self.num_classes, device=self.prompt_learner.tokens.device)
        return torch.cat([self.prompt_learner(chunk).float() for chunk in idx.split(self.text_chunk)])

    def embed(self, prompt: Optional[torch.Tensor], rows: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Class embeddings from (C, text_dim) prompt rows (None: the fixed templates), for ``rows`` or all."""
        return self.with_residual(self.embed_head(prompt, rows), rows)

    def embed_head(self, prompt: Optional[torch.Tensor], rows: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The head's output (GCN, projection, template ensembling), before the class residual."""
        if prompt is None:
            return self.head(self.template_embeddings, rows=rows)
        out = self.head(prompt, rows=rows)
        if self.ensemble_templates:
            # Template rows rescaled to the prompt rows' norms: the head sees one scale.
            templ = F.normalize(self.template_embeddings, dim=-1) * prompt.norm(dim=-1, keepdim=True)
            out = (out + self.head(templ, rows=rows)) / 2
        return out

    def with_residual(self, out: torch.Tensor, rows: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Add the per-class residual (LIFT) to head outputs of ``rows`` (or all classes)."""
        if self.class_residual is None:
            return out
        residual = self.class_residual if rows is None else self.class_residual[rows]
        if self.residual_gate is not None:
            gate = self.residual_gate if rows is None else self.residual_gate[rows]
            residual = residual * gate.unsqueeze(-1)
        return F.normalize(F.normalize(out, dim=-1) + residual.float(), dim=-1)

    def forward(self) -> torch.Tensor:
        """(C, D) class embeddings, unit-norm (a mean of two unit-norm rows when ensembling); cached
        in eval mode without grad."""
        key = self.tensors()
        cached = self._cache.get(self.training, key)
        if cached is not None:
            return cached
        out = self.embed(None if self.prompt_learner is None else self.all_prompts())
        return self._cache.put(self.training, key, out)
