"""Test-time ensembling (CAPNET Sec. 3.5, after LIFT): average logits over image views.

A view transform turns one PIL image into a (V, 3, H, W) stack: ``single`` (resize + centre
crop, V=1), ``flip`` (+ its mirror, V=2), ``five_crop`` / ``ten_crop`` (resize to
``image_size * resize_scale`` then torchvision FiveCrop / TenCrop, V=5 / 10). ``tte_logits``
averages the per-view logits in logit space, computing the class embeddings once. The text
side of the ensemble (prompt templates) lives in CAPNET (``ensemble_templates``).
"""
from __future__ import annotations

from typing import Callable, List, Sequence

import torch
from torchvision import transforms as T
from torchvision.transforms import functional as TF

from capnet.config import TTEConfig
from capnet.models.backbones.base import BackboneSpec
from capnet.registry import Registry

VIEWS = Registry("TTE view set")


class StackViews:
    """PIL image -> (V, 3, H, W): crop views, then to-tensor + normalise each (picklable)."""

    def __init__(self, views: Callable[[object], Sequence[object]], mean: Sequence[float], std: Sequence[float]) -> None:
        self.views = views
        self.normalize = T.Normalize(mean, std)

    def __call__(self, image: object) -> torch.Tensor:
        return torch.stack([self.normalize(TF.to_tensor(v)) for v in self.views(image)])


class _Chain:
    """Apply ``first`` then ``crops`` (a callable returning a tuple of images)."""

    def __init__(self, first: Callable, crops: Callable) -> None:
        self.first, self.crops = first, crops

    def __call__(self, image: object) -> List[object]:
        return list(self.crops(self.first(image)))


def _centre(size: int, interpolation: T.InterpolationMode) -> T.Compose:
    return T.Compose([T.Resize(size, interpolation=interpolation), T.CenterCrop(size)])


class _CentreViews:
    """The centre view, optionally with its mirror."""

    def __init__(self, centre: Callable, flip: bool) -> None:
        self.centre, self.flip = centre, flip

    def __call__(self, image: object) -> List[object]:
        img = self.centre(image)
        return [img, TF.hflip(img)] if self.flip else [img]


@VIEWS.register("single")
def single_views(size: int, resize_scale: float, interpolation: T.InterpolationMode) -> Callable:
    """One view: resize + centre crop (the usual eval transform)."""
    return _CentreViews(_centre(size, interpolation), flip=False)


@VIEWS.register("flip")
def flip_views(size: int, resize_scale: float, interpolation: T.InterpolationMode) -> Callable:
    """Centre view and its horizontal mirror."""
    return _CentreViews(_centre(size, interpolation), flip=True)


@VIEWS.register("five_crop")
def five_crop_views(size: int, resize_scale: float, interpolation: T.InterpolationMode) -> Callable:
    """Four corners + centre of the enlarged image."""
    return _Chain(T.Resize(int(round(size * resize_scale)), interpolation=interpolation), T.FiveCrop(size))


@VIEWS.register("ten_crop")
def ten_crop_views(size: int, resize_scale: float, interpolation: T.InterpolationMode) -> Callable:
    """Five crops of the enlarged image and of its mirror."""
    return _Chain(T.Resize(int(round(size * resize_scale)), interpolation=interpolation), T.TenCrop(size))


def view_transform(
    views: str,
    image_size: int,
    resize_scale: float,
    mean: Sequence[float],
    std: Sequence[float],
    interpolation: str = "bicubic",
) -> StackViews:
    """A PIL-image -> (V, 3, image_size, image_size) transform for the named view set."""
    mode = T.InterpolationMode(interpolation)
    return StackViews(VIEWS.build(views, image_size, resize_scale, mode), mean, std)


def build_view_transform(tte: TTEConfig, spec: BackboneSpec) -> StackViews:
    """The TTE transform from the config and the backbone's preprocessing spec."""
    return view_transform(tte.views, spec.image_size, tte.resize_scale, spec.mean, spec.std, spec.interpolation)


def num_views(views: str) -> int:
    """How many views a view set yields."""
    return {"single": 1, "flip": 2, "five_crop": 5, "ten_crop": 10}[views]


def tte_logits(model: torch.nn.Module, views: torch.Tensor) -> torch.Tensor:
    """(B, V, 3, H, W) views -> (B, C): mean over views of the logits, class embeddings once."""
    if views.ndim == 4:
        views = views.unsqueeze(1)
    class_emb = model.class_embeddings()
    total = None
    for v in range(views.shape[1]):
        logits = model.logits_from_image_features(model.image_features(views[:, v]), class_emb)
        total = logits if total is None else total + logits
    return total / views.shape[1]
