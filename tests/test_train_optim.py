"""Optimizer param groups / lr scales / weight-decay split, and warm-up + cosine values."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from capnet.config import OptimConfig
from capnet.train.optim import build_optimizer, build_scheduler, group_lrs
from capnet.errors import TrainingError


def _groups():
    head = nn.Linear(3, 2)
    ctx = nn.Parameter(torch.zeros(4, 3))
    scale = nn.Parameter(torch.tensor(1.0))
    return {"head": list(head.parameters()), "prompts": [ctx, scale]}, head, ctx, scale


def test_group_lrs_scales_and_weight_decay_split():
    groups, head, ctx, scale = _groups()
    cfg = OptimConfig(optimizer="sgd", lr=0.1, momentum=0.8, weight_decay=1e-3, lr_scale={"prompts": 2.0})
    opt = build_optimizer(groups, cfg)
    assert isinstance(opt, torch.optim.SGD)
    by_param = {id(p): g for g in opt.param_groups for p in g["params"]}
    assert by_param[id(head.weight)]["lr"] == pytest.approx(0.1)
    assert by_param[id(head.weight)]["weight_decay"] == pytest.approx(1e-3)
    assert by_param[id(head.bias)]["weight_decay"] == 0.0  # bias: no decay
    assert by_param[id(ctx)]["lr"] == pytest.approx(0.2)
    assert by_param[id(ctx)]["weight_decay"] == pytest.approx(1e-3)
    assert by_param[id(scale)]["weight_decay"] == 0.0  # logit scale: no decay
    assert by_param[id(scale)]["lr"] == pytest.approx(0.2)
    assert all(g["momentum"] == 0.8 and g["nesterov"] is False for g in opt.param_groups)
    assert group_lrs(opt) == pytest.approx({"head": 0.1, "prompts": 0.2})


def test_adamw_and_frozen_params_skipped():
    groups, head, ctx, scale = _groups()
    ctx.requires_grad_(False)
    opt = build_optimizer(groups, OptimConfig(optimizer="adamw", lr=0.01))
    assert isinstance(opt, torch.optim.AdamW)
    ids = {id(p) for g in opt.param_groups for p in g["params"]}
    assert id(ctx) not in ids and id(scale) in ids


def test_unknown_lr_scale_group_is_a_clear_error():
    groups, *_ = _groups()
    with pytest.raises(TrainingError, match=r"unknown parameter group.*'gnc'.*\['head', 'prompts'\]"):
        build_optimizer(groups, OptimConfig(lr_scale={"gnc": 10.0}))


def test_lr_scale_for_a_switched_off_component_is_accepted():
    groups, *_ = _groups()  # no GCN in this model: a recipe's gcn scale must not break ablations
    opt = build_optimizer(groups, OptimConfig(lr_scale={"gcn": 10.0, "head": 2.0}))
    assert {g["name"] for g in opt.param_groups} == {"head", "prompts"}


def test_no_trainable_params_and_duplicates_fail():
    with pytest.raises(TrainingError, match="no trainable parameters"):
        build_optimizer({"head": []}, OptimConfig())
    p = nn.Parameter(torch.zeros(2, 2))
    with pytest.raises(TrainingError, match="both group"):
        build_optimizer({"head": [p], "gcn": [p]}, OptimConfig())


def _lrs(cfg, steps_per_epoch, epochs):
    p = nn.Parameter(torch.zeros(2, 2))
    opt = build_optimizer({"head": [p]}, cfg)
    sched = build_scheduler(opt, cfg, steps_per_epoch, epochs)
    out = []
    for _ in range(steps_per_epoch * epochs):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_warmup_then_cosine_values():
    cfg = OptimConfig(lr=1.0, warmup_epochs=1, scheduler="cosine")
    lrs = _lrs(cfg, steps_per_epoch=4, epochs=3)  # W = 4, T = 12
    assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    expected = [0.5 * (1 + math.cos(math.pi * (s - 4) / 8)) for s in range(4, 12)]
    assert lrs[4:] == pytest.approx(expected)
    assert lrs[4] == pytest.approx(1.0) and lrs[-1] < 0.05


def test_constant_schedule_and_no_warmup():
    lrs = _lrs(OptimConfig(lr=0.5, warmup_epochs=1, scheduler="constant"), 2, 3)
    assert lrs == pytest.approx([0.25, 0.5, 0.5, 0.5, 0.5, 0.5])
    lrs = _lrs(OptimConfig(lr=1.0, warmup_epochs=0, scheduler="cosine"), 2, 2)
    assert lrs == pytest.approx([0.5 * (1 + math.cos(math.pi * s / 4)) for s in range(4)])
