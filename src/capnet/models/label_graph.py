"""Label-correlation graphs for the GCN (CAPNET Sec. 3.3; ML-GCN, Chen et al., CVPR 2019).

Pipeline for every non-trivial graph:
  raw affinity (zero diagonal) -> sparsify -> ``reweight`` (ML-GCN's p re-weighting: each
  row's off-diagonal mass becomes p, the self weight 1 - p) -> ``normalize_adjacency``.

Final normalisation (explicit choice): the re-weighted matrix is row-stochastic but not
symmetric, so we first symmetrise it, ``A <- (A + A^T) / 2``, then apply ML-GCN's
``gen_adj`` normalisation ``D^-1/2 A D^-1/2`` with ``D = diag(row sums)``. ML-GCN's own
``gen_adj`` computes ``D^-1/2 A^T D^-1/2``; on a symmetric matrix the two coincide, and the
result is symmetric with eigenvalues in [-1, 1], so stacked layers stay well scaled.

``norm="row"`` skips that last step and keeps the re-weighted matrix as it is (rows sum to 1:
p over the neighbours, 1 - p on the diagonal, no symmetrisation, no D^-1/2), as LT-GCN builds its
GCN relation (Wang-zuozheng/LT-GCN model.py: ``relation / relation.sum(1) * p``, diagonal 1 - p).

Differences from ML-GCN's code, on purpose: ML-GCN normalises columns and then adds a self
weight of 1 (not 1 - p); we follow the paper's text (rows sum to p, self weight 1 - p).
Sources registered in GRAPHS: ``text`` (class-name embedding similarity, CAPNET's default: no
training labels needed), ``cooccurrence`` (ML-GCN conditional probabilities from TRAIN
labels) and ``none`` (identity: the GCN then acts on each class alone).

At 10,000+ classes a dense (C, C) matrix is 400 MB per copy, so the ``text`` source switches
(``sparse=None``: above ``SPARSE_ABOVE`` classes) to ``sparse_text_graph``: cosine similarity
and top-k in row chunks, the same re-weighting and normalisation on a sparse COO matrix. It
equals the dense pipeline (to float rounding) for the same top-k / threshold settings.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from capnet.errors import CapnetError
from capnet.registry import GRAPHS

SPARSE_ABOVE = 2000  # text graphs over more classes than this are built and kept sparse (graph.sparse=null)


def text_similarity(emb: torch.Tensor) -> torch.Tensor:
    """(C, D) class-name embeddings -> (C, C) cosine similarities."""
    unit = F.normalize(emb.float(), dim=-1)
    return unit @ unit.T


def zero_diagonal(adj: torch.Tensor) -> torch.Tensor:
    """Copy of ``adj`` with self-affinities removed (the GCN's self weight is set by reweight)."""
    return adj * (1.0 - torch.eye(adj.shape[0], dtype=adj.dtype, device=adj.device))


def sparsify(sim: torch.Tensor, topk: Optional[int] = None, threshold: Optional[float] = None) -> torch.Tensor:
    """Keep each row's ``topk`` strongest off-diagonal entries and/or those >= ``threshold``.

    Kept entries keep their (clamped non-negative) weights; the diagonal is never selected
    and is returned as zero; ``topk`` above C - 1 keeps all C - 1 neighbours. With both
    rules an entry must pass both.
    """
    c = sim.shape[0]
    off = torch.eye(c, dtype=torch.bool, device=sim.device)
    keep = ~off
    if topk is not None:
        if topk < 0:
            raise CapnetError(f"graph.topk={topk} must be >= 0")
        ranked = sim.masked_fill(off, float("-inf"))
        idx = ranked.topk(min(topk, c - 1), dim=1).indices
        top = torch.zeros_like(keep).scatter_(1, idx, True)
        keep = keep & top
    if threshold is not None:
        keep = keep & (sim >= threshold)
    return torch.where(keep, sim.clamp(min=0.0), torch.zeros_like(sim))


def reweight(adj: torch.Tensor, p: float) -> torch.Tensor:
    """ML-GCN re-weighting: off-diagonal row mass p, diagonal 1 - p (rows with no edges: 1)."""
    if not 0.0 <= p <= 1.0:
        raise CapnetError(f"graph.p={p} must be in [0, 1]")
    off = zero_diagonal(adj.float())
    sums = off.sum(dim=1, keepdim=True)
    has_edges = sums > 0
    off = torch.where(has_edges, p * off / sums.clamp(min=1e-12), torch.zeros_like(off))
    diag = torch.where(has_edges.squeeze(1), torch.full_like(sums.squeeze(1), 1.0 - p), torch.ones_like(sums.squeeze(1)))
    return off + torch.diag(diag)


def normalize_adjacency(adj: torch.Tensor, symmetrize: bool = True) -> torch.Tensor:
    """``D^-1/2 A D^-1/2`` (after ``A <- (A + A^T)/2`` when ``symmetrize``), D = row sums."""
    a = adj.float()
    if symmetrize:
        a = (a + a.T) / 2
    deg = a.sum(dim=1)
    inv_sqrt = torch.where(deg > 0, deg.clamp(min=1e-12).rsqrt(), torch.zeros_like(deg))
    return inv_sqrt[:, None] * a * inv_sqrt[None, :]


NORMS = ("symmetric", "row")  # graph.norm: D^-1/2 ((A + A^T)/2) D^-1/2, or the re-weighted rows as they are


def finish(adj: torch.Tensor, norm: str = "symmetric") -> torch.Tensor:
    """The last step of every graph: ``normalize_adjacency`` (symmetric) or nothing (row, LT-GCN)."""
    if norm not in NORMS:
        raise CapnetError(f"graph.norm={norm!r} is not one of {', '.join(NORMS)}")
    return normalize_adjacency(adj) if norm == "symmetric" else adj.float()


def cooccurrence_matrix(labels: np.ndarray) -> torch.Tensor:
    """(N, C) multi-hot TRAIN labels -> (C, C) counts M_ij = #images with i and j (M_ii = N_i)."""
    y = torch.as_tensor(np.asarray(labels), dtype=torch.float64)
    if y.ndim != 2:
        raise CapnetError(f"co-occurrence graph needs (N, C) multi-hot labels, got shape {tuple(y.shape)}")
    y = (y > 0).double()
    return y.T @ y


def conditional_probability(counts: torch.Tensor) -> torch.Tensor:
    """ML-GCN's P(j | i) = M_ij / N_i (rows of never-seen classes are zero)."""
    n = counts.diagonal().clamp(min=0)
    return torch.where(n[:, None] > 0, counts / n[:, None].clamp(min=1), torch.zeros_like(counts))


# ------------------------------------------------------------------------ registered sources

@dataclass(frozen=True)
class GraphInputs:
    """What a graph source may use; the text embeddings are computed only if asked for."""

    num_classes: int
    text_embeddings: Callable[[], torch.Tensor]  # () -> (C, D) template-ensemble class-name embeddings
    train_labels: Optional[np.ndarray] = None  # (N, C) multi-hot TRAIN labels (never val/test)


def _chunk_edges(unit: torch.Tensor, lo: int, hi: int, topk: Optional[int], threshold: Optional[float]
                 ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Kept off-diagonal edges of rows lo..hi: ((2, n) global indices, (n,) clamped weights), as ``sparsify``."""
    c = unit.shape[0]
    sim = unit[lo:hi] @ unit.T
    rows = torch.arange(lo, hi)
    diag = torch.zeros_like(sim, dtype=torch.bool)
    diag[rows - lo, rows] = True
    keep = ~diag
    if topk is not None:
        idx = sim.masked_fill(diag, float("-inf")).topk(min(topk, c - 1), dim=1).indices
        keep = keep & torch.zeros_like(keep).scatter_(1, idx, True)
    if threshold is not None:
        keep = keep & (sim >= threshold)
    keep = keep & (sim > 0)  # clamped to zero by sparsify: no edge
    r, col = keep.nonzero(as_tuple=True)
    return torch.stack([r + lo, col]), sim[r, col]


def sparse_text_graph(emb: torch.Tensor, topk: Optional[int], threshold: Optional[float], p: float,
                      chunk: int = 2048, norm: str = "symmetric") -> torch.Tensor:
    """(C, D) class-name embeddings -> (C, C) sparse COO adjacency, never a dense (C, C) matrix.

    Same steps as the dense ``text`` graph: similarity and top-k/threshold per row chunk
    (``chunk`` rows x C at a time), ML-GCN re-weighting, then (``norm="symmetric"``)
    symmetrisation and ``D^-1/2 A D^-1/2``, or (``"row"``) the re-weighted rows as they are.
    """
    if norm not in NORMS:
        raise CapnetError(f"graph.norm={norm!r} is not one of {', '.join(NORMS)}")
    if topk is not None and topk < 0:
        raise CapnetError(f"graph.topk={topk} must be >= 0")
    if not 0.0 <= p <= 1.0:
        raise CapnetError(f"graph.p={p} must be in [0, 1]")
    unit = F.normalize(emb.detach().float().cpu(), dim=-1)
    c = unit.shape[0]
    parts = [_chunk_edges(unit, lo, min(lo + chunk, c), topk, threshold) for lo in range(0, c, max(1, chunk))]
    idx, val = torch.cat([q[0] for q in parts], 1), torch.cat([q[1] for q in parts])
    sums = torch.zeros(c).index_add_(0, idx[0], val)  # reweight: off-diagonal row mass p, self 1 - p
    val = p * val / sums[idx[0]]
    has_edges = sums > 0
    self_w = torch.where(has_edges, torch.full((c,), 1.0 - p), torch.ones(c))
    diag = torch.arange(c)
    idx = torch.cat([idx, torch.stack([diag, diag])], 1)
    val = torch.cat([val, self_w])
    if norm == "row":
        return torch.sparse_coo_tensor(idx, val, (c, c), check_invariants=False).coalesce()
    sym = torch.sparse_coo_tensor(torch.cat([idx, idx.flip(0)], 1), torch.cat([val, val]) / 2, (c, c), check_invariants=False).coalesce()
    idx, val = sym.indices(), sym.values()
    deg = torch.zeros(c).index_add_(0, idx[0], val)
    inv_sqrt = torch.where(deg > 0, deg.clamp(min=1e-12).rsqrt(), torch.zeros_like(deg))
    return torch.sparse_coo_tensor(idx, inv_sqrt[idx[0]] * val * inv_sqrt[idx[1]], (c, c), check_invariants=False).coalesce()


@GRAPHS.register("text")
def text_graph(inputs: GraphInputs, topk: Optional[int], threshold: Optional[float], p: float, tau: float,
               sparse: Optional[bool] = None, chunk: int = 2048, norm: str = "symmetric") -> torch.Tensor:
    """Cosine similarity of class-name embeddings -> sparsify -> reweight -> normalise (``norm``).

    ``sparse``: build and return a sparse COO matrix in row chunks (None: when C > SPARSE_ABOVE).
    """
    with torch.no_grad():
        emb = inputs.text_embeddings().detach().cpu()
        if _use_sparse(sparse, inputs.num_classes):
            return sparse_text_graph(emb, topk, threshold, p, chunk, norm)
        sim = zero_diagonal(text_similarity(emb))
    return finish(reweight(sparsify(sim, topk, threshold), p), norm)


def _use_sparse(sparse: Optional[bool], num_classes: int) -> bool:
    """graph.sparse: true/false, or null = sparse above SPARSE_ABOVE classes."""
    return bool(sparse) if sparse is not None else num_classes > SPARSE_ABOVE


@GRAPHS.register("cooccurrence")
def cooccurrence_graph(inputs: GraphInputs, topk: Optional[int], threshold: Optional[float], p: float, tau: float,
                       sparse: Optional[bool] = None, chunk: int = 2048, norm: str = "symmetric") -> torch.Tensor:
    """ML-GCN: P(j|i) from train labels, binarised at tau -> reweight -> normalise (the counts are
    (C, C) by nature; ``sparse`` only changes what is kept)."""
    if inputs.train_labels is None:
        raise CapnetError("graph.source=cooccurrence needs the training labels; none were given")
    prob = zero_diagonal(conditional_probability(cooccurrence_matrix(inputs.train_labels)).float())
    if prob.shape[0] != inputs.num_classes:
        raise CapnetError(f"train labels have {prob.shape[0]} classes, the model has {inputs.num_classes}")
    binary = (prob >= tau).float()
    adj = finish(reweight(binary, p), norm)
    return adj.to_sparse().coalesce() if _use_sparse(sparse, inputs.num_classes) else adj


@GRAPHS.register("none")
def identity_graph(inputs: GraphInputs, topk: Optional[int], threshold: Optional[float], p: float, tau: float,
                   sparse: Optional[bool] = None, chunk: int = 2048, norm: str = "symmetric") -> torch.Tensor:
    """No correlations: the identity adjacency (sparse when ``sparse``, or above SPARSE_ABOVE classes)."""
    if _use_sparse(sparse, inputs.num_classes):
        diag = torch.arange(inputs.num_classes)
        return torch.sparse_coo_tensor(torch.stack([diag, diag]), torch.ones(inputs.num_classes),
                                       (inputs.num_classes,) * 2, check_invariants=False).coalesce()
    return torch.eye(inputs.num_classes)
