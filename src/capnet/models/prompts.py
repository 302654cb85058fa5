"""CoOp soft prompts (Zhou et al., IJCV 2022; CAPNET Sec. 3.2): learnable context vectors.

Every class gets the placeholder prompt ``"X X ... X <class text>."`` (``n_ctx`` X's). It is
tokenized once; the token embeddings of the start token, the class words, the full stop, EOT
and padding are frozen buffers, and the ``n_ctx`` rows of the X's are replaced by learnable
context vectors (shared by all classes, or one set per class: CoOp's "CSC"). The frozen text
tower runs once per call for all C classes (or for a subset of class indices: the budgeted text
branch, ``text_bank.py``), never per image. The frozen token embeddings are looked up from the
token ids at each call rather than stored: a stored (C, 77, W) copy is 1.2 GB at C = 10,000.
"""
from __future__ import annotations

import warnings
from typing import List, Optional, Tuple

import torch
from torch import nn

from capnet.errors import CapnetError
from capnet.models.backbones.base import Backbone
from capnet.models.templates import class_text

INIT_STD = 0.02  # CoOp's random context initialisation N(0, 0.02)


def count_tokens(backbone: Backbone, phrase: str) -> int:
    """Number of tokens ``phrase`` adds between the start and end tokens (tokenizer-agnostic)."""
    tokens = backbone.tokenize([phrase, ""])
    pad = int(tokens[1, -1])
    lengths = (tokens != pad).sum(dim=1)
    return int(lengths[0] - lengths[1])


class EvalCache:
    """Caches one tensor in eval mode under no_grad, keyed on the versions of some parameters.

    An optimiser step or ``load_state_dict`` bumps a parameter's version counter, and ``train()``
    clears the cache, so a stale value is never returned. With grad enabled nothing is cached
    (the engine may call ``eval()`` while still wanting gradients).
    """

    def __init__(self) -> None:
        self._key: Optional[Tuple] = None
        self._value: Optional[torch.Tensor] = None

    def clear(self) -> None:
        """Forget the cached value."""
        self._key, self._value = None, None

    @staticmethod
    def key_of(tensors: List[torch.Tensor]) -> Tuple:
        """Identity of a set of tensors: storage, version, device and dtype of each (a sparse
        tensor by its values, which carry no ``data_ptr`` of their own)."""
        dense = [t._values() if t.is_sparse else t for t in tensors]
        return tuple((t.data_ptr(), t._version, t.device, t.dtype) for t in dense)

    def get(self, training: bool, tensors: List[torch.Tensor]) -> Optional[torch.Tensor]:
        """The cached value if it is valid for this mode and these tensors, else None."""
        if training or torch.is_grad_enabled() or self._key is None:
            return None
        return self._value if self._key == self.key_of(tensors) else None

    def put(self, training: bool, tensors: List[torch.Tensor], value: torch.Tensor) -> torch.Tensor:
        """Store ``value`` when caching is allowed; return it either way."""
        if not training and not torch.is_grad_enabled():
            self._key, self._value = self.key_of(tensors), value
        return value


class PromptLearner(nn.Module):
    """Learnable context vectors in front of each class name -> (C, text_dim) class embeddings."""

    def __init__(
        self,
        backbone: Backbone,
        class_names: List[str],
        n_ctx: int,
        class_specific: bool = False,
        init: Optional[str] = None,
    ) -> None:
        super().__init__()
        if n_ctx < 1:
            raise CapnetError(f"prompts: n_ctx must be >= 1, got {n_ctx}")
        n_ctx = self.context_length_for(backbone, n_ctx, init)
        # Not registered as a submodule: the backbone belongs to the model that owns us.
        object.__setattr__(self, "_backbone", backbone)
        self.n_ctx, self.class_specific = n_ctx, class_specific
        self.num_classes = len(class_names)
        placeholder = " ".join(["X"] * n_ctx)
        prompts = [f"{placeholder} {class_text(name)}." for name in class_names]
        tokens = backbone.tokenize(prompts).to(backbone.device)
        with torch.no_grad():
            embedding = backbone.embed_tokens(tokens[:1]).detach()  # width and dtype only
        self.register_buffer("tokens", tokens, persistent=False)
        ctx = self._init_context(backbone, n_ctx, init, embedding.shape[-1], embedding.dtype)
        if class_specific:
            ctx = ctx.unsqueeze(0).repeat(self.num_classes, 1, 1)
        self.ctx = nn.Parameter(ctx)
        self._cache = EvalCache()

    @staticmethod
    def context_length_for(backbone: Backbone, n_ctx: int, init: Optional[str]) -> int:
        """CoOp's rule: with an init phrase the context is exactly the phrase (n_ctx = its tokens).

        CoOp (``ctx_init``) sets n_ctx to the phrase length, so the soft prompt starts as the
        hand prompt "a photo of a <class>." and nothing in it is random; a configured n_ctx that
        differs is overridden with a warning that names the value to write instead.
        """
        if not init:
            return n_ctx
        k = count_tokens(backbone, init)
        if k < 1:
            raise CapnetError(f"prompts.init {init!r} has no tokens; give a phrase or init: null")
        if k != n_ctx:
            warnings.warn(f"prompts.init {init!r} has {k} tokens: using n_ctx={k} as CoOp does "
                          f"(prompts.n_ctx={n_ctx} ignored); set prompts.n_ctx={k} to silence this", stacklevel=3)
        return k

    @staticmethod
    def _init_context(backbone: Backbone, n_ctx: int, init: Optional[str], width: int, dtype: torch.dtype) -> torch.Tensor:
        """(n_ctx, W) context: the init phrase's token embeddings, or random N(0, 0.02) without one."""
        ctx = torch.randn(n_ctx, width, dtype=dtype) * INIT_STD
        if init:
            k = count_tokens(backbone, init)  # == n_ctx (context_length_for)
            tokens = backbone.tokenize([init]).to(backbone.device)
            with torch.no_grad():
                emb = backbone.embed_tokens(tokens)[0].detach().cpu().to(dtype)
            start = backbone.context_offset
            ctx[n_ctx - k :] = emb[start : start + k]
        return ctx

    @property
    def backbone(self) -> Backbone:
        return self._backbone

    def train(self, mode: bool = True) -> "PromptLearner":
        self._cache.clear()
        return super().train(mode)

    def prompt_embeddings(self, rows: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(C, L, W) token embeddings with the context vectors spliced in (``rows``: only those classes).

        Class-specific contexts are indexed by class; a shared context is just expanded to fewer rows.
        """
        tokens = self.tokens if rows is None else self.tokens[rows]
        with torch.no_grad():
            frozen = self.backbone.embed_tokens(tokens)
        start, n = self.backbone.context_offset, len(tokens)
        if self.class_specific:
            ctx = self.ctx if rows is None else self.ctx[rows]
        else:
            ctx = self.ctx.unsqueeze(0).expand(n, -1, -1)
        ctx = ctx.to(frozen.dtype)
        return torch.cat([frozen[:, :start], ctx, frozen[:, start + self.n_ctx :]], dim=1)

    def forward(self, rows: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(C, text_dim) class embeddings from one pass of the frozen text tower.

        ``rows`` (1-D class indices) runs only those classes: (len(rows), text_dim), never cached.
        """
        if rows is not None:
            return self.backbone.encode_token_embeddings(self.prompt_embeddings(rows), self.tokens[rows])
        cached = self._cache.get(self.training, [self.ctx])
        if cached is not None:
            return cached
        out = self.backbone.encode_token_embeddings(self.prompt_embeddings(), self.tokens)
        return self._cache.put(self.training, [self.ctx], out)
