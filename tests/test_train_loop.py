"""fit(): exact resume, NaN stop keeping the last good checkpoint, CSV log, selection, accumulation."""
from __future__ import annotations

import contextlib
import csv

import pytest
import torch
from torch import nn

from capnet import run_files
from capnet.train import checkpoint
from capnet.features.loaders import build_loader
from capnet.plans import fit_plan
from capnet.train.loop import fit
from capnet.errors import CapnetError, CheckpointError, TrainingError

from _toys import CLASS_NAMES, GROUPS, TextToyModel, ToyModel, toy_config, toy_data

CPU = torch.device("cpu")


def _setup(n_train=20, **sections):
    cfg = toy_config(**sections)
    torch.manual_seed(0)
    model = ToyModel(dropout=0.3)
    train = build_loader(toy_data(n_train, seed=1), cfg.data.batch_size, True, cfg.train.seed, 0, CPU)
    val = build_loader(toy_data(12, seed=2), cfg.data.eval_batch_size, False, cfg.train.seed, 0, CPU)
    return cfg, model, train, val


def _fit(run_dir, resume=False, callbacks=None, loss_fn=None, **sections):
    cfg, model, train, val = _setup(**sections)
    result = fit(model, loss_fn or nn.BCEWithLogitsLoss(), train, val, fit_plan(cfg), run_dir, resume=resume,
                 callbacks=callbacks, groups=GROUPS, class_names=CLASS_NAMES, device=CPU)
    return model, result


class Crash(Exception):
    pass


def _crash_after(epoch):
    def callback(row):
        if row["epoch"] == epoch:
            raise Crash

    return callback


def test_resume_reproduces_uninterrupted_run(tmp_path):
    opts = dict(train={"epochs": 4, "ema": 0.5, "grad_accum": 2}, optim={"lr": 0.2, "warmup_epochs": 1})
    straight, res_a = _fit(tmp_path / "a", **opts)
    with pytest.raises(Crash):
        _fit(tmp_path / "b", callbacks=[_crash_after(2)], **opts)
    _, meta = run_files.load_file(tmp_path / "b" / "last.safetensors")
    assert meta["progress"]["epoch"] == 2
    resumed, res_b = _fit(tmp_path / "b", resume=True, **opts)
    for k, v in straight.trainable_state_dict().items():
        assert torch.equal(resumed.trainable_state_dict()[k], v), k
    strip = lambda h: [{k: v for k, v in row.items() if k != "seconds"} for row in h]  # noqa: E731
    assert strip(res_a.history) == strip(res_b.history)
    assert (res_a.best_epoch, res_a.best_val_map) == (res_b.best_epoch, res_b.best_val_map)
    assert len(res_b.history) == 4
    a_last, _ = run_files.load_file(tmp_path / "a" / "last.safetensors")
    b_last, _ = run_files.load_file(tmp_path / "b" / "last.safetensors")
    assert a_last.keys() == b_last.keys() and all(torch.equal(a_last[k], b_last[k]) for k in a_last)
    rows = list(csv.DictReader(open(tmp_path / "b" / "log.csv")))
    assert [r["epoch"] for r in rows] == ["1", "2", "3", "4"]
    straight_rows = list(csv.DictReader(open(tmp_path / "a" / "log.csv")))
    assert list(rows[0]) == list(straight_rows[0])  # columns in the original order, not sorted


def test_resume_refuses_another_config(tmp_path):
    _fit(tmp_path, train={"epochs": 1})
    with pytest.raises(CheckpointError, match=r"different config.*optim.lr: 0.1 -> 0.5"):
        _fit(tmp_path, resume=True, train={"epochs": 1}, optim={"lr": 0.5})


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    calls = {"n": 0}
    bce = nn.BCEWithLogitsLoss()

    def loss_fn(logits, target):
        calls["n"] += 1
        loss = bce(logits, target)
        return loss * float("nan") if calls["n"] == 8 else loss  # 5 steps/epoch: epoch 2, step 3

    with pytest.raises(TrainingError) as err:
        _fit(tmp_path, loss_fn=loss_fn, train={"epochs": 3})
    last = tmp_path / "last.safetensors"
    assert "non-finite loss" in str(err.value) and "epoch 2 step 3" in str(err.value)
    assert f"last good checkpoint kept at {last}" in str(err.value)
    _, meta = run_files.load_file(last)
    assert meta["progress"]["epoch"] == 1


def test_log_csv_and_selection(tmp_path):
    model, result = _fit(tmp_path, train={"epochs": 3})
    rows = list(csv.DictReader(open(tmp_path / "log.csv")))
    assert list(rows[0]) == ["epoch", "lr_head", "lr_prompts", "train_loss", "val_mAP", "val_head",
                             "val_medium", "val_tail", "seconds"]
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    assert float(rows[0]["lr_head"]) == pytest.approx(0.1 / 5)  # warm-up step 1 of 5
    maps = [float(r["val_mAP"]) for r in rows]
    assert result.best_val_map == pytest.approx(max(maps))
    assert result.best_epoch == 1 + maps.index(max(maps))
    assert all(0.0 <= float(r["val_mAP"]) <= 100.0 and float(r["train_loss"]) > 0 for r in rows)
    best, meta = run_files.load_file(tmp_path / "best.safetensors")
    assert meta["epoch"] == result.best_epoch
    for k, v in model.trainable_state_dict().items():  # the model holds the selected weights
        assert torch.equal(best["model." + k], v)


def test_select_last_without_val(tmp_path):
    cfg, model, train, _ = _setup(train={"epochs": 2, "select": "last"})
    result = fit(model, nn.BCEWithLogitsLoss(), train, None, fit_plan(cfg), tmp_path, device=CPU)
    assert result.best_epoch == 2 and result.best_val_map is None
    assert "val_mAP" not in result.history[0]
    cfg_val, model, train, _ = _setup(train={"epochs": 1})
    with pytest.raises(TrainingError, match="needs a validation loader"):
        fit(model, nn.BCEWithLogitsLoss(), train, None, fit_plan(cfg_val), tmp_path, device=CPU)


def _big_batch_and_accumulated(tmp_path, model_cls, epochs, accum_batch, accum):
    """Train ``model_cls`` with one batch of 8 per step and with ``accum`` micro-batches of
    ``accum_batch`` (constant lr, no decay); returns both models."""
    optim = {"warmup_epochs": 0, "scheduler": "constant", "weight_decay": 0.0}
    models = []
    for sub, (bs, steps) in {"big": (8, 1), "acc": (accum_batch, accum)}.items():
        cfg, _, train, _ = _setup(n_train=16, data={"batch_size": bs}, optim=optim,
                                  train={"epochs": epochs, "select": "last", "grad_accum": steps})
        torch.manual_seed(0)
        model = model_cls(dropout=0.0)
        fit(model, nn.BCEWithLogitsLoss(), train, None, fit_plan(cfg), tmp_path / sub, device=CPU)
        models.append(model)
    return models


def test_gradient_accumulation_matches_large_batch(tmp_path):
    big, acc = _big_batch_and_accumulated(tmp_path, ToyModel, epochs=1, accum_batch=4, accum=2)
    for k, v in big.trainable_state_dict().items():
        assert torch.allclose(v, acc.trainable_state_dict()[k], atol=1e-6), k


def test_text_branch_runs_once_per_optimiser_step_with_exact_gradients(tmp_path):
    """Under accumulation the class embeddings are computed once per step, not per micro-batch,
    and the resulting weights equal those of one large batch."""
    big, acc = _big_batch_and_accumulated(tmp_path, TextToyModel, epochs=2, accum_batch=2, accum=4)
    assert [big.text_calls, acc.text_calls] == [4, 4]  # 2 epochs x 2 optimiser steps, whatever the micro-batch count
    models = [big.trainable_state_dict(), acc.trainable_state_dict()]
    for k in models[0]:
        assert torch.allclose(models[0][k], models[1][k], atol=1e-6), k
    torch.manual_seed(0)
    assert not torch.allclose(models[0]["prompts"], TextToyModel(dropout=0.0).prompts.detach())  # prompts trained


def test_bf16_autocast_runs_on_cpu(tmp_path):
    model, result = _fit(tmp_path, train={"epochs": 1, "amp": "bf16"})
    assert len(result.history) == 1 and result.history[0]["train_loss"] > 0


def test_ema_weights_are_evaluated_and_selected(tmp_path):
    model, result = _fit(tmp_path, train={"epochs": 1, "ema": 0.9, "select": "last"})
    last, _ = run_files.load_file(tmp_path / "last.safetensors")
    best, _ = run_files.load_file(tmp_path / "best.safetensors")
    for k, v in model.trainable_state_dict().items():
        assert torch.equal(best["model." + k], last["ema." + k]) and torch.equal(v, last["ema." + k])
    assert not torch.equal(last["model.head.weight"], last["ema.head.weight"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="fp16 is allowed on CUDA")
def test_fp16_without_cuda_fails_before_training(tmp_path):
    with pytest.raises(CapnetError, match="fp16 needs a CUDA device"):
        _fit(tmp_path, train={"epochs": 1, "amp": "fp16"})
    assert not (tmp_path / "last.safetensors").exists()


def _budgeted_capnet(budget):
    """A toy CAPNET with ``model.text_budget=budget``, on a ToyBackbone handed to build_model
    (no registry entry needed, so DDP worker processes can build it too)."""
    from capnet.config import config_from_dict
    from capnet.models.build import build_model
    from toy_backbone import ToyBackbone

    raw = {"backbone": "toy.random", "prompts": {"n_ctx": 4, "class_specific": True}, "gcn": {"hidden": 16},
           "graph": {"topk": 2}, "text_budget": budget}
    torch.manual_seed(0)
    return build_model(config_from_dict({"model": raw}), CLASS_NAMES, backbone=ToyBackbone())


@pytest.mark.parametrize("budget", [2, None])
def test_budgeted_text_branch_in_the_loop(tmp_path, budget):
    """model.text_budget=2 of 4 classes: the loop drives step_class_embeddings (each step runs 2 prompts
    through the text tower, after one full bank pass per epoch); resume reproduces the run exactly."""
    opts = dict(train={"epochs": 3, "grad_accum": 2}, optim={"lr": 0.2, "warmup_epochs": 1})
    runs = {}
    for name, resume in (("a", False), ("b", False), ("b", True)):
        cfg, _, train, val = _setup(**opts)
        model = _budgeted_capnet(budget)
        assert getattr(model, "text_budget", None) == budget  # None: the exact CAPNET, no budget at all
        calls = model.backbone.text_calls
        callbacks = [_crash_after(2)] if name == "b" and not resume else None
        try:
            result = fit(model, nn.BCEWithLogitsLoss(), train, val, fit_plan(cfg), tmp_path / name, resume=resume,
                         callbacks=callbacks, groups=GROUPS, class_names=CLASS_NAMES, device=CPU)
        except Crash:
            continue
        runs[name] = (model, result)
        if name == "a" and budget is not None:
            assert model.text_bank.ready
            steps = 3 * 3  # 3 epochs x ceil(5 batches / 2) optimiser steps
            assert model.backbone.text_calls - calls >= steps + 3  # one subset pass per step + one bank fill per epoch
    (a, res_a), (b, res_b) = runs["a"], runs["b"]
    for k, v in a.trainable_state_dict().items():
        assert torch.equal(b.trainable_state_dict()[k], v), k
    assert [r["train_loss"] for r in res_a.history] == [r["train_loss"] for r in res_b.history]


class HookedToy(TextToyModel):
    """Records every engine hook call (ClassifierBase's contract) and owes one resume tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.log = []
        self.steps_seen = torch.zeros(())

    def start_epoch(self, seed):
        self.log.append(("start_epoch", seed))

    def step_class_embeddings(self, step):
        assert step.targets.shape[1] == self.ctx.shape[0]
        self.log.append(("step", step.scores is None))
        return self.class_embeddings()

    def around_optimizer_step(self, optimizer):
        self.log.append(("rows",))
        return contextlib.nullcontext()

    def after_optimizer_step(self):
        self.log.append(("after",))
        self.steps_seen += 1

    def resume_state(self):
        return {"steps_seen": self.steps_seen.clone()}

    def load_resume_state(self, state):
        self.steps_seen = state["steps_seen"].clone()


def test_the_loop_calls_each_declared_hook_in_order_and_resume_restores_model_state(tmp_path):
    """The loop's contract with a model, observed from the model: one start_epoch per epoch with a
    seed fixed by (train.seed, epoch); per optimiser step one text pass (the first one without
    previous scores), then around_optimizer_step and after_optimizer_step; resume_state survives a resume."""
    cfg = toy_config(train={"epochs": 3, "grad_accum": 2})
    train = build_loader(toy_data(16, seed=1), cfg.data.batch_size, True, cfg.train.seed, 0, CPU)  # 4 batches
    val = build_loader(toy_data(8, seed=2), cfg.data.eval_batch_size, False, cfg.train.seed, 0, CPU)
    torch.manual_seed(0)
    straight = HookedToy()
    fit(straight, nn.BCEWithLogitsLoss(), train, val, fit_plan(cfg), tmp_path / "a", device=CPU)
    seeds = [e[1] for e in straight.log if e[0] == "start_epoch"]
    assert len(seeds) == 3 and len(set(seeds)) == 3
    per_epoch = straight.log[: straight.log.index(("start_epoch", seeds[1]))]
    assert per_epoch == [("start_epoch", seeds[0]), ("step", True), ("rows",), ("after",), ("step", False), ("rows",), ("after",)]
    assert int(straight.steps_seen) == 3 * 2
    torch.manual_seed(0)
    crashed = HookedToy()
    with pytest.raises(Crash):
        fit(crashed, nn.BCEWithLogitsLoss(), train, val, fit_plan(cfg), tmp_path / "b", device=CPU,
            callbacks=[_crash_after(1)])
    resumed = HookedToy()
    fit(resumed, nn.BCEWithLogitsLoss(), train, val, fit_plan(cfg), tmp_path / "b", resume=True, device=CPU)
    assert [e[1] for e in resumed.log if e[0] == "start_epoch"] == seeds[1:]  # the same seeds as uninterrupted
    assert int(resumed.steps_seen) == 3 * 2  # 2 restored from last.safetensors + 4 stepped after the resume
