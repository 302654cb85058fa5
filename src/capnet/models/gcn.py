"""Graph convolution over class embeddings (CAPNET Sec. 3.3; Kipf & Welling; ML-GCN).

``H' = LeakyReLU_0.2(A H W)`` per layer, no activation after the last one. The output width
equals the input width and the last weight is zero-initialised, so CAPNET's residual
``E = E_prompt + residual * GCN(A, E_prompt)`` starts exactly at the prompt embeddings.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from capnet.errors import CapnetError


class GCN(nn.Module):
    """Stacked graph convolutions ``dim -> hidden -> ... -> dim`` with a zero last layer."""

    def __init__(self, dim: int, hidden: int, layers: int = 2, dropout: float = 0.0) -> None:
        super().__init__()
        if layers < 1:
            raise CapnetError(f"gcn.layers must be >= 1, got {layers}")
        widths = [dim] + [hidden] * (layers - 1) + [dim]
        self.layers = nn.ModuleList(nn.Linear(a, b, bias=False) for a, b in zip(widths[:-1], widths[1:]))
        self.dropout = dropout
        nn.init.zeros_(self.layers[-1].weight)

    def forward(self, adj: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """(C, C) normalised adjacency, (C, dim) node features -> (C, dim)."""
        for i, layer in enumerate(self.layers):
            x = adj.to(x.dtype) @ layer(x)
            if i < len(self.layers) - 1:
                x = F.leaky_relu(x, 0.2)
                x = F.dropout(x, self.dropout, self.training)
        return x
