"""Class-count scaling (issue 24): the sparse label graph, the GCN on a class subset, and the
budgeted text branch (bank + subset) against the exact one."""
import pytest
import torch
from toy_backbone import ToyBackbone

from capnet.config import config_from_dict
from capnet.errors import CapnetError
from capnet.models.build import build_model
from capnet.models.capnet import CAPNET
from capnet.models.gcn import GCN, receptive_field
from capnet.models.label_graph import GraphInputs, sparse_text_graph
from capnet.models.prompts import PromptLearner
from capnet.models.heads import StepInputs
from capnet.models.text_bank import BudgetedCAPNET, resolve_text_budget, select_classes
from capnet.registry import GRAPHS

NAMES = ["dog", "cat", "car", "person", "potted plant", "bus", "horse", "sheep", "sofa"]
C = len(NAMES)


def _emb(c, d=16, seed=0):
    return torch.randn(c, d, generator=torch.Generator().manual_seed(seed))


def _dense_text_graph(emb, topk, threshold, p=0.2, sparse=False, chunk=2048):
    inputs = GraphInputs(len(emb), lambda: emb)
    return GRAPHS.build("text", inputs, topk=topk, threshold=threshold, p=p, tau=0.4, sparse=sparse, chunk=chunk)


@pytest.mark.parametrize("topk,threshold", [(5, None), (2, 0.1), (None, 0.2), (40, None), (0, None)])
@pytest.mark.parametrize("chunk", [7, 2048])
def test_sparse_text_graph_equals_dense(topk, threshold, chunk):
    emb = _emb(37)
    dense = _dense_text_graph(emb, topk, threshold)
    sparse = sparse_text_graph(emb, topk, threshold, 0.2, chunk=chunk)
    assert sparse.is_sparse and sparse.shape == (37, 37)
    assert torch.allclose(sparse.to_dense(), dense, atol=1e-6)


def test_graph_sources_switch_to_sparse_when_asked():
    emb = _emb(12)
    inputs = GraphInputs(12, lambda: emb, train_labels=(torch.rand(30, 12) > 0.7).int().numpy())
    for source in ("text", "cooccurrence", "none"):
        dense = GRAPHS.build(source, inputs, topk=3, threshold=None, p=0.2, tau=0.3)
        sparse = GRAPHS.build(source, inputs, topk=3, threshold=None, p=0.2, tau=0.3, sparse=True)
        assert not dense.is_sparse and sparse.is_sparse
        assert torch.allclose(sparse.to_dense(), dense, atol=1e-6)


def _gcn(seed=0, layers=3):
    torch.manual_seed(seed)
    gcn = GCN(dim=16, hidden=24, layers=layers)
    with torch.no_grad():
        gcn.layers[-1].weight.normal_(0, 0.2)  # non-zero output
    return gcn


@pytest.mark.parametrize("layers", [1, 3])
def test_gcn_sparse_and_subset_equal_dense(layers):
    emb = _emb(40)
    adj = _dense_text_graph(emb, 3, None)
    gcn, x = _gcn(layers=layers), _emb(40, seed=1)
    full = gcn(adj, x)
    assert torch.allclose(gcn(adj.to_sparse(), x), full, atol=1e-5)
    rows = torch.tensor([0, 5, 17, 39])
    for a in (adj, adj.to_sparse()):
        assert torch.allclose(gcn(a, x, rows=rows), full[rows], atol=1e-5)
    inputs, subs = receptive_field(adj, rows, layers)
    assert subs[-1].shape[0] == len(rows) and subs[0].shape[1] == len(inputs)
    assert len(inputs) < 40 or layers > 1  # one hop of a top-3 graph cannot reach every class


def _make(class_specific=True, ensemble=True, budget=None, chunk=1024, seed=0, gcn_weight=0.2, with_gcn=True,
          residual=False):
    """A CAPNET whose GCN output is non-zero (so the graph matters) on the toy backbone."""
    torch.manual_seed(seed)
    bb = ToyBackbone(image_dim=32, text_dim=32, seed=1)
    with torch.no_grad():
        templ = bb.encode_text([f"a photo of a {n}." for n in NAMES])
    gcn = GCN(bb.text_dim, 16, 2)
    with torch.no_grad():
        gcn.layers[-1].weight.normal_(0, gcn_weight)
    cls, extra = (CAPNET, {}) if budget is None else (BudgetedCAPNET, {"budget": budget})
    return cls(bb, C, prompt_learner=PromptLearner(bb, NAMES, n_ctx=4, class_specific=class_specific, init="a photo of a"),
               template_embeddings=templ, adjacency=_dense_text_graph(templ, 2, None), gcn=gcn if with_gcn else None,
               ensemble_templates=ensemble, text_chunk=chunk, class_residual=residual, **extra)


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("class_specific", [True, False])
def test_budgeted_with_every_class_equals_exact(class_specific):
    exact, budgeted = _make(class_specific), _make(class_specific, budget=4)
    w = torch.randn(C, 32, generator=torch.Generator().manual_seed(3))
    a = exact.class_embeddings()
    (a * w).sum().backward()
    b = budgeted.budgeted_embeddings(torch.arange(C))
    (b * w).sum().backward()
    assert torch.allclose(a, b, atol=1e-5)
    ga, gb = _grads(exact), _grads(budgeted)
    assert ga.keys() == gb.keys() and ga
    for name in ga:
        assert torch.allclose(ga[name], gb[name], atol=1e-5), name


def test_small_budget_trains_only_the_subset_and_updates_the_bank():
    m = _make(class_specific=True, budget=3).train()
    with torch.no_grad():
        m.refresh_text_bank()
        before = m.text_bank.head.clone()
        m.prompt_learner.ctx.add_(torch.randn_like(m.prompt_learner.ctx))  # bank rows are now stale
    rows = torch.tensor([1, 4, 7])
    calls = m.backbone.text_calls
    emb = m.budgeted_embeddings(rows)
    assert m.backbone.text_calls == calls + 1  # one text pass over the 3 rows, no refresh
    emb.sum().backward()
    grad = m.prompt_learner.ctx.grad
    others = torch.tensor([i for i in range(C) if i not in rows.tolist()])
    assert grad[rows].abs().sum(dim=(1, 2)).gt(0).all() and grad[others].abs().sum() == 0
    assert torch.equal(emb[others].detach(), before[others])  # old bank rows, detached
    assert not torch.allclose(m.text_bank.head[rows], before[rows])  # subset rows refreshed
    assert torch.equal(m.text_bank.head[rows], emb[rows].detach())
    # the subset's rows are the GCN output of fresh rows + bank neighbours: the full GCN on that mix
    with torch.no_grad():
        mixed = m.text_bank.prompt.clone()
        assert torch.allclose(m.text.embed(mixed)[rows], emb[rows], atol=1e-5)


def test_gradient_outside_the_subset_is_owed_and_paid_when_the_class_runs():
    """Deferred gradient: the loss's gradient on classes outside a step's subset reaches their
    prompts when they next run, so two budgeted steps (unchanged parameters, no GCN mixing rows)
    give the exact gradient of both losses; the class residual gets its exact gradient every step."""
    exact = _make(class_specific=True, ensemble=False, with_gcn=False, residual=True)
    budgeted = _make(class_specific=True, ensemble=False, with_gcn=False, residual=True, budget=3)
    with torch.no_grad():
        for m in (exact, budgeted):
            m.class_residual.normal_(0, 0.3, generator=torch.Generator().manual_seed(5))
    gen = torch.Generator().manual_seed(4)
    w1, w2 = torch.randn(C, 32, generator=gen), torch.randn(C, 32, generator=gen)
    ((exact.class_embeddings() * w1).sum() + (exact.class_embeddings() * w2).sum()).backward()
    first = torch.tensor([0, 1, 2])
    (budgeted.budgeted_embeddings(first) * w1).sum().backward()
    owed = budgeted.text_bank.pending
    assert owed[first].abs().sum() == 0 and owed[3:].abs().sum(dim=1).gt(0).all()
    assert budgeted.prompt_learner.ctx.grad[3:].abs().sum() == 0  # not paid yet
    state = budgeted.resume_state()["text_bank.pending"]
    assert torch.equal(state, owed.cpu())
    (budgeted.budgeted_embeddings(torch.arange(C)) * w2).sum().backward()  # every class runs: all paid
    assert budgeted.text_bank.pending.abs().sum() == 0
    for name in ("text.prompt_learner.ctx", "text.class_residual"):
        a, b = dict(exact.named_parameters())[name].grad, dict(budgeted.named_parameters())[name].grad
        assert torch.allclose(a, b, atol=1e-5), name
    budgeted.load_resume_state({"text_bank.pending": state})
    assert torch.equal(budgeted.text_bank.pending, state)


def test_a_non_finite_gradient_is_not_owed():
    """A skipped fp16 step (inf / nan gradient) must not poison the classes' owed gradient."""
    m = _make(class_specific=True, ensemble=False, with_gcn=False, residual=True, budget=3)
    emb = m.budgeted_embeddings(torch.tensor([0, 1, 2]))
    (emb * torch.randn(C, 32)).sum().backward()
    owed = m.text_bank.pending.clone()
    (m.budgeted_embeddings(torch.tensor([3, 4, 5])) * float("inf")).sum().backward()
    assert torch.isfinite(m.text_bank.pending).all()
    assert torch.equal(m.text_bank.pending[6:], owed[6:])  # rows outside both subsets: unchanged


def test_without_deferral_the_gradient_outside_the_subset_is_dropped():
    """model.text_defer=false (the ablation): nothing is owed, a later step pays nothing."""
    m = _make(class_specific=True, ensemble=False, with_gcn=False, residual=True, budget=3)
    m.text_defer = False
    (m.budgeted_embeddings(torch.tensor([0, 1, 2])) * torch.randn(C, 32)).sum().backward()
    assert m.text_bank.pending.abs().sum() == 0
    assert m.prompt_learner.ctx.grad[3:].abs().sum() == 0 and m.class_residual.grad[3:].abs().sum() > 0


def test_eval_in_chunks_equals_unchunked():
    whole, chunked = _make(chunk=1024).eval(), _make(chunk=2).eval()
    with torch.no_grad():
        calls = chunked.backbone.text_calls
        b = chunked.class_embeddings()
        assert chunked.backbone.text_calls == calls + (C + 1) // 2
        assert torch.allclose(whole.class_embeddings(), b, atol=1e-6)


def test_step_embeddings_select_positives_and_are_exact_when_unbudgeted():
    m = _make(budget=3).train()
    targets = torch.zeros(2, C)
    targets[0, 2] = targets[1, 6] = 1
    scores = torch.zeros(2, C)
    scores[1, 5] = 9.0
    m.start_epoch(0)  # a full bank and the epoch's class-sampling generator
    before = m.text_bank.head.clone()
    m.step_class_embeddings(StepInputs(targets, scores)).sum().backward()
    changed = (m.prompt_learner.ctx.grad.abs().sum(dim=(1, 2)) > 0).nonzero().flatten().tolist()
    assert changed == [2, 5, 6]  # positives 2, 6, hardest negative 5 (budget 3, half of 1 slot rounds to 1)
    assert torch.equal(m.text_bank.head[0], before[0])
    exact = _make().train()
    assert torch.equal(exact.step_class_embeddings(StepInputs(targets, scores)), exact.class_embeddings())


def test_select_classes():
    pos = torch.zeros(10, dtype=torch.bool)
    pos[[1, 3]] = True
    hard = torch.arange(10.0)
    out = select_classes(pos, hard, 6, 0.5, torch.Generator().manual_seed(0))
    assert len(out) == 6 and {1, 3, 9, 8}.issubset(out.tolist()) and torch.equal(out, out.sort().values)
    too_many = select_classes(torch.ones(10, dtype=torch.bool), None, 4, 0.5, torch.Generator().manual_seed(0))
    assert len(too_many) == 4 and len(set(too_many.tolist())) == 4
    assert len(select_classes(pos, None, 50, 0.5)) == 10


def test_resolve_text_budget():
    assert resolve_text_budget(80, None, 100, 32) is None  # auto, small C: exact
    assert resolve_text_budget(1000, None, 100, 32) == 32  # auto, large C: budgeted
    assert resolve_text_budget(16, 4, 100, 32) == 4  # forced
    assert resolve_text_budget(16, 16, 100, 32) is None  # a budget of every class is exact
    with pytest.raises(CapnetError, match="text_budget"):
        resolve_text_budget(16, 0, 100, 32)


def test_config_forces_the_budget_and_the_sparse_graph(toy_random):
    raw = {"backbone": "toy.random", "prompts": {"n_ctx": 4, "class_specific": True}, "gcn": {"hidden": 16},
           "graph": {"topk": 2, "sparse": True}, "text_budget": 4}
    model = build_model(config_from_dict({"model": raw}), NAMES)
    assert model.text_budget == 4 and model.adjacency.is_sparse
    model.train()
    model.start_epoch(0)
    emb = model.step_class_embeddings(StepInputs(torch.eye(C)[:2]))
    logits = model(torch.randn(2, 3, 32, 32), emb)
    logits.sum().backward()
    rows = (model.prompt_learner.ctx.grad.abs().sum(dim=(1, 2)) > 0).sum()
    assert emb.shape == (C, model.class_embeddings().shape[1]) and int(rows) == 4
    model.eval()
    with torch.no_grad():
        assert model.class_embeddings().shape[0] == C


def test_sparse_label_graph_round_trips_through_the_saved_model_state():
    """safetensors holds dense tensors only: a sparse adjacency is saved as indices/values/shape."""
    from safetensors.torch import load, save

    from capnet.run_files import EXTRA_STATE_KEYS, extra_state, load_extra_state

    m = _make()
    m.adjacency = m.adjacency.to_sparse().coalesce()
    saved = load(save(extra_state(m)))
    assert set(saved) <= set(EXTRA_STATE_KEYS) and "graph.adjacency" not in saved
    twin = _make()
    load_extra_state(twin, saved)
    assert twin.adjacency.is_sparse and torch.equal(twin.adjacency.to_dense(), m.adjacency.to_dense())


@pytest.mark.parametrize("sparse", [False, True])
def test_budgeted_step_backward_under_bf16_autocast(sparse):
    """The subset GCN and the sparse product run under bf16 autocast (the training loop's setting)."""
    m = _make(budget=3).train()
    if sparse:
        m.adjacency = m.adjacency.to_sparse().coalesce()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        emb = m.budgeted_embeddings(torch.tensor([0, 4, 8]))
        logits = m(torch.randn(2, 3, 32, 32), emb)
    logits.float().sum().backward()
    assert m.gcn.layers[0].weight.grad.abs().sum() > 0 and m.prompt_learner.ctx.grad[[0, 4, 8]].abs().sum() > 0


def test_adamw_step_keeps_rows_outside_the_budgeted_subset():
    """Lazy updates: an AdamW step moves only the subset's prompt rows, whose moments alone change."""

    m = _make(class_specific=True, budget=3).train()
    opt = torch.optim.AdamW([m.prompt_learner.ctx], lr=0.1, weight_decay=0.5)
    rows = torch.tensor([1, 4, 7])
    others = torch.tensor([i for i in range(C) if i not in rows.tolist()])
    for step in range(3):  # later steps carry moments from earlier ones: those must stay too
        with torch.no_grad():
            m.refresh_text_bank()
        sel = rows if step != 1 else torch.tensor([0, 1, 2])
        before = m.prompt_learner.ctx.detach().clone()
        moments = {k: v.clone() for k, v in opt.state.get(m.prompt_learner.ctx, {}).items() if torch.is_tensor(v) and v.dim()}
        m.budgeted_embeddings(sel).pow(2).sum().backward()
        with m.around_optimizer_step(opt):
            opt.step()
        opt.zero_grad()
        rest = torch.tensor([i for i in range(C) if i not in sel.tolist()])
        ctx = m.prompt_learner.ctx.detach()
        assert torch.equal(ctx[rest], before[rest]) and not torch.equal(ctx[sel], before[sel])
        for k, v in moments.items():
            assert torch.equal(opt.state[m.prompt_learner.ctx][k][rest], v[rest]), k
    # without the restore the same step moves the other rows (decay + stale moments): the guard matters
    before = m.prompt_learner.ctx.detach().clone()
    m.budgeted_embeddings(rows).pow(2).sum().backward()
    opt.step()
    assert not torch.equal(m.prompt_learner.ctx.detach()[others], before[others])


def test_keep_rows_steps_only_the_subset_as_a_full_step_then_restore_would():
    """KeepRows steps a proxy of the subset's rows: the same values and moments as stepping the
    whole parameter and putting the other rows (and their moments) back."""

    def run(proxy: bool):
        m = _make(class_specific=True, budget=3, residual=True).train()
        opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=0.05, weight_decay=0.1)
        gen = torch.Generator().manual_seed(0)
        for _ in range(5):
            rows = torch.randperm(C, generator=gen)[:3]
            (m.budgeted_embeddings(rows) * torch.randn(C, 32, generator=gen)).sum().backward()
            ctx = m.prompt_learner.ctx
            if proxy:
                with m.around_optimizer_step(opt):
                    opt.step()
            else:
                others = torch.ones(C, dtype=torch.bool)
                others[rows] = False
                saved = {k: v[others].clone() for k, v in opt.state.get(ctx, {}).items() if v.dim()}
                value = ctx.detach()[others].clone()
                opt.step()
                with torch.no_grad():
                    ctx[others] = value
                    for k, v in saved.items():
                        opt.state[ctx][k][others] = v
            opt.zero_grad()
        return m, opt.state[m.prompt_learner.ctx]

    (a, sa), (b, sb) = run(True), run(False)
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), name
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
