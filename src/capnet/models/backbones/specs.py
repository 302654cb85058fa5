"""The CLIP variants ("arch.tag", timm style): architecture and usual weight homes.

Architectures are open_clip model configs (data, not code); the table below adds what capnet
needs on top: where a copy of the weights is usually cached and whether the tag means random
initialisation (the tiny test architectures). Names outside the table resolve through
``resolve_arch``: ``<family>.<tag>`` (a family of the table, e.g. ``clip_vit_b16.laion2b_s34b_b88k``),
``<open_clip arch>.<tag>`` (``ViT-B-16.datacomp_xl_s13b_b90k``) and ``hf-hub:org/repo``.
"""
from __future__ import annotations

import copy
import difflib
import importlib.util
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, FrozenSet, List, Mapping, Optional, Tuple


OPENAI_LICENSE = "MIT (OpenAI CLIP)"

# Tiny architectures for tests and speed checks: same code paths as the real towers, ~2M
# parameters (the 49408 x 32 token table dominates), random weights. QuickGELU as OpenAI's CLIP.
_TINY_TEXT: Dict[str, Any] = {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}
TINY_VIT_CONFIG: Dict[str, Any] = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": _TINY_TEXT,
    "quick_gelu": True,
}
TINY_RN_CONFIG: Dict[str, Any] = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 16, "head_width": 16},
    "text_cfg": _TINY_TEXT,
    "quick_gelu": True,
}
HF_HUB_PREFIX = "hf-hub:"  # open_clip's schema for a hub repo holding open_clip_config.json + weights


@dataclass(frozen=True)
class CLIPArch:
    """One registered CLIP variant: its open_clip architecture and where its weights may be."""

    name: str  # registry key, e.g. "clip_vit_b16.openai"
    open_clip_name: str  # open_clip architecture name ("ViT-B-16"), or a label for custom ones
    config: Optional[Mapping[str, Any]] = None  # custom open_clip config; None: open_clip's own
    openai_file: Optional[str] = None  # file name of the OpenAI release archive ("ViT-B-16.pt")
    hf_hub_open_clip: Optional[str] = None  # open_clip weights repo on the HF hub
    hf_transformers: Optional[str] = None  # transformers CLIPModel repo on the HF hub
    license: Optional[str] = None  # licence of the weights
    random_tag: bool = False  # the tag is "random": weights=None means random initialisation
    hf_repo: Optional[str] = None  # "org/repo" of an ``hf-hub:`` name (config and weights there)

    @property
    def tag(self) -> Optional[str]:
        """The weights tag after the last dot ("openai"); None for ``hf-hub:`` names."""
        return None if self.hf_repo else self.name.rpartition(".")[2]

    def model_config(self) -> Dict[str, Any]:
        """A fresh open_clip config dict (embed_dim, vision_cfg, text_cfg) for this architecture."""
        import open_clip  # heavy (seconds): only when a CLIP is built

        cfg = self.config if self.config is not None else open_clip.get_model_config(self.open_clip_name)
        if cfg is None:
            raise KeyError(f"open_clip {open_clip.__version__} has no architecture '{self.open_clip_name}'")
        return copy.deepcopy(dict(cfg))


CLIP_ARCHS: Dict[str, CLIPArch] = {
    a.name: a
    for a in (
        CLIPArch("clip_rn50.openai", "RN50", openai_file="RN50.pt",
                 hf_hub_open_clip="timm/resnet50_clip.openai", license=OPENAI_LICENSE),
        CLIPArch("clip_vit_b16.openai", "ViT-B-16", openai_file="ViT-B-16.pt",
                 hf_hub_open_clip="timm/vit_base_patch16_clip_224.openai",
                 hf_transformers="openai/clip-vit-base-patch16", license=OPENAI_LICENSE),
        CLIPArch("clip_vit_b32.openai", "ViT-B-32", openai_file="ViT-B-32.pt",
                 hf_hub_open_clip="timm/vit_base_patch32_clip_224.openai",
                 hf_transformers="openai/clip-vit-base-patch32", license=OPENAI_LICENSE),
        CLIPArch("clip_vit_l14.openai", "ViT-L-14", openai_file="ViT-L-14.pt",
                 hf_hub_open_clip="timm/vit_large_patch14_clip_224.openai",
                 hf_transformers="openai/clip-vit-large-patch14", license=OPENAI_LICENSE),
        CLIPArch("clip_tiny_vit.random", "tiny-ViT", config=TINY_VIT_CONFIG, random_tag=True),
        CLIPArch("clip_tiny_rn.random", "tiny-RN", config=TINY_RN_CONFIG, random_tag=True),
    )
}


# capnet family names ("clip_vit_b16") -> their table entry; "family.<any open_clip tag>" reuses it.
FAMILIES: Dict[str, CLIPArch] = {}
for _arch in CLIP_ARCHS.values():
    FAMILIES.setdefault(_arch.name.rpartition(".")[0], _arch)


def open_clip_arch_names() -> FrozenSet[str]:
    """open_clip's architecture names, read from its model_configs/*.json without importing it.

    Importing open_clip takes seconds; the registry asks this for every unknown backbone name.
    """
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        return frozenset()
    root = Path(list(spec.submodule_search_locations)[0]) / "model_configs"
    return frozenset(p.stem for p in root.glob("*.json"))


def resolve_arch(name: str) -> Optional[CLIPArch]:
    """The CLIPArch a backbone name stands for, or None when the name is not a CLIP name.

    Registered names come from the table; ``family.tag`` and ``open_clip_arch.tag`` are built on
    the fly (the tag is checked against open_clip's pretrained registry when weights are
    resolved); ``hf-hub:org/repo`` reads its architecture from the repo's open_clip_config.json.
    """
    if name in CLIP_ARCHS:
        return CLIP_ARCHS[name]
    if name.startswith(HF_HUB_PREFIX):
        repo = name[len(HF_HUB_PREFIX):].strip("/")
        return CLIPArch(name, name, hf_repo=repo) if repo.count("/") == 1 else None
    family, dot, tag = name.rpartition(".")
    if not dot or not family or not tag:
        return None
    base = FAMILIES.get(family)
    if base is not None:
        return CLIPArch(name, base.open_clip_name, config=base.config, openai_file=None,
                        license=base.license if tag == "openai" else None)
    if family in open_clip_arch_names() or _runtime_config(family):
        return CLIPArch(name, family)
    return None


def _runtime_config(arch: str) -> bool:
    """Whether an already imported open_clip knows ``arch`` (configs added with add_model_config)."""
    open_clip = sys.modules.get("open_clip")
    return open_clip is not None and open_clip.get_model_config(arch) is not None


# ------------------------------------------------------------- names users type

NAME_FORMS = ("<family>.<tag> (e.g. clip_vit_b16.laion2b_s34b_b88k)", "<open_clip arch>.<tag> (ViT-B-16.openai)",
              "hf-hub:org/repo (docs/weights.md)")
RANDOM = "random"  # model.weights value: the architecture untrained


def looks_like_path(weights: str) -> bool:
    """Whether ``model.weights`` names a file (a separator, ``~``/``.`` start or a suffix), not a tag."""
    return os.sep in weights or "/" in weights or weights.startswith(("~", ".")) or Path(weights).suffix != ""


def _pretrained_pairs() -> List[Tuple[str, str]]:
    """open_clip's (architecture, tag) pairs: the weights it can name (imports open_clip: seconds)."""
    try:
        import open_clip
    except ImportError:
        return []
    return [(arch, tag) for arch, tag in open_clip.list_pretrained()]


def suggest_names(name: str) -> List[str]:
    """Every accepted CLIP name near ``name``'s form: family.tag and arch.tag over open_clip's tags,
    and ``hf-hub:`` spelt right (the candidates of "did you mean")."""
    out: List[str] = []
    for prefix in ("hf_hub:", "hfhub:", "hf-hub/", "hf:", "hub:"):
        if name.lower().startswith(prefix):
            out.append(HF_HUB_PREFIX + name[len(prefix):])
    if "." not in name:
        return out
    pairs = _pretrained_pairs()
    for family, arch in FAMILIES.items():
        out += [f"{family}.{tag}" for a, tag in pairs if a == arch.open_clip_name]
    return out + [f"{arch}.{tag}" for arch, tag in pairs]


def weights_problem(name: str, weights: Optional[str] = None) -> Optional[str]:
    """What is wrong with the weights tag of CLIP ``name`` (in the name, or ``model.weights``), or None.

    Only tags are checked (against open_clip's pretrained list, with the closest tags); files,
    ``hf-hub:`` repos, ``random`` and the table's own names (``clip_vit_b16.openai``) are left to
    the weights loader, which names what it could not find.
    """
    arch = resolve_arch(name)
    if arch is None or arch.random_tag or arch.hf_repo:
        return None
    if weights is None:
        if name in CLIP_ARCHS:
            return None
        tag, where = arch.tag, f"backbone '{name}'"
    elif weights == RANDOM or weights.startswith(HF_HUB_PREFIX) or looks_like_path(weights) or Path(weights).expanduser().exists():
        return None
    else:
        tag, where = weights, f"model.weights={weights!r} for backbone '{name}'"
    tags = [t for a, t in _pretrained_pairs() if a == arch.open_clip_name]
    if not tags or tag in tags:  # open_clip missing or an architecture without named weights: the loader says
        return None
    close = difflib.get_close_matches(tag or "", tags, n=3)
    hint = f"; did you mean {' or '.join(repr(t) for t in close)}?" if close else ""
    return (f"{where}: open_clip has no weights tagged {tag!r} for {arch.open_clip_name}{hint} "
            f"(tags: {', '.join(tags)}; or set model.weights to a file)")
