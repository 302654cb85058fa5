"""make_loaders: cached-feature loaders vs image loaders, test-time transform override, seeding."""
from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DistributedSampler

from capnet.data import ImageDataset, MultiLabelDataset, Split
from capnet.evaluation.predict import predict_scores
from capnet.plans import feature_plan
from capnet.features.loaders import FeatureDataset, feature_depth, make_loaders
from capnet.runtime.seed import EpochSampler, reseed_loader

from _toys import ToyModel, toy_config

CPU = torch.device("cpu")


def _dataset(tmp_path, write_jpeg):
    rng = np.random.default_rng(0)
    splits = {}
    k = 0
    for name, n in {"train": 6, "val": 3, "test": 4}.items():
        paths = [write_jpeg(tmp_path / "img" / f"{name}{i}.jpg", seed=(k := k + 1)) for i in range(n)]
        labels = (rng.random((n, 4)) > 0.5).astype(np.float32)
        splits[name] = Split([p.stem for p in paths], paths, labels)
    return MultiLabelDataset("toy", tmp_path, ["a", "b", "c", "d"], splits)


def test_feature_cache_loaders(tmp_path, write_jpeg):
    ds = _dataset(tmp_path, write_jpeg)
    torch.manual_seed(0)
    model = ToyModel(dropout=0.0)
    cfg = toy_config(data={"batch_size": 4, "eval_batch_size": 2})
    loaders = make_loaders(ds, model, feature_plan(cfg, model, CPU, tmp_path / "cache"))
    assert set(loaders) == {"train", "val", "test"}
    for name, loader in loaders.items():
        assert isinstance(loader.dataset, FeatureDataset) and feature_depth(loader) == 1
        assert len(loader.dataset) == len(ds.splits[name])
    assert isinstance(loaders["train"].sampler, EpochSampler) and loaders["train"].batch_size == 4
    assert any((tmp_path / "cache").iterdir())
    feats, target, index = loaders["val"].dataset[2]
    # evaluation splits hold every test-time view: (views, features), one view here
    assert feats.shape == (1, 12) and index == 2 and torch.equal(target, torch.from_numpy(ds.splits["val"].labels[2]))
    # cached and image paths give the same scores (features stored as float16)
    model.calls.clear()
    cached, _ = predict_scores(model, loaders["test"], CPU)
    assert model.calls and all(c == "features@1" for c in model.calls)
    images = make_loaders(ds, model, feature_plan(toy_config(train={"feature_cache": False}), model, CPU, None))
    direct, targets = predict_scores(model, images["test"], CPU)
    np.testing.assert_allclose(cached, direct, atol=2e-3)
    np.testing.assert_array_equal(targets, ds.splits["test"].labels)


def test_image_loaders_and_split_selection(tmp_path, write_jpeg):
    ds = _dataset(tmp_path, write_jpeg)
    model = ToyModel(cache_depth=0)  # nothing cacheable: images even with feature_cache on
    loaders = make_loaders(ds, model, feature_plan(toy_config(), model, CPU, None))
    assert all(isinstance(l.dataset, ImageDataset) and feature_depth(l) is None for l in loaders.values())
    x, _, _ = next(iter(loaders["val"]))
    assert x.shape == (3, 1, 3, 8, 8)  # (batch, test-time views, C, H, W)
    fit_only = make_loaders(ds, model, feature_plan(toy_config(), model, CPU, None), splits=("train", "val"))
    assert set(fit_only) == {"train", "val"}  # test is never loaded for fitting


def test_train_order_depends_only_on_seed_and_epoch(tmp_path, write_jpeg):
    ds = _dataset(tmp_path, write_jpeg)
    model = ToyModel()
    cfg = toy_config(data={"batch_size": 2})

    def order(epoch, warm_epochs):
        loader = make_loaders(ds, model, feature_plan(cfg, model, CPU, None))["train"]
        for e in range(warm_epochs):  # consume other epochs first
            reseed_loader(loader, cfg.train.seed, e)
            list(loader)
        reseed_loader(loader, cfg.train.seed, epoch)
        return torch.cat([idx for _, _, idx in loader]).tolist()

    assert order(3, 0) == order(3, 2)
    assert sorted(order(3, 0)) == list(range(6)) and order(3, 0) != order(4, 0)
    assert not isinstance(make_loaders(ds, model, feature_plan(cfg, model, CPU, None))["val"].sampler, DistributedSampler)


def test_a_batch_of_sampled_views_equals_its_items_one_by_one():
    """The batched read of a cached-augmentation training set gives each item the view its epoch drew."""
    feats = torch.arange(6 * 3 * 2, dtype=torch.float32).view(6, 3, 2)  # 6 images x 3 views
    data = FeatureDataset(feats, np.zeros((6, 2), dtype=np.float32), 1, sample_views=True, seed=4)
    for epoch in (0, 1, 2):
        data.set_epoch(epoch)
        batch = data.__getitems__([5, 0, 3, 2])
        single = [data[i] for i in (5, 0, 3, 2)]
        assert all(torch.equal(b[0], s[0]) and b[2] == s[2] for b, s in zip(batch, single))
