"""Graph convolution over class embeddings (CAPNET Sec. 3.3; Kipf & Welling; ML-GCN).

``H' = LeakyReLU_0.2(A H W)`` per layer, no activation after the last one. The output width
equals the input width. ``init="zero_last"``: the last weight is zero-initialised, so CAPNET's
residual ``E = E_prompt + residual * GCN(A, E_prompt)`` starts exactly at the prompt embeddings.
``init="uniform"``: every weight ~ U(-1/sqrt(out), 1/sqrt(out)), the ``GraphConvolution`` init of
Kipf & Welling's code that ML-GCN and LT-GCN use (Wang-zuozheng/LT-GCN model.py, reset_parameters).

``A`` is a dense (C, C) tensor or a sparse COO one (``label_graph.sparse_text_graph``, for
10,000+ classes). ``rows`` computes the output of some classes only: the layers then run on
their receptive field (the classes within ``layers`` hops), aggregating before the linear map
(``A (H W) = (A H) W``: the layers have no bias), so the cost follows the subset, not C.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from capnet.errors import CapnetError

INITS = ("zero_last", "uniform")  # gcn.init


def as_sparse(adj: torch.Tensor) -> torch.Tensor:
    """A coalesced float32 sparse COO copy of a dense or sparse (C, C) adjacency."""
    out = adj if adj.is_sparse else adj.to_sparse()
    return out.coalesce().float()


def sparse_rows(adj: torch.Tensor, rows: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``adj[rows]`` of a coalesced sparse (C, C) matrix as (row positions in ``rows``, columns, values)
    stacked as ((2, nnz) indices, (nnz,) values); row-major order is kept."""
    idx, val = adj.indices(), adj.values()
    counts = torch.bincount(idx[0], minlength=adj.shape[0])
    crow = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
    start, n = crow[rows], counts[rows]
    local = torch.repeat_interleave(torch.arange(len(rows), device=rows.device), n)
    offset = torch.arange(int(n.sum()), device=rows.device) - torch.repeat_interleave(n.cumsum(0) - n, n)
    pos = torch.repeat_interleave(start, n) + offset
    return torch.stack([local, idx[1, pos]]), val[pos]


def receptive_field(adj: torch.Tensor, rows: torch.Tensor, hops: int) -> Tuple[torch.Tensor, List[torch.Tensor]]:
    """The classes a ``hops``-layer GCN output at ``rows`` depends on, and one sub-adjacency per layer.

    Returns (input classes S_0, [A[S_1, S_0], ..., A[S_hops, S_hops-1]]) with S_hops = ``rows``,
    each S_{l-1} the columns used by the rows S_l (sorted), each sub-matrix sparse COO.
    """
    adj = as_sparse(adj)
    needed, subs = rows, []
    for _ in range(hops):
        ind, val = sparse_rows(adj, needed)
        cols, inverse = torch.unique(ind[1], return_inverse=True)
        subs.append(torch.sparse_coo_tensor(torch.stack([ind[0], inverse]), val, (len(needed), len(cols)), check_invariants=False))
        needed = cols
    return needed, subs[::-1]


def propagate(adj: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``adj @ x``: dense as before (dtype of ``x``), sparse in float32 then back to ``x``'s dtype.

    The sparse product runs outside autocast: under bf16 autocast its backward fails on CPU
    (torch 2.14: "expected scalar type Float but found BFloat16").
    """
    if adj.is_sparse:
        with torch.autocast(x.device.type, enabled=False):
            return torch.sparse.mm(adj.float(), x.float()).to(x.dtype)
    return adj.to(x.dtype) @ x


class GCN(nn.Module):
    """Stacked graph convolutions ``dim -> hidden -> ... -> dim`` (``init``: zero last layer, or uniform)."""

    def __init__(self, dim: int, hidden: int, layers: int = 2, dropout: float = 0.0, init: str = "zero_last") -> None:
        super().__init__()
        if layers < 1:
            raise CapnetError(f"gcn.layers must be >= 1, got {layers}")
        if init not in INITS:
            raise CapnetError(f"gcn.init={init!r} is not one of {', '.join(INITS)}")
        widths = [dim] + [hidden] * (layers - 1) + [dim]
        self.layers = nn.ModuleList(nn.Linear(a, b, bias=False) for a, b in zip(widths[:-1], widths[1:]))
        self.dropout = dropout
        if init == "uniform":
            for layer in self.layers:  # nn.Linear's weight is (out, in): bound 1/sqrt(out) as GraphConvolution's
                bound = 1.0 / layer.out_features ** 0.5
                nn.init.uniform_(layer.weight, -bound, bound)
        else:
            nn.init.zeros_(self.layers[-1].weight)

    def _activate(self, i: int, x: torch.Tensor) -> torch.Tensor:
        if i < len(self.layers) - 1:
            x = F.leaky_relu(x, 0.2)
            x = F.dropout(x, self.dropout, self.training)
        return x

    def forward(self, adj: torch.Tensor, x: torch.Tensor, rows: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(C, C) normalised adjacency (dense or sparse), (C, dim) node features -> (C, dim),
        or (len(rows), dim) for the classes ``rows`` only (same values as ``forward(adj, x)[rows]``)."""
        if rows is None:
            for i, layer in enumerate(self.layers):
                x = self._activate(i, propagate(adj, layer(x)))
            return x
        inputs, subs = receptive_field(adj.to(x.device), rows.to(x.device), len(self.layers))
        h = x[inputs]
        for i, (layer, sub) in enumerate(zip(self.layers, subs)):
            h = self._activate(i, layer(propagate(sub, h)))
        return h
