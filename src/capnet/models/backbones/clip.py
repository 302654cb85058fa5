"""CLIP backbones (open_clip): the frozen towers CAPNET prompts, refines and adapts.

``CLIPBackbone`` takes the towers of an ``open_clip.model.CLIP`` so its state dict keeps the
open_clip key layout. The text tower runs on token *embeddings* (CoOp soft prompts replace rows)
and cuts the sequence after the last EOT in the batch: with CLIP's causal mask no kept position
attends to a cut one, so the result equals ``CLIP.encode_text`` at a fraction of the cost.
"""
from __future__ import annotations

import hashlib

import functools
import glob
import os
import warnings
from pathlib import Path
from typing import Callable, List, Optional, Sequence

import open_clip
import torch
from open_clip.model import CLIP
from open_clip.tokenizer import SimpleTokenizer
from PIL import Image
from torchvision import transforms as T

from capnet.errors import CheckpointError
from capnet.models.backbones.base import Backbone, BackboneSpec
from capnet.models.backbones.checkpoints import load_clip_weights, sha256_of
from capnet.models.backbones.specs import CLIP_ARCHS, CLIPArch

RANDOM = "random"  # the `weights` value asking for random initialisation
RANDOM_INIT_SEED = 0  # random-init backbones are seeded: one name, one set of weights


def _state_digest(model: torch.nn.Module) -> str:
    """sha256 over a model's tensors (names, shapes, bytes): identifies seeded random weights."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()
_OPEN_CLIP_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")


class CLIPBackbone(Backbone):
    """An open_clip CLIP behind the Backbone contract (image_dim = text_dim = embed_dim)."""

    def __init__(self, model: CLIP, spec: BackboneSpec, context_length: int = 77) -> None:
        super().__init__()
        self.spec = spec
        self.visual = model.visual
        self.token_embedding = model.token_embedding
        self.positional_embedding = model.positional_embedding
        self.transformer = model.transformer
        self.ln_final = model.ln_final
        self.text_projection = model.text_projection
        self.register_buffer("attn_mask", model.attn_mask, persistent=False)
        # log of the contrastive temperature learned with the checkpoint (open_clip convention)
        self.register_buffer("logit_scale", model.logit_scale.detach().clone())
        self.context_length = context_length
        self.token_width = model.token_embedding.weight.shape[1]
        self.image_dim = self.text_dim = model.visual.output_dim
        self._tokenizer = _tokenizer(context_length)

    # ------------------------------------------------------------------ image side
    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalised pixels -> (B, embed_dim) image features."""
        return self.visual(images)

    def transform(self, train: bool) -> Callable:
        """CLIP preprocessing from the spec: random resized crop + flip, or resize + centre crop."""
        size, interp = self.spec.image_size, T.InterpolationMode(self.spec.interpolation)
        norm = [T.ToTensor(), T.Normalize(self.spec.mean, self.spec.std)]
        if train:
            geo = [T.RandomResizedCrop(size, scale=(0.5, 1.0), interpolation=interp), T.RandomHorizontalFlip()]
        else:
            geo = [T.Resize(size, interpolation=interp), T.CenterCrop(size)]
        return T.Compose([_to_rgb, *geo, *norm])

    # ------------------------------------------------------------------- text side
    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        """Texts -> (N, 77) CLIP BPE ids with <start>/<end>, zero padded, truncated."""
        return self._tokenizer(list(texts), context_length=self.context_length)

    def embed_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """(N, L) ids -> (N, L, width) token embeddings (positions are added later)."""
        return self.token_embedding(tokens)

    def encode_token_embeddings(self, embeddings: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Causal text transformer on (N, L, W) embeddings, pooled at EOT (argmax id), projected."""
        eot = tokens.argmax(dim=-1)
        length = int(eot.max()) + 1 if self.attn_mask is not None else embeddings.shape[1]
        x = embeddings[:, :length] + self.positional_embedding[:length].to(embeddings.dtype)
        mask = self.attn_mask[:length, :length] if self.attn_mask is not None else None
        x = self.ln_final(self.transformer(x, attn_mask=mask))
        x = x[torch.arange(x.shape[0], device=x.device), eot]
        if isinstance(self.text_projection, torch.nn.Linear):
            return self.text_projection(x)
        return x if self.text_projection is None else x @ self.text_projection


def _to_rgb(image: Image.Image) -> Image.Image:
    """Grey or RGBA dataset images -> RGB (a module-level function so DataLoader workers pickle it)."""
    return image if image.mode == "RGB" else image.convert("RGB")


@functools.lru_cache(maxsize=4)
def _tokenizer(context_length: int) -> SimpleTokenizer:
    """One shared BPE tokenizer per context length (building it parses the 49k-merge vocabulary)."""
    return SimpleTokenizer(context_length=context_length)


# ---------------------------------------------------------------------- weight search
def _hub_cache_dirs() -> List[Path]:
    """Hugging Face hub cache roots in the order huggingface_hub resolves them."""
    dirs = [os.environ.get("HF_HUB_CACHE"), os.environ.get("HUGGINGFACE_HUB_CACHE")]
    if os.environ.get("HF_HOME"):
        dirs.append(os.path.join(os.environ["HF_HOME"], "hub"))
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
    dirs.append(os.path.join(xdg, "huggingface", "hub"))
    return list(dict.fromkeys(Path(d).expanduser() for d in dirs if d))


def candidate_paths(arch: CLIPArch) -> List[str]:
    """Every place ``weights=None`` looks for ``arch`` (glob patterns for hub snapshots), in order."""
    out: List[str] = []
    env = os.environ.get("CAPNET_WEIGHTS_DIR")
    if env:
        root = Path(env).expanduser()
        out += [str(root / f"{arch.name}.{ext}") for ext in ("safetensors", "pt", "bin")]
        out += [str(root / arch.openai_file)] if arch.openai_file else []
        if arch.hf_hub_open_clip:
            out += [str(root / arch.hf_hub_open_clip.split("/")[1] / f) for f in _OPEN_CLIP_FILES]
        if arch.hf_transformers:
            out.append(str(root / arch.hf_transformers.split("/")[1]))
    if arch.openai_file:
        out.append(str(Path.home() / ".cache" / "clip" / arch.openai_file))
    for hub in _hub_cache_dirs():
        if arch.hf_hub_open_clip:
            repo = hub / ("models--" + arch.hf_hub_open_clip.replace("/", "--")) / "snapshots" / "*"
            out += [str(repo / f) for f in _OPEN_CLIP_FILES]
        if arch.hf_transformers:
            out.append(str(hub / ("models--" + arch.hf_transformers.replace("/", "--")) / "snapshots" / "*"))
    return out


def find_weights(arch: CLIPArch) -> Path:
    """The first existing weights for ``arch`` among ``candidate_paths``, else a CheckpointError."""
    searched = candidate_paths(arch)
    for pattern in searched:
        for hit in sorted(glob.glob(pattern)):
            p = Path(hit)
            if p.is_file() or (p / "config.json").is_file():
                return p
    listing = "\n  ".join(searched)
    if not os.environ.get("CAPNET_WEIGHTS_DIR"):
        listing += "\n  ($CAPNET_WEIGHTS_DIR is not set)"
    raise CheckpointError(
        f"no weights found for backbone '{arch.name}' (open_clip {arch.open_clip_name}). Searched:\n  {listing}\n"
        "Put a checkpoint in one of these places, set $CAPNET_WEIGHTS_DIR, or set model.weights to its path "
        "(see docs/weights.md); weights='random' gives an untrained model."
    )


# ---------------------------------------------------------------------------- builder
def _open_clip_model(arch: CLIPArch, image_size: Optional[int]) -> CLIP:
    cfg = arch.model_config()
    if image_size is not None:
        cfg["vision_cfg"]["image_size"] = image_size
    # OpenAI CLIP was trained with QuickGELU (open_clip's "-quickgelu" variants); so are the tiny ones.
    return CLIP(cfg["embed_dim"], cfg["vision_cfg"], cfg["text_cfg"], quick_gelu=True).eval()


def build_clip(name: str, weights: Optional[str] = None, image_size: Optional[int] = None) -> CLIPBackbone:
    """Build registered CLIP ``name`` with weights from a path, the usual caches, or 'random'."""
    arch = CLIP_ARCHS[name]
    sha, fmt, source = None, None, weights
    if weights == RANDOM or (weights is None and arch.random_tag):
        if not arch.random_tag:
            warnings.warn(f"backbone '{name}' built with random weights: its features are meaningless",
                          stacklevel=3)
        # Seeded, so "random" names one fixed set of weights: a saved run rebuilds the same
        # backbone, and the recorded digest lets load_run detect any drift.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_INIT_SEED)
            model = _open_clip_model(arch, image_size)
        source = RANDOM
        sha = _state_digest(model)
    else:
        path = Path(weights).expanduser() if weights is not None else find_weights(arch)
        model = _open_clip_model(arch, image_size)
        raw = load_clip_weights(model, path, expected=f"'{name}' (open_clip {arch.open_clip_name})")
        sha, fmt, source = sha256_of(raw.files), raw.format, str(path)
    side = model.visual.image_size
    spec = BackboneSpec(
        name=name,
        image_size=side[0] if isinstance(side, (tuple, list)) else int(side),
        weights=source,
        weights_sha256=sha,
        license=arch.license,
        extra={"open_clip_arch": arch.open_clip_name, "weights_format": fmt,
               "open_clip_version": open_clip.__version__},
    )
    return CLIPBackbone(model, spec, context_length=model.context_length)
