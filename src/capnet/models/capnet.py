"""CAPNET: the correlation adaptation prompt network (arXiv 2511.20641, Sec. 3).

Text branch (once per call, for all C classes; cached in eval mode under no_grad; without grad
the text tower runs in chunks of ``text_chunk`` classes; ``text_bank.BudgetedCAPNET`` runs only
a subset of classes per training step and reads the rest from a bank):
    E_prompt = PromptLearner()                      (or fixed template-ensemble embeddings)
    E        = E_prompt + residual * GCN(A, E_prompt)  (Sec. 3.3; zero-init => E = E_prompt)
    W        = normalize(text_proj(E))               (text_proj only for unaligned towers)
    W        = normalize(W + R)                      (optional per-class residual R, zero-init)
Image branch: f = normalize(image_proj(backbone.encode_image(x) - mu))  (PEFT inside the tower;
             mu: the training-set mean feature when ``center_features``, else 0)
Logits:      scale * f @ W^T in float32 (also under autocast), scale = exp(log_scale) capped at
             100 with a straight-through gradient (the scale can come back down once capped).

The residual R is LIFT's "classifier initialised from text, then fine-tuned": the text branch
gives every class a prior classifier (zero-shot on aligned towers), R moves it where the
labels ask, and weight decay on R pulls it back toward the prior (strongest where labels are
fewest, since those classes' gradients are smallest).

Template ensembling (``ensemble_templates``, config ``tte.templates``) with prompts on: the
class embeddings are the mean of the unit-norm learned-prompt embeddings and the unit-norm
template-ensemble embeddings, both passed through the same GCN and projection (template rows
are first rescaled to the norms of the prompt rows so the head sees inputs of one scale). Because the
logits are linear in the class embeddings, this equals the mean of the two classifiers'
logits (the same logit-space averaging as the image views in tte.py).
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from capnet.errors import CapnetError
from capnet.models.backbones.base import Backbone
from capnet.models.gcn import GCN
from capnet.models.heads import ClassifierBase, cosine_logits
from capnet.models.prompts import EvalCache, PromptLearner

MAX_LOGIT_SCALE = 100.0  # CLIP's clamp on the learned temperature
LOG_MAX_LOGIT_SCALE = math.log(MAX_LOGIT_SCALE)  # the cap on the parameter (open_clip clamps the log)


def projection(in_dim: int, out_dim: int) -> nn.Module:
    """Map an unaligned tower into the shared space: LayerNorm then a bias-free linear map.

    The LayerNorm makes the map independent of the tower's raw feature scale (VGG activations
    are in the hundreds, MiniLM outputs are unit vectors); without a bias, a projection cannot
    collapse every image onto one direction (a large bias dominates W x after L2 normalisation,
    which we saw diverge at higher learning rates).
    """
    return nn.Sequential(nn.LayerNorm(in_dim), nn.Linear(in_dim, out_dim, bias=False))


class CAPNET(ClassifierBase):
    """Frozen backbone + soft prompts + label graph + residual GCN + (optional) PEFT and projections."""

    def __init__(
        self,
        backbone: Backbone,
        num_classes: int,
        prompt_learner: Optional[PromptLearner] = None,
        template_embeddings: Optional[torch.Tensor] = None,
        adjacency: Optional[torch.Tensor] = None,
        gcn: Optional[GCN] = None,
        gcn_residual: float = 1.0,
        peft: Optional[nn.Module] = None,
        proj_dim: Optional[int] = None,
        logit_scale: float = 20.0,
        learn_logit_scale: bool = True,
        ensemble_templates: bool = False,
        class_residual: bool = False,
        residual_gate: Optional[torch.Tensor] = None,
        center_features: bool = False,
        text_chunk: int = 1024,
    ) -> None:
        super().__init__(backbone, peft)
        if prompt_learner is None and template_embeddings is None:
            raise CapnetError("CAPNET needs a PromptLearner or fixed template embeddings for its text branch")
        if gcn is not None and adjacency is None:
            raise CapnetError("CAPNET: a GCN needs an adjacency matrix (model.graph.source)")
        if ensemble_templates and template_embeddings is None:
            raise CapnetError("CAPNET: template ensembling needs the template embeddings")
        self.num_classes = num_classes
        self.prompt_learner = prompt_learner
        self.gcn = gcn
        self.gcn_residual = float(gcn_residual)
        self.register_buffer("template_embeddings", None if template_embeddings is None else template_embeddings.detach().float(), persistent=False)
        self.register_buffer("adjacency", None if adjacency is None else adjacency.detach().float(), persistent=False)
        for name, t in (("template embeddings", template_embeddings), ("adjacency", adjacency)):
            if t is not None and t.shape[0] != num_classes:
                raise CapnetError(f"CAPNET: {name} have {t.shape[0]} rows for {num_classes} classes")
        aligned = backbone.image_dim == backbone.text_dim and backbone.spec.extra.get("aligned", True)
        if proj_dim is None and not aligned:
            raise CapnetError(f"{backbone.spec.name}: towers are not aligned, set model.proj_dim")
        self.image_proj = projection(backbone.image_dim, proj_dim) if proj_dim else None
        self.text_proj = projection(backbone.text_dim, proj_dim) if proj_dim else None
        log_scale = torch.tensor(min(math.log(logit_scale), LOG_MAX_LOGIT_SCALE))
        if learn_logit_scale:
            self.log_logit_scale = nn.Parameter(log_scale)
        else:
            self.register_buffer("log_logit_scale", log_scale)
        width = proj_dim if proj_dim else backbone.text_dim
        self.class_residual = nn.Parameter(torch.zeros(num_classes, width)) if class_residual else None
        if residual_gate is not None and (not class_residual or residual_gate.shape != (num_classes,)):
            raise CapnetError(f"CAPNET: a residual gate needs model.class_residual and one value per class ({num_classes})")
        # (C,) scale of each class's residual (model.residual_gate); saved with the run (train/checkpoint.py)
        self.register_buffer("residual_gate", None if residual_gate is None else residual_gate.detach().float())
        # Filled from the training features by the engine (``set_feature_mean``); saved with the run.
        self.register_buffer("feature_mean", torch.zeros(backbone.image_dim) if center_features else None)
        self._ensemble_templates = ensemble_templates
        self._cache = EvalCache()
        if text_chunk < 1:
            raise CapnetError(f"CAPNET: text_chunk ({text_chunk}) must be >= 1")
        self.text_chunk = text_chunk

    # ---------------------------------------------------------------- text branch
    @property
    def ensemble_templates(self) -> bool:
        """Average learned-prompt and template-ensemble classifiers (test-time, text side)."""
        return self._ensemble_templates

    @ensemble_templates.setter
    def ensemble_templates(self, value: bool) -> None:
        if value and self.template_embeddings is None:
            raise CapnetError("CAPNET: template ensembling needs the template embeddings (build with tte.templates=true)")
        self._ensemble_templates = bool(value)
        self._cache.clear()

    def logit_scale(self) -> torch.Tensor:
        """exp of the log scale, which ``clamp_parameters_`` keeps at or below log(100).

        The training loop clamps the parameter in place after every optimiser step, as open_clip
        does: a value-only cap in the forward let the parameter drift above it (with SGD momentum
        its gradient keeps pushing), and a clamp in the forward has no gradient at the cap.
        """
        return self.log_logit_scale.exp()

    def load_trainable_state_dict(self, state: Dict[str, torch.Tensor]) -> None:
        """Load as the base class does, then cap the scale (runs saved before the in-place clamp
        could hold a log scale above log(100); their forward capped its value at 100)."""
        super().load_trainable_state_dict(state)
        self.after_optimizer_step()

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        """Project the learned log logit scale back to <= log(100) (called after each optimiser step)."""
        if isinstance(self.log_logit_scale, nn.Parameter):
            self.log_logit_scale.clamp_(max=LOG_MAX_LOGIT_SCALE)

    def set_test_time(self, templates: bool) -> bool:
        """Template ensembling on (``tte.templates``, when the model has prompts and templates) or off."""
        before = self.ensemble_templates
        self.ensemble_templates = bool(templates and self.prompt_learner is not None and self.template_embeddings is not None)
        return before

    def needs_feature_mean(self) -> bool:
        """Built with ``center_features``: the engine passes the training set's mean feature."""
        return self.feature_mean is not None

    def run_state(self) -> Dict[str, torch.Tensor]:
        """The label graph (dense or sparse), the feature mean and the residual gate, when present."""
        named = {"graph.adjacency": self.adjacency, "model.feature_mean": self.feature_mean,
                 "model.residual_gate": self.residual_gate}
        return {k: v for k, v in named.items() if v is not None}

    def load_run_state(self, tensors: Dict[str, torch.Tensor]) -> None:
        """Restore ``run_state``'s tensors into the slots this model was built with."""
        if "graph.adjacency" in tensors and self.adjacency is not None:
            adj = tensors["graph.adjacency"]
            self.adjacency = adj.coalesce() if adj.is_sparse else adj.float()
            self._cache.clear()
        if "model.feature_mean" in tensors and self.feature_mean is not None:
            self.set_feature_mean(tensors["model.feature_mean"])
        if "model.residual_gate" in tensors and self.residual_gate is not None:
            with torch.no_grad():
                self.residual_gate.copy_(tensors["model.residual_gate"].to(self.residual_gate))

    def set_feature_mean(self, mean: torch.Tensor) -> None:
        """Centre image features on ``mean`` (the training set's, from the engine)."""
        if self.feature_mean is None:
            raise CapnetError("CAPNET was built without feature centring (model.center_features=false)")
        with torch.no_grad():
            self.feature_mean.copy_(mean.to(self.feature_mean))

    def _text_head(self, emb: torch.Tensor, adjacency: Optional[torch.Tensor] = None,
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
        if self.text_proj is not None:
            emb = self.text_proj(emb)
        return F.normalize(emb, dim=-1)

    def _text_tensors(self) -> List[torch.Tensor]:
        """Everything the text branch depends on (the eval cache key)."""
        mods = [m for m in (self.prompt_learner, self.gcn, self.text_proj) if m is not None]
        bufs = [b for b in (self.template_embeddings, self.adjacency, self.class_residual, self.residual_gate) if b is not None]
        return [p for m in mods for p in m.parameters()] + bufs

    def _all_prompts(self) -> torch.Tensor:
        """(C, text_dim) prompt-tower outputs; without grad in chunks of ``text_chunk`` classes (bounded memory)."""
        if torch.is_grad_enabled() or self.num_classes <= self.text_chunk:
            return self.prompt_learner().float()
        idx = torch.arange(self.num_classes, device=self.prompt_learner.tokens.device)
        return torch.cat([self.prompt_learner(chunk).float() for chunk in idx.split(self.text_chunk)])

    def _embed(self, prompt: Optional[torch.Tensor], rows: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Class embeddings from (C, text_dim) prompt rows (None: the fixed templates), for ``rows`` or all."""
        return self._with_residual(self._embed_head(prompt, rows), rows)

    def _embed_head(self, prompt: Optional[torch.Tensor], rows: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The text head's output (GCN, projection, template ensembling), before the class residual."""
        if prompt is None:
            return self._text_head(self.template_embeddings, rows=rows)
        out = self._text_head(prompt, rows=rows)
        if self.ensemble_templates:
            # Template rows rescaled to the prompt rows' norms: the head sees one scale.
            templ = F.normalize(self.template_embeddings, dim=-1) * prompt.norm(dim=-1, keepdim=True)
            out = (out + self._text_head(templ, rows=rows)) / 2
        return out

    def _with_residual(self, out: torch.Tensor, rows: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Add the per-class residual (LIFT) to head outputs of ``rows`` (or all classes)."""
        if self.class_residual is None:
            return out
        residual = self.class_residual if rows is None else self.class_residual[rows]
        if self.residual_gate is not None:
            gate = self.residual_gate if rows is None else self.residual_gate[rows]
            residual = residual * gate.unsqueeze(-1)
        return F.normalize(F.normalize(out, dim=-1) + residual.float(), dim=-1)

    def class_embeddings(self) -> torch.Tensor:
        """(C, D) class embeddings, unit-norm (a mean of two unit-norm rows when ensembling).

        Cached in eval mode without grad, keyed on the versions of every tensor the text branch
        reads: an evaluation runs the text tower once, however many batches or ``eval()`` calls.
        """
        key = self._text_tensors()
        cached = self._cache.get(self.training, key)
        if cached is not None:
            return cached
        out = self._embed(None if self.prompt_learner is None else self._all_prompts())
        return self._cache.put(self.training, key, out)

    # --------------------------------------------------------------------- logits
    def logits_from_image_features(self, image_features: torch.Tensor, class_embeddings: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(B, image_dim) final image features -> (B, C) scaled cosine logits."""
        with torch.autocast(image_features.device.type, enabled=False):  # rank on float32 logits
            emb = self.class_embeddings() if class_embeddings is None else class_embeddings
            feats = image_features.float()
            if self.feature_mean is not None:
                feats = feats - self.feature_mean
            if self.image_proj is not None:
                feats = self.image_proj(feats)
            return cosine_logits(feats, emb.float(), self.logit_scale())

    def text_parameter_names(self) -> List[str]:
        """Prompts, GCN, text projection and class residual: everything ``class_embeddings`` trains."""
        text = {id(p) for p in self._text_tensors()}
        return [n for n, p in self.named_parameters() if p.requires_grad and id(p) in text]

    def param_groups(self) -> Dict[str, List[nn.Parameter]]:
        """prompts / gcn / peft / head (projections + logit scale); only trainable tensors."""
        head = [p for m in (self.image_proj, self.text_proj) if m is not None for p in m.parameters()]
        if isinstance(self.log_logit_scale, nn.Parameter):
            head.append(self.log_logit_scale)
        if self.class_residual is not None:
            head.append(self.class_residual)
        groups = {
            "prompts": list(self.prompt_learner.parameters()) if self.prompt_learner is not None else [],
            "gcn": list(self.gcn.parameters()) if self.gcn is not None else [],
            "peft": list(self.peft.trainable_parameters()) if self.peft is not None else [],
            "head": head,
        }
        return self._checked_groups(groups)
