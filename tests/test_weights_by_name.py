"""Weights by name (open_clip tags, hf-hub repos), any open_clip CLIP arch, activation and pooling.

No network: hub downloads are replaced by a stub, caches are built in tmp_path, and the tiny
architectures get fake entries in open_clip's pretrained registry.
"""
from __future__ import annotations

import copy
import hashlib
from pathlib import Path
from typing import Any, Dict, List, Tuple

import open_clip
import pytest
import torch
from open_clip.model import QuickGELU
from safetensors.torch import save_file
from torch import nn

import capnet.models.backbones  # noqa: F401  (fills BACKBONES)
from capnet.errors import CapnetError, CheckpointError
from capnet.models.backbones import pretrained as hub
from capnet.models.backbones.checkpoints import to_custom_text_layout
from capnet.models.backbones.clip import _activation, open_clip_model, uses_quick_gelu
from capnet.models.backbones.specs import TINY_VIT_CONFIG, resolve_arch
from capnet.registry import BACKBONES

REPO = "capnet-test/tiny-vit-fake"
GELU_REPO = "capnet-test/tiny-gelu-laionfake"
TEXTS = ["a photo of a cat.", "", "a much longer sentence about a small dog playing with a red ball."]
TINY_GELU = {k: copy.deepcopy(v) for k, v in TINY_VIT_CONFIG.items() if k != "quick_gelu"}


def _pcfg(**kw: Any) -> Dict[str, Any]:
    return {"url": "", "hf_hub": "", "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5), "interpolation": "bicubic", **kw}


@pytest.fixture(autouse=True)
def _registry_and_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Fake pretrained entries for the tiny archs, a tiny GELU arch, and caches inside tmp_path."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for var in ("HUGGINGFACE_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME", "CAPNET_WEIGHTS_DIR"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setitem(open_clip.factory._MODEL_CONFIGS, "tiny-gelu-ViT", copy.deepcopy(TINY_GELU))
    registry = open_clip.pretrained._PRETRAINED
    monkeypatch.setitem(registry, "tiny-ViT", {"fake": _pcfg(hf_hub=f"{REPO}/", quick_gelu=True)})
    monkeypatch.setitem(registry, "tiny-gelu-ViT", {
        "laionfake": _pcfg(hf_hub=f"{GELU_REPO}/"),
        "openaifake": _pcfg(hf_hub=f"{REPO}/", quick_gelu=True),
        "urlfake": _pcfg(url="https://example.invalid/weights/tiny-gelu.pt"),
    })


def _tiny(quick_gelu: bool, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return open_clip_model(TINY_GELU, quick_gelu=quick_gelu)


def _save(model: nn.Module, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def _hub_file(root: Path, repo: str, model: nn.Module, name: str = "open_clip_model.safetensors") -> Path:
    """Write ``model`` into the HF hub cache layout: models--org--repo/{refs/main, snapshots/<rev>/name}."""
    folder = root / ("models--" + repo.replace("/", "--"))
    (folder / "refs").mkdir(parents=True, exist_ok=True)
    (folder / "refs" / "main").write_text("0123abcd")
    return _save(model, folder / "snapshots" / "0123abcd" / name)


def _assert_same_weights(backbone: Any, model: nn.Module) -> None:
    ours = backbone.state_dict()
    for k, v in model.state_dict().items():
        if k in ours:
            assert torch.equal(ours[k], v), k


# ------------------------------------------------------------------ (a) offline hub cache
def test_offline_cache_by_name(tmp_path: Path) -> None:
    model = _tiny(quick_gelu=True)
    path = _hub_file(tmp_path / "hub", REPO, model)
    backbone = BACKBONES.build("clip_tiny_vit.fake")  # family.tag: tag resolved by open_clip's registry
    _assert_same_weights(backbone, model)
    assert backbone.spec.weights == str(path)
    assert backbone.spec.weights_sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert backbone.spec.extra["weights_origin"] == f"hf-hub:{REPO}/open_clip_model.safetensors"
    assert backbone.spec.mean == (0.5, 0.5, 0.5)  # preprocessing travels with the weights' entry
    # the same weights asked for through model.weights on the registered random-tag name
    again = BACKBONES.build("clip_tiny_vit.random", weights="fake")
    assert again.spec.weights_sha256 == backbone.spec.weights_sha256
    # and as an hf-hub: repo
    assert BACKBONES.build("clip_tiny_vit.random", weights=f"hf-hub:{REPO}").spec.weights == str(path)


# --------------------------------------------------------------------- (b) download stub
def test_download_when_online(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    model = _tiny(quick_gelu=False, seed=3)
    calls: List[Tuple[str, str]] = []

    def fake_download(repo_id: str, filename: str) -> str:
        calls.append((repo_id, filename))
        return str(_hub_file(hub.hub_cache_dir(), repo_id, model, filename))

    monkeypatch.setattr(hub, "_hub_download", fake_download)
    backbone = BACKBONES.build("tiny-gelu-ViT.laionfake")  # open_clip arch.tag
    assert calls == [(GELU_REPO, "open_clip_model.safetensors")]
    _assert_same_weights(backbone, model)
    assert not uses_quick_gelu(backbone)
    BACKBONES.build("tiny-gelu-ViT.laionfake")
    assert len(calls) == 1  # the second build reads the cache


def test_url_entry_downloads_into_open_clip_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    model = _tiny(quick_gelu=False, seed=4)
    urls: List[str] = []

    def fake_url(url: str) -> str:
        urls.append(url)
        target = hub.url_cache_dir() / url.rsplit("/", 1)[1]
        target.parent.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), target)
        return str(target)

    monkeypatch.setattr(hub, "_url_download", fake_url)
    backbone = BACKBONES.build("tiny-gelu-ViT.urlfake")
    assert urls == ["https://example.invalid/weights/tiny-gelu.pt"]
    assert backbone.spec.weights == str(tmp_path / "home" / ".cache" / "clip" / "tiny-gelu.pt")
    assert backbone.spec.extra["weights_origin"] == urls[0]
    _assert_same_weights(backbone, model)


# ------------------------------------------------------------ (c) offline, nothing cached
def test_offline_empty_cache_says_what_to_fetch(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError) as err:
        BACKBONES.build("clip_tiny_vit.fake")
    msg = str(err.value)
    assert "\n" not in msg
    assert f"hf download {REPO} open_clip_model.safetensors" in msg
    assert str(tmp_path / "hub") in msg and "models--capnet-test--tiny-vit-fake" in msg
    assert "model.weights=" in msg and "HF_HUB_OFFLINE" in msg
    with pytest.raises(CheckpointError, match=r"https://example.invalid/weights/tiny-gelu.pt into .*\.cache/clip"):
        BACKBONES.build("tiny-gelu-ViT.urlfake")


def test_registered_name_offline_names_hub_file_and_local_places(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError) as err:
        BACKBONES.build("clip_vit_b16.openai")
    msg = str(err.value)
    assert "\n" not in msg
    assert "hf download timm/vit_base_patch16_clip_224.openai open_clip_model.safetensors" in msg
    assert str(tmp_path / "home" / ".cache" / "clip" / "ViT-B-16.pt") in msg  # OpenAI url + local search


def test_unknown_tag_and_non_file(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no weights tagged 'nope'.*tags: laionfake, openaifake, urlfake"):
        BACKBONES.build("tiny-gelu-ViT.nope")
    with pytest.raises(CheckpointError, match="'nope' for backbone 'clip_tiny_vit.random' is neither"):
        BACKBONES.build("clip_tiny_vit.random", weights="nope")
    with pytest.raises(CheckpointError, match="nope.pt do not exist"):  # a path keeps today's message
        BACKBONES.build("clip_tiny_vit.random", weights=str(tmp_path / "nope.pt"))
    with pytest.raises(KeyError, match="unknown backbone 'no_such_arch.openai'"):
        BACKBONES.build("no_such_arch.openai")


# ---------------------------------------------------------------------- (2) activation
@pytest.mark.parametrize("tag,quick", [("laionfake", False), ("openaifake", True)])
def test_activation_follows_pretrained_cfg_and_matches_open_clip(tag: str, quick: bool, tmp_path: Path) -> None:
    model = _tiny(quick_gelu=quick, seed=1)
    repo = GELU_REPO if tag == "laionfake" else REPO
    path = _hub_file(tmp_path / "hub", repo, model)
    backbone = BACKBONES.build(f"tiny-gelu-ViT.{tag}")
    assert uses_quick_gelu(backbone) is quick and backbone.spec.extra["quick_gelu"] is quick
    acts = {type(m) for m in backbone.modules()} & {QuickGELU, nn.GELU}
    assert acts == {QuickGELU if quick else nn.GELU}
    # bit-exact with open_clip's own factory given the same file and activation
    ref = open_clip.create_model("tiny-gelu-ViT", pretrained=str(path), force_quick_gelu=quick).eval()
    tokens = backbone.tokenize(TEXTS)
    pixels = torch.linspace(-2, 2, 2 * 3 * 32 * 32).reshape(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(backbone.encode_image(pixels), ref.encode_image(pixels), atol=0, rtol=0)
        torch.testing.assert_close(backbone.encode_text(TEXTS), ref.encode_text(tokens), atol=1e-6, rtol=0)


def test_real_arch_activation_from_open_clip_configs() -> None:
    """OpenAI weights need QuickGELU, LAION's ViT-B-16 GELU, '-quickgelu' archs say it themselves."""
    cases = {"clip_vit_b16.openai": True, "clip_vit_b16.laion2b_s34b_b88k": False,
             "ViT-B-16.datacomp_xl_s13b_b90k": False, "ViT-B-32-quickgelu.metaclip_400m": True,
             "clip_rn50.openai": True}
    for name, quick in cases.items():
        arch = resolve_arch(name)
        assert arch is not None, name
        remote = hub.remote_for_tag(arch.open_clip_name, arch.tag)
        assert remote is not None and remote.repo_id, name
        assert _activation(arch.model_config(), arch, remote) is quick, name
        assert _activation(arch.model_config(), arch, None) is quick, name  # a local file: the name's tag


def test_hf_directory_activation_must_match(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    text = dict(vocab_size=49408, hidden_size=32, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=2, max_position_embeddings=77, hidden_act="gelu")
    vision = dict(hidden_size=32, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                  image_size=32, patch_size=8, hidden_act="gelu")
    transformers.CLIPModel(transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=32)
                           ).save_pretrained(tmp_path / "gelu-clip")
    assert not uses_quick_gelu(BACKBONES.build("tiny-gelu-ViT.laionfake", weights=str(tmp_path / "gelu-clip")))
    with pytest.raises(CheckpointError, match="hidden_act is 'gelu'.*uses quick_gelu"):
        BACKBONES.build("clip_tiny_vit.random", weights=str(tmp_path / "gelu-clip"))


# ------------------------------------------------------------------------- text pooling
POOL_CASES = {
    "last": {"pool_type": "last"},
    "last_bidirectional": {"pool_type": "last", "no_causal_mask": True},
    "eos": {"pool_type": "eos", "eos_id": 49407},
    "argmax_ln_after_pool_custom_text": {"final_ln_after_pool": True, "proj_bias": True, "custom": True},
    "last_custom_text_no_proj": {"pool_type": "last", "proj_type": "none", "custom": True, "embed_dim": 32},
}


@pytest.mark.parametrize("case", sorted(POOL_CASES))
def test_text_pooling_equals_open_clip(case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    extra = dict(POOL_CASES[case])
    cfg = copy.deepcopy(TINY_GELU)
    cfg["custom_text"] = extra.pop("custom", False)
    cfg["embed_dim"] = extra.pop("embed_dim", cfg["embed_dim"])
    cfg["text_cfg"].update(extra)
    arch = f"tiny-pool-{case}"
    monkeypatch.setitem(open_clip.factory._MODEL_CONFIGS, arch, cfg)
    with pytest.warns(UserWarning, match="random weights"):
        backbone = BACKBONES.build(f"{arch}.random", weights="random")
    torch.manual_seed(0)
    ref = open_clip_model(cfg, quick_gelu=False)
    ref.load_state_dict(_to_model_layout(backbone.state_dict(), ref), strict=True)
    tokens = backbone.tokenize(TEXTS)
    with torch.no_grad():
        torch.testing.assert_close(backbone.encode_text(TEXTS), ref.encode_text(tokens), atol=1e-6, rtol=0)
    assert backbone.spec.extra["text_pool"] == cfg["text_cfg"].get("pool_type", "argmax")


def _to_model_layout(sd: Dict[str, torch.Tensor], model: nn.Module) -> Dict[str, torch.Tensor]:
    """capnet's flat keys -> the model's (CustomTextCLIP keeps the text tower under ``text.``)."""
    return to_custom_text_layout(dict(sd)) if hasattr(model, "text") else dict(sd)


@pytest.mark.parametrize("name,why", [
    ("coca_ViT-B-32.laion2b_s13b_b90k", "multimodal text decoder"),
    ("roberta-ViT-B-32.laion2b_s12b_b32k", "Hugging Face model roberta-base"),
    ("ViT-B-16-SigLIP.webli", "tokenizer"),
])
def test_unsupported_text_towers_are_refused(name: str, why: str) -> None:
    with pytest.raises(CapnetError) as err:
        BACKBONES.build(name)
    msg = str(err.value)
    assert "\n" not in msg and f"backbone '{name}' is not supported" in msg and why in msg


def test_embed_cls_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = copy.deepcopy(TINY_GELU)
    cfg["text_cfg"]["embed_cls"] = True
    monkeypatch.setitem(open_clip.factory._MODEL_CONFIGS, "tiny-cls", cfg)
    with pytest.raises(CapnetError, match="'tiny-cls.random' is not supported: .*embed_cls"):
        BACKBONES.build("tiny-cls.random", weights="random")


def test_hf_hub_backbone_reads_config_from_repo(tmp_path: Path) -> None:
    """``hf-hub:org/repo`` takes architecture, activation and preprocessing from open_clip_config.json."""
    import json

    model = _tiny(quick_gelu=False, seed=2)
    path = _hub_file(tmp_path / "hub", "capnet-test/tiny-hub", model)
    cfg = {"model_cfg": TINY_GELU, "preprocess_cfg": {"mean": [0.1, 0.2, 0.3], "std": [0.5, 0.5, 0.5]}}
    (path.parent / "open_clip_config.json").write_text(json.dumps(cfg))
    backbone = BACKBONES.build("hf-hub:capnet-test/tiny-hub")
    _assert_same_weights(backbone, model)
    assert not uses_quick_gelu(backbone) and backbone.spec.mean == (0.1, 0.2, 0.3)
    assert backbone.spec.extra["weights_origin"] == "hf-hub:capnet-test/tiny-hub/open_clip_model.safetensors"


def test_custom_text_model_loads_flat_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A CLIP-layout file (flat text keys, Linear projection) loads into a CustomTextCLIP tower."""
    cfg = copy.deepcopy(TINY_GELU)
    cfg["custom_text"] = True
    cfg["text_cfg"]["proj_bias"] = True  # a Linear projection: open_clip's own converter misses it
    monkeypatch.setitem(open_clip.factory._MODEL_CONFIGS, "tiny-custom", cfg)
    torch.manual_seed(5)
    model = open_clip_model(cfg, quick_gelu=False)
    flat = {k.removeprefix("text."): v for k, v in model.state_dict().items()}
    path = tmp_path / "flat.safetensors"
    save_file({k: v.contiguous() for k, v in flat.items()}, str(path))
    backbone = BACKBONES.build("tiny-custom.random", weights=str(path))
    with torch.no_grad():
        torch.testing.assert_close(backbone.encode_text(TEXTS), model.encode_text(backbone.tokenize(TEXTS)),
                                   atol=1e-6, rtol=0)
