"""Batch-first self-attention with one contiguous in-projection GEMM (open_clip's CLIP blocks).

open_clip's ``ResidualAttentionBlock`` runs a batch-first ``nn.MultiheadAttention``. torch's
module transposes the (B, L, D) input into a non-contiguous (L, B, D) view before the packed
q/k/v projection; when the weight does not require grad (capnet's frozen towers, PEFT on top),
``matmul`` cannot fold that view into one GEMM and runs ``bmm`` over the L positions against the
weight expanded L times instead (plus the ``aten::copy_`` of that expansion). Issue 31 measured
one frozen ViT-B/16 block at batch 32, forward + backward on 2 cores: 1,024 ms under bf16 autocast
vs 748 ms for a contiguous layout (float32: 1,513 vs 1,355 ms), and ``aten::copy_`` as half of
the train step's CPU time; this module on the same block (2-core AMD EPYC with AVX512-BF16, a
shared machine, fastest of 3): bf16 2,021 -> 943 ms, float32 2,432 -> 2,151 ms. The fix belongs upstream (torch's MHA input layout / open_clip's block); until then
``use_contiguous_attention`` re-classes those modules in place to ``ContiguousMultiheadAttention``,
whose self-attention path computes exactly what torch's slow path computes (same projections,
same ``scaled_dot_product_attention`` call, same dropout) in the batch-first layout, and defers to
torch for everything else: its fused inference kernel (eval, no grad, no autocast: bit for bit),
cross-attention, padding masks, attention weights, seq-first. One deliberate difference: torch
takes that float32 kernel inside a CPU autocast region too (it checks CUDA's autocast only); here
a bf16 region runs the projections in bf16, as training and CUDA do.
Parameters, buffers, state-dict keys, hooks and parametrisations (LoRA) are untouched.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn


class ContiguousMultiheadAttention(nn.MultiheadAttention):
    """``nn.MultiheadAttention`` whose batch-first self-attention keeps (B, L, D) contiguous."""

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: Optional[torch.Tensor] = None, need_weights: bool = True,
                attn_mask: Optional[torch.Tensor] = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """torch's MHA forward; batch-first self-attention without weights takes the contiguous path."""
        if (not self._contiguous_path(query, key, value, key_padding_mask, need_weights, attn_mask)
                or self._torch_fast_path(query, attn_mask)):
            return super().forward(query, key, value, key_padding_mask=key_padding_mask,
                                   need_weights=need_weights, attn_mask=attn_mask,
                                   average_attn_weights=average_attn_weights, is_causal=is_causal)
        bsz, length, dim = query.shape
        heads = self.num_heads
        qkv = F.linear(query, self.in_proj_weight, self.in_proj_bias)  # (B, L, 3D): one GEMM
        q, k, v = qkv.view(bsz, length, 3, heads, dim // heads).permute(2, 0, 3, 1, 4).unbind(0)
        mask = _float_mask(attn_mask, query.dtype)
        if is_causal and mask is not None:
            is_causal = False  # torch's MHA keeps an explicit mask and drops the hint
        dropout = self.dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, mask, dropout, is_causal)  # (B, H, L, D / H)
        out = out.transpose(1, 2).reshape(bsz, length, dim)
        return F.linear(out, self.out_proj.weight, self.out_proj.bias), None

    def _contiguous_path(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                         key_padding_mask: Optional[torch.Tensor], need_weights: bool,
                         attn_mask: Optional[torch.Tensor]) -> bool:
        """Whether this call is the batch-first packed self-attention the fast layout reproduces."""
        return (self.batch_first and query is key and key is value and query.dim() == 3
                and key_padding_mask is None and not need_weights and self._qkv_same_embed_dim
                and self.in_proj_weight is not None and self.bias_k is None and not self.add_zero_attn
                and (attn_mask is None or attn_mask.dim() == 2))


    def _torch_fast_path(self, query: torch.Tensor, attn_mask: Optional[torch.Tensor]) -> bool:
        """Whether torch would take its fused inference kernel (eval, no grad, no float mask, no
        CUDA autocast: its own conditions), which has no layout problem: keep it, bit for bit."""
        mha = getattr(torch.backends, "mha", None)
        if (mha is not None and not mha.get_fastpath_enabled()) or self.training or self.num_heads % 2:
            return False
        if (attn_mask is not None and attn_mask.is_floating_point()) or query.is_nested:
            return False
        if _autocast_on(query.device.type):  # torch checks CUDA's autocast only: on CPU its float32
            return False  # kernel would ignore a bf16 region, where the projections belong in bf16
        params = (self.in_proj_weight, self.in_proj_bias, self.out_proj.weight, self.out_proj.bias)
        if any(p is not None and p.dtype != query.dtype for p in params[:2]):
            return False
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (query, *params)):
            return False
        tracing = [getattr(torch.compiler, f, lambda: False) for f in ("is_compiling", "is_exporting")]  # torch >= 2.1
        return not any(f() for f in tracing)  # torch takes its slow path under make_fx / export


def _autocast_on(device_type: str) -> bool:
    """Whether autocast is on for ``device_type`` (torch >= 2.4 takes the device; 2.1-2.3 do not)."""
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:
        return torch.is_autocast_cpu_enabled() if device_type == "cpu" else torch.is_autocast_enabled()


def _float_mask(mask: Optional[torch.Tensor], dtype: torch.dtype) -> Optional[torch.Tensor]:
    """torch MHA's mask convention (bool True = blocked) as an additive float mask for SDPA."""
    if mask is None or mask.is_floating_point():
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(mask, float("-inf"))


def use_contiguous_attention(model: nn.Module) -> int:
    """Re-class every plain batch-first ``nn.MultiheadAttention`` of ``model`` in place; returns how many."""
    count = 0
    for module in model.modules():
        if type(module) is nn.MultiheadAttention and module.batch_first:
            module.__class__ = ContiguousMultiheadAttention
            count += 1
    return count
