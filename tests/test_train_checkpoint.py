"""Atomic safetensors checkpoints, full training-state round trip, mismatch errors, EMA, RNG."""
from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch

from capnet.config import OptimConfig
from capnet import run_files
from capnet.train import checkpoint
from capnet.train.ema import EMA
from capnet.train.optim import build_optimizer, build_scheduler
from capnet.runtime.seed import rng_state, set_rng_state
from capnet.errors import CheckpointError

from _toys import ToyModel


def _train_a_bit(model, opt, sched, steps=3):
    for _ in range(steps):
        loss = model(torch.rand(2, 3, 8, 8)).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        sched.step()


def test_failed_write_leaves_old_file_intact(tmp_path, monkeypatch):
    path = tmp_path / "last.safetensors"
    run_files.save_file({"a": torch.ones(3)}, {"epoch": 1}, path)
    before = path.read_bytes()

    def boom(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        run_files.save_file({"a": torch.zeros(3)}, {"epoch": 2}, path)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["last.safetensors"]  # no temp file left
    tensors, meta = run_files.load_file(path)
    assert meta == {"epoch": 1} and torch.equal(tensors["a"], torch.ones(3))


def test_training_state_round_trip(tmp_path):
    torch.manual_seed(0)
    model = ToyModel(dropout=0.0)
    cfg = OptimConfig(optimizer="adamw", lr=0.01)
    opt = build_optimizer(model.param_groups(), cfg)
    sched = build_scheduler(opt, cfg, steps_per_epoch=2, epochs=3)
    ema = EMA(model.trainable_state_dict(), 0.9)
    _train_a_bit(model, opt, sched)
    ema.update(model.trainable_state_dict())
    random.seed(5)
    np.random.seed(6)
    torch.manual_seed(7)
    path = tmp_path / "last.safetensors"
    checkpoint.save_training_state(path, model=model, optimizer=opt, scheduler=sched, ema=ema,
                                   progress={"epoch": 2, "history": [{"val_mAP": 50.0}]})
    expected = (random.random(), np.random.rand(), torch.rand(1))

    torch.manual_seed(0)
    other = ToyModel(dropout=0.0)  # same frozen backbone, trainable weights overwritten below
    with torch.no_grad():
        other.head.weight.fill_(3.0)
    opt2 = build_optimizer(other.param_groups(), cfg)
    sched2 = build_scheduler(opt2, cfg, steps_per_epoch=2, epochs=3)
    ema2 = EMA(other.trainable_state_dict(), 0.9)
    progress = checkpoint.load_training_state(path, model=other, optimizer=opt2, scheduler=sched2, ema=ema2)
    assert progress == {"epoch": 2, "history": [{"val_mAP": 50.0}]}
    assert (random.random(), np.random.rand()) == expected[:2] and torch.equal(torch.rand(1), expected[2])
    for k, v in model.trainable_state_dict().items():
        assert torch.equal(other.trainable_state_dict()[k], v)
        assert torch.equal(ema2.state_dict()[k], ema.state_dict()[k])
    assert sched2.state_dict()["last_epoch"] == sched.state_dict()["last_epoch"] == 3
    s1, s2 = opt.state_dict(), opt2.state_dict()
    assert s1["param_groups"] == s2["param_groups"]
    for pid, st in s1["state"].items():
        for key, value in st.items():
            assert torch.equal(s2["state"][pid][key], value), (pid, key)
    # both continue identically (the optimizer moments and the lr schedule were restored)
    torch.manual_seed(1)
    _train_a_bit(model, opt, sched, 2)
    torch.manual_seed(1)
    _train_a_bit(other, opt2, sched2, 2)
    for k, v in model.trainable_state_dict().items():
        assert torch.equal(other.trainable_state_dict()[k], v)


def test_mismatched_weights_name_file_and_keys(tmp_path):
    model = ToyModel(num_classes=4)
    path = tmp_path / "best.safetensors"
    checkpoint.save_weights(model, path, {"epoch": 3})
    meta = checkpoint.load_weights(ToyModel(num_classes=4), path)
    assert meta["epoch"] == 3 and meta["backbone"] == "engine.toy"
    with pytest.raises(CheckpointError) as err:
        checkpoint.load_weights(ToyModel(num_classes=5), path)
    msg = str(err.value)
    assert str(path) in msg and "head.weight: checkpoint (4, 12) vs model (5, 12)" in msg and "ctx" in msg
    sd = {k: v for k, v in model.trainable_state_dict().items() if k != "logit_scale"}
    sd["extra"] = torch.zeros(1)
    checkpoint.save_weights(model, path, state=sd)
    with pytest.raises(CheckpointError, match=r"missing keys \['logit_scale'\].*unexpected keys \['extra'\]"):
        checkpoint.load_weights(model, path)


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        run_files.load_file(tmp_path / "nope.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="bad.safetensors"):
        run_files.load_file(bad)


def test_ema_update_math_and_apply():
    model = ToyModel()
    start = {k: v.clone() for k, v in model.trainable_state_dict().items()}
    ema = EMA(model.trainable_state_dict(), decay=0.75)
    with torch.no_grad():
        model.head.weight.add_(4.0)
    ema.update(model.trainable_state_dict())
    assert torch.allclose(ema.state_dict()["head.weight"], start["head.weight"] + 0.25 * 4.0)
    assert torch.equal(ema.state_dict()["ctx"], start["ctx"])
    with torch.no_grad():
        model.head.weight.add_(4.0)
    ema.update(model.trainable_state_dict())  # 0.75 * (w + 1) + 0.25 * (w + 8) = w + 2.75
    assert torch.allclose(ema.state_dict()["head.weight"], start["head.weight"] + 2.75)
    raw = model.head.weight.detach().clone()
    with ema.applied(model):
        assert torch.allclose(model.head.weight, start["head.weight"] + 2.75)
    assert torch.equal(model.head.weight, raw)
    with pytest.raises(ValueError):
        EMA({}, decay=1.0)


def test_rng_state_round_trip():
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    tensors, meta = rng_state()
    a = (random.random(), float(np.random.rand()), torch.rand(2))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    set_rng_state(tensors, meta)
    b = (random.random(), float(np.random.rand()), torch.rand(2))
    assert a[:2] == b[:2] and torch.equal(a[2], b[2])
