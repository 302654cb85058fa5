"""Training options: the in-place parameter clamp, train.amp=auto, torch.compile and activation
checkpointing wiring, and train.augment_seed reaching the cached augmentations."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import capnet.runtime.precision as precision
from capnet.config import ConfigError, config_hash, load_config
from capnet.errors import CapnetError
from capnet.features.loaders import build_loader
from capnet.plans import feature_plan, fit_plan
from capnet.train.loop import fit

from _toys import CLASS_NAMES, GROUPS, ToyModel, toy_config, toy_data

CPU = torch.device("cpu")


class ClampedToy(ToyModel):
    """ToyModel whose logit scale the loop must keep <= 1 after every optimiser step."""

    def __init__(self) -> None:
        super().__init__(dropout=0.0)
        self.clamps = 0

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        self.clamps += 1
        self.logit_scale.clamp_(max=1.0)


def _fit(model, tmp_path, **sections):
    cfg = toy_config(**sections)
    train = build_loader(toy_data(16, seed=1), cfg.data.batch_size, True, cfg.train.seed, 0, CPU)
    val = build_loader(toy_data(8, seed=2), cfg.data.eval_batch_size, False, cfg.train.seed, 0, CPU)
    return fit(model, nn.BCEWithLogitsLoss(), train, val, fit_plan(cfg), tmp_path, groups=GROUPS, class_names=CLASS_NAMES,
               device=CPU)


def test_loop_clamps_after_every_optimiser_step(tmp_path) -> None:
    torch.manual_seed(0)
    model = ClampedToy()
    _fit(model, tmp_path, train={"epochs": 2, "grad_accum": 2})
    assert model.clamps == 2 * 2  # 4 batches of 4 per epoch, accumulated in pairs
    assert model.logit_scale.item() <= 1.0


@pytest.mark.parametrize("native, want", [(True, "bf16"), (False, "none")])
def test_amp_auto_follows_native_bf16(monkeypatch, native: bool, want: str) -> None:
    monkeypatch.setattr(precision, "native_bf16", lambda device: native)
    cfg = load_config([], ["train.amp=auto"])
    assert precision.resolve_amp(cfg.train.amp, CPU) == want
    ctx = precision.autocast(CPU, "auto")
    assert isinstance(ctx, torch.autocast) == native
    assert precision.resolve_amp(load_config([], ["train.amp=fp16"]).train.amp, CPU) == "fp16"  # explicit values stay
    with pytest.raises(ConfigError, match="train.amp='bf32'"):
        load_config([], ["train.amp=bf32"])


class DtypeToy(ToyModel):
    """ToyModel recording the dtype its head computed in, for training and for scoring forwards."""

    def __init__(self) -> None:
        super().__init__(dropout=0.0)
        self.dtypes = {True: set(), False: set()}  # training mode -> dtypes seen

    def _head(self, f: torch.Tensor) -> torch.Tensor:
        out = super()._head(f)
        self.dtypes[self.training].add(out.dtype)
        return out


@pytest.mark.parametrize("native", ["this machine", True, False])
def test_amp_auto_trains(monkeypatch, tmp_path, native) -> None:
    """train.amp=auto trains in bf16 exactly where the CPU computes bf16 natively; scores stay float32."""
    if native != "this machine":  # both branches on any CPU (emulated bf16 is slow, not wrong)
        monkeypatch.setattr(precision, "native_bf16", lambda device: native)
    want = torch.bfloat16 if precision.native_bf16(CPU) else torch.float32
    torch.manual_seed(0)
    model = DtypeToy()
    result = _fit(model, tmp_path, train={"epochs": 1, "amp": "auto"})
    assert math.isfinite(result.history[0]["train_loss"])
    assert model.dtypes[True] == {want}  # the training forward ran under bf16 autocast (or none)
    assert model.dtypes[False] == {torch.float32}  # validation scores are float32 whatever train.amp


def test_compile_wraps_the_trained_forward(monkeypatch, tmp_path) -> None:
    compiled, steps = [], []

    class Compiled(nn.Module):
        """What torch.compile would return: the same computation, counted."""

        def __init__(self, module: nn.Module) -> None:
            super().__init__()
            self.module = module

        def forward(self, *args, **kwargs):
            steps.append(self.module.training)
            return self.module(*args, **kwargs)

    def fake_compile(module, **kwargs):
        compiled.append(module)
        return Compiled(module)

    monkeypatch.setattr(torch, "compile", fake_compile)
    torch.manual_seed(0)
    with_compile = _fit(ToyModel(), tmp_path, train={"epochs": 1, "compile": True})
    assert len(compiled) == 1 and steps.count(True) == 16 // 4  # every training batch ran through it
    torch.manual_seed(0)
    plain = _fit(ToyModel(), tmp_path / "plain", train={"epochs": 1})
    assert len(compiled) == 1 and steps.count(True) == 4  # off by default
    assert with_compile.history[0]["train_loss"] == plain.history[0]["train_loss"]  # same computation


def test_runtime_options_do_not_change_the_experiment() -> None:
    base = load_config([], [])
    for item in ("train.compile=true", "train.grad_checkpointing=true", "train.log.tensorboard=true"):
        assert config_hash(load_config([], [item])) == config_hash(base), item
    assert config_hash(load_config([], ["train.augment_seed=3"])) != config_hash(base)


def test_grad_checkpointing_reaches_the_open_clip_tower(tmp_path) -> None:
    from capnet.models.build import build_model
    from capnet.train.loop import enable_grad_checkpointing

    cfg = load_config([], ["model.backbone=clip_tiny_vit.random", "model.prompts.n_ctx=4", "model.gcn.hidden=8",
                           "model.peft.method=lora"])
    model = build_model(cfg, ["cat", "dog"], None)
    assert not model.backbone.visual.transformer.grad_checkpointing
    enable_grad_checkpointing(model)
    assert model.backbone.visual.transformer.grad_checkpointing
    x = torch.randn(2, 3, model.backbone.spec.image_size, model.backbone.spec.image_size)
    model.train()
    model(x).sum().backward()  # checkpointed blocks still give the PEFT parameters a gradient
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.backbone.visual.parameters() if p.requires_grad)
    with pytest.raises(CapnetError, match="has no set_grad_checkpointing"):
        enable_grad_checkpointing(ToyModel())


def test_augment_seed_changes_the_cached_augmentations(monkeypatch) -> None:
    import capnet.features.views as views

    from PIL import Image

    seen = []
    monkeypatch.setattr(views, "split_features", lambda model, paths, transform, *a, **k: (
        seen.append(transform) or torch.zeros(len(paths), 1, 2)))
    split = type("S", (), {"image_paths": ["a.jpg", "b.jpg"]})()
    model = ToyModel()
    for seed in (0, 5):
        cfg = load_config([], ["train.augment_views=2", f"train.augment_seed={seed}", "data.val_seed=9"])
        views.train_features(model, split, feature_plan(cfg, model, CPU))
    assert [t.seed for t in seen] == [0, 5]  # one cached entry per seed: the eval view, then 2 augmentations
    image = Image.new("RGB", (12, 10), (200, 10, 30))
    stack = seen[0](image)
    assert stack.shape[0] == 3 and torch.equal(stack[0], views.single_view(model)(image)[0])
