"""k-reciprocal re-ranking (Zhong et al., CVPR 2017), vectorised in torch on any device.

Shapes: ``q_g`` (Q, G), ``q_q`` (Q, Q), ``g_g`` (G, G) distances in; (Q, G) distances
out. N = Q + G. It follows the authors' public implementation step for step:

1. ``D`` = the (N, N) block matrix of the three inputs, squared, each column divided
   by its maximum, transposed (so row i is scaled by column i's maximum);
2. ``R(i)``: the k-reciprocal neighbours of i among its ``k1 + 1`` nearest (self
   included); each ``c`` in ``R(i)`` whose own ``round(k1 / 2)``-reciprocal set
   ``R'(c)`` shares more than 2/3 of its members with ``R(i)`` adds ``R'(c)``;
3. ``V[i, j] = exp(-D[i, j])`` over that expanded set, rows normalised to sum 1;
   with ``k2 > 1`` each row is replaced by the mean of the rows of its ``k2``
   nearest neighbours (query expansion);
4. Jaccard distance ``1 - m / (2 - m)`` with ``m = sum_k min(V[q, k], V[g, k])``,
   blended as ``(1 - lambda) * jaccard + lambda * D``.

Neighbour lists use a stable sort (ties keep index order). The N x N matrices ``D``
and ``V`` are dense (memory 2 * N^2 * itemsize); the Jaccard step walks only the
non-zeros of ``V`` (a sparse join chunked over queries), never a (Q, G, N) tensor.
"""

from __future__ import annotations

import torch
from torch import Tensor

# Pairs (query non-zero, gallery non-zero in the same column) handled per Jaccard chunk.
DEFAULT_PAIR_BUDGET = 1 << 23
SORT_CHUNK_ELEMENTS = 1 << 22


def k_reciprocal_rerank(
    q_g: Tensor,
    q_q: Tensor,
    g_g: Tensor,
    k1: int = 20,
    k2: int = 6,
    lambda_value: float = 0.3,
    pair_budget: int = DEFAULT_PAIR_BUDGET,
) -> Tensor:
    """Re-ranked (Q, G) distances; inputs keep their dtype and device."""
    num_q, num_g = q_g.shape
    if q_q.shape != (num_q, num_q) or g_g.shape != (num_g, num_g):
        raise ValueError(f"shapes disagree: q_g {tuple(q_g.shape)}, q_q {tuple(q_q.shape)}, g_g {tuple(g_g.shape)}")
    if k1 < 1 or k2 < 1:
        raise ValueError(f"k1 and k2 must be >= 1, got {k1}, {k2}")
    dist = torch.cat([torch.cat([q_q, q_g], 1), torch.cat([q_g.T, g_g], 1)], 0).pow(2)
    dist = (dist / dist.amax(0, keepdim=True)).T.contiguous()  # (N, N)
    num = dist.shape[0]
    k1 = min(k1, num - 1)
    half = min(int(round(k1 / 2)), num - 1)
    ranked = _nearest(dist, max(k1 + 1, k2))  # (N, K) nearest first
    expanded = _expanded_neighbours(ranked[:, : k1 + 1], ranked[:, : half + 1])  # (N, N) bool
    weights = torch.where(expanded, torch.exp(-dist), torch.zeros((), dtype=dist.dtype, device=dist.device))
    v = weights / weights.sum(1, keepdim=True)
    if k2 != 1:
        v = _query_expansion(v, ranked[:, :k2])
    jaccard = _jaccard_to_gallery(v, num_q, pair_budget)
    return jaccard * (1 - lambda_value) + dist[:num_q, num_q:] * lambda_value


def _nearest(dist: Tensor, k: int) -> Tensor:
    """Indices of each row's ``k`` smallest entries, stable order; (N, k) int64."""
    step = max(1, SORT_CHUNK_ELEMENTS // dist.shape[1])
    parts = [torch.sort(dist[s: s + step], dim=1, stable=True).indices[:, :k] for s in range(0, len(dist), step)]
    return torch.cat(parts)


def _reciprocal(neigh: Tensor) -> Tensor:
    """(N, k) bool: is ``i`` among the neighbours of its own ``a``-th neighbour?"""
    rows = torch.arange(len(neigh), device=neigh.device)
    return (neigh[neigh] == rows[:, None, None]).any(-1)


def _expanded_neighbours(forward: Tensor, half_forward: Tensor) -> Tensor:
    """(N, N) bool membership of each row's expanded k-reciprocal set."""
    num, device = len(forward), forward.device
    recip = _reciprocal(forward)  # (N, k1+1): R(i) = forward[i][recip[i]]
    half_recip = _reciprocal(half_forward)  # (N, h+1): R'(c) = half_forward[c][half_recip[c]]
    member = torch.zeros(num, num, dtype=torch.bool, device=device)
    rows = torch.arange(num, device=device)[:, None]
    member[rows.expand_as(forward)[recip], forward[recip]] = True  # R(i)

    cand_half = half_forward[forward]  # (N, k1+1, h+1): R'(c) candidates of each c = forward[i, a]
    cand_valid = half_recip[forward]  # (N, k1+1, h+1)
    in_r = member[rows[:, :, None].expand_as(cand_half), cand_half] & cand_valid
    accept = recip & (in_r.sum(-1) > (2.0 / 3.0) * cand_valid.sum(-1))  # (N, k1+1)
    add = accept[:, :, None] & cand_valid
    member[rows[:, :, None].expand_as(cand_half)[add], cand_half[add]] = True
    return member


def _query_expansion(v: Tensor, neighbours: Tensor) -> Tensor:
    """Row i becomes the mean of the rows of its ``k2`` nearest neighbours."""
    num, k2 = neighbours.shape
    rows = torch.arange(num, device=v.device).repeat_interleave(k2)
    values = torch.full((num * k2,), 1.0 / k2, dtype=v.dtype, device=v.device)
    index = torch.stack([rows, neighbours.reshape(-1)])
    avg = torch.sparse_coo_tensor(index, values, (num, num), check_invariants=True)
    return torch.sparse.mm(avg, v)


def _jaccard_to_gallery(v: Tensor, num_q: int, pair_budget: int) -> Tensor:
    """(Q, G) Jaccard distance of each query row of ``v`` to each gallery row, via a sparse join."""
    num = v.shape[0]
    num_g = num - num_q
    device = v.device
    g_cols, g_rows = (v[num_q:].T != 0).nonzero(as_tuple=True)  # sorted by column k, then gallery row
    col_count = torch.bincount(g_cols, minlength=num)
    col_start = torch.cumsum(col_count, 0) - col_count
    g_vals = v[num_q:][g_rows, g_cols]
    q_nonzero = v[:num_q] != 0
    pairs_per_query = (q_nonzero.to(v.dtype) @ col_count.to(v.dtype)).long()
    out = torch.empty(num_q, num_g, dtype=v.dtype, device=device)
    for start, stop in _budget_chunks(pairs_per_query, pair_budget):
        q_rows, q_cols = q_nonzero[start:stop].nonzero(as_tuple=True)
        q_vals = v[start:stop][q_rows, q_cols]
        counts = col_count[q_cols]
        owner = torch.repeat_interleave(torch.arange(len(q_cols), device=device), counts)
        offset = torch.arange(len(owner), device=device) - (torch.cumsum(counts, 0) - counts)[owner]
        slot = col_start[q_cols][owner] + offset
        overlap = torch.zeros(stop - start, num_g, dtype=v.dtype, device=device)
        overlap.index_put_((q_rows[owner], g_rows[slot]), torch.minimum(q_vals[owner], g_vals[slot]),
                           accumulate=True)
        out[start:stop] = 1 - overlap / (2 - overlap)
    return out


def _budget_chunks(cost: Tensor, budget: int) -> list[tuple[int, int]]:
    """Consecutive [start, stop) query ranges whose summed cost stays near ``budget``."""
    if len(cost) == 0:
        return []
    chunk_id = (torch.cumsum(cost, 0) - cost) // max(budget, 1)
    sizes = torch.unique_consecutive(chunk_id, return_counts=True)[1].tolist()
    stops = torch.cumsum(torch.tensor(sizes), 0).tolist()
    return list(zip([0, *stops[:-1]], stops, strict=True))
