"""AdaptFormer (Chen et al., NeurIPS 2022, Sec. 3.2): a parallel bottleneck adapter on each MLP branch.

Block l becomes ``x = x' + MLP(LN(x')) + s * up(ReLU(down(LN_a(x'))))`` where ``x'`` is the input
of the MLP sub-block (the input of ``ln_2``). The adapter has its own LayerNorm (as in LIFT); the
up-projection is zero-initialised, so the tower is unchanged at initialisation.
"""
from __future__ import annotations

import math
from typing import Any, Optional

import torch
from torch import nn

from capnet.models.peft.base import VIT, PEFTMethod
from capnet.registry import PEFT


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

    def __init__(self, bottleneck: int = 64, scale: float = 0.1, learnable_scale: bool = False) -> None:
        super().__init__()
        if bottleneck < 1:
            raise ValueError(f"PEFT method 'adaptformer': bottleneck must be >= 1, got {bottleneck}")
        self.bottleneck, self.scale, self.learnable_scale = int(bottleneck), float(scale), bool(learnable_scale)
        self.adapters = nn.ModuleList()
        self._pending: dict = {}

    def _patch(self, visual: nn.Module, kind: str) -> None:
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
def adaptformer(bottleneck: int = 64, scale: float = 0.1, learnable_scale: bool = False) -> AdaptFormer:
    """AdaptFormer with bottleneck width ``bottleneck`` and branch scale ``scale`` (paper: 0.1)."""
    return AdaptFormer(bottleneck=bottleneck, scale=scale, learnable_scale=learnable_scale)
