"""The SSTN's sparse affinity graph: nodes, kept rows laid out in blocks, exact top-k, edge weights,
propagation and the training graph's statistics.

Shapes (N nodes, M columns, k kept neighbours per row, D node feature width, E affinity width)::

    Nodes.x            [N, D]   unified features (see :func:`unify`)
    Nodes.sh, Nodes.sp [N, E]   unit affinity embeddings (``sp`` None without a specific branch)
    Graph.index        [N, k]   kept neighbours (column ids), block by block
    Graph.weight       [N, k]   row-normalised weights (0 for padding)
    Graph.value        [N, k]   kept similarities (``-inf`` for padding)
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from cmssft.evaluation.graph_stats import edge_statistics
from cmssft.scoring import KeptEdges

EPS = 1e-6
NEG_INF = float("-inf")


class Nodes(NamedTuple):
    """Graph nodes: unified features ``x [N, D]``, unit affinity embeddings ``sh``/``sp`` ``[N, E]``
    (``sp`` None without a specific branch) and ``modality`` long ``[N]``."""

    x: torch.Tensor
    sh: torch.Tensor
    sp: torch.Tensor | None
    modality: torch.Tensor


class Graph(NamedTuple):
    """Sparse row-normalised affinity: row i keeps ``index[i]`` (``[N, k]``, block by block, each
    block sorted by decreasing similarity, ties to the lower node id) with weights ``weight[i]`` and
    similarities ``value[i]`` (``-inf`` marks padding, whose weight is 0)."""

    index: torch.Tensor
    weight: torch.Tensor
    value: torch.Tensor

    @property
    def valid(self) -> torch.Tensor:
        return self.value > NEG_INF

    def edges(self, offset: int = 0) -> KeptEdges:
        """The kept edges for :mod:`~cmssft.evaluation.graph_stats`, node ids shifted by ``offset``."""
        return KeptEdges(self.index + offset, self.weight, self.valid)


class Block(NamedTuple):
    """One block of a kept row: ``kind`` (``all``, ``intra`` or ``cross``) over columns ``start..start+width``."""

    kind: str
    start: int
    width: int


def row_layout(topk: int, cross_k: int) -> tuple[Block, ...]:
    """The blocks of a kept row: one ``all`` block (``cross_k = 0``), else intra then cross."""
    if cross_k == 0:
        return (Block("all", 0, topk),)
    return (Block("intra", 0, topk - cross_k), Block("cross", topk - cross_k, cross_k))


def slice_nodes(nodes: Nodes, start: int, stop: int) -> Nodes:
    """Nodes ``start..stop``."""
    return Nodes(*(t[start:stop] if t is not None else None for t in nodes))


def take_nodes(nodes: Nodes, ids: torch.Tensor) -> Nodes:
    """Nodes ``ids`` (``[n]`` long), in that order."""
    return Nodes(*(t.index_select(0, ids) if t is not None else None for t in nodes))


def unify(
    shared: torch.Tensor, specific: torch.Tensor | None, modality: torch.Tensor, num_modalities: int = 2
) -> torch.Tensor:
    """Zero-padded unified features ``[h_sh, h_sp_0, ..., h_sp_{M-1}]``, only the own slot filled."""
    if specific is None:
        return shared
    slots = [specific * (modality == m).unsqueeze(1).to(specific.dtype) for m in range(num_modalities)]
    return torch.cat([shared, *slots], dim=1)


def _raw_weights(value: torch.Tensor, normalize: str, temperature: float) -> torch.Tensor:
    """Unnormalised positive weights of kept similarities ``[N, k]``, 0 for padding; softmax terms are
    relative to each row's largest valid value (so only ratios within a row are meaningful)."""
    value = value.float()
    valid = value > NEG_INF
    if value.shape[1] == 0:
        return value
    if normalize == "softmax":
        top = value.max(dim=1, keepdim=True).values.clamp_min(-1e30)  # a row of padding only: any finite
        return torch.exp((value - top) / temperature) * valid
    if normalize == "sum":
        return ((1.0 + value) / 2.0).clamp_min(EPS) * valid
    raise ValueError(f"unknown normalisation {normalize!r}")


def edge_weights(
    value: torch.Tensor, normalize: str, temperature: float, shares: list[tuple[int, int, float]] | None = None
) -> torch.Tensor:
    """Row-normalise kept similarities ``[N, k]``: softmax(S / T), or (1 + S) / 2 over its row sum.

    Padding (``-inf``) gets weight 0; a row without valid entries gets all zeros. ``shares``
    (``(start, width, share)`` per block) normalises each block apart, block b carrying ``share``
    of the row, the shares renormalised over the row's non-empty blocks.
    """
    if value.shape[1] == 0:
        return value.float()
    if shares is None:
        return _normalise(_raw_weights(value, normalize, temperature))
    parts, masses = [], []
    for start, width, share in shares:
        raw = _raw_weights(value[:, start : start + width], normalize, temperature)
        parts.append(_normalise(raw))
        masses.append(share * (raw.sum(dim=1, keepdim=True) > 0).float())
    total = torch.stack(masses).sum(dim=0).clamp_min(1e-12)
    return torch.cat([w * (m / total) for w, m in zip(parts, masses, strict=True)], dim=1)


def _normalise(raw: torch.Tensor) -> torch.Tensor:
    return raw / raw.sum(dim=1, keepdim=True).clamp_min(1e-30)


# Rows at most this wide are simply sorted; wider rows go through torch.topk (O(m), not O(m log m)).
_SORT_MAX_COLS = 256


def top_k(
    similarity: torch.Tensor, k: int, columns: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exactly ``k`` largest entries per row, ties broken towards the lower column (stable sort);
    ``k`` beyond the row's width pads with ``-inf`` values (index 0).

    ``columns`` (a permutation, ``[m]``): column j of ``similarity`` is node ``columns[j]``; the
    returned indices are then node ids, and ties go to the lower node id.

    Wide rows: ``torch.topk`` keeps k + 1 entries; a row whose (k+1)-th value equals its k-th (a
    tie across the cut, where node order decides) falls back to the stable sort in node order. The
    others keep their k nodes, put in id order and then stably sorted by value, so equal values
    inside the kept set are in id order too.
    """
    n, m = similarity.shape
    if k > m:
        value, index = top_k(similarity, m, columns)
        pad = k - m
        return (
            torch.cat([value, value.new_full((n, pad), NEG_INF)], dim=1),
            torch.cat([index, index.new_zeros((n, pad))], dim=1),
        )
    if m <= _SORT_MAX_COLS or k == 0 or k >= m:
        value, index = torch.sort(_in_node_order(similarity, columns), dim=1, descending=True, stable=True)
        return value[:, :k], index[:, :k]
    value, index = torch.topk(similarity, k + 1, dim=1, sorted=True)
    tied = value[:, k] == value[:, k - 1]
    value, index = value[:, :k], index[:, :k] if columns is None else columns[index[:, :k]]
    index, pos = index.sort(dim=1)
    value = value.gather(1, pos)
    if bool(tied.any()):
        rows = tied.nonzero().squeeze(1)
        exact = torch.sort(_in_node_order(similarity[rows], columns), dim=1, descending=True, stable=True)
        index[rows], pos = exact.indices[:, :k].sort(dim=1)
        value[rows] = exact.values[:, :k].gather(1, pos)
    order = torch.sort(value, dim=1, descending=True, stable=True).indices
    return value.gather(1, order), index.gather(1, order)


def _in_node_order(similarity: torch.Tensor, columns: torch.Tensor | None) -> torch.Tensor:
    if columns is None:
        return similarity
    return torch.empty_like(similarity).index_copy_(1, columns, similarity)


def propagate(graph: Graph, x: torch.Tensor) -> torch.Tensor:
    """``z = A x`` for a sparse ``A``: ``[N, k]`` graph and ``[M, D]`` features -> ``[N, D]``."""
    return (graph.weight.to(x.dtype).unsqueeze(-1) * x[graph.index]).sum(dim=1)


def affinity_stats(
    graph: Graph, modality: torch.Tensor, labels: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """Training-graph statistics for logging (:func:`~cmssft.evaluation.graph_stats.edge_statistics`
    under ``sstn/``) plus the mean kept similarity; detached 0-d tensors on the graph's device, nan
    where nothing was counted (nothing is read back here: the trainer reads them at its log steps)."""
    with torch.no_grad():
        values = edge_statistics(graph.edges(), modality, labels, on_device=True).items()
        stats = {f"sstn/{k}": v for k, v in values}
        valid = graph.valid
        stats["sstn/kept_similarity"] = (graph.value.float() * valid).sum() / valid.sum().clamp_min(1)
    return stats
