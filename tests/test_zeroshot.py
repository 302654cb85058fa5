"""Prompt templates, class-name clean-up and zero-shot logits on the tiny random CLIP."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES, SIMPLE_IMAGENET_TEMPLATES

import capnet.models.backbones  # noqa: F401  (fills BACKBONES)
from capnet.models.templates import DEFAULT_TEMPLATE, IMAGENET_TEMPLATES, SIMPLE_TEMPLATES, class_text, fill
from capnet.models.zeroshot import logit_multiplier, template_embeddings, zeroshot_logits
from capnet.registry import BACKBONES

CLASSES = ["pottedplant", "traffic_light", "dog"]


@pytest.fixture(scope="module")
def backbone():
    torch.manual_seed(0)
    return BACKBONES.build("clip_tiny_vit.random").eval()


def test_templates_are_clips() -> None:
    assert len(IMAGENET_TEMPLATES) == 80 and len(set(IMAGENET_TEMPLATES)) == 80
    assert list(IMAGENET_TEMPLATES) == [t("{}") for t in OPENAI_IMAGENET_TEMPLATES]
    assert list(SIMPLE_TEMPLATES) == [t("{}") for t in SIMPLE_IMAGENET_TEMPLATES]
    assert len(SIMPLE_TEMPLATES) == 7 and DEFAULT_TEMPLATE == "a photo of a {}."


@pytest.mark.parametrize("raw,text", [
    ("pottedplant", "potted plant"), ("traffic_light", "traffic light"), ("diningtable", "dining table"),
    ("tvmonitor", "tv monitor"), ("TVMonitor", "tv monitor"), ("hair drier", "hair dryer"),
    ("fire hydrant", "fire hydrant"), ("  teddy__bear ", "teddy bear"), ("person", "person"),
])
def test_class_text(raw: str, text: str) -> None:
    assert class_text(raw) == text


def test_fill_needs_a_slot() -> None:
    assert fill(DEFAULT_TEMPLATE, "diningtable") == "a photo of a dining table."
    with pytest.raises(ValueError, match="no '\\{\\}' slot"):
        fill("a photo", "dog")


def test_ensemble_equals_manual_mean(backbone) -> None:
    templates = SIMPLE_TEMPLATES
    emb = template_embeddings(backbone, CLASSES, templates, batch_size=5)  # batches cross classes
    assert emb.shape == (len(CLASSES), backbone.text_dim) and not emb.requires_grad
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(len(CLASSES)))
    with torch.no_grad():
        for i, name in enumerate(CLASSES):
            texts = [t.format(class_text(name)) for t in templates]
            manual = F.normalize(F.normalize(backbone.encode_text(texts), dim=-1).mean(0), dim=-1)
            torch.testing.assert_close(emb[i], manual, atol=1e-5, rtol=0)


def test_single_template_is_the_normalised_prompt(backbone) -> None:
    emb = template_embeddings(backbone, ["pottedplant"])
    with torch.no_grad():
        ref = F.normalize(backbone.encode_text(["a photo of a potted plant."]), dim=-1)
    torch.testing.assert_close(emb, ref, atol=1e-6, rtol=0)
    with pytest.raises(ValueError):
        template_embeddings(backbone, [], SIMPLE_TEMPLATES)


def test_zeroshot_logits(backbone) -> None:
    emb = template_embeddings(backbone, CLASSES, SIMPLE_TEMPLATES)
    images = torch.randn(4, 3, 32, 32)
    logits = zeroshot_logits(backbone, images, emb)
    assert logits.shape == (4, len(CLASSES))
    scale = logit_multiplier(backbone)
    assert scale == pytest.approx(1 / 0.07, rel=1e-5)  # open_clip's initial temperature
    with torch.no_grad():
        cos = F.normalize(backbone.encode_image(images), dim=-1) @ emb.t()
    torch.testing.assert_close(logits.detach(), scale * cos, atol=1e-5, rtol=0)
    torch.testing.assert_close(zeroshot_logits(backbone, images, emb, logit_scale=1.0).detach(), cos,
                               atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="aligned"):
        zeroshot_logits(backbone, images, torch.randn(3, 7))
