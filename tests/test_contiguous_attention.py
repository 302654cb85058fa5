"""The contiguous CLIP attention path equals open_clip's own module (issue 31, item 1).

Every CLIP backbone capnet builds re-classes open_clip's batch-first ``nn.MultiheadAttention``
(``models/backbones/attention.py``). These tests compare the built towers with an untouched
open_clip model holding the same random weights: float32 to 1e-6 (outputs and the gradients of
whatever is trainable: input pixels, soft-prompt embeddings, PEFT parameters), bf16 autocast
close, and they check the path really is one GEMM (no ``bmm`` over positions).
"""
from __future__ import annotations

import copy

import pytest
import torch
from open_clip.transformer import ResidualAttentionBlock
from torch import nn

import capnet.models.backbones  # noqa: F401  (fills BACKBONES)
from capnet.models.backbones.attention import ContiguousMultiheadAttention, use_contiguous_attention
from capnet.models.backbones.clip import open_clip_model
from capnet.models.backbones.specs import CLIP_ARCHS
from capnet.models.peft import apply_peft
from capnet.registry import BACKBONES

TINY_VIT = "clip_tiny_vit.random"
TEXTS = ["a photo of a cat.", "a much longer sentence about a small dog with a red ball.", "tv monitor"]


def _pair(name: str = TINY_VIT):
    """(capnet backbone, untouched open_clip CLIP with the same weights)."""
    backbone = BACKBONES.get(name)(weights="random")
    reference = open_clip_model(CLIP_ARCHS[name].model_config(), quick_gelu=True)
    reference.load_state_dict(backbone.state_dict(), strict=True)
    return backbone, reference


def _image_step(visual: nn.Module, images: torch.Tensor, amp: bool):
    x = images.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
        out = visual(x)
    out.float().square().sum().backward()
    return out.float(), x.grad


def _close(got: torch.Tensor, want: torch.Tensor, tol: float = 1e-6) -> None:
    """Equal within ``tol`` of the larger of 1 and the reference's largest magnitude (gradients of a
    squared-sum loss reach ~100, where float32 rounding alone is ~1e-5 in absolute terms)."""
    scale = max(1.0, float(want.detach().abs().max()))
    torch.testing.assert_close(got, want, atol=tol * scale, rtol=0)


def test_built_backbones_use_the_contiguous_module() -> None:
    backbone, reference = _pair()
    patched = [m for m in backbone.modules() if isinstance(m, nn.MultiheadAttention)]
    assert patched and all(type(m) is ContiguousMultiheadAttention for m in patched)
    assert not any(isinstance(m, ContiguousMultiheadAttention) for m in reference.modules())
    assert set(backbone.state_dict()) <= set(reference.state_dict())  # same key layout


@pytest.mark.parametrize("amp", [False, True])
def test_image_tower_equals_open_clip(amp: bool) -> None:
    backbone, reference = _pair()
    for tower in (backbone, reference):
        tower.requires_grad_(False)  # frozen weights: the case torch's layout handles badly
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    got, got_grad = _image_step(backbone.visual, images, amp)
    want, want_grad = _image_step(reference.visual, images, amp)
    if amp:  # bf16: same ops, rounding differs with the GEMM shapes
        torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2)
        _close(got_grad, want_grad, tol=2e-2)
    else:
        _close(got, want)
        _close(got_grad, want_grad)


def _unpatched(backbone: nn.Module) -> nn.Module:
    """A copy of ``backbone`` whose attention modules are torch's own class again."""
    plain = copy.deepcopy(backbone)
    for m in plain.modules():
        if type(m) is ContiguousMultiheadAttention:
            m.__class__ = nn.MultiheadAttention
    return plain


def _text_step(backbone: nn.Module, tokens: torch.Tensor):
    emb = backbone.embed_tokens(tokens).detach().requires_grad_(True)
    out = backbone.encode_token_embeddings(emb, tokens)
    out.square().sum().backward()
    return out, emb.grad


def test_text_tower_with_causal_mask_equals_open_clip() -> None:
    """Soft prompts are trainable token embeddings run through the frozen, causally masked tower."""
    backbone, reference = _pair()
    backbone.requires_grad_(False)
    plain = _unpatched(backbone)
    tokens = backbone.tokenize(TEXTS)
    got, got_grad = _text_step(backbone, tokens)
    want, want_grad = _text_step(plain, tokens)  # the same sequence cut through torch's module
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    _close(got_grad, want_grad)
    # and open_clip's encode_text on the full 77 positions (the cut itself rounds differently)
    torch.testing.assert_close(got, reference.encode_text(tokens), atol=1e-5, rtol=1e-5)


def test_same_math_as_torch_in_float64() -> None:
    """In float64 rounding vanishes: the patched text tower equals torch's module to 1e-12."""
    backbone, _ = _pair()
    backbone = backbone.double().requires_grad_(False)
    tokens = backbone.tokenize(TEXTS)
    got, got_grad = _text_step(backbone, tokens)
    want, want_grad = _text_step(_unpatched(backbone), tokens)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=0)
    torch.testing.assert_close(got_grad, want_grad, atol=1e-10, rtol=0)


@pytest.mark.parametrize("method,options", [("adaptformer", {}), ("lora", {"rank": 4}), ("vpt_deep", {"num_tokens": 3})])
def test_peft_on_patched_blocks_equals_open_clip(method: str, options: dict) -> None:
    backbone, reference = _pair()
    torch.manual_seed(3)
    ours = apply_peft(method, backbone.visual, **options)
    torch.manual_seed(3)
    theirs = apply_peft(method, reference.visual, **options)
    with torch.no_grad():  # move off the zero init so every PEFT parameter gets a gradient
        for a, b in zip(ours.parameters(), theirs.parameters()):
            noise = torch.randn(a.shape, generator=torch.Generator().manual_seed(a.numel())) * 0.05
            a.add_(noise)
            b.add_(noise)
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    got, _ = _image_step(backbone.visual, images, amp=False)
    want, _ = _image_step(reference.visual, images, amp=False)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    grads = [(a.grad, b.grad) for a, b in zip(ours.trainable_parameters(), theirs.trainable_parameters())]
    assert grads and all(g is not None and g.abs().sum() > 0 for g, _ in grads)
    for g, h in grads:
        _close(g, h)


def _ops(fn) -> set:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return {e.key for e in prof.key_averages()}


def test_frozen_bf16_block_runs_one_gemm_not_bmm_over_positions() -> None:
    """The regression the module exists for: open_clip's layout ends in bmm against a weight
    expanded over the sequence (frozen weight, bf16); the patched one runs a single GEMM."""
    torch.manual_seed(0)
    block = ResidualAttentionBlock(64, 4).eval().requires_grad_(False)
    patched = copy.deepcopy(block)
    assert use_contiguous_attention(patched) == 1
    x = torch.randn(4, 17, 64, requires_grad=True)

    def run(module):
        def go():
            with torch.autocast("cpu", dtype=torch.bfloat16):
                module(x).float().sum().backward()
        return go

    assert "aten::bmm" in _ops(run(block))  # the test can fail: torch's path does hit bmm
    assert "aten::bmm" not in _ops(run(patched))


def test_fallbacks_keep_torch_semantics() -> None:
    """Cross-attention, attention weights and seq-first calls go to torch unchanged."""
    torch.manual_seed(0)
    plain = nn.MultiheadAttention(32, 4, batch_first=True)
    patched = copy.deepcopy(plain)
    use_contiguous_attention(patched)
    q, kv = torch.randn(2, 5, 32), torch.randn(2, 7, 32)
    torch.testing.assert_close(patched(q, kv, kv)[0], plain(q, kv, kv)[0], atol=1e-6, rtol=0)
    got, weights = patched(q, q, q, need_weights=True)
    want, want_weights = plain(q, q, q, need_weights=True)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    torch.testing.assert_close(weights, want_weights, atol=1e-6, rtol=0)
    mask = torch.triu(torch.ones(5, 5, dtype=torch.bool), diagonal=1)  # bool: True = blocked
    torch.testing.assert_close(patched(q, q, q, need_weights=False, attn_mask=mask)[0],
                               plain(q, q, q, need_weights=False, attn_mask=mask)[0], atol=1e-6, rtol=0)
    seq_first = nn.MultiheadAttention(32, 4)
    assert use_contiguous_attention(seq_first) == 0


def test_inference_float32_is_torch_bit_for_bit_and_bf16_close() -> None:
    """Eval + no grad: float32 is torch's own fused kernel (exact); a CPU bf16 region runs bf16 GEMMs."""
    backbone, reference = _pair()
    backbone.eval()
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want = reference.visual(images)
        torch.testing.assert_close(backbone.visual(images), want, atol=0, rtol=0)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got, theirs = backbone.visual(images).float(), reference.visual(images).float()
    torch.testing.assert_close(got, want, atol=5e-2, rtol=5e-2)
    torch.testing.assert_close(got, theirs, atol=5e-2, rtol=5e-2)
