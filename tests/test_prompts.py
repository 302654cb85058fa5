"""PromptLearner: placeholder layout, context shapes and init, one text pass, eval cache."""
import warnings

import pytest
import torch

from capnet.errors import CapnetError
from capnet.models.prompts import PromptLearner, count_tokens
from toy_backbone import ToyBackbone

NAMES = ["dog", "pottedplant", "dining_table", "cat"]


@pytest.fixture
def backbone():
    return ToyBackbone(seed=0)


def test_count_tokens(backbone):
    assert count_tokens(backbone, "a photo of a") == 4
    assert count_tokens(backbone, "") == 0


@pytest.mark.parametrize("class_specific,shape", [(False, (4, 16)), (True, (4, 4, 16))])
def test_context_shape_and_output(backbone, class_specific, shape):
    pl = PromptLearner(backbone, NAMES, n_ctx=4, class_specific=class_specific, init=None)
    assert tuple(pl.ctx.shape) == shape
    out = pl()
    assert out.shape == (4, backbone.text_dim)
    assert pl.tokens.shape == (4, backbone.context_length)


def test_init_phrase_equals_hand_prompt(backbone):
    """With init = the phrase and n_ctx = its length, the soft prompt IS "a photo of a <cls>."."""
    pl = PromptLearner(backbone, NAMES, n_ctx=4, class_specific=False, init="a photo of a")
    hand = backbone.encode_text(["a photo of a dog.", "a photo of a potted plant.", "a photo of a dining table.", "a photo of a cat."])
    assert torch.allclose(pl(), hand, atol=1e-5)


@pytest.mark.parametrize("n_ctx", [16, 2])
def test_init_phrase_sets_n_ctx_as_coop(backbone, n_ctx):
    """CoOp: with ctx_init, n_ctx is the phrase's token count; a different setting warns and is overridden."""
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match=rf"using n_ctx=2 as CoOp does \(prompts.n_ctx={n_ctx} ignored\)") \
            if n_ctx != 2 else warnings.catch_warnings():
        if n_ctx == 2:
            warnings.simplefilter("error")  # a matching n_ctx is silent
        pl = PromptLearner(backbone, NAMES, n_ctx=n_ctx, class_specific=True, init="a photo")
    assert pl.n_ctx == 2 and tuple(pl.ctx.shape) == (4, 2, 16)
    phrase = backbone.embed_tokens(backbone.tokenize(["a photo"]))[0, 1:3]
    for c in range(4):
        assert torch.allclose(pl.ctx[c], phrase)  # no random slot left
    hand = backbone.encode_text([f"a photo {n}." for n in ("dog", "potted plant", "dining table", "cat")])
    assert torch.allclose(pl(), hand, atol=1e-5)


def test_empty_init_is_an_error(backbone):
    with pytest.raises(CapnetError, match="has no tokens"):
        PromptLearner(backbone, NAMES, n_ctx=4, init=" ")


def test_frozen_parts_are_buffers_and_grad_reaches_ctx(backbone):
    pl = PromptLearner(backbone, NAMES, n_ctx=4)
    assert [n for n, _ in pl.named_parameters()] == ["ctx"]
    pl().sum().backward()
    assert pl.ctx.grad is not None and pl.ctx.grad.abs().sum() > 0


def test_eval_cache_and_invalidation(backbone):
    pl = PromptLearner(backbone, NAMES, n_ctx=4).eval()
    with torch.no_grad():
        calls = backbone.text_calls
        a = pl()
        b = pl()
        assert backbone.text_calls == calls + 1 and a is b
        pl.ctx.add_(1.0)  # an optimiser step bumps the version
        c = pl()
        assert backbone.text_calls == calls + 2 and not torch.allclose(a, c)
    pl.train()
    pl.eval()
    with torch.no_grad():
        pl()
    assert backbone.text_calls == calls + 3
    pl.train()
    pl()
    pl()
    assert backbone.text_calls == calls + 5  # never cached in train mode
