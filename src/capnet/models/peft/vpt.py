"""Visual Prompt Tuning (Jia et al., ECCV 2022, Sec. 3.2): learnable tokens in the ViT sequence.

Shallow: ``num_tokens`` prompts are inserted after the class token at the input of the first
block. Deep: block 0 inserts layer-0 prompts and every later block replaces those positions with
its own prompts. Implemented with forward pre-hooks on ``visual.transformer.resblocks``. Inserted
tokens change attention for every token, so VPT is *not* equal to the frozen tower at
initialisation; the class token stays at position 0, so pooling is unchanged in form.
"""
from __future__ import annotations

import math
from typing import Any, Dict, Tuple

import torch
from torch import nn

from capnet.models.peft.base import VIT, PEFTMethod
from capnet.registry import PEFT


class VPT(PEFTMethod):
    """Prompt tokens (L, n, d) with L = number of blocks (deep) or 1 (shallow)."""

    supported = (VIT,)

    def __init__(self, num_tokens: int = 10, deep: bool = False) -> None:
        super().__init__()
        if num_tokens < 1:
            raise ValueError(f"PEFT method 'vpt': num_tokens must be >= 1, got {num_tokens}")
        self.name = "vpt_deep" if deep else "vpt_shallow"
        self.num_tokens, self.deep = int(num_tokens), bool(deep)
        self.prompts = nn.Parameter(torch.empty(0))
        self._batch_first = True

    def _patch(self, visual: nn.Module, kind: str) -> None:
        transformer = visual.transformer
        self._batch_first = bool(getattr(transformer, "batch_first", True))
        layers = len(transformer.resblocks) if self.deep else 1
        width = transformer.width
        patch = visual.patch_size if isinstance(visual.patch_size, tuple) else (visual.patch_size,) * 2
        bound = math.sqrt(6.0 / float(3 * patch[0] * patch[1] + width))  # VPT's Xavier-uniform bound
        self.prompts = nn.Parameter(torch.empty(layers, self.num_tokens, width).uniform_(-bound, bound))
        for index, block in enumerate(transformer.resblocks):
            if index == 0 or self.deep:
                self.hook(block.register_forward_pre_hook(self._hook(index), with_kwargs=True))

    def _hook(self, index: int):
        """Pre-hook of block ``index``: insert (block 0) or overwrite (deep, later blocks) prompts."""

        def hook(module: nn.Module, args: Tuple[Any, ...], kwargs: Dict[str, Any]):
            x = args[0] if args else kwargs["q_x"]
            if not self._batch_first:
                x = x.transpose(0, 1)
            prompts = self.prompts[index].to(x.dtype).unsqueeze(0).expand(x.shape[0], -1, -1)
            n = self.num_tokens
            if index == 0:
                x = torch.cat([x[:, :1], prompts, x[:, 1:]], dim=1)
            else:
                x = torch.cat([x[:, :1], prompts, x[:, 1 + n:]], dim=1)
            if not self._batch_first:
                x = x.transpose(0, 1)
            if args:
                return (x,) + tuple(args[1:]), kwargs
            return args, {**kwargs, "q_x": x}

        return hook


@PEFT.register("vpt_shallow")
def vpt_shallow(num_tokens: int = 10) -> VPT:
    """VPT-Shallow: ``num_tokens`` prompts at the input of the first block."""
    return VPT(num_tokens=num_tokens, deep=False)


@PEFT.register("vpt_deep")
def vpt_deep(num_tokens: int = 10) -> VPT:
    """VPT-Deep: fresh ``num_tokens`` prompts at the input of every block."""
    return VPT(num_tokens=num_tokens, deep=True)
