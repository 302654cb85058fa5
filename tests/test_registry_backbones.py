"""Every random-weight backbone of BACKBONES: build, image forward, text encode, backward.

Parametrized over the registry: every ``*.random`` name (the tiny test architectures, seconds) in
the quick loop, and every other CLIP architecture of the table built with ``weights="random"``
at a small input side (64 px, ViT-L/14 56 px: 4 x 4 patches) marked ``slow`` (building the
full-size random towers takes 2-10 s each on a 2-core CPU). The offline backbones need their
weight files and are covered by test_offline_backbone.py / test_efficientnet_lite.py.
"""
from __future__ import annotations

import warnings
from typing import Dict, Optional

import pytest
import torch
from PIL import Image

import capnet.models.backbones  # noqa: F401  (fills BACKBONES)
from capnet.models.backbones.base import Backbone
from capnet.models.backbones.specs import resolve_arch
from capnet.registry import BACKBONES

RANDOM = BACKBONES.names("*.random")
FULL_SIDE: Dict[str, int] = {"clip_vit_l14.openai": 56}  # 14 px patches; others 64 px (RN: /32, ViT: /16, /32)
FULL = [n for n in BACKBONES.names() if n not in RANDOM and resolve_arch(n) is not None]
CASES = [pytest.param(n, None, id=n) for n in RANDOM] + [
    pytest.param(n, FULL_SIDE.get(n, 64), id=n, marks=pytest.mark.slow) for n in FULL]
TEXTS = ["a photo of a cat.", "a photo of a dog.", ""]


def test_the_registry_has_random_backbones() -> None:
    assert RANDOM, "no '*.random' backbone is registered: the quick loop would test no backbone"
    assert FULL, "no full-size CLIP architecture is registered"


def _build(name: str, side: Optional[int]) -> Backbone:
    if side is None:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a '.random' name means random on purpose: no warning
            return BACKBONES.build(name)
    with pytest.warns(UserWarning, match="random weights"):
        return BACKBONES.build(name, weights="random", image_size=side)


@pytest.mark.parametrize("name, side", CASES)
def test_random_backbone_builds_runs_and_backpropagates(name: str, side: Optional[int]) -> None:
    backbone = _build(name, side)
    assert backbone.spec.name == name and backbone.spec.weights == "random"
    size = backbone.spec.image_size
    assert side is None or size == side

    # image forward, from a decoded PIL image through the backbone's own transform
    pixels = torch.stack([backbone.transform(train=False)(Image.new("RGB", (40 + 9 * k, 50), (30 * k, 90, 200)))
                          for k in range(2)])
    assert pixels.shape == (2, 3, size, size)
    with torch.no_grad():
        feats = backbone.encode_image(pixels)
        assert feats.shape == (2, backbone.image_dim) and torch.isfinite(feats).all()
        assert not torch.allclose(feats[0], feats[1])  # the features depend on the image
        for k in range(backbone.num_image_stages + 1):  # every cacheable depth composes back
            torch.testing.assert_close(backbone.image_suffix(backbone.image_prefix(pixels, k), k), feats,
                                       atol=1e-4, rtol=1e-4)

    # text encode, through the embedding path soft prompts use
    tokens = backbone.tokenize(TEXTS)
    assert tokens.shape[0] == len(TEXTS) and tokens.dtype == torch.long
    with torch.no_grad():
        text = backbone.encode_text(TEXTS)
    assert text.shape == (len(TEXTS), backbone.text_dim) and torch.isfinite(text).all()
    assert not torch.allclose(text[0], text[1])

    # backward: gradients reach soft prompts, the image input (PEFT inside a frozen tower) and
    # the weights of both towers
    embeddings = backbone.embed_tokens(tokens).detach().requires_grad_(True)
    pixels = pixels.clone().requires_grad_(True)
    classifiers = backbone.encode_token_embeddings(embeddings, tokens)
    if backbone.image_dim == backbone.text_dim:
        logits = backbone.encode_image(pixels) @ classifiers.t()
    else:  # unaligned towers: any scalar of both
        logits = backbone.encode_image(pixels).sum() * classifiers.sum()
    logits.sum().backward()
    assert embeddings.grad is not None and embeddings.grad[:, 1].abs().sum() > 0  # first word after SOS
    assert pixels.grad is not None and pixels.grad.abs().sum() > 0
    for tower in (backbone.visual_parameters(), backbone.text_parameters()):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in tower)


@pytest.mark.parametrize("name", RANDOM)
def test_random_names_are_seeded(name: str) -> None:
    """One '.random' name is one set of weights (a saved run rebuilds the same backbone)."""
    torch.manual_seed(1)
    a = BACKBONES.build(name)
    torch.manual_seed(2)
    b = BACKBONES.build(name)
    assert a.spec.weights_sha256 == b.spec.weights_sha256
    x = torch.randn(1, 3, a.spec.image_size, a.spec.image_size)
    with torch.no_grad():
        torch.testing.assert_close(a.encode_image(x), b.encode_image(x), atol=0, rtol=0)


def test_the_toy_backbone_is_registered_only_while_a_test_asks_for_it() -> None:
    """Importing tests/toy_backbone.py registers nothing; conftest's toy_random adds and removes it."""
    import toy_backbone

    assert "toy.random" not in BACKBONES
    with toy_backbone.registered() as name:
        assert name == "toy.random" and BACKBONES.build(name).spec.name == name
        with pytest.raises(RuntimeError, match="already registered"):
            with toy_backbone.registered():
                pass
    assert "toy.random" not in BACKBONES
