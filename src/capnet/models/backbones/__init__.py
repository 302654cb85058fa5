"""Backbones: importing this package registers every backbone in BACKBONES.

CLIP entries are registered from the architecture table (``specs.CLIP_ARCHS``, data only); their
builders import open_clip (several seconds) when called, so offline runs never pay for it. Other
CLIP names (``clip_vit_b16.laion2b_s34b_b88k``, ``ViT-B-16.datacomp_xl_s13b_b90k``,
``hf-hub:org/repo``) are too many to register: a resolver builds them on demand.
"""
from typing import Any, Callable, Optional

from capnet.models.backbones import offline  # noqa: F401  (registers the offline backbones)
from capnet.models.backbones.specs import CLIP_ARCHS, resolve_arch
from capnet.registry import BACKBONES


def _register_clip(name: str) -> None:
    """Register ``build(weights=None, image_size=None, resize, crop_scale)`` for one entry of the CLIP_ARCHS table
    (``resize``: eval view crop | whole; ``crop_scale``: the training crop's smallest area share)."""

    def build(weights: Optional[str] = None, image_size: Optional[int] = None, resize: str = "crop",
              crop_scale: float = 0.5) -> Any:
        from capnet.models.backbones.clip import build_clip

        return build_clip(name, weights, image_size, resize=resize, crop_scale=crop_scale)

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


def _resolve_clip(name: str) -> Optional[Callable[..., Any]]:
    """A ``build(weights=None, image_size=None)`` for any CLIP name ``specs.resolve_arch`` understands."""
    if resolve_arch(name) is None:
        return None

    def build(weights: Optional[str] = None, image_size: Optional[int] = None, resize: str = "crop",
              crop_scale: float = 0.5) -> Any:
        from capnet.models.backbones.clip import build_clip

        return build_clip(name, weights, image_size, resize=resize, crop_scale=crop_scale)

    build.__name__ = "build_clip_by_name"
    return build


BACKBONES.add_resolver(_resolve_clip)


def __getattr__(attr: str) -> Any:
    """``CLIPBackbone`` on first use (it imports open_clip)."""
    if attr == "CLIPBackbone":
        from capnet.models.backbones.clip import CLIPBackbone

        return CLIPBackbone
    raise AttributeError(attr)


__all__ = ["CLIPBackbone"]
