"""CAPNET: the correlation adaptation prompt network (arXiv 2511.20641, Sec. 3).

Text branch (``text_branch.TextBranch``): prompts or fixed templates -> residual GCN over the
label graph -> projection -> per-class residual, giving (C, D) unit-norm class embeddings.
``text_bank.BudgetedCAPNET`` runs only a subset of classes per training step (large C).
Image branch: f = normalize(image_proj(backbone.encode_image(x) - mu))  (PEFT inside the tower;
             mu: the training-set mean feature when ``center_features``, else 0)
Logits:      scale * f @ W^T in float32 (also under autocast), scale = exp(log_scale) with the
             log scale clamped in place at log(100) after every optimiser step (CLIP's cap).
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional

import torch
from torch import nn

from capnet.errors import CapnetError
from capnet.models.backbones.base import Backbone, is_aligned
from capnet.models.gcn import GCN
from capnet.models.heads import ClassifierBase, cosine_logits
from capnet.models.prompts import PromptLearner
from capnet.models.text_branch import TextBranch

MAX_LOGIT_SCALE = 100.0  # CLIP's clamp on the learned temperature
LOG_MAX_LOGIT_SCALE = math.log(MAX_LOGIT_SCALE)  # the cap on the parameter (open_clip clamps the log)
# Trainable tensors of runs saved before the text branch was its own module, by their new name.
_LEGACY_PREFIXES = (("prompt_learner.", "text.prompt_learner."), ("gcn.", "text.gcn."), ("text_proj.", "text.proj."))


def _text_part(name: str, doc: str) -> property:
    """A read-only view of ``self.text.<name>`` (open_vocab, export and tests read the parts by these names)."""
    return property(lambda self: getattr(self.text, name), doc=doc)


def projection(in_dim: int, out_dim: int) -> nn.Module:
    """Map an unaligned tower into the shared space: LayerNorm then a bias-free linear map.

    The LayerNorm makes the map independent of the tower's raw feature scale (VGG activations
    are in the hundreds, MiniLM outputs are unit vectors); without a bias, a projection cannot
    collapse every image onto one direction (a large bias dominates W x after L2 normalisation,
    which we saw diverge at higher learning rates).
    """
    return nn.Sequential(nn.LayerNorm(in_dim), nn.Linear(in_dim, out_dim, bias=False))


class CAPNET(ClassifierBase):
    """Frozen backbone + text branch (prompts, label graph, residual GCN) + (optional) PEFT and projections."""

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
        self.num_classes = num_classes
        # image_proj before the text side's projection: the order their initial weights are drawn in
        self.image_proj = projection(backbone.image_dim, proj_dim) if proj_dim else None
        self.text = TextBranch(num_classes, proj_dim if proj_dim else backbone.text_dim, prompt_learner=prompt_learner,
                               template_embeddings=template_embeddings, adjacency=adjacency, gcn=gcn,
                               gcn_residual=gcn_residual, proj=projection(backbone.text_dim, proj_dim) if proj_dim else None,
                               class_residual=class_residual, residual_gate=residual_gate,
                               ensemble_templates=ensemble_templates, text_chunk=text_chunk)
        if proj_dim is None and not is_aligned(backbone):
            raise CapnetError(f"{backbone.spec.name}: towers are not aligned, set model.proj_dim")
        log_scale = torch.tensor(min(math.log(logit_scale), LOG_MAX_LOGIT_SCALE))
        if learn_logit_scale:
            self.log_logit_scale = nn.Parameter(log_scale)
        else:
            self.register_buffer("log_logit_scale", log_scale)
        # Filled from the training features by the engine (``set_feature_mean``); saved with the run.
        self.register_buffer("feature_mean", torch.zeros(backbone.image_dim) if center_features else None)

    # ------------------------------------------------- the text branch's parts, by their old names
    prompt_learner = _text_part("prompt_learner", "The soft prompts (None: the fixed template classifier).")
    gcn = _text_part("gcn", "The residual GCN over the label graph (None: off).")
    template_embeddings = _text_part("template_embeddings", "(C, text_dim) template-ensemble embeddings, or None.")
    class_residual = _text_part("class_residual", "(C, D) per-class residual on the text classifier, or None.")
    residual_gate = _text_part("residual_gate", "(C,) scale of each class's residual, or None.")

    @property
    def adjacency(self) -> Optional[torch.Tensor]:
        return self.text.adjacency

    @adjacency.setter
    def adjacency(self, value: torch.Tensor) -> None:
        self.text.set_adjacency(value)

    @property
    def ensemble_templates(self) -> bool:
        """Average learned-prompt and template-ensemble classifiers (test-time, text side)."""
        return self.text.ensemble_templates

    @ensemble_templates.setter
    def ensemble_templates(self, value: bool) -> None:
        self.text.ensemble_templates = value

    def class_embeddings(self) -> torch.Tensor:
        """(C, D) unit-norm class embeddings of the text branch (cached in eval mode without grad)."""
        return self.text()

    # ------------------------------------------------------------------ the engine's hooks
    def logit_scale(self) -> torch.Tensor:
        """exp of the log scale, which ``after_optimizer_step`` keeps at or below log(100).

        The training loop clamps the parameter in place after every optimiser step, as open_clip
        does: a value-only cap in the forward let the parameter drift above it (with SGD momentum
        its gradient keeps pushing), and a clamp in the forward has no gradient at the cap.
        """
        return self.log_logit_scale.exp()

    def upgrade_state(self, state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """Rename the trainable tensors of runs saved before the text branch was ``self.text``."""
        out = {}
        for key, value in state.items():
            for old, new in _LEGACY_PREFIXES:
                if key.startswith(old):
                    key = new + key[len(old):]
            out["text.class_residual" if key == "class_residual" else key] = value
        return out

    def load_trainable_state_dict(self, state: Dict[str, torch.Tensor]) -> None:
        """Load as the base class does, then cap the scale (runs saved before the in-place clamp
        could hold a log scale above log(100); their forward capped its value at 100)."""
        super().load_trainable_state_dict(self.upgrade_state(state))
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

    def set_feature_mean(self, mean: torch.Tensor) -> None:
        """Centre image features on ``mean`` (the training set's, from the engine)."""
        if self.feature_mean is None:
            raise CapnetError("CAPNET was built without feature centring (model.center_features=false)")
        with torch.no_grad():
            self.feature_mean.copy_(mean.to(self.feature_mean))

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
        if "model.feature_mean" in tensors and self.feature_mean is not None:
            self.set_feature_mean(tensors["model.feature_mean"])
        if "model.residual_gate" in tensors and self.residual_gate is not None:
            with torch.no_grad():
                self.residual_gate.copy_(tensors["model.residual_gate"].to(self.residual_gate))

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
        """Everything the text branch trains (prompts, GCN, text projection, class residual)."""
        return [f"text.{n}" for n, p in self.text.named_parameters() if p.requires_grad]

    def param_groups(self) -> Dict[str, List[nn.Parameter]]:
        """prompts / gcn / peft / head (projections + logit scale + class residual); only trainable tensors."""
        head = [p for m in (self.image_proj, self.text.proj) if m is not None for p in m.parameters()]
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
