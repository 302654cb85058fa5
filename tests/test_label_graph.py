"""Label graphs: each pipeline step's invariant and a hand-computed example."""
import numpy as np
import pytest
import torch

from capnet.errors import CapnetError
from capnet.models.label_graph import (
    GraphInputs,
    conditional_probability,
    cooccurrence_matrix,
    normalize_adjacency,
    reweight,
    sparsify,
    text_similarity,
    zero_diagonal,
)
from capnet.registry import GRAPHS


def _emb(c=6, d=8, seed=0):
    return torch.randn(c, d, generator=torch.Generator().manual_seed(seed))


def test_text_similarity_is_cosine():
    emb = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 2.0]])
    sim = text_similarity(emb)
    r = 2 ** -0.5
    assert torch.allclose(sim, torch.tensor([[1, r, 0], [r, 1, r], [0, r, 1.0]]), atol=1e-6)


def test_zero_diagonal_before_reweighting():
    sim = zero_diagonal(text_similarity(_emb()))
    assert torch.all(sim.diagonal() == 0)
    assert torch.all(sparsify(text_similarity(_emb()), topk=3).diagonal() == 0)


@pytest.mark.parametrize("k", [1, 2, 4])
def test_topk_keeps_exactly_k_per_row(k):
    sim = zero_diagonal(text_similarity(_emb())).abs() + 0.01  # all positive off-diagonal
    out = sparsify(zero_diagonal(sim), topk=k)
    assert torch.all((out > 0).sum(dim=1) == k)
    # the kept ones are the k largest of each row
    for i in range(sim.shape[0]):
        row = sim[i].clone()
        row[i] = -1
        assert set(out[i].nonzero().flatten().tolist()) == set(row.topk(k).indices.tolist())


def test_threshold_and_negative_clamp():
    sim = torch.tensor([[1.0, 0.5, -0.3], [0.5, 1.0, 0.2], [-0.3, 0.2, 1.0]])
    out = sparsify(sim, topk=None, threshold=0.3)
    assert torch.equal(out, torch.tensor([[0, 0.5, 0], [0.5, 0, 0], [0, 0, 0.0]]))
    assert torch.all(sparsify(sim).ge(0))


def test_reweight_row_mass():
    adj = sparsify(zero_diagonal(text_similarity(_emb())).abs() + 0.01, topk=3)
    out = reweight(adj, p=0.2)
    off = zero_diagonal(out)
    assert torch.allclose(off.sum(dim=1), torch.full((6,), 0.2))
    assert torch.allclose(out.diagonal(), torch.full((6,), 0.8))


def test_reweight_isolated_node_keeps_self_weight_one():
    adj = torch.tensor([[0, 1.0, 0], [1.0, 0, 0], [0, 0, 0]])
    out = reweight(adj, p=0.3)
    assert torch.allclose(out, torch.tensor([[0.7, 0.3, 0], [0.3, 0.7, 0], [0, 0, 1.0]]))


def test_normalize_is_symmetric_and_hand_computed():
    a = torch.tensor([[0.8, 0.2, 0.0], [0.1, 0.8, 0.1], [0.0, 0.2, 0.8]])
    out = normalize_adjacency(a)
    assert torch.allclose(out, out.T)
    sym = torch.tensor([[0.8, 0.15, 0.0], [0.15, 0.8, 0.15], [0.0, 0.15, 0.8]])
    d = sym.sum(1)  # 0.95, 1.1, 0.95
    expected = sym / torch.sqrt(d[:, None] * d[None, :])
    assert torch.allclose(out, expected, atol=1e-6)
    assert out[0, 1].item() == pytest.approx(0.15 / (0.95 * 1.1) ** 0.5, abs=1e-6)


def test_cooccurrence_conditional_probability_hand_computed():
    labels = np.array([[1, 1, 0], [1, 0, 0], [1, 1, 1], [0, 0, 1]])
    m = cooccurrence_matrix(labels)
    assert torch.equal(m, torch.tensor([[3, 2, 1], [2, 2, 1], [1, 1, 2]], dtype=torch.float64))
    p = conditional_probability(m)
    assert p[0, 1].item() == pytest.approx(2 / 3)  # P(1 | 0)
    assert p[1, 0].item() == pytest.approx(1.0)  # P(0 | 1)
    assert p[2, 0].item() == pytest.approx(0.5)


def test_registered_sources():
    c = 5
    inputs = GraphInputs(c, lambda: _emb(c), np.eye(c, dtype=int)[[0, 1, 1, 2, 3, 4, 0]] | np.eye(c, dtype=int)[[1, 2, 0, 3, 4, 0, 4]])
    for name in ("text", "cooccurrence", "none"):
        adj = GRAPHS.build(name, inputs, topk=2, threshold=None, p=0.2, tau=0.4)
        assert adj.shape == (c, c)
        assert torch.allclose(adj, adj.T, atol=1e-6)
        assert torch.isfinite(adj).all()
    assert torch.equal(GRAPHS.build("none", inputs, topk=2, threshold=None, p=0.2, tau=0.4), torch.eye(c))


def test_cooccurrence_needs_labels():
    with pytest.raises(CapnetError, match="training labels"):
        GRAPHS.build("cooccurrence", GraphInputs(3, lambda: _emb(3)), topk=None, threshold=None, p=0.2, tau=0.4)
