"""Prompt templates and class-name clean-up for CLIP text embeddings.

The 80 ImageNet templates and the 7-template subset are those of the CLIP paper (Radford et al.,
2021, notebook "Prompt_Engineering_for_ImageNet"); averaging their embeddings is the usual
zero-shot ensemble and CAPNET's text-side test-time ensemble.
"""
from __future__ import annotations

import re
from typing import Dict, Tuple

DEFAULT_TEMPLATE = "a photo of a {}."

IMAGENET_TEMPLATES: Tuple[str, ...] = (
    "a bad photo of a {}.",
    "a photo of many {}.",
    "a sculpture of a {}.",
    "a photo of the hard to see {}.",
    "a low resolution photo of the {}.",
    "a rendering of a {}.",
    "graffiti of a {}.",
    "a bad photo of the {}.",
    "a cropped photo of the {}.",
    "a tattoo of a {}.",
    "the embroidered {}.",
    "a photo of a hard to see {}.",
    "a bright photo of a {}.",
    "a photo of a clean {}.",
    "a photo of a dirty {}.",
    "a dark photo of the {}.",
    "a drawing of a {}.",
    "a photo of my {}.",
    "the plastic {}.",
    "a photo of the cool {}.",
    "a close-up photo of a {}.",
    "a black and white photo of the {}.",
    "a painting of the {}.",
    "a painting of a {}.",
    "a pixelated photo of the {}.",
    "a sculpture of the {}.",
    "a bright photo of the {}.",
    "a cropped photo of a {}.",
    "a plastic {}.",
    "a photo of the dirty {}.",
    "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.",
    "a photo of the {}.",
    "a good photo of the {}.",
    "a rendering of the {}.",
    "a {} in a video game.",
    "a photo of one {}.",
    "a doodle of a {}.",
    "a close-up photo of the {}.",
    "a photo of a {}.",
    "the origami {}.",
    "the {} in a video game.",
    "a sketch of a {}.",
    "a doodle of the {}.",
    "a origami {}.",
    "a low resolution photo of a {}.",
    "the toy {}.",
    "a rendition of the {}.",
    "a photo of the clean {}.",
    "a photo of a large {}.",
    "a rendition of a {}.",
    "a photo of a nice {}.",
    "a photo of a weird {}.",
    "a blurry photo of a {}.",
    "a cartoon {}.",
    "art of a {}.",
    "a sketch of the {}.",
    "a embroidered {}.",
    "a pixelated photo of a {}.",
    "itap of the {}.",
    "a jpeg corrupted photo of the {}.",
    "a good photo of a {}.",
    "a plushie {}.",
    "a photo of the nice {}.",
    "a photo of the small {}.",
    "a photo of the weird {}.",
    "the cartoon {}.",
    "art of the {}.",
    "a drawing of the {}.",
    "a photo of the large {}.",
    "a black and white photo of a {}.",
    "the plushie {}.",
    "a dark photo of a {}.",
    "itap of a {}.",
    "graffiti of the {}.",
    "a toy {}.",
    "itap of my {}.",
    "a photo of a cool {}.",
    "a photo of a small {}.",
    "a tattoo of the {}.",
)

SIMPLE_TEMPLATES: Tuple[str, ...] = (
    "itap of a {}.",
    "a bad photo of the {}.",
    "a origami {}.",
    "a photo of the large {}.",
    "a {} in a video game.",
    "art of the {}.",
    "a photo of the small {}.",
)

# Dataset label spellings that are not natural text (PASCAL VOC joins words; some COCO
# releases use "hair drier"). Keys are lower-case; anything else only loses its underscores.
_CLASS_TEXT: Dict[str, str] = {
    "pottedplant": "potted plant",
    "diningtable": "dining table",
    "tvmonitor": "tv monitor",
    "hair drier": "hair dryer",
    "sportsball": "sports ball",
}


def class_text(name: str) -> str:
    """Dataset class name -> the words a text encoder should read ("pottedplant" -> "potted plant")."""
    words = re.sub(r"\s+", " ", name.replace("_", " ")).strip()
    return _CLASS_TEXT.get(words.lower(), words)


def fill(template: str, name: str) -> str:
    """Put the natural text of ``name`` into a "{}" template."""
    if "{}" not in template:
        raise ValueError(f"prompt template {template!r} has no '{{}}' slot for the class name")
    return template.format(class_text(name))
