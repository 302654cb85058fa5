"""The backbone contract: what CAPNET needs from any vision-language model.

CLIP (open_clip) and the offline VGG19 + MiniLM default both implement it, so prompts,
graph, GCN, PEFT and the engine never look inside a particular model.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional, Sequence, Tuple

import torch
from torch import nn


@dataclass(frozen=True)
class BackboneSpec:
    """Identity and input contract of a backbone ("arch.tag" name, preprocessing, provenance)."""

    name: str  # registry key, e.g. "clip_vit_b16.openai" or "vgg19_minilm.offline"
    image_size: int = 224  # square input side after the eval transform
    mean: Tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)  # pixel mean, 0-1 scale
    std: Tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)  # pixel std, 0-1 scale
    interpolation: str = "bicubic"  # resize interpolation used with these weights
    weights: Optional[str] = None  # where the weights came from (path or package)
    weights_sha256: Optional[str] = None  # checksum of the weights file, recorded in runs
    license: Optional[str] = None  # licence of the weights
    extra: dict = field(default_factory=dict)  # anything else worth recording in a run


class Backbone(nn.Module, abc.ABC):
    """A frozen image tower and a text tower callable on token *embeddings*.

    ``image_dim`` and ``text_dim`` are the output widths of the two towers. For CLIP they are
    equal and aligned; for the offline default they differ and CAPNET adds trainable
    projections into a shared space.
    """

    spec: BackboneSpec
    image_dim: int  # width of encode_image output
    text_dim: int  # width of encode_token_embeddings output
    token_width: int  # width of the token embeddings the text transformer consumes
    visual: nn.Module  # the image tower (PEFT methods act on this module)

    # ---------------------------------------------------------------- image side
    @abc.abstractmethod
    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalised pixels -> (B, image_dim) features (not L2-normalised)."""

    # A visual tower may be split into stages so that a frozen prefix can be cached while a
    # PEFT method trains later stages (the offline VGG19 exposes its 5 conv blocks). Towers
    # that are not split have one stage: the prefix is the whole encoder.
    num_image_stages: int = 1

    def image_prefix(self, images: torch.Tensor, depth: int) -> torch.Tensor:
        """Run the first ``depth`` stages (``depth == num_image_stages`` gives encode_image)."""
        if depth == 0:
            return images
        if depth == self.num_image_stages:
            return self.encode_image(images)
        raise NotImplementedError(f"{type(self).__name__} cannot stop after stage {depth}")

    def image_suffix(self, features: torch.Tensor, depth: int) -> torch.Tensor:
        """Continue from the output of stage ``depth`` to (B, image_dim) features."""
        if depth == 0:
            return self.encode_image(features)
        if depth == self.num_image_stages:
            return features
        raise NotImplementedError(f"{type(self).__name__} cannot start at stage {depth}")

    @abc.abstractmethod
    def transform(self, train: bool) -> Callable:
        """The PIL-image -> tensor transform (train augmentation or eval resize/crop)."""

    # ----------------------------------------------------------------- text side
    @abc.abstractmethod
    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        """Texts -> (N, L) token ids, padded, with the model's start/end tokens."""

    @abc.abstractmethod
    def embed_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """(N, L) ids -> (N, L, token_width) input embeddings (before positions)."""

    @abc.abstractmethod
    def encode_token_embeddings(self, embeddings: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Run the text transformer on (N, L, W) embeddings; ``tokens`` locate EOT/padding.

        Soft prompts replace some rows of ``embeddings``; ``tokens`` still carries the ids of
        the placeholder prompt so the pooling position and padding mask are known.
        """

    @property
    def context_offset(self) -> int:
        """Index of the first context token (after the start token)."""
        return 1

    def encode_text(self, texts: Sequence[str]) -> torch.Tensor:
        """Texts -> (N, text_dim) features through the embedding path."""
        tokens = self.tokenize(texts).to(self.device)
        return self.encode_token_embeddings(self.embed_tokens(tokens), tokens)

    # ----------------------------------------------------------- parameter sets
    def visual_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters of the image tower."""
        return self.visual.parameters()

    def text_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters of the text tower (everything that is not visual)."""
        visual = {id(p) for p in self.visual.parameters()}
        return (p for p in self.parameters() if id(p) not in visual)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device


def is_aligned(backbone: "Backbone") -> bool:
    """Whether image and text features already live in one space (CLIP yes, offline VGG+MiniLM no)."""
    return backbone.image_dim == backbone.text_dim and bool(backbone.spec.extra.get("aligned", True))
