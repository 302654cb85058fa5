"""The PEFT contract: a module that owns every added parameter and patches a frozen visual tower.

``apply(visual)`` freezes every existing parameter of the tower, then adds the method's modules
through forward hooks or ``torch.nn.utils.parametrize`` (never by replacing submodules), such
that -- except for VPT -- the patched tower's output equals the frozen tower's at initialisation.

``cached_depth`` tells the engine how deep it may cache frozen features: the method leaves the
outputs of stages ``0 .. cached_depth - 1`` unchanged, so ``Backbone.image_prefix(x, cached_depth)``
is cacheable and ``image_suffix(cached, cached_depth)`` runs everything the method touches. CLIP
towers are one stage, so their methods report 0. For the offline VGG (``visual.stages[k]``), a
method that changes ``stages[k]`` or hooks its output reports ``k``.
"""
from __future__ import annotations

import inspect
import math
from typing import Any, Callable, Iterator, List, Optional, Tuple

import torch
from torch import nn

from capnet.errors import CapnetError
from capnet.registry import PEFT, unknown_options_message

VIT, RESNET, STAGED_CNN = "vit", "resnet", "staged_cnn"
TOWER_NAMES = {
    VIT: "open_clip VisionTransformer",
    RESNET: "open_clip ModifiedResNet",
    STAGED_CNN: "staged CNN (visual.stages: ModuleList of conv blocks, e.g. the offline VGG19)",
}


class PEFTError(CapnetError, ValueError):
    """A PEFT method applied to a tower it cannot patch, or given an option it does not know."""


def tower_kind(visual: nn.Module) -> Optional[str]:
    """Classify a visual tower: 'vit', 'resnet', 'staged_cnn' or None (unknown)."""
    stages = getattr(visual, "stages", None)
    if isinstance(stages, nn.ModuleList) and any(isinstance(m, nn.Conv2d) for m in stages.modules()):
        return STAGED_CNN
    if not type(visual).__module__.startswith("open_clip"):
        return None  # not an open_clip tower: no need to import open_clip (seconds) to say so
    from open_clip.modified_resnet import ModifiedResNet
    from open_clip.transformer import VisionTransformer

    if isinstance(visual, VisionTransformer):
        return VIT
    if isinstance(visual, ModifiedResNet):
        return RESNET
    return None


def reference_tensor(visual: nn.Module) -> torch.Tensor:
    """A floating parameter of the tower: new parameters follow its device and dtype."""
    for param in visual.parameters():
        if param.is_floating_point():
            return param
    raise PEFTError(f"visual tower {type(visual).__name__} has no floating-point parameters")


def count_trainable(module: nn.Module) -> int:
    """Number of trainable scalars (a PEFTMethod counts its trainable_parameters(), tower biases included)."""
    params = module.trainable_parameters() if isinstance(module, PEFTMethod) else module.parameters()
    seen, total = set(), 0
    for param in params:
        if param.requires_grad and id(param) not in seen:
            seen.add(id(param))
            total += param.numel()
    return total


class PEFTMethod(nn.Module):
    """Base class: subclasses set ``name``/``supported`` and implement ``_patch``."""

    name: str = "peft"
    supported: Tuple[str, ...] = ()

    def __init__(self) -> None:
        super().__init__()
        self.cached_depth: int = 0
        self.tower: Optional[str] = None  # kind of the tower patched, set by apply()
        self._handles: List[Any] = []

    def apply(self, visual: nn.Module) -> None:  # type: ignore[override]
        """Freeze ``visual`` and patch it in place; at init its output is unchanged (VPT aside).

        ``nn.Module.apply(fn)`` recurses into children by calling ``child.apply(fn)``; a
        non-module callable is therefore passed on to it, so ``container.apply(init_fn)`` works.
        """
        if not isinstance(visual, nn.Module) and callable(visual):
            return super().apply(visual)  # type: ignore[return-value]
        if self.tower is not None:
            raise PEFTError(f"PEFT method '{self.name}' was already applied to a tower")
        kind = tower_kind(visual)
        if kind not in self.supported:
            found = TOWER_NAMES.get(kind, "unrecognised")  # type: ignore[arg-type]
            wanted = "; ".join(TOWER_NAMES[k] for k in self.supported)
            raise PEFTError(
                f"PEFT method '{self.name}' does not support the visual tower {type(visual).__name__} "
                f"({found}); it supports: {wanted}"
            )
        for param in visual.parameters():
            param.requires_grad_(False)
        self.tower = kind
        self._patch(visual, kind)
        ref = reference_tensor(visual)
        self.to(device=ref.device, dtype=ref.dtype)

    def _patch(self, visual: nn.Module, kind: str) -> None:
        """Create parameters sized from ``visual`` and attach them (subclass hook)."""
        raise NotImplementedError

    def hook(self, handle: Any) -> None:
        """Remember a hook handle so that ``remove_hooks`` can undo the patch."""
        self._handles.append(handle)

    def remove_hooks(self) -> None:
        """Detach the forward hooks this method added (parametrizations stay)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def trainable_parameters(self) -> List[nn.Parameter]:
        """Everything the optimiser should update for this method."""
        return [p for p in self.parameters() if p.requires_grad]


def _none() -> None:
    """No PEFT: the visual tower stays entirely frozen (apply_peft returns None)."""
    return None


PEFT.register("none")(_none)


AUTO = "auto"  # a size option set to this follows LIFT's rule (``auto_bottleneck``)
FROM_MODEL = ("num_classes",)  # builder arguments apply_peft fills from the model, never user options


def auto_bottleneck(num_classes: int, layers: int) -> int:
    """LIFT's adapter width ``2 ** max(0, floor(log2(C / (2 L))))`` for C classes and L blocks.

    shijxcs/LIFT models/peft_vit.py: ``adapter_dim = 2 ** max(0, int(math.log2(num_classes /
    (n_layers * 2))))`` (int() and floor agree wherever the max does not clamp to 0).
    """
    if num_classes < 1 or layers < 1:
        raise PEFTError(f"auto bottleneck needs num_classes >= 1 and layers >= 1, got {num_classes}, {layers}")
    return 2 ** max(0, math.floor(math.log2(num_classes / (2 * layers))))


def resolve_size(method: str, key: str, value: Any, num_classes: Optional[int], layers: int) -> int:
    """An integer size option, or ``auto`` resolved by ``auto_bottleneck`` (needs the class count)."""
    if value == AUTO:
        if num_classes is None:
            raise PEFTError(f"PEFT method '{method}': {key}: auto needs the number of classes (build it through build_model)")
        return auto_bottleneck(num_classes, layers)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise PEFTError(f"PEFT method '{method}': {key} must be an integer >= 1 or 'auto', got {value!r}")
    return int(value)


def peft_options(name: str) -> List[str]:
    """The option names a registered PEFT method accepts (``num_classes`` comes from the model)."""
    return [p for p in inspect.signature(PEFT.get(name)).parameters if p != "self" and p not in FROM_MODEL]


def apply_peft(name: str, visual: nn.Module, num_classes: Optional[int] = None, **options: Any) -> Optional[PEFTMethod]:
    """Build PEFT[name](**options) and apply it to ``visual``; 'none' returns None.

    ``num_classes`` reaches the builders that take it (size options set to ``auto``)."""
    builder: Callable[..., Optional[PEFTMethod]] = PEFT.get(name)
    valid = peft_options(name)
    message = unknown_options_message(f"PEFT method '{name}'", options, valid)
    if message:
        raise PEFTError(message)
    if "num_classes" in inspect.signature(builder).parameters:
        options = {**options, "num_classes": num_classes}
    method = builder(**options)
    if method is None:
        for param in visual.parameters():
            param.requires_grad_(False)
        return None
    method.apply(visual)
    return method


def stage_out_channels(stage: nn.Module, where: str) -> int:
    """Output channels of a conv stage: those of its last Conv2d."""
    convs = [m for m in stage.modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise PEFTError(f"{where} has no Conv2d layer to size an adapter from")
    return convs[-1].out_channels


def resolve_stages(
    method: str, requested: Optional[List[int]], count: int, default: List[int]
) -> List[int]:
    """Validate 0-based stage indices (negative ones count from the end), sorted and unique."""
    chosen = default if requested is None else list(requested)
    resolved = []
    for index in chosen:
        if not isinstance(index, int) or not -count <= index < count:
            raise PEFTError(
                f"PEFT method '{method}': stage {index!r} out of range; this tower has stages 0..{count - 1}"
            )
        resolved.append(index % count)
    if not resolved:
        raise PEFTError(f"PEFT method '{method}': 'stages' is empty")
    return sorted(set(resolved))


def named_biases(module: nn.Module) -> Iterator[Tuple[str, nn.Parameter]]:
    """Every parameter whose own name is 'bias' or ends in '_bias' (e.g. MultiheadAttention.in_proj_bias)."""
    for name, param in module.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        if leaf == "bias" or leaf.endswith("_bias"):
            yield name, param
