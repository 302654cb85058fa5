"""Options added so the CLIP recipes can say what capnet's relatives do (docs/recipes.md).

LIFT's adapter sizing and learnable AdaptFormer scale, LT-GCN's row-normalised graph and uniform
GCN init, torch Adam + OneCycleLR and a schedule longer than the run (LT-GCN), the CLIP eval view
that keeps the whole image (LMPT) and the training crop's area range; then the ViT-B/16 recipe
file itself, end to end on a tiny random CLIP.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import open_clip
import pytest
import torch
from PIL import Image
from torch import nn

from capnet.cli import main
from capnet.config import ConfigError, OptimConfig, load_config
from capnet.errors import CapnetError
from capnet.models.gcn import GCN
from capnet.models.label_graph import GraphInputs, sparse_text_graph, text_graph
from capnet.models.peft import PEFTError, apply_peft
from capnet.models.peft.base import auto_bottleneck
from capnet.train.optim import build_optimizer, build_scheduler

REPO = Path(__file__).resolve().parents[1]
TEXT = open_clip.model.CLIPTextCfg(context_length=8, vocab_size=64, width=32, heads=2, layers=1)


def tiny_vit(layers: int = 2) -> nn.Module:
    torch.manual_seed(0)
    cfg = open_clip.model.CLIPVisionCfg(layers=layers, width=64, head_width=32, patch_size=8, image_size=32)
    return open_clip.model.CLIP(embed_dim=32, vision_cfg=cfg, text_cfg=TEXT).visual.eval()


# ------------------------------------------------------------------ PEFT sizes and scale (LIFT)

@pytest.mark.parametrize("classes, layers, width", [(20, 12, 1), (80, 12, 2), (81, 12, 2), (1000, 12, 32),
                                                    (48, 12, 2), (47, 12, 1), (8, 2, 2)])
def test_lift_bottleneck_rule(classes: int, layers: int, width: int) -> None:
    # 2 ** max(0, floor(log2(C / 2L))): VOC-LT's 20 classes on ViT-B/16's 12 blocks give 1, COCO-LT's 80 give 2
    assert auto_bottleneck(classes, layers) == width


def test_auto_bottleneck_reaches_the_adapters_and_needs_the_class_count() -> None:
    peft = apply_peft("adaptformer", tiny_vit(layers=2), num_classes=20, bottleneck="auto")
    assert {a.down.out_features for a in peft.adapters} == {4}  # 20 / (2 * 2) = 5 -> 2 ** 2
    lora = apply_peft("lora", tiny_vit(layers=2), num_classes=80, rank="auto", alpha=1.0)
    assert lora.rank == 16 and {d.lora_A.shape[0] for d in lora.deltas} == {16}  # 80 / 4 = 20 -> 2 ** 4
    assert math.isclose(lora.deltas[0].scaling, 1.0 / 16)  # LIFT's LoRA scaling 1 / r
    with pytest.raises(PEFTError, match="auto needs the number of classes"):
        apply_peft("adaptformer", tiny_vit(), bottleneck="auto")
    with pytest.raises(PEFTError, match="bottleneck must be an integer"):
        apply_peft("adaptformer", tiny_vit(), bottleneck="wide")


def test_learnable_adaptformer_scale_starts_at_one_and_learns() -> None:
    visual = tiny_vit()
    peft = apply_peft("adaptformer", visual, scale="learnable", bottleneck=4)
    scales = [a.scale for a in peft.adapters]
    assert all(isinstance(s, nn.Parameter) and float(s.detach()) == 1.0 for s in scales)
    assert all(any(s is p for p in peft.trainable_parameters()) for s in scales)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    frozen = visual(x).detach()
    opt = torch.optim.SGD(peft.trainable_parameters(), lr=0.1)
    for _ in range(2):  # the up-projection starts at zero, so the scale's gradient appears at step 2
        opt.zero_grad()
        visual(x).pow(2).sum().backward()
        opt.step()
    assert any(s.grad is not None and float(s.grad.abs()) > 0 for s in scales)
    assert any(float(s.detach()) != 1.0 for s in scales)
    fixed = apply_peft("adaptformer", tiny_vit(), scale=0.1, bottleneck=4)
    assert not any(isinstance(a.scale, nn.Parameter) for a in fixed.adapters)
    assert torch.allclose(frozen, tiny_vit()(x), atol=1e-6)  # sanity: same tower without PEFT at init
    with pytest.raises(PEFTError, match="scale must be a number"):
        apply_peft("adaptformer", tiny_vit(), scale="fixed")


# ------------------------------------------------------------------ label graph (LT-GCN)

def _three_classes() -> GraphInputs:
    # unit vectors with cosines s01 = 0.6, s02 = 0, s12 = 0.8
    emb = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]])
    return GraphInputs(3, lambda: emb)


def test_row_normalised_graph_equals_a_hand_computation() -> None:
    adj = text_graph(_three_classes(), topk=None, threshold=None, p=0.2, tau=0.0, norm="row")
    # A_ij = p * s_ij / sum_k s_ik off the diagonal, 1 - p on it; no symmetrisation, no D^-1/2
    hand = torch.tensor([[0.8, 0.2, 0.0],
                         [0.2 * 0.6 / 1.4, 0.8, 0.2 * 0.8 / 1.4],
                         [0.0, 0.2, 0.8]])
    assert torch.allclose(adj, hand, atol=1e-6)
    assert torch.allclose(adj.sum(1), torch.ones(3))
    sym = text_graph(_three_classes(), topk=None, threshold=None, p=0.2, tau=0.0)  # the default stays symmetric
    assert torch.allclose(sym, sym.T) and not torch.allclose(sym, hand, atol=1e-3)
    # LT-GCN's COCO-LT setting p = 0 leaves each class alone
    assert torch.equal(text_graph(_three_classes(), None, None, 0.0, 0.0, norm="row"), torch.eye(3))


def test_sparse_row_graph_equals_the_dense_one() -> None:
    emb = torch.randn(12, 8, generator=torch.Generator().manual_seed(0))
    dense = text_graph(GraphInputs(12, lambda: emb), topk=4, threshold=None, p=0.3, tau=0.0, norm="row")
    sparse = sparse_text_graph(emb, topk=4, threshold=None, p=0.3, chunk=5, norm="row")
    assert torch.allclose(sparse.to_dense(), dense, atol=1e-6)
    with pytest.raises(CapnetError, match="graph.norm"):
        text_graph(GraphInputs(12, lambda: emb), 4, None, 0.3, 0.0, norm="column")


# ------------------------------------------------------------------ GCN init (LT-GCN)

def test_uniform_gcn_init_follows_graph_convolution_and_zero_last_stays_default() -> None:
    torch.manual_seed(0)
    gcn = GCN(64, 128, layers=3, init="uniform")
    for layer in gcn.layers:
        bound = 1.0 / math.sqrt(layer.out_features)
        w = layer.weight.detach()
        assert float(w.abs().max()) <= bound and float(w.abs().max()) > 0.9 * bound
        assert math.isclose(float(w.std()), bound / math.sqrt(3), rel_tol=0.1)  # U(-b, b) has std b / sqrt(3)
    x = torch.randn(5, 64)
    assert not torch.allclose(gcn(torch.eye(5), x), torch.zeros(5, 64))  # the residual no longer starts at 0
    default = GCN(64, 128, layers=3)
    assert torch.count_nonzero(default.layers[-1].weight) == 0
    with pytest.raises(CapnetError, match="gcn.init"):
        GCN(64, 128, init="xavier")


def test_new_config_keys_are_validated() -> None:
    for override, key in (("model.graph.norm=col", "model.graph.norm"), ("model.gcn.init=ones", "model.gcn.init"),
                          ("optim.scheduler=step", "optim.scheduler"), ("optim.optimizer=lamb", "optim.optimizer")):
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            load_config([], [override])
    with pytest.raises(ConfigError, match="schedule_epochs"):
        load_config([], ["optim.schedule_epochs=5", "train.epochs=10"])


# ------------------------------------------------------------------ optimiser and schedule (LT-GCN)

def _groups():
    torch.manual_seed(0)
    return {"prompts": [nn.Parameter(torch.randn(4, 8))], "gcn": [nn.Parameter(torch.randn(8, 8)), nn.Parameter(torch.randn(8))]}


def test_adam_adds_the_decay_to_the_gradient() -> None:
    groups = _groups()
    opt = build_optimizer(groups, OptimConfig(optimizer="adam", lr=0.1, weight_decay=0.5, lr_scale={"gcn": 25.0}))
    assert type(opt) is torch.optim.Adam
    decayed = [g for g in opt.param_groups if g["decay"]]
    assert {g["name"]: g["weight_decay"] for g in decayed} == {"prompts": 0.5, "gcn": 0.5}
    before = groups["prompts"][0].detach().clone()
    for g in groups.values():
        for p in g:
            p.grad = torch.zeros_like(p)
    opt.step()  # zero loss gradient: only the L2 term moves the weights (AdamW would move them by lr * wd * w)
    step = groups["prompts"][0].detach() - before
    assert torch.allclose(step, -0.1 * torch.sign(before), atol=1e-4)  # Adam's first step is lr * sign(g)


def test_onecycle_peaks_each_group_at_its_own_lr_after_the_warmup() -> None:
    groups = _groups()
    cfg = OptimConfig(optimizer="adam", lr=4e-5, lr_scale={"gcn": 25.0}, scheduler="onecycle", warmup_epochs=2,
                      schedule_epochs=10)
    opt = build_optimizer(groups, cfg)
    sched = build_scheduler(opt, cfg, steps_per_epoch=5, epochs=3)  # trains 3 of 10 epochs (LT-GCN COCO-LT: 16 of 120)
    lrs = {}
    for step in range(15):
        lrs[step] = {g["name"]: g["lr"] for g in opt.param_groups}
        opt.step()
        sched.step()
    assert math.isclose(lrs[0]["prompts"], 4e-5 / 25, rel_tol=1e-6)  # OneCycleLR starts at max_lr / div_factor
    peak = 2 * 5 - 1  # torch's OneCycleLR peaks at step pct_start * total - 1
    assert math.isclose(lrs[peak]["prompts"], 4e-5, rel_tol=1e-6) and math.isclose(lrs[peak]["gcn"], 1e-3, rel_tol=1e-6)
    assert lrs[peak - 1]["gcn"] < 1e-3 and lrs[peak + 1]["gcn"] < 1e-3
    assert lrs[14]["gcn"] > 0.9e-3  # 3 of 10 epochs: still near the peak, as the schedule spans 10


def test_schedule_epochs_stretches_the_cosine() -> None:
    cfg = OptimConfig(lr=1.0, warmup_epochs=0, schedule_epochs=4)
    opt = build_optimizer(_groups(), cfg)
    sched = build_scheduler(opt, cfg, steps_per_epoch=10, epochs=2)
    for _ in range(20):
        opt.step()
        sched.step()
    assert math.isclose(opt.param_groups[0]["lr"], 0.5, rel_tol=1e-6)  # half-way through a 40-step cosine


# ------------------------------------------------------------------ CLIP views

def test_clip_whole_image_eval_view_and_crop_scale() -> None:
    from capnet.registry import BACKBONES

    crop = BACKBONES.build("clip_tiny_vit.random")
    whole = BACKBONES.build("clip_tiny_vit.random", resize="whole", crop_scale=0.08)
    img = Image.new("RGB", (96, 32), (0, 0, 0))
    img.paste((255, 255, 255), (0, 0, 16, 32))  # a white strip at the left border
    keep, cut = whole.transform(train=False)(img), crop.transform(train=False)(img)
    assert keep.shape == cut.shape == (3, 32, 32)
    assert float(keep[:, :, :4].mean()) > float(cut[:, :, :4].mean()) + 1.0  # the centre crop drops the strip
    assert whole.spec.extra["resize"] == "whole" and whole.spec.extra["crop_scale"] == 0.08
    assert "resize" not in crop.spec.extra  # the default spec is unchanged
    assert "scale=(0.08, 1.0)" in repr(whole.transform(train=True))
    with pytest.raises(CapnetError, match="resize"):
        BACKBONES.build("clip_tiny_vit.random", resize="pad")


# ------------------------------------------------------------------ the recipe file, end to end

def test_vit_b16_recipe_trains_end_to_end_on_a_tiny_clip(small_real: Path, tmp_path: Path) -> None:
    recipe = REPO / "configs" / "model" / "clip_vit_b16.yaml"
    cfg = load_config([recipe])
    assert (cfg.model.peft.options, cfg.model.graph.norm, cfg.model.gcn.init) == \
        ({"bottleneck": "auto", "scale": "learnable"}, "row", "uniform")
    out = tmp_path / "run"
    sets = ["model.backbone=clip_tiny_vit.random", "model.backbone_options={image_size: 32, resize: whole}",
            "model.gcn.hidden=32", f"data.root={small_real}", "data.val_fraction=0.25", "train.select=val",
            "train.epochs=2", "optim.schedule_epochs=3", "data.batch_size=16", "data.num_workers=0",
            "train.amp=none", "train.extract_amp=none"]
    rc = main(["train", "--config", str(recipe), "--out", str(out), "--no-cache", *[a for s in sets for a in ("--set", s)]])
    assert rc == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["per_class"]) == {"cat", "dog", "person", "horse"} and 0.0 <= metrics["mAP"] <= 100.0
    saved = load_config([out / "config.yaml"])
    assert saved.optim.optimizer == "adam" and saved.optim.scheduler == "onecycle"
    assert saved.model.logit_scale == 10.0 and not saved.model.learn_logit_scale


def test_lora_on_q_and_v_leaves_k_and_the_output_projection_alone() -> None:
    visual = tiny_vit()
    lora = apply_peft("lora", visual, rank=2, alpha=1.0, targets=["q", "v"])
    attn = visual.transformer.resblocks[0].attn
    d = attn.embed_dim
    assert len(lora.deltas) == 2 * 2 and {tuple(x.lora_B.shape) for x in lora.deltas} == {(d, 2)}
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    before = attn.in_proj_weight.detach().clone()
    opt = torch.optim.SGD(lora.trainable_parameters(), lr=0.5)
    for _ in range(2):
        opt.zero_grad()
        visual(x).pow(2).sum().backward()
        opt.step()
    after = attn.in_proj_weight.detach()
    moved = [not torch.equal(before[i * d:(i + 1) * d], after[i * d:(i + 1) * d]) for i in range(3)]
    assert moved == [True, False, True]  # q and v adapted, k untouched
    with pytest.raises(ValueError, match="twice"):
        apply_peft("lora", tiny_vit(), targets=["qkv", "q"])


def test_adam_onecycle_resumes_from_a_saved_training_state(tmp_path: Path) -> None:
    from capnet.models.heads import ModelHooks
    from capnet.train.checkpoint import load_training_state, save_training_state

    class Tiny(ModelHooks, nn.Module):  # the engine's model hooks with their defaults
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.w = nn.Parameter(torch.randn(4, 4))

        def trainable_state_dict(self):
            return {"w": self.w.detach()}

        def load_trainable_state_dict(self, state):
            with torch.no_grad():
                self.w.copy_(state["w"])

    cfg = OptimConfig(optimizer="adam", lr=1e-2, scheduler="onecycle", warmup_epochs=1, schedule_epochs=4)

    def parts(model):
        opt = build_optimizer({"prompts": [model.w]}, cfg)
        return opt, build_scheduler(opt, cfg, steps_per_epoch=3, epochs=4)

    def step(model, opt, sched):
        opt.zero_grad()
        model.w.pow(2).sum().backward()
        opt.step()
        sched.step()

    straight = Tiny()
    opt, sched = parts(straight)
    for _ in range(12):
        step(straight, opt, sched)
    first = Tiny()
    opt, sched = parts(first)
    for _ in range(5):
        step(first, opt, sched)
    save_training_state(tmp_path / "last.safetensors", model=first, optimizer=opt, scheduler=sched)
    resumed = Tiny()
    opt, sched = parts(resumed)
    load_training_state(tmp_path / "last.safetensors", model=resumed, optimizer=opt, scheduler=sched)
    for _ in range(7):
        step(resumed, opt, sched)
    assert torch.allclose(resumed.w, straight.w, atol=1e-6)
