"""Zero-shot CLIP classification with prompt-template ensembles (Radford et al., 2021, Sec. 3.1.4).

A class embedding is the mean of its L2-normalised template embeddings, re-normalised; a logit
is the checkpoint's logit scale times the cosine between image feature and class embedding.
The same class embeddings initialise CAPNET's class prototypes and its text-side ensemble.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from capnet.models.backbones.base import Backbone
from capnet.models.templates import DEFAULT_TEMPLATE, fill


@torch.no_grad()
def template_embeddings(
    backbone: Backbone,
    class_names: Sequence[str],
    templates: Sequence[str] = (DEFAULT_TEMPLATE,),
    batch_size: int = 256,
) -> torch.Tensor:
    """(C, text_dim) unit class embeddings: the re-normalised mean over ``templates`` per class."""
    if not class_names or not templates:
        raise ValueError("template_embeddings needs at least one class name and one template")
    texts = [fill(t, name) for name in class_names for t in templates]
    chunks = [backbone.encode_text(texts[i:i + batch_size]) for i in range(0, len(texts), batch_size)]
    per_template = F.normalize(torch.cat(chunks).float(), dim=-1)
    per_template = per_template.view(len(class_names), len(templates), -1)
    return F.normalize(per_template.mean(dim=1), dim=-1)


def logit_multiplier(backbone: Backbone) -> float:
    """exp(logit_scale) of the backbone's checkpoint, capped at 100 (CLIP's clamp)."""
    scale = getattr(backbone, "logit_scale", None)
    if scale is None:
        raise ValueError(f"{type(backbone).__name__} has no logit_scale; pass logit_scale= explicitly")
    return float(torch.as_tensor(scale).exp().clamp(max=100.0))


def zeroshot_logits(
    backbone: Backbone,
    images: torch.Tensor,
    class_embeddings: torch.Tensor,
    logit_scale: Optional[float] = None,
) -> torch.Tensor:
    """(B, C) logits = scale * cos(image feature, class embedding); scale defaults to the checkpoint's."""
    if backbone.image_dim != class_embeddings.shape[-1]:
        raise ValueError(
            f"{backbone.spec.name}: image features are {backbone.image_dim}-d but class embeddings are "
            f"{class_embeddings.shape[-1]}-d; zero-shot needs aligned towers (CLIP)"
        )
    scale = logit_multiplier(backbone) if logit_scale is None else float(logit_scale)
    feats = F.normalize(backbone.encode_image(images).float(), dim=-1)
    return scale * feats @ F.normalize(class_embeddings.float(), dim=-1).t()
