"""The image-feature cache: keys, hits, float16 storage, in-place fills and resume, corruption handling."""
from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torchvision import transforms as T

from capnet.data import load_image
from capnet.errors import DataError, FeatureRangeError
from capnet.runtime.stopwatch import Stopwatch
from capnet.features.cache import (
    FeatureCache,
    cache_key,
    compute_features,
    feature_key_parts,
)
from capnet.fileio import file_fingerprints
from capnet.features.store import RowFile
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

    def image_prefix(self, images: torch.Tensor, depth: int) -> torch.Tensor:
        self.calls += 1
        return self.visual[:depth](images)


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
    first = compute_features(model, images, transform(), depth=2, batch_size=3, cache=cache, progress=False)
    assert first.shape == (4, 4, 3, 3) and first.dtype == torch.float32
    assert model.calls == 2  # two batches
    key = cache_key(feature_key_parts(model, transform(), 2))
    files = list((tmp_path / "cache" / key).glob("*.npy"))
    assert len(files) == 1 and not list((tmp_path / "cache").rglob("*.tmp"))
    assert np.load(files[0], mmap_mode="r").dtype == np.float16  # a plain .npy anyone can open
    second = compute_features(model, images, transform(), depth=2, cache=cache, progress=False)
    assert model.calls == 2  # served from disk
    assert torch.equal(first, second)
    uncached = compute_features(model, images, transform(), depth=2, progress=False)
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
    some = compute_features(model, images[:3], transform(), depth=1, cache=cache, progress=False)
    assert model.calls == 1
    mixed = compute_features(model, [images[3], images[1], images[0]], transform(), depth=1, cache=cache, progress=False)
    assert model.calls == 2  # only images[3] went through the tower
    assert torch.equal(mixed[1], some[1]) and torch.equal(mixed[2], some[0])
    full = compute_features(model, images, transform(), depth=1, cache=cache, progress=False)
    assert model.calls == 2 and torch.equal(full[3], mixed[0])
    # one array per image list; shared rows were copied from the other lists, not recomputed
    assert len(list((tmp_path / "cache").rglob("*.npy"))) == 3


def test_stacked_views_are_one_decode_and_rows_of_views(tmp_path, images):
    from capnet.models.tte import view_transform

    stack = view_transform("flip", 16, 1.0, (0.0,) * 3, (1.0,) * 3, "bilinear", eval_transform=transform())
    model = StubBackbone()
    feats = compute_features(model, images, stack, depth=1, progress=False)
    single = compute_features(model, images, transform(), depth=1, progress=False)
    assert feats.shape == (4, 2, 4, 7, 7)
    assert torch.equal(feats[:, 0], single)


def test_changed_image_is_recomputed(tmp_path, images):
    cache, model = FeatureCache(tmp_path / "cache"), StubBackbone()
    before = compute_features(model, images, transform(), depth=1, cache=cache, progress=False)
    shutil.copy2(images[1], images[0])
    after = compute_features(model, images, transform(), depth=1, cache=cache, progress=False)
    assert model.calls == 2 and torch.equal(after[0], after[1]) and not torch.equal(before[0], after[0])


def _entry(cache, model, images, depth=2):
    key = cache_key(feature_key_parts(model, transform(), depth))
    ids = [json.dumps(fp) for fp in file_fingerprints(images)]
    return RowFile(cache.stem(key, ids), key, ids)


@pytest.mark.parametrize("damage", ["truncate", "wrong_key", "bad_state"])
def test_corrupt_entry_is_reported_deleted_and_recomputed(tmp_path, images, damage):
    cache, model = FeatureCache(tmp_path / "cache"), StubBackbone()
    good = compute_features(model, images, transform(), depth=2, cache=cache, progress=False)
    entry = _entry(cache, model, images)
    if damage == "truncate":
        raw = entry.array_path.read_bytes()
        entry.array_path.write_bytes(raw[: len(raw) - 7])
        named = entry.array_path.name
    elif damage == "wrong_key":  # another entry's state file under this name
        other = compute_features(model, images[:3], transform(), depth=2, cache=cache, progress=False)
        assert len(other) == 3
        stale = next(p for p in entry.state_path.parent.glob("*.state.safetensors") if p != entry.state_path)
        shutil.copy(stale, entry.state_path)
        named = entry.state_path.name
    else:
        raw = bytearray(entry.state_path.read_bytes())
        raw[-2] ^= 0xFF  # the crc table sits at the end; the header stays valid
        entry.state_path.write_bytes(bytes(raw))
        named = entry.state_path.name
    calls = model.calls
    with pytest.warns(UserWarning, match=named):
        again = compute_features(model, images, transform(), depth=2, cache=cache, progress=False)
    assert torch.equal(again, good) and model.calls > calls and entry.state_path.exists()
    assert not entry.stem.with_name(entry.stem.name + ".part-0.npy").exists()


def test_flipped_byte_recomputes_only_that_row(tmp_path, images):
    cache, model = FeatureCache(tmp_path / "cache"), StubBackbone()
    good = compute_features(model, images, transform(), depth=2, batch_size=1, cache=cache, progress=False)
    entry = _entry(cache, model, images)
    raw = bytearray(entry.array_path.read_bytes())
    raw[-3] ^= 0xFF  # inside the last row
    entry.array_path.write_bytes(bytes(raw))
    calls = model.calls
    with pytest.warns(UserWarning, match=rf"{entry.array_path.name}: 1 row\(s\) fail their checksum"):
        again = compute_features(model, images, transform(), depth=2, batch_size=1, cache=cache, progress=False)
    assert torch.equal(again, good) and model.calls == calls + 1  # one image through the tower again


class Interrupt(Exception):
    pass


class FailingBackbone(StubBackbone):
    """Raises after ``fail_after`` batches, like a run stopped mid-extraction."""

    def __init__(self, fail_after: int) -> None:
        super().__init__()
        self.fail_after = fail_after

    def image_prefix(self, images, depth):
        if self.calls == self.fail_after:
            raise Interrupt
        return super().image_prefix(images, depth)


def test_interrupted_fill_resumes_with_only_the_missing_rows(tmp_path, images):
    cache = FeatureCache(tmp_path / "cache", flush_every_s=3600.0)  # only the final mark counts
    stopped = FailingBackbone(fail_after=2)
    with pytest.raises(Interrupt):
        compute_features(stopped, images, transform(), depth=1, batch_size=1, cache=cache, progress=False)
    entry = RowFile.open(_entry(cache, stopped, images, depth=1).stem, _entry(cache, stopped, images, 1).key,
                         _entry(cache, stopped, images, 1).ids)
    assert entry.filled.tolist() == [True, True, False, False]  # the rows written before the stop
    stopwatch = Stopwatch()
    resumed_model = StubBackbone()
    resumed = compute_features(resumed_model, images, transform(), depth=1, batch_size=1, cache=cache,
                               progress=False, stopwatch=stopwatch)
    assert stopwatch.images == 2 and resumed_model.calls == 2
    assert torch.equal(resumed, compute_features(StubBackbone(), images, transform(), depth=1, progress=False))


class ScaledBackbone(StubBackbone):
    """Multiplies one image's features past float16's range."""

    big = float("nan")  # the pixel sum of the image to scale (none until set)

    def image_prefix(self, images, depth):
        out = super().image_prefix(images, depth)
        return out * torch.where(images.flatten(1).sum(1) == self.big, 1e6, 1.0).view(-1, *[1] * (out.ndim - 1))


def test_float16_storage_and_overflow_is_a_clear_error(tmp_path, images):
    model = ScaledBackbone()
    cache, other = FeatureCache(tmp_path / "cache"), FeatureCache(tmp_path / "other")
    plain = compute_features(model, images, transform(), depth=1, batch_size=1, cache=cache, progress=False)
    assert torch.equal(plain, plain.half().float())  # float16-rounded, returned as float32
    assert np.load(_entry(cache, model, images, depth=1).array_path, mmap_mode="r").dtype == np.float16
    model.big = float(transform()(load_image(images[2])).sum())
    for where in (other, None):  # never silently inf, with or without a cache
        with pytest.raises(FeatureRangeError, match=r"stub\.test: stage-1 image features reach .*train\.feature_cache"):
            compute_features(model, images, transform(), depth=1, batch_size=1, cache=where, progress=False)
    stopped = _entry(other, model, images, depth=1)
    assert RowFile.open(stopped.stem, stopped.key, stopped.ids).filled.tolist() == [True, True, False, False]


def test_bad_image_is_a_data_error(tmp_path, images):
    images[1].write_bytes(b"not a jpeg")
    with pytest.raises(DataError, match=images[1].name):
        compute_features(StubBackbone(), images, transform(), depth=1, progress=False)
    with pytest.raises(ValueError):
        compute_features(StubBackbone(), [], transform(), depth=1, progress=False)


@pytest.mark.slow
def test_cached_vgg_prefix_feeds_the_trainable_suffix(tmp_path, images):
    """Cache VGG19 blocks 1-3, then blocks 4-5 + pooling on them == the full image tower."""
    import capnet.models.backbones  # noqa: F401  (fills BACKBONES)
    from capnet.registry import BACKBONES

    backbone = BACKBONES.build("vgg19_minilm.offline", image_size=32)
    tf = backbone.transform(train=False)
    cache = FeatureCache(tmp_path / "cache")
    prefix = compute_features(backbone, images, tf, depth=3, cache=cache, progress=False)
    assert prefix.shape == (4, 256, 4, 4)
    assert torch.equal(compute_features(backbone, images, tf, depth=3, cache=cache, progress=False), prefix)
    with torch.inference_mode():
        full = backbone.encode_image(torch.stack([tf(load_image(p)) for p in images]))
        resumed = backbone.image_suffix(prefix, 3)
    assert torch.allclose(resumed, full, rtol=2e-2, atol=0.5)  # float16 cache: small rounding only


def test_a_flipped_byte_in_another_list_is_not_copied(tmp_path, images):
    """Rows shared with another image list are copied only where their crc32 holds."""
    cache, model = FeatureCache(tmp_path / "cache"), StubBackbone()
    some = compute_features(model, images[:3], transform(), depth=2, batch_size=1, cache=cache, progress=False)
    source = _entry(cache, model, images[:3])
    raw = bytearray(source.array_path.read_bytes())
    raw[-3] ^= 0xFF  # inside the last row (images[2])
    source.array_path.write_bytes(bytes(raw))
    calls = model.calls
    full = compute_features(model, images, transform(), depth=2, batch_size=1, cache=cache, progress=False)
    assert model.calls == calls + 2  # images[3], and images[2] whose copy failed its crc32
    assert torch.equal(full[:3], some) and torch.equal(full, compute_features(model, images, transform(), depth=2,
                                                                             progress=False))


SHARED = """
import json, sys, time
from pathlib import Path
import torch
from torch import nn
from torchvision import transforms as T
from capnet.features.cache import FeatureCache, compute_features
from capnet.models.backbones.base import BackboneSpec

class Slow(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.spec = BackboneSpec(name="stub.shared", weights_sha256="d" * 64)
        self.visual = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2), nn.Conv2d(4, 4, 3, stride=2))

    def image_prefix(self, images, depth):
        time.sleep(0.2)
        return self.visual[:depth](images)

root, me = Path(sys.argv[1]), sys.argv[2]
(root / f"ready-{me}").touch()
while len(list(root.glob("ready-*"))) < 2:  # start both fills together
    time.sleep(0.01)
paths = sorted((root / "img").glob("*.jpg"))
tf = T.Compose([T.Resize(16), T.CenterCrop(16), T.ToTensor()])
feats = compute_features(Slow(), paths, tf, 2, batch_size=1, cache=FeatureCache(root / "cache", flush_every_s=0.0),
                         progress=False)
torch.save(feats, root / f"feats-{me}.pt")
"""


def test_two_processes_filling_one_fresh_cache_agree(tmp_path, images):
    """Two runs started together on an empty cache: both finish with the same, correct features."""
    import os
    import subprocess
    import sys

    for k in range(2):  # 12 images: the two fills overlap for seconds
        for p in images:
            shutil.copy2(p, tmp_path / "img" / f"copy{k}_{p.name}")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src") + os.pathsep
           + os.environ.get("PYTHONPATH", "")}
    procs = [subprocess.Popen([sys.executable, "-c", SHARED, str(tmp_path), str(k)], env=env,
                              stderr=subprocess.PIPE, text=True) for k in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-2000:]
    first, second = (torch.load(tmp_path / f"feats-{k}.pt", weights_only=True) for k in range(2))
    paths = sorted((tmp_path / "img").glob("*.jpg"))
    model = StubBackbone()
    model.spec = BackboneSpec(name="stub.shared", weights_sha256="d" * 64)
    reference = compute_features(model, paths, T.Compose([T.Resize(16), T.CenterCrop(16), T.ToTensor()]), 2,
                                 progress=False)
    assert len(first) == 12 and torch.equal(first, reference) and torch.equal(second, reference)
    assert len(list((tmp_path / "cache").rglob("*.npy"))) == 1 and not list((tmp_path / "cache").rglob("*.tmp"))
