"""Residual convolutional bottleneck adapters after chosen CNN stages (Conv-Adapter style).

After stage k: ``y = x + up(ReLU(down(x)))`` with 1x1 convs C -> C/reduction -> C and ``up``
zero-initialised, so the tower is unchanged at initialisation. Stages are 0-based: for
ModifiedResNet index k is ``layer{k+1}``; for a staged CNN it is ``visual.stages[k]``. Default:
the last stage only.

On a staged CNN the adapter is a forward PRE-hook on the module after stage k (``stages[k+1]``,
or ``visual.pool`` after the last stage), so stage k itself stays in the frozen, cacheable
prefix: ``cached_depth = min(stages) + 1``. An adapter on the last VGG block therefore trains on
cached block-5 maps and never re-runs a convolution of the tower. A tower without ``pool`` falls
back to a forward hook on stage k (``cached_depth = k``). On the unsplit CLIP RN50, cached_depth=0.
"""
from __future__ import annotations

import math
from typing import Any, List, Optional, Sequence

import torch
from torch import nn

from capnet.models.peft.base import RESNET, STAGED_CNN, PEFTMethod, resolve_stages, stage_out_channels
from capnet.registry import PEFT


class ConvBottleneck(nn.Module):
    """1x1 conv down, ReLU, 1x1 conv up (zero-init): the residual branch of one adapter."""

    def __init__(self, channels: int, hidden: int) -> None:
        super().__init__()
        self.down = nn.Conv2d(channels, hidden, kernel_size=1)
        self.up = nn.Conv2d(hidden, channels, kernel_size=1)
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, C, H, W) residual branch."""
        return self.up(torch.relu(self.down(x)))


class ConvAdapter(PEFTMethod):
    """One ConvBottleneck per chosen stage, added to that stage's output by a forward hook."""

    name = "conv_adapter"
    supported = (RESNET, STAGED_CNN)

    def __init__(self, stages: Optional[Sequence[int]] = None, reduction: int = 4) -> None:
        super().__init__()
        if reduction < 1:
            raise ValueError(f"PEFT method 'conv_adapter': reduction must be >= 1, got {reduction}")
        self.stages = None if stages is None else list(stages)
        self.reduction = int(reduction)
        self.adapters = nn.ModuleDict()

    def _patch(self, visual: nn.Module, kind: str) -> None:
        if kind == RESNET:
            blocks: List[nn.Module] = [visual.layer1, visual.layer2, visual.layer3, visual.layer4]
        else:
            blocks = list(visual.stages)
        chosen = resolve_stages(self.name, self.stages, len(blocks), [len(blocks) - 1])
        self.stages = chosen
        first = []
        for k in chosen:
            channels = stage_out_channels(blocks[k], f"stage {k} of {type(visual).__name__}")
            adapter = ConvBottleneck(channels, max(1, channels // self.reduction))
            self.adapters[str(k)] = adapter
            after = self._next_module(visual, blocks, k) if kind == STAGED_CNN else None
            if after is not None:
                self.hook(after.register_forward_pre_hook(self._residual_input(adapter)))
                first.append(k + 1)
            else:
                self.hook(blocks[k].register_forward_hook(self._residual(adapter)))
                first.append(k)
        self.cached_depth = min(first) if kind == STAGED_CNN else 0

    @staticmethod
    def _next_module(visual: nn.Module, blocks: List[nn.Module], k: int) -> Optional[nn.Module]:
        """The module that consumes stage k's output (None when the tower has no ``pool``)."""
        return blocks[k + 1] if k + 1 < len(blocks) else getattr(visual, "pool", None)

    @staticmethod
    def _residual(adapter: ConvBottleneck):
        """Forward hook: stage output x -> x + adapter(x)."""

        def hook(module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
            return output + adapter(output)

        return hook

    @staticmethod
    def _residual_input(adapter: ConvBottleneck):
        """Forward pre-hook on the next module: its input x -> x + adapter(x)."""

        def hook(module: nn.Module, args: Any) -> Any:
            return (args[0] + adapter(args[0]),) + tuple(args[1:])

        return hook


@PEFT.register("conv_adapter")
def conv_adapter(stages: Optional[Sequence[int]] = None, reduction: int = 4) -> ConvAdapter:
    """Conv adapters after ``stages`` (0-based, default the last) with width C // ``reduction``."""
    return ConvAdapter(stages=stages, reduction=reduction)
