"""The image-feature cache: keys, hits, float16 storage, corruption handling."""
from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn
from torchvision import transforms as T

from capnet.features.cache import FeatureCache, cache_key, compute_features, feature_key_parts
from capnet.data import load_image
from capnet.errors import DataError
from capnet.models.backbones.base import BackboneSpec

REPO_DATA = Path(__file__).resolve().parents[1] / "data" / "voc_real_lt"
VOC_REAL_LT = REPO_DATA  # vendored in the repository (scripts/vendor_voc_real_lt.py)


class StubBackbone(nn.Module):
    """Two conv stages with a forward counter: enough of the Backbone contract for the cache."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.spec = BackboneSpec(name="stub.test", weights_sha256="a" * 64)
        self.visual = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2), nn.Conv2d(4, 4, 3, stride=2))
        self.calls = 0

    def image_prefix(self, images: torch.Tensor, upto: int) -> torch.Tensor:
        self.calls += 1
        return self.visual[:upto](images)


def transform(size: int = 16):
    return T.Compose([T.Resize(size), T.CenterCrop(size), T.ToTensor()])


@pytest.fixture
def images(tmp_path):
    """Copies of 4 bundled real images (copies, so tests may touch and overwrite them)."""
    src = sorted((VOC_REAL_LT / "images").glob("*.jpg"))[:4]
    assert len(src) == 4
    out = []
    for p in src:
        out.append(tmp_path / "img" / p.name)
        out[-1].parent.mkdir(exist_ok=True)
        shutil.copy2(p, out[-1])
    return out


def test_cache_key_is_canonical():
    assert cache_key({"a": 1, "b": [1, 2]}) == cache_key({"b": [1, 2], "a": 1})
    assert cache_key({"a": 1, "b": [1, 2]}) != cache_key({"a": 1, "b": [2, 1]})
    assert len(cache_key({})) == 64


def test_miss_then_hit_returns_identical_tensor(tmp_path, images):
    cache, model = FeatureCache(tmp_path / "cache"), StubBackbone()
    first = compute_features(model, images, transform(), upto=2, batch_size=3, cache=cache, progress=False)
    assert first.shape == (4, 4, 3, 3) and first.dtype == torch.float32
    assert model.calls == 2  # two batches
    files = list((tmp_path / "cache").glob("*.safetensors"))
    assert len(files) == 1 and not list((tmp_path / "cache").glob(".tmp-*"))
    second = compute_features(model, images, transform(), upto=2, cache=cache, progress=False)
    assert model.calls == 2  # served from disk
    assert torch.equal(first, second)
    uncached = compute_features(model, images, transform(), upto=2, progress=False)
    assert torch.equal(uncached, first)  # same numbers with or without a cache (float16-rounded)
    assert model.training  # the train/eval mode is restored


def test_key_changes_with_transform_weights_depth_and_precision(images):
    model = StubBackbone()
    base = cache_key(feature_key_parts(model, transform(16), 2))
    assert cache_key(feature_key_parts(model, transform(16), 2)) == base
    assert cache_key(feature_key_parts(model, transform(24), 2)) != base
    assert cache_key(feature_key_parts(model, transform(16), 1)) != base
    assert cache_key(feature_key_parts(model, transform(16), 2, compute="bf16")) != base
    model.spec = dataclasses.replace(model.spec, extra={"pooling": "avgmax"})  # same weights, other features
    assert cache_key(feature_key_parts(model, transform(16), 2)) != base
    model.spec = dataclasses.replace(model.spec, extra={}, weights_sha256="b" * 64)
    assert cache_key(feature_key_parts(model, transform(16), 2)) != base


def test_rows_are_shared_by_any_subset_or_order_of_images(tmp_path, images):
    """Splits, re-splits and validation carve-outs of the same images reuse the same rows."""
    cache, model = FeatureCache(tmp_path / "cache"), StubBackbone()
    some = compute_features(model, images[:3], transform(), upto=1, cache=cache, progress=False)
    assert model.calls == 1
    mixed = compute_features(model, [images[3], images[1], images[0]], transform(), upto=1, cache=cache, progress=False)
    assert model.calls == 2  # only images[3] went through the tower
    assert torch.equal(mixed[1], some[1]) and torch.equal(mixed[2], some[0])
    full = compute_features(model, images, transform(), upto=1, cache=cache, progress=False)
    assert model.calls == 2 and torch.equal(full[3], mixed[0])
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 1  # one entry holds them all


def test_stacked_views_are_one_decode_and_rows_of_views(tmp_path, images):
    from capnet.models.tte import view_transform

    stack = view_transform("flip", 16, 1.0, (0.0,) * 3, (1.0,) * 3, "bilinear", eval_transform=transform())
    model = StubBackbone()
    feats = compute_features(model, images, stack, upto=1, progress=False)
    single = compute_features(model, images, transform(), upto=1, progress=False)
    assert feats.shape == (4, 2, 4, 7, 7)
    assert torch.equal(feats[:, 0], single)


def test_changed_image_is_recomputed(tmp_path, images):
    cache, model = FeatureCache(tmp_path / "cache"), StubBackbone()
    before = compute_features(model, images, transform(), upto=1, cache=cache, progress=False)
    shutil.copy2(images[1], images[0])
    after = compute_features(model, images, transform(), upto=1, cache=cache, progress=False)
    assert model.calls == 2 and torch.equal(after[0], after[1]) and not torch.equal(before[0], after[0])


@pytest.mark.parametrize("damage", ["truncate", "flip_data_byte", "wrong_key"])
def test_corrupt_entry_is_reported_deleted_and_recomputed(tmp_path, images, damage):
    cache, model = FeatureCache(tmp_path / "cache"), StubBackbone()
    good = compute_features(model, images, transform(), upto=2, cache=cache, progress=False)
    key = cache_key(feature_key_parts(model, transform(), 2))
    path = cache.path(key)
    raw = bytearray(path.read_bytes())
    if damage == "truncate":
        path.write_bytes(bytes(raw[: len(raw) // 2]))
    elif damage == "flip_data_byte":
        raw[-3] ^= 0xFF  # tensor data sits at the end; the header stays valid
        path.write_bytes(bytes(raw))
    else:
        other = cache.save("0" * 64, good, [("x", 1, 1)] * len(good), {})
        os.replace(other, path)
    with pytest.warns(UserWarning, match=path.name):
        assert cache.load(key) is None
    assert not path.exists()
    again = compute_features(model, images, transform(), upto=2, cache=cache, progress=False)
    assert torch.equal(again, good) and model.calls == 2 and path.exists()


def test_float16_storage_and_overflow_fallback(tmp_path):
    cache = FeatureCache(tmp_path)
    small = torch.tensor([[1.0, 2.5e-4, -3.14159]])
    cache.save("k1", small, [("a.jpg", 1, 2)], {"note": "x", "n": 3})
    loaded, fps = cache.load("k1")
    assert loaded.dtype == torch.float32 and torch.equal(loaded, small.half().float()) and fps == [("a.jpg", 1, 2)]
    big = torch.tensor([[1.0, 1e6]])
    cache.save("k2", big, [("b.jpg", 1, 2)], {})
    assert torch.equal(cache.load("k2")[0], big)  # kept as float32 instead of overflowing to inf
    assert cache.load("missing") is None


def test_bad_image_is_a_data_error(tmp_path, images):
    images[1].write_bytes(b"not a jpeg")
    with pytest.raises(DataError, match=images[1].name):
        compute_features(StubBackbone(), images, transform(), upto=1, progress=False)
    with pytest.raises(ValueError):
        compute_features(StubBackbone(), [], transform(), upto=1, progress=False)


@pytest.mark.slow
def test_cached_vgg_prefix_feeds_the_trainable_suffix(tmp_path, images):
    """Cache VGG19 blocks 1-3, then blocks 4-5 + pooling on them == the full image tower."""
    import capnet.models.backbones  # noqa: F401  (fills BACKBONES)
    from capnet.registry import BACKBONES

    backbone = BACKBONES.build("vgg19_minilm.offline", image_size=32)
    tf = backbone.transform(train=False)
    cache = FeatureCache(tmp_path / "cache")
    prefix = compute_features(backbone, images, tf, upto=3, cache=cache, progress=False)
    assert prefix.shape == (4, 256, 4, 4)
    assert torch.equal(compute_features(backbone, images, tf, upto=3, cache=cache, progress=False), prefix)
    with torch.inference_mode():
        full = backbone.encode_image(torch.stack([tf(load_image(p)) for p in images]))
        resumed = backbone.image_suffix(prefix, 3)
    assert torch.allclose(resumed, full, rtol=2e-2, atol=0.5)  # float16 cache: small rounding only
