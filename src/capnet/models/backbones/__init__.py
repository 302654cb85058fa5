"""Backbones: importing this package registers every backbone in BACKBONES.

CLIP entries are registered from the architecture table (``specs.CLIP_ARCHS``, data only); their
builders import open_clip (several seconds) when called, so offline runs never pay for it.
"""
from typing import Any, Optional

from capnet.models.backbones import offline  # noqa: F401  (registers the offline backbones)
from capnet.models.backbones.specs import CLIP_ARCHS
from capnet.registry import BACKBONES


def _register_clip(name: str) -> None:
    """Register ``build(weights=None, image_size=None)`` for one entry of the CLIP_ARCHS table."""

    def build(weights: Optional[str] = None, image_size: Optional[int] = None) -> Any:
        from capnet.models.backbones.clip import build_clip

        return build_clip(name, weights, image_size)

    arch = CLIP_ARCHS[name]
    build.__name__ = name.replace(".", "_")
    build.__doc__ = (f"CLIP {arch.open_clip_name} ('{name}'): "
                     + ("random init, for tests and speed checks." if arch.random_tag
                        else "weights from a local file or the usual caches (docs/weights.md)."))
    BACKBONES.register(name)(build)


# Architectures are data (specs.CLIP_ARCHS): RN50 and ViT-B/16 (the paper's backbones), ViT-B/32,
# ViT-L/14, and two tiny random-init variants for tests.
for _name in CLIP_ARCHS:
    _register_clip(_name)


def __getattr__(attr: str) -> Any:
    """``CLIPBackbone`` on first use (it imports open_clip)."""
    if attr == "CLIPBackbone":
        from capnet.models.backbones.clip import CLIPBackbone

        return CLIPBackbone
    raise AttributeError(attr)


__all__ = ["CLIPBackbone"]
