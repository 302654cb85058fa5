"""GCN: shapes, zero-initialised last layer, the layer formula."""
import pytest
import torch
import torch.nn.functional as F

from capnet.errors import CapnetError
from capnet.models.gcn import GCN


@pytest.mark.parametrize("layers", [1, 2, 3])
def test_shape_and_zero_output_at_init(layers):
    gcn = GCN(dim=12, hidden=7, layers=layers)
    x = torch.randn(5, 12)
    adj = torch.rand(5, 5)
    out = gcn(adj, x)
    assert out.shape == (5, 12)
    assert torch.count_nonzero(out) == 0
    assert len(gcn.layers) == layers


def test_formula_two_layers():
    torch.manual_seed(0)
    gcn = GCN(dim=4, hidden=3, layers=2)
    with torch.no_grad():
        gcn.layers[1].weight.normal_()
    x, adj = torch.randn(6, 4), torch.rand(6, 6)
    w0, w1 = gcn.layers[0].weight, gcn.layers[1].weight
    expected = adj @ (F.leaky_relu(adj @ (x @ w0.T), 0.2) @ w1.T)
    assert torch.allclose(gcn(adj, x), expected, atol=1e-5)


def test_gradient_reaches_last_layer_at_init():
    """The zero last layer still learns: its gradient is (A H)^T dL/dout, non-zero."""
    gcn = GCN(dim=4, hidden=8, layers=2)
    (gcn(torch.eye(3) + 0.1, torch.randn(3, 4)) * torch.randn(3, 4)).sum().backward()
    assert gcn.layers[-1].weight.grad.abs().sum() > 0


def test_bad_layers():
    with pytest.raises(CapnetError):
        GCN(4, 4, layers=0)
