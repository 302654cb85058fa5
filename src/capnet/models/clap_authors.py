"""CLAP's head as its authors build it: a cosine classifier over free prototypes (model kind ``clap_authors``).

Silva-Rodriguez et al. (CVPR 2024), code jusiro/CLAP@dbdf4095b3d824546474c725539b9f4efff3ca0e:

* ``trainers/adapters.py:91-128`` (``_get_base_text_features``): the class anchor is the mean over
  the prompt templates of the *raw* (not normalised) text embeddings;
* ``trainers/adapters.py:148-150``: the prototypes start as a copy of that raw mean;
* ``trainers/adapters.py:343-352`` (``forward_lp``): image features *and prototypes* are
  L2-normalised in the forward pass, times CLIP's own ``logit_scale.exp()``; no bias.

capnet's ``clap`` kind (``models.heads.ZeroShotLinearProbe``) instead starts at the unit zero-shot
embedding, leaves ``w`` unnormalised (its norm a per-class temperature) and adds a prior-matching
bias. This head keeps the authors' forward; the fit is ``capnet.evaluation.clap_authors``.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from capnet.config import ModelConfig
from capnet.models.backbones.base import Backbone
from capnet.models.build import MODEL_KINDS
from capnet.models.heads import ZeroShotLinearProbe, backbone_logit_scale
from capnet.models.templates import fill


@torch.no_grad()
def raw_template_mean(backbone: Backbone, class_names: Sequence[str], templates: Sequence[str]) -> torch.Tensor:
    """(C, D) mean over ``templates`` of the unnormalised text embeddings (adapters.py:119-127)."""
    if not class_names or not templates:
        raise ValueError("raw_template_mean needs at least one class name and one template")
    texts = [fill(t, name) for name in class_names for t in templates]
    emb = torch.cat([backbone.encode_text(texts[i:i + 256]) for i in range(0, len(texts), 256)]).float()
    return emb.view(len(class_names), len(templates), -1).mean(dim=1)


class CosinePrototypeProbe(ZeroShotLinearProbe):
    """``logits = s * <f/|f|, p_c/|p_c|>``: CLAP's linear probe; ``anchor`` is the raw template mean.

    The bias inherited from the probe stays zero (the authors' head has none); it is kept so the
    run file and the serving path are those of the other probes.
    """

    def __init__(self, backbone: Backbone, anchor: torch.Tensor, logit_scale: float) -> None:
        super().__init__(backbone, anchor, logit_scale)
        self.register_buffer("anchor", anchor.detach().float().clone())
        with torch.no_grad():
            self.weight.copy_(self.anchor)  # adapters.py:150: prototypes = base_text_features.clone()

    def logits_from_image_features(self, image_features: torch.Tensor, class_embeddings: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``s * cos(f, p)`` in float32 (prototypes normalised here, as in adapters.py:349)."""
        with torch.autocast(image_features.device.type, enabled=False):
            image = F.normalize(image_features.float(), dim=-1)
            return self.fixed_logit_scale * image @ F.normalize(self.weight.float(), dim=-1).T + self.bias.float()


@MODEL_KINDS.register("clap_authors")
def build_clap_authors(m: ModelConfig, backbone: Backbone, class_names: List[str], train_labels: Optional[np.ndarray],
                       tte_templates: bool = False) -> CosinePrototypeProbe:
    """CLAP's cosine prototype head at the raw template mean, with the backbone's own logit scale."""
    backbone.requires_grad_(False)
    anchor = raw_template_mean(backbone, class_names, m.templates)
    return CosinePrototypeProbe(backbone, anchor, backbone_logit_scale(backbone, m.logit_scale))
