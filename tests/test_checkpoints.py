"""Every checkpoint format loads through capnet to the same features; every failure is explained."""
from __future__ import annotations

import hashlib
import warnings
from pathlib import Path
from typing import Callable, Dict

import pytest
import torch
from open_clip.model import CLIP
from safetensors.torch import save_file

import capnet.models.backbones  # noqa: F401  (fills BACKBONES)
from capnet.errors import CheckpointError
from capnet.models.backbones.checkpoints import convert_hf_state_dict, read_checkpoint
from capnet.models.backbones.clip import _tokenizer, open_clip_model
from capnet.models.backbones.specs import CLIP_ARCHS
from capnet.registry import BACKBONES

VIT, RN = "clip_tiny_vit.random", "clip_tiny_rn.random"
TEXTS = ["a photo of a cat.", "a dog on a sofa next to a potted plant"]


def _model(name: str, seed: int = 0) -> CLIP:
    """A random tiny open_clip CLIP whose weights are exactly representable in fp16."""
    torch.manual_seed(seed)
    model = open_clip_model(CLIP_ARCHS[name].model_config(), quick_gelu=True)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.half().float())
    return model


def _features(model: CLIP, name: str) -> Dict[str, torch.Tensor]:
    size = CLIP_ARCHS[name].model_config()["vision_cfg"]["image_size"]
    pixels = torch.linspace(-2, 2, 2 * 3 * size * size).reshape(2, 3, size, size)
    tokens = _tokenizer(77)(TEXTS)
    with torch.no_grad():
        return {"pixels": pixels, "tokens": tokens, "image": model.encode_image(pixels),
                "text": model.encode_text(tokens)}


def _assert_same(path: Path, name: str, ref: Dict[str, torch.Tensor], atol: float = 1e-6) -> None:
    """The backbone loaded from ``path`` reproduces the reference features and records the file."""
    backbone = BACKBONES.build(name, weights=str(path))
    with torch.no_grad():
        torch.testing.assert_close(backbone.encode_image(ref["pixels"]), ref["image"], atol=atol, rtol=0)
        emb = backbone.embed_tokens(ref["tokens"])
        torch.testing.assert_close(backbone.encode_token_embeddings(emb, ref["tokens"]), ref["text"],
                                   atol=atol, rtol=0)
    assert backbone.spec.weights == str(path)
    assert backbone.spec.weights_sha256 == hashlib.sha256(path.read_bytes()).hexdigest()


# --------------------------------------------------------------------------- writers
def _open_clip_nested(model: CLIP, d: Path) -> Path:
    sd = {f"module.{k}": v for k, v in model.state_dict().items()}
    torch.save({"epoch": 3, "name": "run", "state_dict": sd}, d / "epoch_3.pt")
    return d / "epoch_3.pt"


def _bin(model: CLIP, d: Path) -> Path:
    torch.save(model.state_dict(), d / "open_clip_pytorch_model.bin")
    return d / "open_clip_pytorch_model.bin"


def _safetensors(model: CLIP, d: Path) -> Path:
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(d / "open_clip_model.safetensors"))
    return d / "open_clip_model.safetensors"


def _openai_plain(model: CLIP, d: Path) -> Path:
    """OpenAI layout: fp16 weights plus the input_resolution/context_length/vocab_size entries."""
    sd = {k: v.half() for k, v in model.state_dict().items()}
    sd.update(input_resolution=torch.tensor(32), context_length=torch.tensor(77), vocab_size=torch.tensor(49408))
    torch.save(sd, d / "openai_plain.pt")
    return d / "openai_plain.pt"


def _torchscript(model: CLIP, d: Path) -> Path:
    """An OpenAI-style release archive: the traced model (its state dict carries attn_mask too)."""
    size = model.visual.image_size
    size = size[0] if isinstance(size, tuple) else size
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace_module(
            model, {"encode_image": (torch.zeros(1, 3, size, size),),
                    "encode_text": (torch.zeros(1, 77, dtype=torch.long),)}, check_trace=False)
    torch.jit.save(traced, str(d / "RN50.pt"))
    return d / "RN50.pt"


WRITERS: Dict[str, Callable[[CLIP, Path], Path]] = {
    "open_clip_nested_module": _open_clip_nested, "bin": _bin, "safetensors": _safetensors,
    "openai_plain": _openai_plain, "torchscript": _torchscript,
}


# every format on the ViT; the formats OpenAI's RN50 ships in on the ResNet
CASES = [(f, VIT) for f in WRITERS] + [(f, RN) for f in ("open_clip_nested_module", "openai_plain", "torchscript")]


@pytest.mark.parametrize("fmt,name", CASES)
def test_format_round_trip(fmt: str, name: str, tmp_path: Path) -> None:
    model = _model(name)
    ref = _features(model, name)
    path = WRITERS[fmt](model, tmp_path)
    _assert_same(path, name, ref)
    expected = {"torchscript": "openai-torchscript", "safetensors": "safetensors"}.get(fmt, "torch")
    assert read_checkpoint(path).format == expected


# ----------------------------------------------------------------------- Hugging Face
@pytest.fixture(scope="module")
def hf_model():
    transformers = pytest.importorskip("transformers")
    text = dict(vocab_size=49408, hidden_size=32, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=2, max_position_embeddings=77, hidden_act="quick_gelu",
                bos_token_id=49406, eos_token_id=49407, pad_token_id=0)
    vision = dict(hidden_size=32, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                  image_size=32, patch_size=8, hidden_act="quick_gelu")
    torch.manual_seed(0)
    config = transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=32)
    return transformers.CLIPModel(config).eval()


def _pooled(out: object) -> torch.Tensor:
    """get_*_features returns a tensor (transformers 4) or an output with pooler_output (5)."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def test_hugging_face_directory(hf_model, tmp_path: Path) -> None:
    hf_model.save_pretrained(tmp_path / "clip-tiny")
    backbone = BACKBONES.build(VIT, weights=str(tmp_path / "clip-tiny"))
    assert backbone.spec.extra["weights_format"] == "hf-transformers"
    tokens = backbone.tokenize(TEXTS)
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(backbone.encode_image(pixels),
                                   _pooled(hf_model.get_image_features(pixel_values=pixels)), atol=1e-5, rtol=0)
        torch.testing.assert_close(backbone.encode_text(TEXTS),
                                   _pooled(hf_model.get_text_features(input_ids=tokens)), atol=1e-5, rtol=0)
    torch.testing.assert_close(backbone.logit_scale, hf_model.logit_scale.detach())


def test_hugging_face_layout_in_a_single_file(hf_model, tmp_path: Path) -> None:
    path = tmp_path / "hf_state.safetensors"
    save_file({k: v.contiguous() for k, v in hf_model.state_dict().items()}, str(path))
    raw = read_checkpoint(path)
    assert raw.format == "safetensors+hf-layout" and "visual.transformer.resblocks.0.attn.in_proj_weight" in raw.state_dict
    pixels = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        feats = BACKBONES.build(VIT, weights=str(path)).encode_image(pixels)
        torch.testing.assert_close(feats, _pooled(hf_model.get_image_features(pixel_values=pixels)), atol=1e-5, rtol=0)


def test_hugging_face_wrong_heads(hf_model, tmp_path: Path) -> None:
    hf_model.save_pretrained(tmp_path / "clip-tiny")
    cfg = (tmp_path / "clip-tiny" / "config.json").read_text().replace('"num_attention_heads": 2', '"num_attention_heads": 4')
    (tmp_path / "clip-tiny" / "config.json").write_text(cfg)
    with pytest.raises(CheckpointError, match="num_attention_heads is 4.*expects 2"):
        BACKBONES.build(VIT, weights=str(tmp_path / "clip-tiny"))


def test_hf_conversion_fuses_qkv() -> None:
    q, k, v = (torch.full((4, 4), float(i)) for i in range(3))
    hf = {f"text_model.encoder.layers.0.self_attn.{n}_proj.weight": t for n, t in zip("qkv", (q, k, v))}
    hf["text_projection.weight"] = torch.arange(6.0).reshape(2, 3)
    out = convert_hf_state_dict(hf)
    torch.testing.assert_close(out["transformer.resblocks.0.attn.in_proj_weight"], torch.cat([q, k, v]))
    torch.testing.assert_close(out["text_projection"], hf["text_projection.weight"].t())
    del hf["text_model.encoder.layers.0.self_attn.v_proj.weight"]
    with pytest.raises(CheckpointError, match="lacks"):
        convert_hf_state_dict(hf)


# ------------------------------------------------------------------------------ errors
def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="nope.pt do not exist"):
        BACKBONES.build(VIT, weights=str(tmp_path / "nope.pt"))


def test_wrong_architecture_names_both(tmp_path: Path) -> None:
    path = _bin(_model(RN), tmp_path)
    with pytest.raises(CheckpointError) as err:
        BACKBONES.build(VIT, weights=str(path))
    msg = str(err.value)
    assert str(path) in msg and "different CLIP architecture" in msg
    assert "found ResNet width 16" in msg and "expected ViT width 32" in msg


def test_real_architecture_is_named(tmp_path: Path) -> None:
    sd = _model(VIT).state_dict()
    sd["visual.conv1.weight"] = torch.zeros(32, 3, 16, 16)  # patch 16 instead of 8
    torch.save(sd, tmp_path / "p16.pt")
    with pytest.raises(CheckpointError, match="patch 16.*expected ViT width 32, layers 2, patch 8"):
        BACKBONES.build(VIT, weights=str(tmp_path / "p16.pt"))


def test_wrong_shapes(tmp_path: Path) -> None:
    sd = _model(VIT).state_dict()
    sd["positional_embedding"] = sd["positional_embedding"][:50]
    sd["visual.ln_pre.weight"] = torch.ones(16)
    torch.save(sd, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError) as err:
        BACKBONES.build(VIT, weights=str(tmp_path / "bad.pt"))
    msg = str(err.value)
    assert "bad.pt" in msg and "positional_embedding: expected (77, 32) vs found (50, 32)" in msg
    assert "visual.ln_pre.weight: expected (32,) vs found (16,)" in msg


def test_missing_and_unexpected_keys(tmp_path: Path) -> None:
    sd = _model(VIT).state_dict()
    del sd["ln_final.bias"]
    sd["logit_bias"] = torch.zeros(())
    torch.save({"model": sd}, tmp_path / "keys.pt")
    with pytest.raises(CheckpointError, match="missing keys: ln_final.bias; unexpected keys: logit_bias"):
        BACKBONES.build(VIT, weights=str(tmp_path / "keys.pt"))


def test_unreadable_and_empty_checkpoints(tmp_path: Path) -> None:
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="junk.pt"):
        read_checkpoint(tmp_path / "junk.pt")
    torch.save({"epoch": 1, "optimizer": {}}, tmp_path / "empty.pt")
    with pytest.raises(CheckpointError, match="holds no tensors"):
        read_checkpoint(tmp_path / "empty.pt")
    (tmp_path / "somedir").mkdir()
    with pytest.raises(CheckpointError, match="without config.json"):
        read_checkpoint(tmp_path / "somedir")
    (tmp_path / "somedir" / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="no weights"):
        read_checkpoint(tmp_path / "somedir")


def test_other_image_size_resizes_positions(tmp_path: Path) -> None:
    model = _model(VIT)
    path = _safetensors(model, tmp_path)
    backbone = BACKBONES.build(VIT, weights=str(path), image_size=48)
    pe = backbone.visual.positional_embedding
    assert pe.shape == (1 + 6 * 6, 32)
    torch.testing.assert_close(pe[0], model.visual.positional_embedding[0])
    assert backbone.encode_image(torch.randn(1, 3, 48, 48)).shape == (1, 32)
