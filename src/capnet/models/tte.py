"""Test-time ensembling (CAPNET Sec. 3.5, after LIFT): average logits over image views.

A view transform turns one decoded PIL image into a (V, 3, H, W) stack: ``single`` (the
backbone's eval transform, V=1), ``flip`` (+ the mirror of that view, V=2), ``five_crop`` /
``ten_crop`` (resize to ``image_size * resize_scale`` then torchvision FiveCrop / TenCrop,
V=5 / 10). The engine runs the tower once on all V views of an image. ``tte_logits``
averages the per-view logits in logit space, computing the class embeddings once. The text
side of the ensemble (prompt templates) lives in CAPNET (``ensemble_templates``).

The flip view mirrors the *transformed* view (resized, centre-cropped, normalised), not the image
before the crop: with an odd crop margin the two differ by a pixel shift, and an exported graph
(``capnet.serving.export``) can only mirror the tensor it receives. Training, validation, the
feature cache, ``capnet predict`` and exported graphs therefore see one definition.
"""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence

import torch
from torchvision import transforms as T

from capnet.config import TTEConfig
from capnet.models.backbones.base import BackboneSpec
from capnet.registry import Registry

VIEWS = Registry("TTE view set")


class StackViews:
    """PIL image -> (V, 3, H, W): one decoded image, every view (picklable, stable repr).

    ``views`` turns the image into V PIL views; ``to_tensor`` converts and normalises one view
    (a backbone's eval transform for ``single``/``flip``, to-tensor + normalise for the crops).
    """

    def __init__(self, views: Callable[[object], Sequence[object]], to_tensor: Callable[[object], torch.Tensor],
                 description: str) -> None:
        self.views, self.to_tensor, self.description = views, to_tensor, description

    def __call__(self, image: object) -> torch.Tensor:
        tensors = [self.to_tensor(v) for v in self.views(image)]
        if getattr(self.views, "mirror_after", False):
            tensors += [t.flip(-1) for t in tensors]
        return torch.stack(tensors)

    def __repr__(self) -> str:
        return self.description


class _Chain:
    """Apply ``first`` then ``crops`` (a callable returning a tuple of images)."""

    def __init__(self, first: Callable, crops: Callable) -> None:
        self.first, self.crops = first, crops

    def __call__(self, image: object) -> List[object]:
        return list(self.crops(self.first(image)))


class _Mirrors:
    """The image itself; with ``flip``, StackViews adds the mirror of its transformed tensor."""

    def __init__(self, flip: bool) -> None:
        self.flip = flip
        self.mirror_after = flip

    def __call__(self, image: object) -> List[object]:
        return [image]


@VIEWS.register("single")
def single_views(size: int, resize_scale: float, interpolation: T.InterpolationMode) -> Callable:
    """One view: the backbone's eval transform."""
    return _Mirrors(flip=False)


@VIEWS.register("flip")
def flip_views(size: int, resize_scale: float, interpolation: T.InterpolationMode) -> Callable:
    """The eval view and its mirror (mirrored after the eval transform's resize and crop)."""
    return _Mirrors(flip=True)


@VIEWS.register("five_crop")
def five_crop_views(size: int, resize_scale: float, interpolation: T.InterpolationMode) -> Callable:
    """Four corners + centre of the enlarged image."""
    return _Chain(T.Resize(int(round(size * resize_scale)), interpolation=interpolation), T.FiveCrop(size))


@VIEWS.register("ten_crop")
def ten_crop_views(size: int, resize_scale: float, interpolation: T.InterpolationMode) -> Callable:
    """Five crops of the enlarged image and of its mirror."""
    return _Chain(T.Resize(int(round(size * resize_scale)), interpolation=interpolation), T.TenCrop(size))


CROP_VIEWS = ("five_crop", "ten_crop")  # view sets that crop themselves (the others reuse the eval transform)


def view_transform(
    views: str,
    image_size: int,
    resize_scale: float,
    mean: Sequence[float],
    std: Sequence[float],
    interpolation: str = "bicubic",
    eval_transform: Optional[Callable] = None,
) -> StackViews:
    """A PIL-image -> (V, 3, image_size, image_size) transform for the named view set.

    ``single`` and ``flip`` size each view with ``eval_transform`` (the backbone's, so a
    whole-image or centre-crop eval applies to the mirror too); without one, resize + centre crop.
    """
    mode = T.InterpolationMode(interpolation)
    normalize = T.Compose([T.ToTensor(), T.Normalize(mean, std)])
    if views in CROP_VIEWS:
        to_tensor = normalize
    else:
        to_tensor = eval_transform or T.Compose([T.Resize(image_size, interpolation=mode), T.CenterCrop(image_size), normalize])
    mirror = "+mirror_after_transform" if views == "flip" else ""  # feature-cache key: flip-before-crop entries are stale
    scale = f", resize_scale={resize_scale}" if views in CROP_VIEWS else ""  # single / flip ignore it
    desc = f"views={views}{mirror}(size={image_size}{scale}, interpolation={interpolation}) then {to_tensor!r}"
    return StackViews(VIEWS.build(views, image_size, resize_scale, mode), to_tensor, desc.replace("\n", " "))


def view_set(views: str, resize_scale: float, spec: BackboneSpec, eval_transform: Optional[Callable] = None) -> StackViews:
    """The named view set on the backbone's preprocessing spec and eval transform."""
    return view_transform(views, spec.image_size, resize_scale, spec.mean, spec.std, spec.interpolation, eval_transform)


def build_view_transform(tte: TTEConfig, spec: BackboneSpec, eval_transform: Optional[Callable] = None) -> StackViews:
    """The TTE transform from the config, the backbone's preprocessing spec and its eval transform."""
    return view_set(tte.views, tte.resize_scale, spec, eval_transform)


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
