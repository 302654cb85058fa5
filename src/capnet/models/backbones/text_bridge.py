"""The ImageNet text bridge: class names -> classifiers of an ImageNet-trained image tower.

An offline image tower with an ImageNet head (EfficientNet-Lite) and a sentence encoder
(MiniLM) were never trained together, but the head's 1,000 classes have names. Embedding those
names with the sentence encoder (keys ``k_j``) relates any text embedding ``t`` to them:

    a(t) = softmax_j(cos(t, k_j) / tau)          (a distribution over the ImageNet classes)
    w(t) = a(t) @ W                              (W: the head's (1000, D) weight rows)

so ``w(t)`` is a classifier in the tower's pooled-feature space: the bridged text tower. With
avgmax pooling the head is applied to both halves (``[W, W]``). This is ConSE (Norouzi et al.,
ICLR 2014) in logit space: ``f . w(t) = sum_j a_j(t) (f . W_j)``. The bridge is fixed (no
parameter is trained); soft prompts and the GCN act on ``t`` and reach the image space through it.
It covers what ImageNet names cover: "person" has no ImageNet class, "motor scooter" and "moped"
stand in for motorbike; docs/offline_backbone.md has the per-class picture.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Callable, List, Optional, Sequence

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save
from torch import nn

DEFAULT_TAU = 0.05  # chosen on validation mAP of the zero-shot classifier (docs/offline_backbone.md)


def imagenet_class_texts(detailed: bool = True) -> List[str]:
    """The 1,000 ImageNet-1k class names in index order, from timm; ``detailed`` adds the WordNet
    gloss ("goldfinch, Carduelis carduelis: small European finch having a crimson face ...").

    The glosses say what a Latin or rare name is: with them the zero-shot classifier scored
    40.8 validation mAP (bundled split + 5 re-splits), 36.3 with the names alone
    (benchmarks/results/sweeps/sweep7_zeroshot_keys.json, docs/offline_backbone.md).
    """
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    return [info.index_to_description(i, detailed=detailed) for i in range(info.num_classes())]


def _keys_file(cache_dir: Path, encoder_digest: str, texts: Sequence[str]) -> Path:
    """Cache file of the key embeddings, named by the encoder weights and the exact texts."""
    ident = hashlib.sha256(json.dumps([encoder_digest, list(texts)]).encode()).hexdigest()[:24]
    return Path(cache_dir) / f"imagenet_keys_{ident}.safetensors"


def imagenet_keys(encode: Callable[[Sequence[str]], torch.Tensor], encoder_digest: str,
                  cache_dir: Optional[Path], texts: Optional[Sequence[str]] = None,
                  batch_size: int = 250) -> torch.Tensor:
    """(1000, d) unit sentence embeddings of the ImageNet names, computed once and cached."""
    texts = list(texts) if texts is not None else imagenet_class_texts()
    path = _keys_file(cache_dir, encoder_digest, texts) if cache_dir is not None else None
    if path is not None and path.is_file():
        try:
            return load_file(str(path))["keys"]
        except Exception:  # a damaged cache file is recomputed, never trusted
            path.unlink(missing_ok=True)
    with torch.no_grad():
        keys = torch.cat([encode(texts[i:i + batch_size]).float() for i in range(0, len(texts), batch_size)])
    keys = F.normalize(keys, dim=-1).contiguous()
    if path is not None:
        from capnet.fileio import atomic_write_bytes

        atomic_write_bytes(save({"keys": keys}), path)
    return keys


class TextBridge(nn.Module):
    """Fixed map from (N, d) text embeddings to (N, D) classifiers of the image tower."""

    def __init__(self, keys: torch.Tensor, weight: torch.Tensor, tau: float = DEFAULT_TAU) -> None:
        super().__init__()
        if keys.shape[0] != weight.shape[0]:
            raise ValueError(f"text bridge: {keys.shape[0]} keys for {weight.shape[0]} classifier rows")
        if tau <= 0:
            raise ValueError(f"text bridge: tau must be > 0, got {tau}")
        self.register_buffer("keys", F.normalize(keys.detach().float(), dim=-1), persistent=False)
        self.register_buffer("weight", weight.detach().float(), persistent=False)
        self.tau = float(tau)

    @property
    def out_dim(self) -> int:
        """Width of the bridged classifiers (the image tower's pooled-feature width)."""
        return int(self.weight.shape[1])

    def affinities(self, text: torch.Tensor) -> torch.Tensor:
        """(N, d) text embeddings -> (N, 1000) softmax over the ImageNet classes."""
        sims = F.normalize(text.float(), dim=-1) @ self.keys.T
        return torch.softmax(sims / self.tau, dim=-1)

    def forward(self, text: torch.Tensor) -> torch.Tensor:
        """(N, d) text embeddings -> (N, D) image-space classifiers ``a(t) @ W``."""
        return self.affinities(text) @ self.weight

    def extra_repr(self) -> str:
        return f"keys={tuple(self.keys.shape)}, out_dim={self.out_dim}, tau={self.tau}"


def bridge_weight(classifier: nn.Linear, pooling: str) -> torch.Tensor:
    """The head's (1000, D) rows laid out for the pooled features ([W, W] for avgmax)."""
    weight = classifier.weight.detach().float()
    if pooling == "avgmax":
        return torch.cat([weight, weight], dim=1)
    if pooling in ("avg", "max"):
        return weight
    raise ValueError(f"the text bridge needs avg, max or avgmax pooling, got {pooling!r}")
