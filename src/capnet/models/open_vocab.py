"""Open-vocabulary classes: score class names a model was never trained on (docs/open_vocab.md).

``extend_classes(model, old_names, new_names)`` returns a model over ``old + new`` classes. A new
class's embedding comes from the same text path the trained classes used, minus what labels taught:

* text input: with **shared** prompts, the learned context in front of the new name (CoOp's
  transfer to unseen classes); with **class-specific** prompts (no context belongs to a new name)
  or **no prompts**, the template ensemble of the name. Template rows are rescaled to the mean
  norm of the trained prompt rows, as ``CAPNET.class_embeddings`` rescales them when ensembling;
  with text-side template ensembling on, a new class also gets the template half of the average.
* label graph: the enlarged graph (``graph``: e.g. the text graph rebuilt over old + new names,
  no labels needed; default: new classes are isolated nodes), then the trained GCN and text
  projection over all rows; only the new rows are taken.
* class residual: none (zero), so a new class keeps the text prior.
* the image branch (feature mean, image projection, logit scale) is the trained one.

Old classes keep their trained embeddings exactly (``keep_old=True``, the default), so their
scores do not move. ``keep_old=False`` instead re-runs the GCN for old rows on the enlarged graph
(their residual kept): new rows then mix into old ones and old scores move; the measurement that
chose the default is in docs/open_vocab.md. Both need towers whose text outputs are image-space
classifiers (CLIP, or an offline tower with its ImageNet text bridge): a learned ``text_proj``
of unaligned towers was fitted to the trained names only, so a new name has no meaning there.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from capnet.errors import CapnetError
from capnet.models.backbones.base import is_aligned
from capnet.models.capnet import CAPNET
from capnet.models.heads import ClassifierBase, ZeroShot
from capnet.models.label_graph import GraphInputs, text_graph
from capnet.models.prompts import PromptLearner
from capnet.models.templates import DEFAULT_TEMPLATE, class_text
from capnet.models.zeroshot import template_embeddings

GraphFn = Callable[[torch.Tensor], torch.Tensor]  # (C, D) unit class-name embeddings -> (C, C) adjacency


def check_new_names(old_names: Sequence[str], new_names: Sequence[str]) -> List[str]:
    """Stripped new names; empty, repeated or already-known ones (compared as the text the encoder
    reads, case-insensitively: "potted plant" is "pottedplant") are one-line errors."""
    names = [str(n).strip() for n in new_names]
    if not names:
        raise CapnetError("add classes: no class names given")
    if any(not n for n in names):
        raise CapnetError(f"add classes: empty class name in {list(new_names)!r}")
    key = lambda n: class_text(n).lower()  # noqa: E731
    known = {key(n): n for n in old_names}
    seen: Dict[str, str] = {}
    for n in names:
        if key(n) in known:
            raise CapnetError(f"add classes: {n!r} is already a trained class ({known[key(n)]!r})")
        if key(n) in seen:
            raise CapnetError(f"add classes: {n!r} is given twice (as {seen[key(n)]!r} and {n!r})")
        seen[key(n)] = n
    return names


def text_graph_fn(topk: Optional[int], threshold: Optional[float], p: float, norm: str = "symmetric") -> GraphFn:
    """The ``text`` label graph (label_graph.text_graph) with these settings, as a GraphFn."""
    return lambda emb: text_graph(GraphInputs(emb.shape[0], lambda: emb), topk, threshold, p, 0.0, norm=norm)


class OpenVocabModel(ClassifierBase):
    """A trained model's image branch with fixed class embeddings over old + added classes."""

    def __init__(self, base: ClassifierBase, class_embeddings: torch.Tensor, added: Sequence[str]) -> None:
        nn.Module.__init__(self)  # not ClassifierBase.__init__: the base already froze its backbone
        self.base = base
        self.added = list(added)
        self.num_classes = int(class_embeddings.shape[0])
        self.register_buffer("fixed_class_embeddings", class_embeddings.detach().float())

    @property
    def backbone(self):  # the base's (frozen) towers: the engine reads model.backbone
        return self.base.backbone

    @property
    def peft(self):
        return self.base.peft

    def class_embeddings(self) -> torch.Tensor:
        """(C_old + C_new, D) unit-norm classifiers (computed once by ``extend_classes``)."""
        return self.fixed_class_embeddings

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        return self.base.image_features(images)

    def logits_from_image_features(self, image_features: torch.Tensor, class_embeddings: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The base's logits (centring, projection, scale) against the extended classifiers."""
        emb = self.fixed_class_embeddings if class_embeddings is None else class_embeddings
        return self.base.logits_from_image_features(image_features, emb)

    def cached_depth(self) -> int:
        return self.base.cached_depth()

    def param_groups(self) -> Dict[str, List[nn.Parameter]]:
        """Nothing is trained after extension."""
        return {}

    def trainable_state_dict(self) -> Dict[str, torch.Tensor]:
        return {}


def _require_bridge(model: ClassifierBase) -> None:
    backbone = model.backbone
    if not is_aligned(backbone) or (isinstance(model, CAPNET) and model.text.proj is not None):
        raise CapnetError(
            f"{backbone.spec.name}: cannot add classes: its image and text towers are not aligned and it has no "
            f"text bridge (the learned text projection only knows the trained class names); use a CLIP backbone "
            f"or an efficientnet_lite*_minilm.offline backbone with text_bridge: true")


def _shared_prompt_rows(model: CAPNET, names: List[str]) -> torch.Tensor:
    """(N, text_dim) text-tower outputs of "<learned shared context> <name>." for new names."""
    learned = model.prompt_learner
    fresh = PromptLearner(learned.backbone, names, learned.n_ctx, class_specific=False, init=None)
    fresh.to(learned.ctx.device).eval()
    with torch.no_grad():
        fresh.ctx.copy_(learned.ctx)
    return fresh().float()


@torch.no_grad()
def _capnet_rows(model: CAPNET, old_names: List[str], new_names: List[str], templates: Sequence[str],
                 graph: Optional[GraphFn], keep_old: bool) -> torch.Tensor:
    """(C_old + C_new, D) class embeddings of an extended CAPNET (module docstring)."""
    backbone = model.backbone
    c_old = len(old_names)
    new_templ = template_embeddings(backbone, new_names, list(templates)).float()
    if model.prompt_learner is None:
        prompt_rows, templ_rows = torch.cat([model.template_embeddings.float(), new_templ]), None
    else:
        old_prompt = model.prompt_learner().float()
        if model.prompt_learner.class_specific:
            new_prompt = new_templ * old_prompt.norm(dim=-1).mean()
        else:
            new_prompt = _shared_prompt_rows(model, new_names)
        prompt_rows = torch.cat([old_prompt, new_prompt])
        templ_rows = None
        if model.ensemble_templates:
            templ = torch.cat([model.template_embeddings.float(), new_templ])
            templ_rows = F.normalize(templ, dim=-1) * prompt_rows.norm(dim=-1, keepdim=True)
    adjacency = None
    if model.gcn is not None:
        n = c_old + len(new_names)
        if graph is None:  # new classes as isolated nodes: the trained graph, plus self-loops
            adjacency = torch.eye(n)
            adjacency[:c_old, :c_old] = model.adjacency.cpu().to_dense()
        else:
            adjacency = graph(template_embeddings(backbone, old_names + new_names, list(templates)).float().cpu())
    out = model.text.head(prompt_rows, adjacency)
    if templ_rows is not None:
        out = (out + model.text.head(templ_rows, adjacency)) / 2
    new = F.normalize(out[c_old:], dim=-1)  # no class residual: the text prior
    if keep_old:
        old = model.class_embeddings()
    else:
        old = F.normalize(out[:c_old], dim=-1)
        if model.class_residual is not None:
            old = F.normalize(old + model.class_residual.float(), dim=-1)
    return torch.cat([old.float(), new.to(old.device)])


def extend_classes(model: ClassifierBase, old_names: Sequence[str], new_names: Sequence[str], *,
                   templates: Sequence[str] = (DEFAULT_TEMPLATE,), graph: Optional[GraphFn] = None,
                   keep_old: bool = True) -> OpenVocabModel:
    """A model over ``old_names + new_names`` (in that order); the module docstring says how.

    ``model``: a trained CAPNET or ZeroShot over ``old_names`` (put it in eval mode and set its
    ``ensemble_templates`` first: the text pass runs once, here). ``templates``: the run's
    ``model.templates``. ``graph``: builds the enlarged label graph from class-name embeddings
    (``text_graph_fn``; None: new classes are isolated nodes). Old scores are unchanged when
    ``keep_old`` (or when the model has no GCN). Raises CapnetError for empty, repeated or known
    names and for towers with no text-to-image bridge.
    """
    old_names = list(old_names)
    new_names = check_new_names(old_names, new_names)
    if isinstance(model, OpenVocabModel):
        raise CapnetError("add classes: this model was already extended; extend the trained model once with all names")
    if not isinstance(model, (CAPNET, ZeroShot)):
        raise CapnetError(f"add classes: a {type(model).__name__} has no text branch to embed new class names")
    if model.class_embeddings().shape[0] != len(old_names):
        raise CapnetError(f"add classes: the model has {model.class_embeddings().shape[0]} classes, "
                          f"old_names lists {len(old_names)}")
    _require_bridge(model)
    was_training = model.training
    model.eval()
    try:
        if isinstance(model, ZeroShot):
            with torch.no_grad():
                new = template_embeddings(model.backbone, new_names, list(templates)).float()
                emb = torch.cat([model.text_features.float(), new.to(model.text_features.device)])
        else:
            emb = _capnet_rows(model, old_names, new_names, templates, graph, keep_old)
    finally:
        model.train(was_training)
    return OpenVocabModel(model, emb, new_names)
