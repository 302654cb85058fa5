"""LoRA (Hu et al., ICLR 2022, eq. 3) on the ViT attention: W + (alpha / r) * B A for qkv and out.

Implemented with ``torch.nn.utils.parametrize`` on ``attn.in_proj_weight`` (the fused q/k/v
projection of ``nn.MultiheadAttention``) and ``attn.out_proj.weight``. Targets ``q``, ``k``, ``v``
adapt one third of the fused projection each (LoRA's paper and LIFT adapt q and v: shijxcs/LIFT
models/peft_vit.py, ``"q"`` / ``"v"`` LoRA modules); ``qkv`` is one update of the whole. B is zero-initialised so
the tower is unchanged at initialisation. Note: parametrisation renames the frozen weights in the
tower's state_dict to ``...parametrizations.<name>.original``; load tower weights before applying.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from capnet.models.peft.base import AUTO, VIT, PEFTError, PEFTMethod, resolve_size
from capnet.registry import PEFT

TARGETS = ("qkv", "out")  # the default targets
ALL_TARGETS = ("qkv", "q", "k", "v", "out")
THIRDS = {"q": 0, "k": 1, "v": 2}  # row block of the fused in_proj_weight


class LoRADelta(nn.Module):
    """Parametrization W -> W + scaling * B @ A with A (r, in) Kaiming-uniform, B (out, r) zeros."""

    def __init__(self, out_features: int, in_features: int, rank: int, alpha: float,
                 rows: Optional[Tuple[int, int]] = None) -> None:
        super().__init__()
        self.rows = rows  # (lo, hi): the update covers only these rows of the weight (q, k or v of qkv)
        self.lora_A = nn.Parameter(torch.empty(rank, in_features))
        self.lora_B = nn.Parameter(torch.zeros(out_features if rows is None else rows[1] - rows[0], rank))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.scaling = alpha / rank

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        """The effective weight seen by the wrapped layer."""
        delta = self.scaling * (self.lora_B @ self.lora_A).to(weight.dtype)
        if self.rows is not None:
            delta = F.pad(delta, (0, 0, self.rows[0], weight.shape[0] - self.rows[1]))
        return weight + delta


class LoRA(PEFTMethod):
    """Low-rank updates on every block's attention projections."""

    name = "lora"
    supported = (VIT,)

    def __init__(self, rank: Union[int, str] = 8, alpha: float = 8.0, targets: Sequence[str] = TARGETS,
                 num_classes: Optional[int] = None) -> None:
        super().__init__()
        if rank != AUTO:
            rank = resolve_size("lora", "rank", rank, None, 1)
        bad = [t for t in targets if t not in ALL_TARGETS]
        if bad or not targets or len(set(targets)) != len(targets):
            raise ValueError(f"PEFT method 'lora': targets must be a non-empty subset of {ALL_TARGETS}, got {list(targets)}")
        if "qkv" in targets and set(targets) & set(THIRDS):
            raise ValueError(f"PEFT method 'lora': targets {list(targets)} adapt q/k/v twice: give qkv or some of q, k, v")
        self.rank, self.alpha, self.targets, self.num_classes = rank, float(alpha), tuple(targets), num_classes
        self.deltas = nn.ModuleList()

    def _patch(self, visual: nn.Module, kind: str) -> None:
        self.rank = resolve_size("lora", "rank", self.rank, self.num_classes, len(visual.transformer.resblocks))
        for index, block in enumerate(visual.transformer.resblocks):
            attn = getattr(block, "attn", None)
            if not isinstance(attn, nn.MultiheadAttention) or not attn._qkv_same_embed_dim:
                raise PEFTError(
                    f"PEFT method 'lora': block {index} of {type(visual).__name__} has no fused "
                    f"nn.MultiheadAttention ({type(attn).__name__}); custom attention blocks are unsupported"
                )
            for module, param_name, rows in self._sites(attn):
                out_f, in_f = getattr(module, param_name).shape
                delta = LoRADelta(out_f, in_f, self.rank, self.alpha, rows)
                parametrize.register_parametrization(module, param_name, delta)
                self.deltas.append(delta)

    def _sites(self, attn: nn.MultiheadAttention) -> Tuple[Tuple[nn.Module, str, Optional[Tuple[int, int]]], ...]:
        """(module, parameter name, rows) to adapt, in the order of ``targets``."""
        d = attn.embed_dim
        sites = {"qkv": (attn, "in_proj_weight", None), "out": (attn.out_proj, "weight", None)}
        sites.update({t: (attn, "in_proj_weight", (i * d, (i + 1) * d)) for t, i in THIRDS.items()})
        return tuple(sites[t] for t in self.targets)


@PEFT.register("lora")
def lora(rank: Union[int, str] = 8, alpha: float = 8.0, targets: Sequence[str] = TARGETS,
         num_classes: Optional[int] = None) -> LoRA:
    """LoRA of rank ``rank`` (``auto``: LIFT's rule, peft/base.auto_bottleneck) and scaling
    ``alpha / rank`` on ``targets`` ('qkv' or some of 'q', 'k', 'v'; 'out'); LIFT: rank auto,
    alpha 1 (scaling 1 / rank), targets q and v."""
    return LoRA(rank=rank, alpha=alpha, targets=targets, num_classes=num_classes)
