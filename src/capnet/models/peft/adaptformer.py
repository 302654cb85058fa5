"""AdaptFormer (Chen et al., NeurIPS 2022, Sec. 3.2): a parallel bottleneck adapter on each MLP branch.

Block l becomes ``x = x' + MLP(LN(x')) + s * up(ReLU(down(LN_a(x'))))`` where ``x'`` is the input
of the MLP sub-block (the input of ``ln_2``). The adapter has its own LayerNorm (as in LIFT); the
up-projection is zero-initialised, so the tower is unchanged at initialisation.

Size and scale: AdaptFormer's paper uses ``bottleneck=64`` and a fixed ``s=0.1`` (the defaults
here); LIFT (shijxcs/LIFT, models/peft_modules.py ``AdaptFormer``, utils/config.py
``adaptformer_scale = "learnable"``) learns ``s`` from 1 and sizes the bottleneck by
``2 ** max(0, floor(log2(C / 2L)))``: ``scale: learnable`` and ``bottleneck: auto``.
"""
from __future__ import annotations

import math
from typing import Any, Optional, Union

import torch
from torch import nn

from capnet.models.peft.base import AUTO, VIT, PEFTError, PEFTMethod, resolve_size
from capnet.registry import PEFT


LEARNABLE = "learnable"  # scale option: a learned scalar started at 1 (LIFT)


class BottleneckAdapter(nn.Module):
    """LN -> down (d -> r) -> ReLU -> up (r -> d, zero-init) -> * scale."""

    def __init__(self, dim: int, bottleneck: int, scale: float, learnable_scale: bool) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(dim)
        self.down = nn.Linear(dim, bottleneck)
        self.up = nn.Linear(bottleneck, dim)
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)
        if learnable_scale:
            self.scale = nn.Parameter(torch.tensor(float(scale)))
        else:
            self.register_buffer("scale", torch.tensor(float(scale)), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., d) -> (..., d) adapter branch."""
        return self.up(torch.relu(self.down(self.ln(x)))) * self.scale


class AdaptFormer(PEFTMethod):
    """One BottleneckAdapter per ViT block, added in parallel to the MLP through two forward hooks."""

    name = "adaptformer"
    supported = (VIT,)

    def __init__(self, bottleneck: Union[int, str] = 64, scale: Union[float, str] = 0.1, learnable_scale: bool = False,
                 num_classes: Optional[int] = None) -> None:
        super().__init__()
        if bottleneck != AUTO:
            bottleneck = resolve_size("adaptformer", "bottleneck", bottleneck, None, 1)
        if scale == LEARNABLE:  # LIFT: nn.Parameter(torch.ones(1))
            scale, learnable_scale = 1.0, True
        elif isinstance(scale, bool) or not isinstance(scale, (int, float)):
            raise PEFTError(f"PEFT method 'adaptformer': scale must be a number or '{LEARNABLE}', got {scale!r}")
        self.bottleneck, self.scale, self.learnable_scale = bottleneck, float(scale), bool(learnable_scale)
        self.num_classes = num_classes
        self.adapters = nn.ModuleList()
        self._pending: dict = {}

    def _patch(self, visual: nn.Module, kind: str) -> None:
        blocks = len(visual.transformer.resblocks)
        self.bottleneck = resolve_size("adaptformer", "bottleneck", self.bottleneck, self.num_classes, blocks)
        width = visual.transformer.width
        for index, block in enumerate(visual.transformer.resblocks):
            adapter = BottleneckAdapter(width, self.bottleneck, self.scale, self.learnable_scale)
            self.adapters.append(adapter)
            self.hook(block.ln_2.register_forward_hook(self._capture(index)))
            self.hook(block.mlp.register_forward_hook(self._add(index)))

    def _capture(self, index: int):
        """ln_2 hook: run the adapter on the pre-norm input x' of the MLP sub-block."""

        def hook(module: nn.Module, args: Any, output: torch.Tensor) -> None:
            self._pending[index] = self.adapters[index](args[0])

        return hook

    def _add(self, index: int):
        """mlp hook: add the adapter branch computed from the same x'."""

        def hook(module: nn.Module, args: Any, output: torch.Tensor) -> Optional[torch.Tensor]:
            branch = self._pending.pop(index, None)
            if branch is None:  # mlp called without ln_2 first: not the block's own forward
                return None
            return output + branch

        return hook


@PEFT.register("adaptformer")
def adaptformer(bottleneck: Union[int, str] = 64, scale: Union[float, str] = 0.1, learnable_scale: bool = False,
                num_classes: Optional[int] = None) -> AdaptFormer:
    """AdaptFormer with bottleneck width ``bottleneck`` (``auto``: LIFT's rule) and branch scale
    ``scale`` (paper: 0.1; ``learnable``: LIFT's learned scalar from 1)."""
    return AdaptFormer(bottleneck=bottleneck, scale=scale, learnable_scale=learnable_scale, num_classes=num_classes)
