"""CAPNET and the baselines on the toy backbone: shapes, init equivalence, gradients, groups,
component toggles, the once-per-call text branch, the eval cache and trainable checkpoints."""
import math

import numpy as np
import pytest
import torch

from capnet.errors import CapnetError, CheckpointError
from capnet.models.capnet import CAPNET
from capnet.models.gcn import GCN
from capnet.models.heads import LinearProbe, ZeroShot, cosine_logits
from capnet.models.label_graph import normalize_adjacency, reweight, sparsify, text_similarity, zero_diagonal
from capnet.models.prompts import PromptLearner
from toy_backbone import ToyBackbone, ToyPEFT

NAMES = ["dog", "cat", "car", "person", "potted plant"]
C = len(NAMES)
pytestmark = pytest.mark.usefixtures("toy_random")  # cfg() builds toy.random by name


def images(b=3, seed=0):
    return torch.randn(b, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def make(prompts=True, graph=True, gcn=True, peft=False, proj=False, ensemble=False, class_specific=False, seed=0):
    """CAPNET from parts, as build_capnet composes them (no config needed)."""
    torch.manual_seed(seed)
    bb = ToyBackbone(image_dim=24 if proj else 32, text_dim=32, seed=1)
    with torch.no_grad():
        templ = bb.encode_text([f"a photo of a {n}." for n in NAMES])
    adj = normalize_adjacency(reweight(sparsify(zero_diagonal(text_similarity(templ)), topk=2), 0.2)) if graph else torch.eye(C)
    return CAPNET(
        bb,
        C,
        prompt_learner=PromptLearner(bb, NAMES, n_ctx=4, class_specific=class_specific, init="a photo of a") if prompts else None,
        template_embeddings=templ if (ensemble or not prompts) else None,
        adjacency=adj if gcn else None,
        gcn=GCN(bb.text_dim, 16, 2) if gcn else None,
        peft=ToyPEFT(bb.visual) if peft else None,
        proj_dim=20 if proj else None,
        logit_scale=20.0,
        ensemble_templates=ensemble,
    )


def test_shapes_and_stage_paths():
    m = make(peft=True)
    x = images()
    logits = m(x)
    assert logits.shape == (3, C)
    assert m.class_embeddings().shape == (C, 32)
    assert m.cached_depth() == 1
    assert make().cached_depth() == 2
    for start in (0, 1):
        feats = m.backbone.image_prefix(x, start)
        assert torch.allclose(m.forward_features(feats, start), logits, atol=1e-5)
    with pytest.raises(CapnetError, match="stage 2"):
        m.forward_features(m.backbone.image_prefix(x, 2), 2)


def test_logits_are_scaled_cosines():
    m = make(gcn=False)
    x = images()
    img = torch.nn.functional.normalize(m.backbone.encode_image(x), dim=-1)
    txt = torch.nn.functional.normalize(m.prompt_learner(), dim=-1)
    assert torch.allclose(m(x), 20.0 * img @ txt.T, atol=1e-4)


def test_gcn_at_init_equals_no_gcn():
    x = images()
    m = make(gcn=True, peft=True, proj=True)
    with_gcn = m(x)
    m.text.gcn = None  # same prompts, projections and PEFT, no graph refinement
    assert torch.equal(with_gcn, m(x))


def test_gradients_reach_trainable_parts_only():
    m = make(peft=True, proj=True)
    with torch.no_grad():  # leave the zero init so every GCN layer gets gradient
        m.gcn.layers[-1].weight.normal_(0, 0.1)
    m(images()).pow(2).mean().backward()
    for group, params in m.param_groups().items():
        for p in params:
            assert p.grad is not None and p.grad.abs().sum() > 0, group
    peft_ids = {id(p) for p in m.peft.trainable_parameters()}
    frozen = [n for n, p in m.backbone.named_parameters() if id(p) not in peft_ids]
    assert frozen
    assert all(p.grad is None and not p.requires_grad for n, p in m.backbone.named_parameters() if id(p) not in peft_ids)


def test_param_groups_cover_each_trainable_once():
    m = make(peft=True, proj=True)
    groups = m.param_groups()
    assert set(groups) == {"prompts", "gcn", "peft", "head"}
    listed = [id(p) for v in groups.values() for p in v]
    trainable = [id(p) for p in m.parameters() if p.requires_grad]
    assert len(listed) == len(set(listed)) and set(listed) == set(trainable)
    assert len(groups["head"]) == 7  # per projection: LayerNorm w/b + bias-free linear; logit scale
    frozen_scale = CAPNET(m.backbone, C, template_embeddings=torch.randn(C, 32), proj_dim=20, learn_logit_scale=False)
    assert set(frozen_scale.param_groups()) == {"head"}
    assert len(frozen_scale.param_groups()["head"]) == 6


COMPONENTS = ["prompts", "graph", "gcn", "peft", "proj", "ensemble"]


@pytest.mark.parametrize("off", [None] + COMPONENTS)
def test_each_component_toggles(off):
    flags = {k: True for k in COMPONENTS}
    if off:
        flags[off] = False
    if off == "prompts":
        flags["ensemble"] = False  # template ensembling is a prompts-on option
    m = make(**flags).train()
    logits = m(images(2))
    assert logits.shape == (2, C) and torch.isfinite(logits).all()
    logits.sum().backward()
    groups = m.param_groups()
    assert ("prompts" in groups) == flags["prompts"]
    assert ("gcn" in groups) == flags["gcn"]
    assert ("peft" in groups) == flags["peft"]
    assert all(p.grad is not None for v in groups.values() for p in v)


def test_template_ensemble_is_mean_of_classifier_logits():
    x = images()
    ens = make(ensemble=True, gcn=False)
    prompt_logits = make(gcn=False)(x)
    ens.eval()
    with torch.no_grad():
        ens.ensemble_templates = False
        assert torch.allclose(ens(x), prompt_logits, atol=1e-5)
        ens.ensemble_templates = True
        templ_only = make(prompts=False, gcn=False)(x)
        assert torch.allclose(ens(x), (prompt_logits + templ_only) / 2, atol=1e-5)


@pytest.mark.parametrize("batch", [1, 4])
def test_text_branch_runs_once_per_forward(batch):
    m = make(ensemble=True).train()
    before = m.backbone.text_calls
    m(images(batch))
    assert m.backbone.text_calls == before + 1


def test_eval_cache():
    m = make(peft=True)
    opt = torch.optim.SGD([p for v in m.param_groups().values() for p in v], lr=0.1)
    m.eval()
    with torch.no_grad():
        calls = m.backbone.text_calls
        a = m(images())
        b = m(images())
        assert m.backbone.text_calls == calls + 1 and torch.equal(a, b)
    m.train()
    m(images()).sum().backward()
    opt.step()
    m.eval()
    with torch.no_grad():
        calls = m.backbone.text_calls
        c = m(images())
        assert m.backbone.text_calls == calls + 1 and not torch.allclose(a, c)
    assert m(images()).requires_grad  # eval mode with grad enabled is not cached


def test_train_keeps_backbone_in_eval():
    m = make(peft=True).train()
    assert m.training and m.prompt_learner.training and m.peft.training
    assert not m.backbone.training and not m.backbone.text.layer.training


def test_trainable_state_dict_round_trip_and_errors():
    src, dst = make(peft=True, proj=True, seed=0), make(peft=True, proj=True, seed=1)
    with torch.no_grad():
        for p in src.param_groups()["gcn"] + src.param_groups()["peft"]:
            p.normal_(0, 0.05)
    sd = src.trainable_state_dict()
    assert {k.split(".")[0] for k in sd} == {"text", "peft", "image_proj", "log_logit_scale"}
    assert {k.split(".")[1] for k in sd if k.startswith("text.")} == {"prompt_learner", "gcn", "proj"}
    assert all(not k.startswith("backbone.") for k in sd)
    x = images()
    assert not torch.allclose(src(x), dst(x))
    dst.load_trainable_state_dict({k: v.clone() for k, v in sd.items()})
    assert torch.allclose(src(x), dst(x), atol=1e-6)
    bad = dict(sd, **{"text.gcn.layers.0.weight": torch.zeros(3, 3)})
    with pytest.raises(CheckpointError, match=r"gcn\.layers\.0\.weight"):
        dst.load_trainable_state_dict(bad)
    with pytest.raises(CheckpointError, match="missing keys.*prompt_learner.ctx"):
        dst.load_trainable_state_dict({k: v for k, v in sd.items() if k != "text.prompt_learner.ctx"})
    with pytest.raises(CheckpointError, match="unexpected keys.*extra"):
        dst.load_trainable_state_dict(dict(sd, extra=torch.zeros(1)))


def test_construction_errors():
    bb = ToyBackbone(image_dim=24, text_dim=32)
    with pytest.raises(CapnetError, match="PromptLearner or fixed"):
        CAPNET(bb, C)
    with pytest.raises(CapnetError, match="not aligned"):
        CAPNET(bb, C, template_embeddings=torch.randn(C, 32))
    with pytest.raises(CapnetError, match="adjacency"):
        CAPNET(ToyBackbone(), C, template_embeddings=torch.randn(C, 32), gcn=GCN(32, 8, 2))


def test_baselines():
    bb = ToyBackbone()
    x = images()
    lp = LinearProbe(bb, C)
    assert lp(x).shape == (3, C)
    assert set(lp.param_groups()) == {"head"} and len(lp.param_groups()["head"]) == 2  # fc weight and bias
    lp(x).sum().backward()
    assert all(p.grad is None for p in bb.parameters())
    assert set(lp.trainable_state_dict()) == {"fc.weight", "fc.bias"}
    assert torch.allclose(lp.forward_features(bb.image_prefix(x, 1), 1), lp(x), atol=1e-5)
    # a probe fitted on standardised features, folded into W and b, reads raw features
    feats = bb.encode_image(x).detach().double().numpy()
    mean, scale = feats.mean(0), feats.std(0) + 0.5
    coef, icpt = np.random.default_rng(0).normal(size=(C, feats.shape[1])), np.arange(C, dtype=float)
    lp.load_fit(coef, icpt, mean, scale)
    with torch.no_grad():
        assert np.allclose(lp(x).double().numpy(), ((feats - mean) / scale) @ coef.T + icpt, atol=1e-4)
    with torch.no_grad():
        templ = bb.encode_text([f"a photo of a {n}." for n in NAMES])
    zs = ZeroShot(bb, templ, logit_scale=10.0)
    assert zs.param_groups() == {} and zs.trainable_state_dict() == {}
    expected = 10.0 * torch.nn.functional.normalize(bb.encode_image(x), dim=-1) @ torch.nn.functional.normalize(templ, dim=-1).T
    assert torch.allclose(zs(x), expected, atol=1e-4)
    with pytest.raises(CapnetError, match="aligned"):
        ZeroShot(ToyBackbone(image_dim=24), templ, 10.0)


# ------------------------------------------------------------------ build_model from a Config

from capnet.config import config_from_dict  # noqa: E402
from capnet.models import MODEL_KINDS, build_model  # noqa: E402
from capnet.registry import BACKBONES, PEFT  # noqa: E402

LABELS = np.array([[1, 1, 0, 0, 0], [1, 0, 1, 0, 0], [0, 1, 0, 1, 1], [1, 0, 0, 0, 1], [0, 0, 1, 1, 0]])


def cfg(backbone="toy.random", **model):
    base = {"backbone": backbone, "prompts": {"n_ctx": 4}, "gcn": {"hidden": 16}, "graph": {"topk": 2}}
    for key, value in model.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            base[key] = {**base[key], **value}
        else:
            base[key] = value
    tte = base.pop("tte", {})
    return config_from_dict({"model": base, "tte": tte})


def run_step(model, size=32):
    model.train()
    logits = model(images(2).new_empty(2, 3, size, size).normal_())
    assert logits.shape == (2, C) and torch.isfinite(logits).all()
    assert logits.requires_grad == bool(model.param_groups())
    if logits.requires_grad:
        logits.sum().backward()
    return model


def test_model_kinds_registered():
    assert MODEL_KINDS.names() == ["capnet", "clap", "clap_authors", "linear_probe", "zeroshot", "zs_linear_probe"]


@pytest.mark.parametrize("source", ["text", "cooccurrence", "none"])
def test_build_capnet_graph_sources(source):
    m = run_step(build_model(cfg(graph={"source": source}), NAMES, LABELS))
    assert isinstance(m, CAPNET) and m.adjacency.shape == (C, C)
    assert torch.allclose(m.adjacency, m.adjacency.T, atol=1e-6)
    assert set(m.param_groups()) == {"prompts", "gcn", "head"}


def test_build_coop_and_fixed_template_configs():
    coop = run_step(build_model(cfg(graph={"source": "none"}, gcn={"enabled": False}), NAMES))
    assert coop.gcn is None and coop.adjacency is None and set(coop.param_groups()) == {"prompts", "head"}
    fixed = run_step(build_model(cfg(prompts={"enabled": False}, gcn={"enabled": False}, learn_logit_scale=False), NAMES))
    assert fixed.prompt_learner is None and fixed.param_groups() == {}
    ens = build_model(cfg(tte={"templates": True}), NAMES)
    assert ens.ensemble_templates and ens.template_embeddings.shape == (C, 32)


def test_build_unaligned_uses_projections():
    m = run_step(build_model(cfg(backbone_options={"image_dim": 24}, proj_dim=12), NAMES))
    assert m.image_proj[-1].out_features == 12 and m.text.proj[-1].in_features == 32
    assert m.class_embeddings().shape == (C, 12)


@pytest.mark.parametrize("method", ["bitfit", "conv_adapter"])
def test_build_with_registered_peft_on_staged_cnn(method):
    if method not in PEFT:
        pytest.skip(f"PEFT method {method} not registered")
    m = run_step(build_model(cfg(peft={"method": method, "options": {"stages": [1]}}), NAMES))
    assert m.cached_depth() == 1
    assert "peft" in m.param_groups()
    assert all(p.grad is not None for p in m.param_groups()["peft"])
    peft_ids = {id(p) for p in m.param_groups()["peft"]}
    assert all(p.grad is None for p in m.backbone.parameters() if id(p) not in peft_ids)
    x = images()
    assert torch.allclose(m.forward_features(m.backbone.image_prefix(x, 1), 1), m(x), atol=1e-5)


def test_build_baselines():
    lp = build_model(cfg(kind="linear_probe"), NAMES)
    assert isinstance(lp, LinearProbe) and not lp.fc.weight.any()  # fitted later, by scikit-learn
    zs = build_model(cfg(kind="zeroshot"), NAMES)
    assert isinstance(zs, ZeroShot) and zs.param_groups() == {}
    assert zs.logit_scale().item() == pytest.approx(float(np.exp(2.0)))  # the toy's log scale


CLIP_CASES = [("clip_tiny_vit.random", m) for m in ["none", "lora", "adaptformer", "vpt_shallow", "vpt_deep", "bitfit"]]
CLIP_CASES += [("clip_tiny_rn.random", m) for m in ["none", "bitfit", "conv_adapter"]]


@pytest.mark.parametrize("backbone,method", CLIP_CASES)
def test_build_on_clip_tiny(backbone, method):
    if backbone not in BACKBONES or method not in PEFT:
        pytest.skip(f"{backbone} or PEFT method {method} is not registered")
    torch.manual_seed(0)  # the random tower is drawn from the global generator
    m = build_model(cfg(backbone, peft={"method": method}, tte={"templates": True}), NAMES, LABELS)
    assert m.cached_depth() == m.backbone.num_image_stages if method == "none" else m.cached_depth() == 0
    run_step(m, m.backbone.spec.image_size)
    groups = m.param_groups()
    assert ("peft" in groups) == (method != "none")
    assert all(p.grad is not None for v in groups.values() for p in v)
    trainable = {id(p) for v in groups.values() for p in v}
    assert all(p.grad is None for p in m.backbone.parameters() if id(p) not in trainable)
    with torch.no_grad():  # a stand-in for training, so loading has something to restore
        for v in groups.values():
            for p in v:
                p.add_(torch.randn_like(p) * 0.05)
    sd = m.trainable_state_dict()
    torch.manual_seed(0)
    m2 = build_model(cfg(backbone, peft={"method": method}, tte={"templates": True}), NAMES, LABELS)
    m.eval(), m2.eval()
    x = torch.randn(2, 3, m.backbone.spec.image_size, m.backbone.spec.image_size)
    with torch.no_grad():
        assert not torch.allclose(m(x), m2(x), atol=1e-5)
        m2.load_trainable_state_dict(sd)
        assert torch.allclose(m(x), m2(x), atol=1e-5)


def test_zeroshot_on_clip_tiny_vit():
    if "clip_tiny_vit.random" not in BACKBONES:
        pytest.skip("clip_tiny_vit.random not registered")
    zs = build_model(cfg("clip_tiny_vit.random", kind="zeroshot"), NAMES)
    assert zs(torch.randn(2, 3, 32, 32)).shape == (2, C)


@pytest.mark.slow
def test_build_on_offline_backbone():
    """The real offline default: unaligned towers -> projections; conv_adapter on VGG stages."""
    if "vgg19_minilm.offline" not in BACKBONES:
        pytest.skip("vgg19_minilm.offline not registered")
    cfg_ = cfg("vgg19_minilm.offline", backbone_options={"image_size": 64}, peft={"method": "conv_adapter"}, gcn={"hidden": 64})
    m = run_step(build_model(cfg_, NAMES, LABELS), 64)
    assert m.image_proj is not None and m.class_embeddings().shape == (C, cfg_.model.proj_dim)
    assert set(m.param_groups()) == {"prompts", "gcn", "peft", "head"}
    # adapter after the last block = pre-hook on the pooling: the whole conv stack is cacheable,
    # the pooling (the backbone's last stage) is not
    assert m.cached_depth() == m.backbone.num_image_stages - 1 == len(m.backbone.visual.stages)


# ------------------------------------------------------------- head details
def _residual_twin(**kw):
    """CAPNET with and without a class residual, same weights otherwise."""
    plain = make(**kw)
    torch.manual_seed(0)
    with_res = CAPNET(plain.backbone, C, prompt_learner=plain.prompt_learner, adjacency=plain.adjacency,
                      gcn=plain.gcn, class_residual=True, center_features=True)
    with torch.no_grad():
        with_res.log_logit_scale.copy_(plain.log_logit_scale)
    return plain, with_res


def test_class_residual_starts_at_the_text_classifier_and_trains():
    plain, res = _residual_twin()
    x = images()
    with torch.no_grad():
        assert torch.allclose(plain(x), res(x), atol=1e-5)  # zero residual, zero mean: identical
    assert any(p is res.class_residual for p in res.param_groups()["head"])
    assert "text.class_residual" in res.text_parameter_names()  # trained once per step, with the text branch
    res.train()
    res(x).sum().backward()
    assert res.class_residual.grad is not None and res.class_residual.grad.abs().sum() > 0


def test_residual_gate_scales_each_class_residual_by_its_training_count():
    """model.residual_gate=n: class c's residual is scaled by min(1, n_c / n); saved with the run."""
    from capnet.models.build import residual_gate
    from capnet.run_files import extra_state, load_extra_state

    gate = residual_gate(LABELS, C, 3.0)  # training counts 3, 2, 2, 2, 2
    assert torch.allclose(gate, torch.tensor([1.0, 2 / 3, 2 / 3, 2 / 3, 2 / 3]))
    assert residual_gate(None, C, 3.0).eq(1).all() and residual_gate(LABELS, C, None) is None
    model = build_model(cfg(class_residual=True, residual_gate=3.0, gcn={"enabled": False}), NAMES, LABELS)
    assert torch.equal(model.residual_gate, gate)
    with torch.no_grad():
        model.class_residual.normal_()
    plain = build_model(cfg(class_residual=True, gcn={"enabled": False}), NAMES, LABELS)
    plain.load_trainable_state_dict(model.trainable_state_dict())
    model.eval(), plain.eval()
    with torch.no_grad():
        gated, ungated = model.class_embeddings(), plain.class_embeddings()
        full = gate.eq(1)
        assert torch.allclose(gated[full], ungated[full], atol=1e-6) and not torch.allclose(gated[~full], ungated[~full])
    twin = build_model(cfg(class_residual=True, residual_gate=3.0, gcn={"enabled": False}), NAMES, None)
    load_extra_state(twin, extra_state(model))  # a saved run rebuilt without its labels
    assert torch.equal(twin.residual_gate, gate)
    with pytest.raises(Exception, match="residual_gate"):
        build_model(cfg(class_residual=True, residual_gate=0.0), NAMES, LABELS)


def test_feature_centring_subtracts_the_given_mean():
    _, res = _residual_twin()
    x = images()
    mean = torch.randn(res.backbone.image_dim)
    res.set_feature_mean(mean)
    with torch.no_grad():
        feats = res.backbone.encode_image(x)
        expected = cosine_logits(feats - mean, res.class_embeddings(), res.logit_scale())
        assert torch.allclose(res.logits_from_image_features(feats), expected, atol=1e-5)
    with pytest.raises(CapnetError, match="without feature centring"):
        make().set_feature_mean(mean)


def test_logit_scale_parameter_never_exceeds_the_cap_under_sgd():
    """open_clip's clamp: after every step the parameter itself is <= log(100), not only its value."""
    m = make()
    with torch.no_grad():
        m.log_logit_scale.fill_(math.log(90.0))
    opt = torch.optim.SGD([m.log_logit_scale], lr=0.5, momentum=0.9)
    for _ in range(20):
        opt.zero_grad()
        (-m.logit_scale()).backward()  # a loss that only wants a larger scale
        opt.step()
        m.after_optimizer_step()
        assert m.log_logit_scale.item() <= math.log(100.0) + 1e-7
    assert m.logit_scale().item() == pytest.approx(100.0)
    assert m.log_logit_scale.grad.item() == pytest.approx(-100.0)  # at the cap the gradient still flows


def test_weights_saved_above_the_cap_load_capped():
    """Runs saved before the in-place clamp may hold log(400): their forward capped the value at 100."""
    m = make()
    state = {k: v.clone() for k, v in m.trainable_state_dict().items()}
    state["log_logit_scale"] = torch.tensor(math.log(400.0))
    m.load_trainable_state_dict(state)
    assert m.logit_scale().item() == pytest.approx(100.0)


def test_logits_are_float32_under_bf16_autocast():
    m = make().eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        logits = m(images())
    assert logits.dtype == torch.float32


def test_runs_saved_before_the_text_branch_module_still_load(tmp_path):
    """model.safetensors written with the old flat names (prompt_learner.*, gcn.*, text_proj.*,
    class_residual) loads into today's CAPNET through ``upgrade_state``, tensor for tensor."""
    from capnet import run_files
    from capnet.train import checkpoint

    src, dst = make(peft=True, proj=True, seed=0), make(peft=True, proj=True, seed=1)
    legacy = {}
    for k, v in src.trainable_state_dict().items():
        old = k.replace("text.proj.", "text_proj.").replace("text.", "", 1) if k.startswith("text.") else k
        legacy[old] = v.clone()
    assert "prompt_learner.ctx" in legacy and "text_proj.1.weight" in legacy
    run_files.save_file(run_files.with_prefix(legacy, "model."), {}, tmp_path / "old.safetensors")
    x = images()
    assert not torch.allclose(src(x), dst(x))
    checkpoint.load_weights(dst, tmp_path / "old.safetensors")
    assert torch.allclose(src(x), dst(x), atol=1e-6)
