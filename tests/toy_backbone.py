"""A tiny deterministic Backbone for fast tests (milliseconds on CPU, no weights, no downloads).

Image tower: two conv stages (so a frozen prefix can be cached) + pooling + linear.
Text tower: a one-layer causal transformer over a word-level vocabulary; word ids are a
stable hash (crc32) of the lower-cased word, so any text tokenizes without a fitted vocab.
Importing this module registers nothing: a test that builds ``toy.random`` by name asks for
conftest's ``toy_random`` fixture, which registers it for that test only (:func:`registered`).
"""
from __future__ import annotations

import contextlib
import re
import zlib
from typing import Callable, Iterator, Optional, Sequence

import torch
from torch import nn
from torchvision import transforms as T

from capnet.models.backbones.base import Backbone, BackboneSpec
from capnet.registry import BACKBONES

PAD, SOS, EOT = 0, 1, 2
NAME = "toy.random"  # the BACKBONES name tests build the toy by
_WORD = re.compile(r"[a-z0-9]+|[^\sa-z0-9]")


class ToyVisual(nn.Module):
    """Two conv stages (``stages``, the staged-CNN layout PEFT methods patch) + pool + linear."""

    def __init__(self, image_dim: int) -> None:
        super().__init__()
        self.stages = nn.ModuleList(
            [
                nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU()),
                nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU()),
            ]
        )
        self.proj = nn.Linear(16, image_dim)

    def run(self, x: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """Run stages ``start`` <= k < ``stop``; reaching the end adds pooling and the projection."""
        for k in range(start, stop):
            x = self.stages[k](x)
        if start < len(self.stages) == stop:
            x = self.proj(x.mean(dim=(2, 3)))
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.run(x, 0, len(self.stages))


class ToyText(nn.Module):
    """Token embedding + positions + one causal transformer layer + EOT pooling + projection."""

    def __init__(self, vocab_size: int, width: int, context_length: int, text_dim: int) -> None:
        super().__init__()
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.randn(context_length, width) * 0.01)
        self.layer = nn.TransformerEncoderLayer(width, nhead=2, dim_feedforward=2 * width, dropout=0.0, batch_first=True)
        self.ln_final = nn.LayerNorm(width)
        self.projection = nn.Linear(width, text_dim, bias=False)


class ToyBackbone(Backbone):
    """Tiny random two-tower model implementing the full Backbone contract."""

    num_image_stages = 2

    def __init__(
        self,
        image_dim: int = 32,
        text_dim: int = 32,
        token_width: int = 16,
        context_length: int = 32,
        vocab_size: int = 512,
        image_size: int = 32,
        seed: int = 0,
        freeze: bool = True,
    ) -> None:
        super().__init__()
        self.image_dim, self.text_dim, self.token_width = image_dim, text_dim, token_width
        self.context_length, self.vocab_size = context_length, vocab_size
        self.spec = BackboneSpec(
            name=NAME,
            image_size=image_size,
            mean=(0.5, 0.5, 0.5),
            std=(0.25, 0.25, 0.25),
            interpolation="bilinear",
            extra={"aligned": image_dim == text_dim},
        )
        gen_state = torch.random.get_rng_state()
        torch.manual_seed(seed)
        self.visual = ToyVisual(image_dim)
        self.text = ToyText(vocab_size, token_width, context_length, text_dim)
        self.logit_scale = nn.Parameter(torch.tensor(2.0))  # log-scale, CLIP convention
        torch.random.set_rng_state(gen_state)
        self.text_calls = 0  # how many times the text transformer ran (tests count it)
        if freeze:
            self.requires_grad_(False)

    # ---------------------------------------------------------------- image side
    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, image_dim)."""
        return self.visual(images)

    def image_prefix(self, images: torch.Tensor, depth: int) -> torch.Tensor:
        """Output of stage ``depth`` (0: the images)."""
        return self.visual.run(images, 0, depth)

    def image_suffix(self, features: torch.Tensor, depth: int) -> torch.Tensor:
        """Continue from stage ``depth`` to the final features."""
        return self.visual.run(features, depth, self.num_image_stages)

    def transform(self, train: bool) -> Callable:
        """Resize + centre crop + normalise (a flip when training)."""
        size = self.spec.image_size
        head = [T.RandomHorizontalFlip()] if train else []
        return T.Compose(head + [T.Resize(size), T.CenterCrop(size), T.ToTensor(), T.Normalize(self.spec.mean, self.spec.std)])

    # ----------------------------------------------------------------- text side
    def _word_id(self, word: str) -> int:
        return 3 + zlib.crc32(word.encode()) % (self.vocab_size - 3)

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        """Texts -> (N, context_length) ids: [SOS] words [EOT] [PAD]...; too long is an error."""
        out = torch.full((len(texts), self.context_length), PAD, dtype=torch.long)
        for i, text in enumerate(texts):
            ids = [SOS] + [self._word_id(w) for w in _WORD.findall(text.lower())] + [EOT]
            if len(ids) > self.context_length:
                raise ValueError(f"text {text!r} has {len(ids)} tokens > context length {self.context_length}")
            out[i, : len(ids)] = torch.tensor(ids)
        return out

    def embed_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """(N, L) ids -> (N, L, token_width)."""
        return self.text.token_embedding(tokens.to(self.device))

    def encode_token_embeddings(self, embeddings: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Causal transformer over embeddings + positions, pooled at the EOT token."""
        self.text_calls += 1
        length = embeddings.shape[1]
        x = embeddings + self.text.positional_embedding[:length]
        mask = torch.triu(torch.full((length, length), float("-inf"), device=x.device), diagonal=1)
        x = self.text.ln_final(self.text.layer(x, src_mask=mask))
        eot = (tokens.to(x.device) == EOT).int().argmax(dim=1)
        return self.text.projection(x[torch.arange(x.shape[0], device=x.device), eot])


class ToyPEFT(nn.Module):
    """A minimal PEFT method for tests: a zero-initialised 1x1-conv adapter on ``stages[1]``.

    It follows the PEFTMethod contract (``trainable_parameters()``, ``cached_depth``) without
    depending on capnet.models.peft, so model tests do not wait on the real methods.
    """

    def __init__(self, visual: ToyVisual) -> None:
        super().__init__()
        self.cached_depth = 1  # stage 0's output is untouched, so it may be cached
        channels = visual.stages[1][0].out_channels
        self.adapter = nn.Conv2d(channels, channels, 1)
        nn.init.zeros_(self.adapter.weight)
        nn.init.zeros_(self.adapter.bias)
        self.handle = visual.stages[1].register_forward_hook(lambda mod, inp, out: out + self.adapter(out))

    def trainable_parameters(self) -> list:
        """The adapter's weights."""
        return list(self.adapter.parameters())


def build_toy(weights: Optional[str] = None, **kwargs) -> ToyBackbone:
    """BACKBONES builder for ``toy.random`` (``weights`` is ignored: the toy is random)."""
    return ToyBackbone(**kwargs)


@contextlib.contextmanager
def registered(name: str = NAME) -> Iterator[str]:
    """``name`` -> :func:`build_toy` in BACKBONES inside the block only (conftest's ``toy_random``).

    Registering on import made a test's outcome depend on which test file imported this first.
    The Registry has no public removal (components are never unregistered in the library), so
    the entry is dropped from its table directly.
    """
    if name in BACKBONES:
        raise RuntimeError(f"backbone '{name}' is already registered: a test registered it without removing it")
    BACKBONES.register(name)(build_toy)
    try:
        yield name
    finally:
        BACKBONES._items.pop(name, None)
