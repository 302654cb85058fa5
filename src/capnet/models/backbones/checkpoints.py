"""Every CLIP checkpoint format, normalised in one place into an open_clip state dict.

Formats (detected from the file, not its name):
- OpenAI release archives (TorchScript zip with ``constants.pkl`` / ``code/``): ``torch.jit.load``;
- plain state dicts (OpenAI or open_clip ``.pt`` / ``.bin``, ``torch.load(weights_only=True)``),
  possibly nested under ``state_dict`` / ``model`` and prefixed with ``module.``;
- ``.safetensors`` files (open_clip layout or Hugging Face layout);
- Hugging Face ``CLIPModel`` directories (``config.json`` + ``model.safetensors`` or
  ``pytorch_model.bin``, sharded or not), converted to the open_clip key layout.
The result is checked against the model it is meant for: architecture first, then keys, then
shapes, each failure a CheckpointError that names the file and what was expected.
"""
from __future__ import annotations

import json
import pickle
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import open_clip
import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from capnet.errors import CheckpointError

StateDict = Dict[str, torch.Tensor]

# Entries of OpenAI archives / traced models that are not weights of an open_clip CLIP.
_NON_WEIGHTS = ("input_resolution", "context_length", "vocab_size", "attn_mask")
_NESTING_KEYS = ("state_dict", "model", "module")
_HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
_LOAD_ERRORS = (OSError, RuntimeError, ValueError, EOFError, pickle.UnpicklingError, SafetensorError)


@dataclass(frozen=True)
class RawCheckpoint:
    """A checkpoint read from disk, already in open_clip key layout."""

    state_dict: StateDict
    format: str  # "openai-torchscript", "torch", "safetensors" or "hf-transformers"
    files: Tuple[Path, ...]  # the files the weights came from (hashed for provenance)
    hf_config: Optional[dict] = None  # config.json of a Hugging Face directory



# ------------------------------------------------------------------------------- reading
def is_torchscript_archive(path: Path) -> bool:
    """True for a TorchScript zip (OpenAI's release format), false for torch.save zips."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as zf:
        return any(n.endswith("/constants.pkl") or "/code/" in n for n in zf.namelist())


def _torch_load(path: Path) -> object:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except _LOAD_ERRORS as e:
        raise CheckpointError(f"cannot read checkpoint {path} with torch.load(weights_only=True): {e}") from e


def _safetensors_load(path: Path) -> StateDict:
    try:
        return load_file(str(path), device="cpu")
    except _LOAD_ERRORS as e:
        raise CheckpointError(f"cannot read safetensors file {path}: {e}") from e


def unwrap_state_dict(obj: object, path: Path) -> StateDict:
    """Find the tensor mapping inside a training checkpoint and drop ``module.`` prefixes."""
    while isinstance(obj, dict) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
        inner = next((obj[k] for k in _NESTING_KEYS if isinstance(obj.get(k), dict)), None)
        if inner is None:
            raise CheckpointError(
                f"checkpoint {path} holds no tensors; expected a state dict, possibly under one of "
                f"{list(_NESTING_KEYS)} (found keys {sorted(obj)[:8]})"
            )
        obj = inner
    if not isinstance(obj, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(obj).__name__}, expected a state dict")
    sd = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    while sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot parse {path}: {e}") from e


def _read_hf_dir(path: Path) -> Tuple[StateDict, Tuple[Path, ...], dict]:
    config = _read_json(path / "config.json")
    for name in _HF_WEIGHT_FILES:
        index = path / f"{name}.index.json"
        if index.is_file():  # sharded: the index maps each key to its shard
            weight_map = _read_json(index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"shard index {index} has no 'weight_map'")
            files = tuple(path / s for s in sorted(set(weight_map.values())))
        elif (path / name).is_file():
            files = (path / name,)
        else:
            continue
        sd: StateDict = {}
        for f in files:
            sd.update(_safetensors_load(f) if f.suffix == ".safetensors" else unwrap_state_dict(_torch_load(f), f))
        return sd, files, config
    raise CheckpointError(
        f"Hugging Face directory {path} has config.json but no weights; expected one of {list(_HF_WEIGHT_FILES)}"
    )


def read_checkpoint(path: str | Path) -> RawCheckpoint:
    """Read any supported CLIP checkpoint file or directory into open_clip key layout."""
    path = Path(path).expanduser()
    if not path.exists():
        raise CheckpointError(f"CLIP weights {path} do not exist")
    hf_config = None
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise CheckpointError(
                f"{path} is a directory without config.json; expected a Hugging Face CLIPModel directory "
                f"(config.json + {' or '.join(_HF_WEIGHT_FILES)}) or a weights file"
            )
        sd, files, hf_config = _read_hf_dir(path)
        fmt = "hf-transformers"
    elif is_torchscript_archive(path):
        try:
            sd = dict(torch.jit.load(str(path), map_location="cpu").state_dict())
        except _LOAD_ERRORS as e:
            raise CheckpointError(f"cannot open TorchScript archive {path}: {e}") from e
        files, fmt = (path,), "openai-torchscript"
    elif path.suffix == ".safetensors":
        sd, files, fmt = _safetensors_load(path), (path,), "safetensors"
    else:
        sd, files, fmt = unwrap_state_dict(_torch_load(path), path), (path,), "torch"
    sd = {k: v for k, v in sd.items() if k not in _NON_WEIGHTS}
    if is_hf_layout(sd):
        sd = convert_hf_state_dict(sd)
        fmt = fmt if fmt == "hf-transformers" else f"{fmt}+hf-layout"
    return RawCheckpoint(sd, fmt, files, hf_config)


# ----------------------------------------------------------- Hugging Face -> open_clip
def is_hf_layout(sd: StateDict) -> bool:
    """True when keys follow transformers' CLIPModel layout (vision_model.*, text_model.*)."""
    return any(k.startswith(("vision_model.", "text_model.")) for k in sd)


_HF_RENAMES = [  # (regex on the HF key, open_clip replacement), applied in order
    (r"^text_model\.embeddings\.token_embedding\.", "token_embedding."),
    (r"^text_model\.embeddings\.position_embedding\.weight$", "positional_embedding"),
    (r"^text_model\.final_layer_norm\.", "ln_final."),
    (r"^text_model\.encoder\.layers\.", "transformer.resblocks."),
    (r"^vision_model\.embeddings\.class_embedding$", "visual.class_embedding"),
    (r"^vision_model\.embeddings\.patch_embedding\.", "visual.conv1."),
    (r"^vision_model\.embeddings\.position_embedding\.weight$", "visual.positional_embedding"),
    (r"^vision_model\.pre_layrnorm\.", "visual.ln_pre."),
    (r"^vision_model\.post_layernorm\.", "visual.ln_post."),
    (r"^vision_model\.encoder\.layers\.", "visual.transformer.resblocks."),
    (r"\.self_attn\.out_proj\.", ".attn.out_proj."),
    (r"\.layer_norm1\.", ".ln_1."),
    (r"\.layer_norm2\.", ".ln_2."),
    (r"\.mlp\.fc1\.", ".mlp.c_fc."),
    (r"\.mlp\.fc2\.", ".mlp.c_proj."),
]


def convert_hf_state_dict(hf: StateDict) -> StateDict:
    """transformers CLIPModel keys -> open_clip CLIP keys (q/k/v fused, projections transposed)."""
    out: StateDict = {}
    qkv: Dict[Tuple[str, str], Dict[str, torch.Tensor]] = {}
    for key, value in hf.items():
        if key.endswith("position_ids"):
            continue  # an index buffer, not a weight
        if key in ("text_projection.weight", "visual_projection.weight"):
            out["text_projection" if key.startswith("text") else "visual.proj"] = value.t().contiguous()
            continue
        new = key
        for pattern, repl in _HF_RENAMES:
            new = re.sub(pattern, repl, new)
        m = re.match(r"^(.*)\.self_attn\.([qkv])_proj\.(weight|bias)$", new)
        if m:
            qkv.setdefault((m.group(1), m.group(3)), {})[m.group(2)] = value
            continue
        out[new] = value
    for (block, kind), parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise CheckpointError(f"Hugging Face attention {block} lacks {sorted({'q', 'k', 'v'} - set(parts))} {kind}")
        out[f"{block}.attn.in_proj_{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return out


# ------------------------------------------------------------------ architecture checks
def _count_blocks(sd: StateDict, prefix: str) -> int:
    return len({k[len(prefix):].split(".")[0] for k in sd if k.startswith(prefix)})


def describe_state_dict(sd: StateDict) -> Dict[str, object]:
    """Architecture summary of an open_clip-layout state dict (image size excluded)."""
    d: Dict[str, object] = {}
    if "visual.conv1.weight" in sd and "visual.class_embedding" in sd:
        w = sd["visual.conv1.weight"]
        d["vision"] = ("ViT", w.shape[0], _count_blocks(sd, "visual.transformer.resblocks."), w.shape[-1])
    elif "visual.layer1.0.conv1.weight" in sd:
        layers = tuple(_count_blocks(sd, f"visual.layer{i}.") for i in range(1, 5))
        d["vision"] = ("ResNet", sd["visual.layer1.0.conv1.weight"].shape[0], layers, None)
    else:
        d["vision"] = ("unknown", None, None, None)
    if "text_projection" in sd:
        d["embed_dim"] = sd["text_projection"].shape[-1]
    if "ln_final.weight" in sd:
        d["text"] = (sd["ln_final.weight"].shape[0], _count_blocks(sd, "transformer.resblocks."))
    if "token_embedding.weight" in sd:
        d["vocab_size"] = sd["token_embedding.weight"].shape[0]
    return d


def describe_config(cfg: dict) -> Optional[Dict[str, object]]:
    """The ``describe_state_dict`` summary of an open_clip config (None for timm/HF towers)."""
    v, t = cfg.get("vision_cfg", {}), cfg.get("text_cfg", {})
    if v.get("timm_model_name") or t.get("hf_model_name") or "embed_dim" not in cfg:
        return None
    layers, width = v.get("layers", 12), v.get("width", 768)
    vision = (("ResNet", width, tuple(layers), None) if isinstance(layers, (list, tuple))
              else ("ViT", width, layers, v.get("patch_size", 16)))
    return {"vision": vision, "embed_dim": cfg["embed_dim"], "text": (t.get("width", 512), t.get("layers", 12)),
            "vocab_size": t.get("vocab_size", 49408)}


def known_architectures(summary: Dict[str, object]) -> List[str]:
    """open_clip architecture names whose config has this summary (to name a stray checkpoint)."""
    found = []
    for name in open_clip.list_models():
        cfg = open_clip.get_model_config(name)
        if cfg is not None and describe_config(cfg) == summary:
            found.append(name)
    return found


def _fmt(d: Dict[str, object]) -> str:
    kind, width, layers, patch = d.get("vision", ("unknown", None, None, None))  # type: ignore[misc]
    vision = f"{kind} width {width}, layers {layers}" + (f", patch {patch}" if patch else "")
    text = d.get("text", (None, None))
    return f"{vision}; text width {text[0]}, {text[1]} layers; embed_dim {d.get('embed_dim')}"  # type: ignore[index]


def _resize_grid(pe: torch.Tensor, tokens: int) -> torch.Tensor:
    """Bicubically resize a (1 + g*g, C) position table (class slot first) to ``tokens`` rows."""
    old, new = round((pe.shape[0] - 1) ** 0.5), round((tokens - 1) ** 0.5)
    if old * old + 1 != pe.shape[0] or new * new + 1 != tokens:
        return pe  # not a square grid: left as is, the shape check reports it
    grid = pe[1:].reshape(1, old, old, -1).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=(new, new), mode="bicubic", antialias=True, align_corners=False)
    return torch.cat([pe[:1], grid.permute(0, 2, 3, 1).reshape(new * new, -1).to(pe.dtype)])


def _fit_image_size(sd: StateDict, target: StateDict) -> None:
    """Resize position tables trained at another image size to the model's size (in place)."""
    for key in ("visual.positional_embedding", "visual.attnpool.positional_embedding"):
        if key in sd and key in target and sd[key].shape[0] != target[key].shape[0]:
            if sd[key].shape[1:] == target[key].shape[1:]:
                sd[key] = _resize_grid(sd[key], target[key].shape[0])


def _few(items: List[str], n: int = 5) -> str:
    return ", ".join(items[:n]) + (f" (+{len(items) - n} more)" if len(items) > n else "")


def check_state_dict(sd: StateDict, model: nn.Module, source: str, expected: str) -> None:
    """Raise a CheckpointError unless ``sd`` fits ``model`` exactly (architecture, keys, shapes)."""
    target = model.state_dict()
    found, want = describe_state_dict(sd), describe_state_dict(target)
    if found != want:
        names = known_architectures(found)
        hint = f" (like open_clip {', '.join(names[:3])})" if names else ""
        raise CheckpointError(
            f"{source} holds a different CLIP architecture than {expected}: found {_fmt(found)}{hint}; "
            f"expected {_fmt(want)}"
        )
    missing = sorted(set(target) - set(sd))
    unexpected = sorted(set(sd) - set(target))
    if missing or unexpected:
        parts = ([f"missing keys: {_few(missing)}"] if missing else []) + (
            [f"unexpected keys: {_few(unexpected)}"] if unexpected else [])
        raise CheckpointError(f"{source} does not match {expected}: " + "; ".join(parts))
    bad = [f"{k}: expected {tuple(target[k].shape)} vs found {tuple(sd[k].shape)}"
           for k in target if target[k].shape != sd[k].shape]
    if bad:
        raise CheckpointError(f"{source} has tensors of the wrong shape for {expected}: {_few(bad)}")


def _heads(tower: nn.Module) -> Optional[int]:
    blocks = getattr(getattr(tower, "transformer", None), "resblocks", None)
    return blocks[0].attn.num_heads if blocks else None


def _check_hf_config(config: dict, model: nn.Module, source: str, expected: str) -> None:
    """Check what the state dict cannot show: activation and head counts of a HF directory."""
    text_cfg, vision_cfg = config.get("text_config") or {}, config.get("vision_config") or {}
    want_act = "quick_gelu" if any(isinstance(m, open_clip.model.QuickGELU) for m in model.modules()) else "gelu"
    for name, cfg in (("text", text_cfg), ("vision", vision_cfg)):
        act = cfg.get("hidden_act", "quick_gelu")
        if act != want_act:
            raise CheckpointError(f"{source}: {name}_config.hidden_act is {act!r}; {expected} uses {want_act}")
    heads = {"text": (text_cfg.get("num_attention_heads"), _heads(model)),
             "vision": (vision_cfg.get("num_attention_heads"), _heads(model.visual))}
    for name, (got, want) in heads.items():
        if got is not None and want is not None and got != want:
            raise CheckpointError(
                f"{source}: {name}_config.num_attention_heads is {got}; {expected} expects {want}")


_TEXT_TOWER_KEYS = ("text_projection", "positional_embedding", "token_embedding.", "transformer.", "ln_final.")


def to_custom_text_layout(sd: StateDict) -> StateDict:
    """CLIP's flat text keys -> CustomTextCLIP's ``text.*`` (open_clip's converter misses Linear projections)."""
    if "positional_embedding" not in sd:
        return sd
    return {("text." + k if k.startswith(_TEXT_TOWER_KEYS) else k): v for k, v in sd.items()}


def load_clip_weights(model: nn.Module, path: str | Path, expected: str) -> RawCheckpoint:
    """Load any supported checkpoint into an open_clip ``CLIP`` built for ``expected``; return it."""
    raw = read_checkpoint(path)
    source = f"CLIP weights {Path(path).expanduser()} ({raw.format})"
    if raw.hf_config is not None:
        _check_hf_config(raw.hf_config, model, source, expected)
    sd = dict(raw.state_dict)
    if isinstance(getattr(model, "text", None), nn.Module):
        sd = to_custom_text_layout(sd)
    _fit_image_size(sd, model.state_dict())
    check_state_dict(sd, model, source, expected)
    model.load_state_dict(sd, strict=True)
    return raw
