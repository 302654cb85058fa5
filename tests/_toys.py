"""A toy model obeying the engine's model contract, and tiny tensor data (engine tests only)."""
from __future__ import annotations

from typing import Dict, List

import numpy as np
import torch
from torch import nn
from torch.utils.data import TensorDataset
from torchvision import transforms as T

from capnet.config import config_from_dict
from capnet.models.backbones.base import BackboneSpec
from capnet.models.heads import ModelHooks

NUM_CLASSES = 4
FEAT = 12


class ToyBackbone(nn.Module):
    """Frozen 'image tower': flatten an 8x8 RGB image, one linear stage -> (B, FEAT)."""

    num_image_stages = 1

    def __init__(self) -> None:
        super().__init__()
        self.spec = BackboneSpec(name="engine.toy", image_size=8, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
        self.visual = nn.Linear(3 * 8 * 8, FEAT)
        self.visual.requires_grad_(False)

    def image_prefix(self, images: torch.Tensor, depth: int) -> torch.Tensor:
        return images if depth == 0 else torch.tanh(self.visual(images.flatten(1)))

    def transform(self, train: bool):
        ops = [T.Resize((8, 8)), T.ToTensor()]
        return T.Compose(([T.RandomHorizontalFlip()] if train else []) + ops)


class ToyModel(ModelHooks, nn.Module):
    """Frozen backbone + dropout + linear head + 'prompt' matrix and a scalar logit scale (the
    engine's hooks, ``ModelHooks``, at their no-op defaults)."""

    def __init__(self, num_classes: int = NUM_CLASSES, dropout: float = 0.2, cache_depth: int = 1) -> None:
        super().__init__()
        self.backbone = ToyBackbone()
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(FEAT, num_classes)
        self.ctx = nn.Parameter(torch.randn(num_classes, FEAT) * 0.1)
        self.logit_scale = nn.Parameter(torch.tensor(1.0))
        self.cache_depth = cache_depth
        self.calls: List[str] = []

    def backbone_identity(self) -> Dict[str, object]:
        return {"backbone": self.backbone.spec.name, "backbone_sha256": None, "backbone_weights": None}

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self.calls.append("images")
        return self._head(self.backbone.image_prefix(images, 1))

    def forward_features(self, features: torch.Tensor, depth: int) -> torch.Tensor:
        self.calls.append(f"features@{depth}")
        return self._head(self.backbone.image_prefix(features, 1) if depth == 0 else features)

    def _head(self, f: torch.Tensor) -> torch.Tensor:
        f = self.drop(f)
        return self.head(f) + self.logit_scale * f @ self.ctx.t()

    def cached_depth(self) -> int:
        return self.cache_depth

    def param_groups(self) -> Dict[str, List[nn.Parameter]]:
        return {"head": list(self.head.parameters()), "prompts": [self.ctx, self.logit_scale]}

    def trainable_state_dict(self) -> Dict[str, torch.Tensor]:
        return {n: p.detach() for n, p in self.named_parameters() if p.requires_grad}

    def load_trainable_state_dict(self, sd: Dict[str, torch.Tensor]) -> None:
        params = dict(self.named_parameters())
        with torch.no_grad():
            for name, value in sd.items():
                params[name].copy_(value)


def toy_data(n: int = 24, seed: int = 0, num_classes: int = NUM_CLASSES) -> TensorDataset:
    """(image (3, 8, 8), multi-hot target, index) rows; labels depend on the image (learnable)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, 8, 8, generator=gen)
    w = torch.randn(3 * 8 * 8, num_classes, generator=gen)
    y = ((x.flatten(1) - 0.5) @ w > 0).float()
    y[0] = 1.0  # every class has a positive
    return TensorDataset(x, y, torch.arange(n))


def toy_config(**sections: Dict) -> "object":
    """A Config with tiny defaults plus per-section overrides."""
    raw = {
        "data": {"batch_size": 4, "eval_batch_size": 8, "num_workers": 0},
        "optim": {"optimizer": "sgd", "lr": 0.1, "warmup_epochs": 1},
        "train": {"epochs": 3, "seed": 0, "device": "cpu", "log_every": 1},
    }
    for key, values in sections.items():
        raw.setdefault(key, {}).update(values)
    return config_from_dict(raw)


GROUPS = {"head": np.array([0, 1]), "medium": np.array([2]), "tail": np.array([3])}
CLASS_NAMES = [f"c{i}" for i in range(NUM_CLASSES)]


class TextToyModel(ToyModel):
    """ToyModel with a text branch: class embeddings from trainable prompts through a small MLP.

    Counts how often the text branch runs (``text_calls``) so tests can check it runs once per
    optimiser step, and accepts ``class_embeddings`` like CAPNET does.
    """

    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        self.ctx.requires_grad_(False)  # replaced by the text branch below
        self.prompts = nn.Parameter(torch.randn(NUM_CLASSES, FEAT) * 0.1)
        self.text_mlp = nn.Sequential(nn.Linear(FEAT, FEAT), nn.Tanh())
        self.text_calls = 0

    def class_embeddings(self) -> torch.Tensor:
        self.text_calls += 1
        return self.text_mlp(self.prompts)

    def text_parameter_names(self) -> List[str]:
        return ["prompts", "text_mlp.0.weight", "text_mlp.0.bias"]

    def forward(self, images: torch.Tensor, class_embeddings=None) -> torch.Tensor:
        return self.forward_features(self.backbone.image_prefix(images, 1), 1, class_embeddings)

    def forward_features(self, features: torch.Tensor, depth: int, class_embeddings=None) -> torch.Tensor:
        f = self.backbone.image_prefix(features, 1) if depth == 0 else features
        emb = self.class_embeddings() if class_embeddings is None else class_embeddings
        return self.head(self.drop(f)) + self.logit_scale * f @ emb.t()

    def param_groups(self) -> Dict[str, List[nn.Parameter]]:
        return {"head": list(self.head.parameters()) + [self.logit_scale],
                "prompts": [self.prompts] + list(self.text_mlp.parameters())}
