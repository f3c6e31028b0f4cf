"""Dense reference of the SSTN's test-time scoring, for tests and benchmarks only.

It states the method the plain way: the whole ``N x N`` similarity, each block of a row kept by a
full stable sort over a masked copy of the row, a dense adjacency and the dense ``A x`` product;
single-query is one such graph per query. O(N^2) memory (and O(Q G^2) time for single-query).
:class:`~cmssft.models.sstn.SSTN` must give the same distances blockwise.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cmssft.errors import UserError
from cmssft.models.affinity_graph import Graph, Nodes, edge_weights
from cmssft.models.sstn import SSTN

Triple = tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]


def to_dense(graph: Graph, num_cols: int) -> torch.Tensor:
    """The dense ``[N, num_cols]`` affinity matrix of a sparse graph."""
    dense = graph.weight.new_zeros(graph.index.shape[0], num_cols)
    return dense.scatter_add(1, graph.index, graph.weight)


def dense_distance(sstn: SSTN, query: Triple, gallery: Triple, mode: str) -> torch.Tensor:
    """The ``[Q, G]`` cosine distances of :meth:`SSTN.distance`, computed densely (in the test graphs'
    row layout, :meth:`SSTN.test_view`)."""
    sstn = sstn.test_view()
    with torch.no_grad():
        q, g = sstn.nodes(*query), sstn.nodes(*gallery)
        if mode == "transductive":
            return _dense_transductive(sstn, q, g)
        if mode == "single_query":
            rows = [_dense_transductive(sstn, _row(q, i), g) for i in range(q.x.shape[0])]
            return torch.cat(rows) if rows else torch.empty(0, g.x.shape[0])
        raise UserError(f"SSTN test mode {mode!r} is not transductive or single_query")


def dense_adjacency(sstn: SSTN, s: torch.Tensor, modality: torch.Tensor) -> torch.Tensor:
    """``A`` of a whole ``[N, N]`` similarity: per row and block, the block's candidates (own modality,
    other modality, or all) sorted stably, the first ``width`` kept (fewer if fewer exist)."""
    n = s.shape[0]
    if not sstn.self_loops:
        s = s.clone()
        s.fill_diagonal_(float("-inf"))
    same = modality[:, None] == modality[None, :]
    values, indices = [], []
    for block in sstn.blocks:
        masked = s if block.kind == "all" else s.masked_fill(~same if block.kind == "intra" else same, float("-inf"))
        value, index = torch.sort(masked, dim=1, descending=True, stable=True)
        value, index = value[:, : block.width], index[:, : block.width]
        if value.shape[1] < block.width:  # fewer nodes than the block is wide
            pad = block.width - value.shape[1]
            value = F.pad(value, (0, pad), value=float("-inf"))
            index = F.pad(index, (0, pad))
        values.append(value)
        indices.append(index)
    value, index = torch.cat(values, dim=1), torch.cat(indices, dim=1)
    weight = edge_weights(value, sstn.normalize, sstn.temperature, sstn.block_shares)
    return torch.zeros(n, n, dtype=weight.dtype, device=s.device).scatter_add(1, index, weight)


def _dense_transductive(sstn: SSTN, q: Nodes, g: Nodes) -> torch.Tensor:
    x, sh, mod = torch.cat([q.x, g.x]), torch.cat([q.sh, g.sh]), torch.cat([q.modality, g.modality])
    s = sh @ sh.T
    if q.sp is not None and g.sp is not None:
        sp = torch.cat([q.sp, g.sp])
        s = torch.where(mod[:, None] == mod[None, :], (s + sp @ sp.T) / 2, s)
    adjacency = dense_adjacency(sstn, s, mod)
    feats = F.normalize(sstn.descriptor(x, adjacency.to(x.dtype) @ x).float(), dim=1)
    num_q = q.x.shape[0]
    return 1.0 - feats[:num_q] @ feats[num_q:].T


def _row(nodes: Nodes, i: int) -> Nodes:
    return Nodes(*(t[i : i + 1] if t is not None else None for t in nodes))
