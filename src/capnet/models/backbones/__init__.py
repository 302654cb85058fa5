"""Backbones: importing this package registers every backbone in BACKBONES."""
from capnet.models.backbones import clip  # noqa: F401
from capnet.models.backbones import offline  # noqa: F401
from capnet.models.backbones.clip import CLIPBackbone

__all__ = ["CLIPBackbone"]
