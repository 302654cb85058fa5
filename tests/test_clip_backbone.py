"""CLIPBackbone: exact equality with open_clip, registry entries, transforms, weight search."""
from __future__ import annotations

from pathlib import Path

import open_clip
import pytest
import torch
from open_clip.model import CLIP
from PIL import Image

import capnet.models.backbones  # noqa: F401  (fills BACKBONES)
from capnet.errors import CheckpointError
from capnet.models.backbones.checkpoints import describe_config, describe_state_dict, known_architectures
from capnet.models.backbones.clip import CLIPBackbone, candidate_paths, open_clip_model, find_weights
from capnet.models.backbones.specs import CLIP_ARCHS
from capnet.registry import BACKBONES

TINY = ["clip_tiny_vit.random", "clip_tiny_rn.random"]
TEXTS = ["a photo of a cat.", "", "a much longer sentence about a small dog playing with a red ball in the park.",
         "tv monitor"]


def _reference(backbone: CLIPBackbone) -> CLIP:
    """An open_clip CLIP loaded from the backbone's state dict (same key layout, strict)."""
    model = open_clip_model(CLIP_ARCHS[backbone.spec.name].model_config(), quick_gelu=True)
    model.load_state_dict(backbone.state_dict(), strict=True)
    return model


@pytest.fixture(autouse=True)
def _no_real_caches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Point every cache location into tmp_path so no real file on this machine is found."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # no test may reach the network
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME", "CAPNET_WEIGHTS_DIR"):
        monkeypatch.delenv(var, raising=False)


def test_registered_names() -> None:
    want = {"clip_rn50.openai", "clip_vit_b16.openai", "clip_vit_b32.openai", "clip_vit_l14.openai", *TINY}
    assert want <= set(BACKBONES.names("clip_*"))


@pytest.mark.parametrize("name", TINY)
def test_text_cut_equals_open_clip_encode_text(name: str) -> None:
    torch.manual_seed(0)
    backbone = BACKBONES.build(name)
    model = _reference(backbone)
    tokens = backbone.tokenize(TEXTS)
    assert tokens.shape == (len(TEXTS), 77) and tokens.dtype == torch.long
    with torch.no_grad():
        ours = backbone.encode_token_embeddings(backbone.embed_tokens(tokens), tokens)
        ref = model.encode_text(tokens)
        assert ours.shape == (len(TEXTS), backbone.text_dim)
        torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)
        torch.testing.assert_close(backbone.encode_text(TEXTS), ref, atol=1e-5, rtol=0)
        # a short batch is cut far before 77: still equal (causal mask)
        short = tokens[:2]
        torch.testing.assert_close(backbone.encode_text(TEXTS[:2]), model.encode_text(short), atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", TINY)
def test_image_tower_and_dims(name: str) -> None:
    torch.manual_seed(0)
    backbone = BACKBONES.build(name)
    model = _reference(backbone)
    size = backbone.spec.image_size
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        feats = backbone.encode_image(x)
        torch.testing.assert_close(feats, model.encode_image(x))
    assert feats.shape == (2, backbone.image_dim)
    assert backbone.image_dim == backbone.text_dim == 32 and backbone.token_width == 32
    assert backbone.visual is not None and backbone.num_image_stages == 1
    visual = {id(p) for p in backbone.visual_parameters()}
    text = {id(p) for p in backbone.text_parameters()}
    assert visual and text and not visual & text
    assert id(backbone.token_embedding.weight) in text
    torch.testing.assert_close(backbone.logit_scale, model.logit_scale.detach())


def test_gradients_reach_soft_prompt_rows() -> None:
    torch.manual_seed(0)
    backbone = BACKBONES.build("clip_tiny_vit.random")
    tokens = backbone.tokenize(["X X X X cat."])
    emb = backbone.embed_tokens(tokens).detach()
    ctx = torch.zeros(1, 4, backbone.token_width, requires_grad=True)
    full = torch.cat([emb[:, :1], emb[:, 1:5] + ctx, emb[:, 5:]], dim=1)
    backbone.encode_token_embeddings(full, tokens).sum().backward()
    assert ctx.grad is not None and ctx.grad.abs().sum() > 0


@pytest.mark.parametrize("train", [True, False])
def test_transform_shapes_and_normalisation(train: bool) -> None:
    backbone = BACKBONES.build("clip_tiny_rn.random")
    size = backbone.spec.image_size
    for img in (Image.new("RGB", (90, 70), (255, 255, 255)), Image.new("L", (70, 90), 255)):
        out = backbone.transform(train)(img)
        assert out.shape == (3, size, size)
        white = (1 - torch.tensor(backbone.spec.mean)) / torch.tensor(backbone.spec.std)
        torch.testing.assert_close(out.mean(dim=(1, 2)), white, atol=1e-3, rtol=0)
    assert backbone.spec.interpolation == "bicubic"


def test_image_size_override_and_spec() -> None:
    backbone = BACKBONES.build("clip_tiny_vit.random", image_size=48)
    assert backbone.spec.image_size == 48 and backbone.spec.weights == "random"
    assert backbone.encode_image(torch.randn(1, 3, 48, 48)).shape == (1, 32)
    assert backbone.spec.mean == (0.48145466, 0.4578275, 0.40821073)


def test_unknown_builder_argument() -> None:
    with pytest.raises(TypeError, match="pretrained"):
        BACKBONES.build("clip_tiny_vit.random", pretrained=True)


def test_random_weights_for_real_arch_warn() -> None:
    with pytest.warns(UserWarning, match="random weights"):
        backbone = BACKBONES.build("clip_rn50.openai", weights="random")
    assert backbone.image_dim == 1024 and backbone.token_width == 512
    assert len(backbone.spec.weights_sha256) == 64  # seeded random init has a fixed digest
    # the architecture summary read from a state dict matches open_clip's config (names stray files)
    summary = describe_state_dict(backbone.state_dict())
    assert summary == describe_config(open_clip.get_model_config("RN50"))
    assert "RN50" in known_architectures(summary)


def test_missing_weights_lists_every_place(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError) as err:
        BACKBONES.build("clip_vit_b16.openai")
    msg = str(err.value)
    assert str(Path(tmp_path / "home" / ".cache" / "clip" / "ViT-B-16.pt")) in msg
    assert "models--timm--vit_base_patch16_clip_224.openai" in msg
    assert "models--openai--clip-vit-base-patch16" in msg
    assert "CAPNET_WEIGHTS_DIR" in msg


def test_weight_search_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    arch = CLIP_ARCHS["clip_vit_b16.openai"]
    hub = tmp_path / "home" / ".cache" / "huggingface" / "hub" / "models--openai--clip-vit-base-patch16"
    snap = hub / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    (snap / "config.json").write_text("{}")
    assert find_weights(arch) == snap
    openai = tmp_path / "home" / ".cache" / "clip" / "ViT-B-16.pt"
    openai.parent.mkdir(parents=True)
    openai.write_bytes(b"")
    assert find_weights(arch) == openai  # OpenAI's cache comes before the hub
    mine = tmp_path / "weights"
    mine.mkdir()
    (mine / "clip_vit_b16.openai.safetensors").write_bytes(b"")
    monkeypatch.setenv("CAPNET_WEIGHTS_DIR", str(mine))
    assert find_weights(arch) == mine / "clip_vit_b16.openai.safetensors"
    assert candidate_paths(arch)[0].startswith(str(mine))
