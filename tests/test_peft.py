"""PEFT methods on tiny open_clip towers and a tiny VGG-shaped staged CNN (no weights needed)."""
from __future__ import annotations

import open_clip
import pytest
import torch
from torch import nn

from capnet.models.peft import PEFTError, PEFTMethod, apply_peft, count_trainable
from capnet.models.peft.base import RESNET, STAGED_CNN, TOWER_NAMES, VIT, tower_kind
from capnet.registry import PEFT

WIDTH, LAYERS = 64, 2
TEXT = open_clip.model.CLIPTextCfg(context_length=8, vocab_size=64, width=32, heads=2, layers=1)  # text unused


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny convs are slower multi-threaded on a shared 2-core box; restore the setting after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_vit() -> nn.Module:
    torch.manual_seed(0)
    cfg = open_clip.model.CLIPVisionCfg(layers=LAYERS, width=WIDTH, head_width=32, patch_size=8, image_size=32)
    return open_clip.model.CLIP(embed_dim=32, vision_cfg=cfg, text_cfg=TEXT).visual


def tiny_rn() -> nn.Module:
    torch.manual_seed(0)
    cfg = open_clip.model.CLIPVisionCfg(layers=(1, 1, 1, 1), width=16, head_width=8, image_size=64)
    return open_clip.model.CLIP(embed_dim=32, vision_cfg=cfg, text_cfg=TEXT).visual


class TinyVGG(nn.Module):
    """Same structure as the offline VGG19 visual: 5 conv stages, then global average pooling."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        chans = [3, 8, 16, 16, 16, 16]
        self.stages = nn.ModuleList(
            nn.Sequential(nn.Conv2d(chans[i], chans[i + 1], 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
            for i in range(5)
        )
        self.pool = nn.AdaptiveAvgPool2d(1)

    def suffix(self, x: torch.Tensor, depth: int) -> torch.Tensor:
        for stage in self.stages[depth:]:
            x = stage(x)
        return self.pool(x).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.suffix(x, 0)


TOWERS = {"vit": (tiny_vit, (2, 3, 32, 32)), "resnet": (tiny_rn, (2, 3, 64, 64)), "vgg": (TinyVGG, (2, 3, 32, 32))}
KIND = {"vit": VIT, "resnet": RESNET, "vgg": STAGED_CNN}  # the tower kind each test tower stands for
METHODS = [m for m in PEFT.names() if m != "none"]
# Each method's own declaration (PEFTMethod.supported), not a restatement of it.
SUPPORT = {m: [t for t in TOWERS if KIND[t] in PEFT.build(m).supported] for m in METHODS}
CASES = [(m, t) for m in METHODS for t in SUPPORT[m]]
UNSUPPORTED = [(m, t) for m in METHODS for t in TOWERS if t not in SUPPORT[m]]


def build(tower: str):
    factory, shape = TOWERS[tower]
    visual = factory().eval()
    return visual, torch.randn(*shape, generator=torch.Generator().manual_seed(1))


def test_every_registered_method_is_covered():
    assert set(PEFT.names()) == set(SUPPORT) | {"none"}
    for method in METHODS:
        declared = set(PEFT.build(method).supported)
        assert declared and declared <= set(TOWER_NAMES), method  # only kinds tower_kind can report
        assert declared <= set(KIND.values()), f"{method}: no test tower for {declared - set(KIND.values())}"
        assert SUPPORT[method], method


@pytest.mark.parametrize("tower", TOWERS)
def test_test_towers_are_the_kinds_they_stand_for(tower):
    assert tower_kind(TOWERS[tower][0]()) == KIND[tower]


@pytest.mark.parametrize("method,tower", CASES)
def test_output_equals_frozen_tower_at_init(method, tower):
    visual, x = build(tower)
    for p in visual.parameters():
        p.requires_grad_(False)
    with torch.no_grad():
        frozen = visual(x)
    peft = apply_peft(method, visual)
    with torch.no_grad():
        patched = visual(x)
    if method.startswith("vpt"):
        assert patched.shape == frozen.shape and torch.isfinite(patched).all()
        assert not torch.allclose(patched, frozen)  # prompts are live, by design not zero-init
    else:
        assert torch.equal(patched, frozen)
    # with autograd on, kernels may differ in the last bits only
    if not method.startswith("vpt"):
        assert torch.allclose(visual(x), frozen, atol=1e-5)
    assert isinstance(peft, PEFTMethod)


@pytest.mark.parametrize("method,tower", CASES)
def test_only_intended_parameters_get_gradients(method, tower):
    visual, x = build(tower)
    before = {id(p) for p in visual.parameters()}
    peft = apply_peft(method, visual)
    trainable = {id(p) for p in peft.trainable_parameters()}
    assert trainable, "a method must train something"
    visual.train(tower == "vit")  # BN in eval: its running stats are frozen state, not trained
    visual(x).pow(2).sum().backward()
    for name, p in visual.named_parameters():
        if id(p) in trainable:
            continue
        assert p.grad is None, f"{method}: frozen tower parameter {name} received a gradient"
        assert not p.requires_grad, f"{method}: {name} left trainable"
    if method != "bitfit":
        assert all(id(p) not in before for p in peft.trainable_parameters())
    # the last layer's new parameters all receive a gradient through the output
    grads = [p.grad for p in peft.trainable_parameters()]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)
    assert all(g is None or torch.isfinite(g).all() for g in grads)


def expected_count(method: str, tower: str, visual: nn.Module) -> int:
    """Trainable-parameter formulas (d = width, L = blocks)."""
    d, L = WIDTH, LAYERS
    if method == "adaptformer":  # own LN (2d) + down (d*r + r) + up (r*d + d), r = 64
        r = 64
        return L * (2 * d + d * r + r + r * d + d)
    if method == "lora":  # qkv: A (r x d) + B (3d x r); out: A (r x d) + B (d x r); r = 8
        return L * 6 * 8 * d
    if method == "vpt_shallow":
        return 10 * d
    if method == "vpt_deep":
        return L * 10 * d
    if method == "bitfit" and tower == "vit":  # per block: ln_1 d, qkv 3d, out d, ln_2 d, fc 4d, proj d
        return L * 11 * d + 2 * d  # + ln_pre, ln_post
    if method == "bitfit" and tower == "resnet":  # BN biases + attnpool q/k/v/c biases
        bn = sum(m.num_features for m in visual.modules() if isinstance(m, nn.BatchNorm2d))
        return bn + 3 * visual.attnpool.q_proj.out_features + visual.attnpool.c_proj.out_features
    if method == "bitfit" and tower == "vgg":  # conv biases of all 5 stages
        return 8 + 16 * 4
    if method == "conv_adapter":  # last stage, C -> C/4 -> C with biases
        c = 16 * 8 * 4 if tower == "resnet" else 16
        h = c // 4
        return c * h + h + h * c + c
    raise AssertionError(f"no formula for {method} on {tower}")


@pytest.mark.parametrize("method,tower", CASES)
def test_trainable_counts_match_formula(method, tower):
    visual, _ = build(tower)
    peft = apply_peft(method, visual)
    assert count_trainable(peft) == expected_count(method, tower, visual)
    assert count_trainable(visual) == count_trainable(peft) - sum(
        p.numel() for p in peft.parameters() if all(p is not q for q in visual.parameters())
    )


@pytest.mark.parametrize("method,tower", UNSUPPORTED)
def test_unsupported_tower_is_a_clear_error(method, tower):
    visual, _ = build(tower)
    with pytest.raises(PEFTError, match=f"'{method}'.*{type(visual).__name__}"):
        apply_peft(method, visual)


def test_unknown_tower_and_unknown_option():
    with pytest.raises(PEFTError, match="'lora'.*Linear.*unrecognised"):
        apply_peft("lora", nn.Linear(2, 2))
    with pytest.raises(PEFTError, match="'lora'.*'rnak'.*did you mean 'rank'.*valid options: rank, alpha, targets"):
        apply_peft("lora", tiny_vit(), rnak=4)


def test_none_freezes_and_returns_none():
    visual = tiny_vit()
    assert apply_peft("none", visual) is None
    assert count_trainable(visual) == 0


def test_cached_depth_on_staged_cnn():
    # the adapter after stage k is a pre-hook on the next module: stage k stays in the cached prefix
    assert apply_peft("conv_adapter", TinyVGG()).cached_depth == 5
    assert apply_peft("conv_adapter", TinyVGG(), stages=[2, 4]).cached_depth == 3
    assert apply_peft("bitfit", TinyVGG()).cached_depth == 0
    assert apply_peft("bitfit", TinyVGG(), stages=[3, 4]).cached_depth == 3
    assert apply_peft("conv_adapter", tiny_rn(), stages=[1, 3]).cached_depth == 0
    for name in ("adaptformer", "lora", "vpt_deep", "bitfit"):
        assert apply_peft(name, tiny_vit()).cached_depth == 0
    with pytest.raises(PEFTError, match="stage 5 out of range.*0..4"):
        apply_peft("conv_adapter", TinyVGG(), stages=[5])


def test_cached_prefix_plus_suffix_equals_full_forward_after_training():
    """What the engine does: cache stages[:cached_depth], run the rest; the adapter must still act."""
    visual = TinyVGG()
    peft = apply_peft("conv_adapter", visual, stages=[4])
    with torch.no_grad():
        for p in peft.parameters():
            p.add_(0.1)
    x = torch.randn(2, 3, 32, 32)
    cached = x
    for stage in visual.stages[: peft.cached_depth]:
        cached = stage(cached)
    assert torch.allclose(visual.suffix(cached, peft.cached_depth), visual(x))
    frozen = TinyVGG()
    assert not torch.allclose(visual(x), frozen(x))


def test_bitfit_on_vgg_stages_only_unfreezes_those_biases():
    visual = TinyVGG()
    peft = apply_peft("bitfit", visual, stages=[3, 4])
    assert peft.bias_names() == ["stages.3.0.bias", "stages.4.0.bias"]
    assert not visual.stages[2][0].bias.requires_grad and visual.stages[3][0].bias.requires_grad
    with pytest.raises(PEFTError, match="'bitfit'.*stages.*staged CNN"):
        apply_peft("bitfit", tiny_vit(), stages=[0])


def test_bitfit_state_dict_carries_tower_biases():
    visual = tiny_rn()
    peft = apply_peft("bitfit", visual)
    state = peft.state_dict()
    assert "tower.attnpool.c_proj.bias" in state and len(state) == len(peft.bias_names())
    saved = {k: v.clone() + 1.0 for k, v in state.items()}
    other_visual = tiny_rn()
    other = apply_peft("bitfit", other_visual)
    other.load_state_dict(saved)
    assert torch.equal(other_visual.attnpool.c_proj.bias, saved["tower.attnpool.c_proj.bias"])


def test_vpt_sequence_and_class_token():
    visual = tiny_vit()
    seen = []
    visual.transformer.resblocks[1].register_forward_hook(lambda m, a, out: seen.append(out.shape))
    peft = apply_peft("vpt_deep", visual, num_tokens=3)
    out = visual(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 32)
    assert seen[0] == (2, 1 + 3 + 16, WIDTH)  # class token + prompts + 4x4 patches
    out.sum().backward()
    assert peft.prompts.grad is not None and peft.prompts.grad[1].abs().sum() > 0


def test_lora_and_adaptformer_learn():
    for method in ("lora", "adaptformer"):
        visual = tiny_vit()
        peft = apply_peft(method, visual)
        x = torch.randn(2, 3, 32, 32)
        before = visual(x).detach()
        opt = torch.optim.SGD(peft.trainable_parameters(), lr=0.5)
        for _ in range(2):
            opt.zero_grad()
            visual(x).pow(2).sum().backward()
            opt.step()
        assert not torch.allclose(visual(x), before), method


def test_apply_twice_is_an_error():
    visual = tiny_vit()
    peft = apply_peft("lora", visual)
    with pytest.raises(PEFTError, match="already applied"):
        peft.apply(visual)


def test_module_apply_fn_still_recurses():
    """nn.Module.apply(fn) calls child.apply(fn): a container holding a PEFT method must survive it."""
    peft = apply_peft("adaptformer", tiny_vit())
    visited = []
    nn.ModuleList([peft]).apply(visited.append)
    assert {id(m) for m in peft.modules()} <= {id(m) for m in visited}  # every module of the method reached
    assert len(list(peft.modules())) > 1


def test_tower_kind():
    assert tower_kind(tiny_vit()) == "vit"
    assert tower_kind(tiny_rn()) == "resnet"
    assert tower_kind(TinyVGG()) == "staged_cnn"
    assert tower_kind(nn.Linear(2, 2)) is None
