"""CLIP backbones (open_clip): the frozen towers CAPNET prompts, refines and adapts.

``CLIPBackbone`` takes the towers of an open_clip ``CLIP`` / ``CustomTextCLIP``, so its state dict
keeps the open_clip key layout. The text tower runs on token *embeddings* (CoOp soft prompts
replace rows) and, for EOT pooling with a causal mask, cuts the sequence after the last EOT in the
batch: no kept position attends to a cut one, so the result equals ``encode_text`` at a fraction
of the cost. Architecture and activation come from open_clip's model config and the weights'
pretrained config (QuickGELU for OpenAI's weights, GELU for most LAION/DataComp ones).
"""
from __future__ import annotations

import copy
import functools
import glob
import hashlib
import json
import os
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import open_clip
import torch
from open_clip.model import CLIP, CustomTextCLIP
from open_clip.tokenizer import SimpleTokenizer
from PIL import Image
from torch import nn
from torchvision import transforms as T

from capnet.errors import CapnetError, CheckpointError
from capnet.models.backbones import pretrained as hub
from capnet.models.backbones.attention import use_contiguous_attention
from capnet.models.backbones.base import Backbone, BackboneSpec
from capnet.fileio import sha256_of
from capnet.models.backbones.checkpoints import load_clip_weights
from capnet.models.backbones.specs import CLIP_ARCHS, HF_HUB_PREFIX, RANDOM, CLIPArch, looks_like_path, resolve_arch

RANDOM_INIT_SEED = 0  # random-init backbones are seeded: one name, one set of weights


def _state_digest(model: torch.nn.Module) -> str:
    """sha256 over a model's tensors (names, shapes, bytes): identifies seeded random weights."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()
_OPEN_CLIP_FILES = hub.OPEN_CLIP_FILES
POOL_TYPES = ("argmax", "eos", "last", "first")  # open_clip text pools capnet reproduces exactly
CLIP_VOCAB_SIZE = 49408  # open_clip's SimpleTokenizer (OpenAI BPE), the tokenizer capnet's prompts use


class CLIPBackbone(Backbone):
    """An open_clip CLIP behind the Backbone contract (image_dim = text_dim = embed_dim).

    Takes ``CLIP`` (text tower flattened into the model) and ``CustomTextCLIP`` (text tower under
    ``.text``) alike; the text tower must be open_clip's own transformer (``check_text_tower``).
    """

    def __init__(self, model: nn.Module, spec: BackboneSpec, context_length: int = 77,
                 embed_dim: Optional[int] = None) -> None:
        super().__init__()
        text = model.text if isinstance(getattr(model, "text", None), nn.Module) else model
        self.spec = spec
        self.visual = model.visual
        self.token_embedding = text.token_embedding
        self.positional_embedding = text.positional_embedding
        self.transformer = text.transformer
        self.ln_final = text.ln_final
        self.text_projection = text.text_projection
        self.register_buffer("attn_mask", text.attn_mask, persistent=False)
        # pooling as the open_clip class pools: CLIP keeps text_pool_type / text_eos_id and always
        # normalises before pooling; TextTransformer (CustomTextCLIP) may normalise after it
        self.pool_type: str = getattr(text, "pool_type", None) or getattr(model, "text_pool_type", "argmax")
        self.eos_id: Optional[int] = getattr(text, "eos_id", getattr(model, "text_eos_id", None))
        self.final_ln_after_pool = bool(getattr(text, "final_ln_after_pool", False)) and text is not model
        if self.pool_type not in POOL_TYPES:
            raise CapnetError(f"backbone '{spec.name}': text pool_type {self.pool_type!r} is not one of {POOL_TYPES}")
        # log of the contrastive temperature learned with the checkpoint (open_clip convention)
        self.register_buffer("logit_scale", model.logit_scale.detach().clone())
        self.context_length = context_length
        self.token_width = text.token_embedding.weight.shape[1]
        self.image_dim = self.text_dim = int(embed_dim if embed_dim is not None else model.visual.output_dim)
        self._tokenizer = _tokenizer(context_length)

    # ------------------------------------------------------------------ image side
    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalised pixels -> (B, embed_dim) image features."""
        return self.visual(images)

    def transform(self, train: bool) -> Callable:
        """CLIP preprocessing from the spec: random resized crop (area ``crop_scale``..1) + flip, or
        the eval view: resize + centre crop (``resize: crop``) or the whole image squashed (``whole``)."""
        size, interp = self.spec.image_size, T.InterpolationMode(self.spec.interpolation)
        norm = [T.ToTensor(), T.Normalize(self.spec.mean, self.spec.std)]
        if train:
            low = float(self.spec.extra.get("crop_scale", DEFAULT_CROP_SCALE))
            geo = [T.RandomResizedCrop(size, scale=(low, 1.0), interpolation=interp), T.RandomHorizontalFlip()]
        elif self.spec.extra.get("resize", "crop") == "whole":
            geo = [T.Resize((size, size), interpolation=interp)]
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
        """Text transformer on (N, L, W) embeddings, pooled as the model was trained, projected.

        With a causal mask and an index pool (argmax = OpenAI's EOT, eos) no position up to the
        pooled one attends to a later one, so the batch is cut after its last pooled position.
        """
        idx = None
        if self.pool_type == "argmax":
            idx = tokens.argmax(dim=-1)
        elif self.pool_type == "eos":
            idx = (tokens == self.eos_id).int().argmax(dim=-1)
        length = embeddings.shape[1]
        if self.attn_mask is not None and idx is not None:
            length = int(idx.max()) + 1
        x = embeddings[:, :length] + self.positional_embedding[:length].to(embeddings.dtype)
        mask = self.attn_mask[:length, :length] if self.attn_mask is not None else None
        x = self.transformer(x, attn_mask=mask)
        if not self.final_ln_after_pool:
            x = self.ln_final(x)
        if idx is not None:
            x = x[torch.arange(x.shape[0], device=x.device), idx]
        else:
            x = x[:, 0] if self.pool_type == "first" else x[:, -1]
        if self.final_ln_after_pool:
            x = self.ln_final(x)
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
    for root in _hub_cache_dirs():
        if arch.hf_hub_open_clip:
            repo = root / ("models--" + arch.hf_hub_open_clip.replace("/", "--")) / "snapshots" / "*"
            out += [str(repo / f) for f in _OPEN_CLIP_FILES]
        if arch.hf_transformers:
            out.append(str(root / ("models--" + arch.hf_transformers.replace("/", "--")) / "snapshots" / "*"))
    return out


def search_local(arch: CLIPArch) -> Optional[Path]:
    """The first existing weights for ``arch`` among ``candidate_paths``, or None."""
    for pattern in candidate_paths(arch):
        for hit in sorted(glob.glob(pattern)):
            p = Path(hit)
            if p.is_file() or (p / "config.json").is_file():
                return p
    return None


def _searched(arch: CLIPArch) -> str:
    """The local places searched for ``arch``, on one line (for error messages)."""
    unset = "" if os.environ.get("CAPNET_WEIGHTS_DIR") else " ($CAPNET_WEIGHTS_DIR is not set)"
    return ", ".join(candidate_paths(arch)) + unset


def find_weights(arch: CLIPArch) -> Path:
    """The first existing weights for ``arch`` among ``candidate_paths``, else a CheckpointError."""
    found = search_local(arch)
    if found is not None:
        return found
    raise CheckpointError(
        f"no weights found for backbone '{arch.name}' (open_clip {arch.open_clip_name}); searched {_searched(arch)}; "
        "put a checkpoint in one of these places, set $CAPNET_WEIGHTS_DIR, or set model.weights to its path "
        "(docs/weights.md); weights='random' gives an untrained model"
    )


# ------------------------------------------------------------------ architecture checks
def text_tower_problem(cfg: Mapping[str, Any]) -> Optional[str]:
    """Why capnet cannot run this config's text tower on token embeddings (None: it can)."""
    t = cfg.get("text_cfg") or {}
    if cfg.get("multimodal_cfg"):
        return "it is a CoCa-style model with a multimodal text decoder"
    if t.get("hf_model_name"):
        return f"its text tower is the Hugging Face model {t['hf_model_name']}, not open_clip's TextTransformer"
    if t.get("embed_cls"):
        return "its text tower appends a learned CLS embedding (embed_cls), which soft prompts do not model"
    if t.get("hf_tokenizer_name") or t.get("tokenizer_mode"):
        name = t.get("hf_tokenizer_name") or t.get("tokenizer_mode")
        return f"it uses the {name} tokenizer; capnet's prompts use CLIP's BPE tokenizer"
    if t.get("vocab_size", CLIP_VOCAB_SIZE) != CLIP_VOCAB_SIZE:
        return f"its vocabulary has {t['vocab_size']} tokens, not CLIP BPE's {CLIP_VOCAB_SIZE}"
    if t.get("pool_type", "argmax") not in POOL_TYPES:
        return f"its text pool_type {t['pool_type']!r} is not one of {', '.join(POOL_TYPES)}"
    return None


def check_text_tower(cfg: Mapping[str, Any], name: str) -> None:
    """One-line CapnetError when capnet cannot drive the text tower of backbone ``name``."""
    problem = text_tower_problem(cfg)
    if problem:
        raise CapnetError(f"backbone '{name}' is not supported: {problem}")


def uses_quick_gelu(model: nn.Module) -> bool:
    """Whether the built model's towers use QuickGELU (the activation OpenAI trained CLIP with)."""
    return any(isinstance(m, open_clip.model.QuickGELU) for m in model.modules())


# ---------------------------------------------------------------------------- builder
def open_clip_model(cfg: Mapping[str, Any], quick_gelu: bool, image_size: Optional[int] = None) -> nn.Module:
    """The open_clip model a config describes, as ``open_clip.create_model`` builds it (eval mode)."""
    cfg = copy.deepcopy(dict(cfg))
    custom_text = bool(cfg.pop("custom_text", False))
    cfg.pop("quick_gelu", None)
    if image_size is not None:
        cfg["vision_cfg"]["image_size"] = image_size
    model_class = CustomTextCLIP if custom_text else CLIP
    return model_class(**cfg, quick_gelu=quick_gelu).eval()


def _hub_config(repo: str) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """(model_cfg, preprocess_cfg) from an hf-hub repo's open_clip_config.json (cached or fetched)."""
    path = hub.fetch(hub.remote_for_repo(repo, (hub.OPEN_CLIP_CONFIG,)))
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot parse {path}: {e}") from e
    if not isinstance(data.get("model_cfg", data), dict) or "text_cfg" not in data.get("model_cfg", data):
        raise CheckpointError(f"{path} has no model_cfg with a text_cfg; is hf-hub:{repo} an open_clip repo?")
    return dict(data.get("model_cfg", data)), dict(data.get("preprocess_cfg") or {})


def _weights_source(arch: CLIPArch, weights: Optional[str]) -> Tuple[str, Any]:
    """What ``weights`` asks for: ("random", None), ("path", Path), ("remote", RemoteWeights) or ("search", None)."""
    if weights == RANDOM or (weights is None and arch.random_tag):
        return RANDOM, None
    if weights is None:
        if arch.hf_repo:
            return "remote", hub.remote_for_repo(arch.hf_repo)
        if arch.name in CLIP_ARCHS:
            return "search", None
        remote = hub.remote_for_tag(arch.open_clip_name, arch.tag or "")
        if remote is None:
            tags = ", ".join(hub.pretrained_tags(arch.open_clip_name)) or "none"
            raise CheckpointError(f"backbone '{arch.name}': open_clip has no weights tagged {arch.tag!r} for "
                                  f"{arch.open_clip_name} (tags: {tags}); set model.weights to a file or a tag")
        return "remote", remote
    if weights.startswith(HF_HUB_PREFIX):
        return "remote", hub.remote_for_repo(weights[len(HF_HUB_PREFIX):].strip("/"))
    path = Path(weights).expanduser()
    if path.exists() or looks_like_path(weights):
        return "path", path
    remote = None if arch.hf_repo else hub.remote_for_tag(arch.open_clip_name, weights)
    if remote is None:
        tags = "" if arch.hf_repo else f" (tags: {', '.join(hub.pretrained_tags(arch.open_clip_name)) or 'none'})"
        raise CheckpointError(f"model.weights {weights!r} for backbone '{arch.name}' is neither an existing file "
                              f"nor an open_clip pretrained tag of {arch.open_clip_name}{tags}")
    return "remote", remote


def _activation(cfg: Mapping[str, Any], arch: CLIPArch, remote: Optional[hub.RemoteWeights]) -> bool:
    """QuickGELU or not: the model config ("-quickgelu" archs) or the weights' pretrained cfg says so."""
    if cfg.get("quick_gelu"):
        return True
    pcfg = remote.pretrained_cfg if remote is not None and remote.pretrained_cfg else None
    if pcfg is None and arch.tag and not arch.random_tag and not arch.hf_repo:
        from open_clip.pretrained import get_pretrained_cfg

        pcfg = get_pretrained_cfg(arch.open_clip_name, arch.tag)  # local file: the name's tag decides
    return bool((pcfg or {}).get("quick_gelu", False))


RESIZE_MODES = ("crop", "whole")  # eval view: resize + centre crop (LT-GCN, LIFT), or the whole image squashed (LMPT)
DEFAULT_CROP_SCALE = 0.5  # smallest area share of the training RandomResizedCrop (torchvision's, LT-GCN's, LIFT's: 0.08)


def build_clip(name: str, weights: Optional[str] = None, image_size: Optional[int] = None,
               resize: str = "crop", crop_scale: float = DEFAULT_CROP_SCALE) -> CLIPBackbone:
    """Build CLIP ``name`` with weights from a path, a pretrained tag / hf-hub repo, the caches, or 'random'.

    ``resize`` picks the eval view and ``crop_scale`` the training crop's smallest area share
    (backbone_options; recorded in the spec only when they differ from the defaults)."""
    if resize not in RESIZE_MODES:
        raise CheckpointError(f"backbone '{name}': backbone_options.resize must be one of {', '.join(RESIZE_MODES)}, got {resize!r}")
    if isinstance(crop_scale, bool) or not isinstance(crop_scale, (int, float)) or not 0.0 < crop_scale <= 1.0:
        raise CheckpointError(f"backbone '{name}': backbone_options.crop_scale must be in (0, 1], got {crop_scale!r}")
    arch = resolve_arch(name)
    if arch is None:
        raise KeyError(f"'{name}' is not a CLIP backbone name (registered, family.tag, open_clip_arch.tag or hf-hub:)")
    preprocess: Dict[str, Any] = {}
    if arch.hf_repo:
        cfg, preprocess = _hub_config(arch.hf_repo)
    else:
        cfg = arch.model_config()
    check_text_tower(cfg, name)
    kind, where = _weights_source(arch, weights)
    remote: Optional[hub.RemoteWeights] = where if kind == "remote" else None
    if kind == "search":  # registered names: local places first (as before), then the tag's hub/url entry
        found = search_local(arch)
        if found is None:
            remote = hub.remote_for_tag(arch.open_clip_name, arch.tag or "")
            if remote is None:
                find_weights(arch)  # raises the listing of every place searched
            if hub.is_offline() and hub.cached_file(remote) is None:
                raise CheckpointError(
                    f"no weights for backbone '{name}' on disk and HF_HUB_OFFLINE is set; fetch them: "
                    f"{hub.fetch_instructions(remote)}; local places searched: {_searched(arch)}")
        kind, where = ("path", found) if found is not None else ("remote", remote)
    quick_gelu = _activation(cfg, arch, remote)
    extra: Dict[str, Any] = {"open_clip_arch": arch.open_clip_name, "open_clip_version": open_clip.__version__,
                             "quick_gelu": quick_gelu, "text_pool": (cfg.get("text_cfg") or {}).get("pool_type", "argmax")}
    if kind == RANDOM:
        if not arch.random_tag:
            warnings.warn(f"backbone '{name}' built with random weights: its features are meaningless",
                          stacklevel=3)
        # Seeded, so "random" names one fixed set of weights: a saved run rebuilds the same
        # backbone, and the recorded digest lets load_run detect any drift.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_INIT_SEED)
            model = open_clip_model(cfg, quick_gelu, image_size)
        source, sha, fmt = RANDOM, _state_digest(model), None
    else:
        path = hub.fetch(where) if kind == "remote" else where
        model = open_clip_model(cfg, quick_gelu, image_size)
        label = f"'{name}' (open_clip {arch.open_clip_name}, {'QuickGELU' if quick_gelu else 'GELU'})"
        raw = load_clip_weights(model, path, expected=label)
        source, sha, fmt = str(path), sha256_of(raw.files), raw.format
        if remote is not None:
            extra["weights_origin"] = remote.origin(path)
    extra["weights_format"] = fmt
    if resize != "crop":  # only when set: specs of earlier runs stay as they were
        extra["resize"] = resize
    if crop_scale != DEFAULT_CROP_SCALE:
        extra["crop_scale"] = float(crop_scale)
    pcfg = dict(remote.pretrained_cfg) if remote is not None and remote.pretrained_cfg else {}
    pcfg.update(preprocess)
    side = cfg["vision_cfg"].get("image_size", 224) if image_size is None else image_size
    spec = BackboneSpec(
        name=name,
        image_size=side[0] if isinstance(side, (tuple, list)) else int(side),
        mean=tuple(pcfg.get("mean", BackboneSpec.mean)),
        std=tuple(pcfg.get("std", BackboneSpec.std)),
        interpolation=pcfg.get("interpolation", BackboneSpec.interpolation),
        weights=source,
        weights_sha256=sha,
        license=arch.license,
        extra=extra,
    )
    context_length = (cfg.get("text_cfg") or {}).get("context_length", 77)
    use_contiguous_attention(model)  # one in-projection GEMM per block in every precision (attention.py)
    return CLIPBackbone(model, spec, context_length=context_length, embed_dim=cfg["embed_dim"])
