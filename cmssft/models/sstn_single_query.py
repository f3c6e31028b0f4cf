"""Exact single-query scoring: every query scored as if alone with the gallery, in one pass.

A one-query graph differs from the gallery's own graph only where the query enters a gallery row's
kept block (its similarity reaches the block's k-th), and a row's descriptor is affine in what it
receives; so each gallery row's descriptor is precomputed with and without its k-th neighbour
(:class:`_GalleryParts`), and only the entered (query, row) pairs are recomputed, from four dot
products. The dense, one-graph-per-query statement of the same scores is
:func:`cmssft.models.sstn_reference.dense_distance`, which the tests compare against.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import torch
import torch.nn.functional as F

from cmssft.models.affinity_graph import EPS, NEG_INF, Block, Graph, Nodes, edge_weights, propagate, slice_nodes
from cmssft.scoring import DistanceBlocks, KeptEdges

if TYPE_CHECKING:
    from cmssft.models.sstn import SSTN


class _GalleryParts(NamedTuple):
    """Single-query scoring's per-gallery-row terms when the query would enter block ``block`` of a
    row: ``[G, D']`` descriptors ``u`` (the block's k-1 kept, scaled) and ``c`` (block without
    messages), their ``[G]`` products, the block's share ``share`` of the row's weight, the
    similarity ``kth`` the query must reach (``-inf``: the block has room), and the weight mass of
    the block's normalisation group once the k-th has left (``mass``)."""

    block: Block
    u: torch.Tensor
    c: torch.Tensor
    uu: torch.Tensor
    cc: torch.Tensor
    uc: torch.Tensor
    share: torch.Tensor
    kth: torch.Tensor
    mass: torch.Tensor


class _GalleryGraph(NamedTuple):
    """The gallery's graph among its own nodes (``[G, topk]``, node order) and the unit descriptor
    ``f0_unit [G, D']`` of every gallery row that no query enters."""

    graph: Graph
    f0_unit: torch.Tensor

    @classmethod
    def build(cls, sstn: SSTN, g: Nodes) -> _GalleryGraph:
        f0, graph = sstn.describe(g)
        return cls(graph, f0 / f0.norm(dim=1, keepdim=True).clamp_min(1e-12))


def single_query_distance(sstn: SSTN, q: Nodes, g: Nodes) -> DistanceBlocks:
    """``[Q, G]`` cosine distances of every query of ``q`` in its own one-query graph with the gallery ``g``
    (``sstn`` builds the graphs: pass its :meth:`~cmssft.models.sstn.SSTN.test_view`); ``.edges()`` gives
    each query's kept edges in its graph and the gallery's among themselves, queries numbered first."""
    gallery_graph = _GalleryGraph.build(sstn, g)
    parts = [_gallery_parts(sstn, g, gallery_graph, block) for block in _blocks_a_query_enters(sstn, q, g)]
    num_q = q.x.shape[0]

    def block(start: int, stop: int) -> torch.Tensor:
        return 1.0 - _single_query_cosine(sstn, slice_nodes(q, start, stop), g, gallery_graph, parts)

    def edges() -> KeptEdges:
        kept = []
        for start in range(0, num_q, sstn.chunk):
            stop = min(start + sstn.chunk, num_q)
            graph = _query_graph(sstn, slice_nodes(q, start, stop), g)[1]
            own = torch.arange(start, stop, device=graph.index.device).unsqueeze(1)  # self loop: index -1
            kept.append(KeptEdges(torch.where(graph.index < 0, own, graph.index + num_q), graph.weight,
                                  graph.valid))
        kept.append(gallery_graph.graph.edges(offset=num_q))
        return KeptEdges(*(torch.cat([e[i] for e in kept]) for i in range(3)))

    return DistanceBlocks((num_q, g.x.shape[0]), block, block_rows=sstn.chunk, device=g.x.device, edges=edges)


def _blocks_a_query_enters(sstn: SSTN, q: Nodes, g: Nodes) -> list[Block]:
    """The blocks of gallery rows that some query can enter: all, or intra/cross by modality pairs."""
    q_mods, g_mods = set(q.modality.unique().tolist()), set(g.modality.unique().tolist())
    needed = []
    for block in sstn.blocks:
        if block.width == 0:
            continue
        if block.kind == "all" or (block.kind == "intra" and q_mods & g_mods) or (
            block.kind == "cross" and any(a != b for a in q_mods for b in g_mods)
        ):
            needed.append(block)
    return needed


def _gallery_parts(sstn: SSTN, g: Nodes, gg: _GalleryGraph, block: Block) -> _GalleryParts:
    """The affine parts of every gallery row's descriptor once a query enters ``block``.

    With the query entered, the block keeps its first ``width - 1`` gallery neighbours and the
    query (the ``width``-th leaves; if the block had room, nothing leaves: its last column is
    padding). The row's message is then ``Z_other + share (alpha z_red + (1 - alpha) x_q)``
    where ``z_red`` is the normalised message of the query's normalisation group without the
    query and ``alpha`` that group's weight share left to it, so the descriptor is
    ``alpha u + (1 - alpha) (c + share m_q)`` with ``u = D(x, Z_other + share z_red)``,
    ``c = D(x, Z_other)``, ``m_q = M x_q`` (D affine: ``D(x, z) = L x + M z + b``).
    """
    graph, x = gg.graph, g.x
    last = block.start + block.width - 1
    kept = torch.ones_like(graph.valid)
    kept[:, last] = False  # the block's width-th, which the query evicts
    value = graph.value.masked_fill(~kept, NEG_INF)
    if sstn.block_shares is None:  # one normalisation group: the whole row
        group = value
        z_red = propagate(Graph(graph.index, edge_weights(value, sstn.normalize, sstn.temperature), value), x)
        z_other, share = torch.zeros_like(z_red), torch.ones(x.shape[0], device=x.device)
    else:
        group = value[:, block.start : block.start + block.width]
        z_other, share = _other_blocks(sstn, graph, x, block)
        blk = Graph(graph.index[:, block.start : block.start + block.width],
                    edge_weights(group, sstn.normalize, sstn.temperature), group)
        z_red = propagate(blk, x)
    share_col = share.unsqueeze(1).to(x.dtype)
    u = sstn.descriptor(x, z_other + share_col * z_red).float()
    c = sstn.descriptor(x, z_other).float()
    return _GalleryParts(
        block=block,
        u=u,
        c=c,
        uu=(u * u).sum(1),
        cc=(c * c).sum(1),
        uc=(u * c).sum(1),
        share=share.float(),
        kth=graph.value[:, last].float(),
        mass=_mass(sstn, group),
    )


def _other_blocks(sstn: SSTN, graph: Graph, x: torch.Tensor, entered: Block) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-normalised rows once the query enters ``entered``: the other blocks' message ``[G, D]``
    and the entered block's share ``[G]`` (shares renormalised over the blocks then non-empty)."""
    valid = graph.valid
    masses, messages = [], []
    for block in sstn.blocks:
        cols = slice(block.start, block.start + block.width)
        nonempty = valid[:, cols].any(dim=1) if block is not entered else torch.ones_like(valid[:, 0])
        masses.append(block.width / sstn.topk * nonempty.float())
        if block is entered:
            messages.append(None)
            continue
        value = graph.value[:, cols]
        sub = Graph(graph.index[:, cols], edge_weights(value, sstn.normalize, sstn.temperature), value)
        messages.append(propagate(sub, x))
    total = torch.stack(masses).sum(dim=0).clamp_min(1e-12)
    z_other = torch.zeros_like(x)
    for mass, message in zip(masses, messages, strict=True):
        if message is not None:
            z_other = z_other + (mass / total).unsqueeze(1).to(x.dtype) * message
    share = masses[sstn.blocks.index(entered)] / total
    return z_other, share


def _single_query_cosine(
    sstn: SSTN, rows: Nodes, g: Nodes, gg: _GalleryGraph, parts: list[_GalleryParts]
) -> torch.Tensor:
    """Cosine ``[B, G]`` of each query of ``rows`` with every gallery row of its one-query graph.

    A query changes a gallery row's descriptor only where it enters that row's block for the
    query's modality (``s >= kth`` of that block): every pair gets the product with the unchanged
    descriptor, and only the entered pairs are recomputed. Their four dot products come from the
    gathered rows when they are few, else from whole-block products.
    """
    s_qg = _query_similarity(sstn, rows, g).float()  # S is symmetric: s(g, q) = s(q, g)
    f_q = F.normalize(_query_graph(sstn, rows, g, s_qg)[0].float(), dim=1)
    zero = torch.zeros_like(rows.x)
    m = (sstn.descriptor(zero, rows.x) - sstn.descriptor(zero, zero)).float()
    cos = f_q @ gg.f0_unit.T
    same = rows.modality.unsqueeze(1) == g.modality.unsqueeze(0)
    for p in parts:
        enters = s_qg >= p.kth.unsqueeze(0)  # the query has index 0: it wins ties
        if p.block.kind == "intra":
            enters &= same
        elif p.block.kind == "cross":
            enters &= ~same
        qi, gj = enters.nonzero(as_tuple=True)
        if len(qi):
            cos[qi, gj] = _entered_cosine(sstn, f_q, m, p, qi, gj, s_qg[qi, gj], cos.numel())
    return cos


def _entered_cosine(
    sstn: SSTN, f_q: torch.Tensor, m: torch.Tensor, p: _GalleryParts, qi: torch.Tensor, gj: torch.Tensor,
    s_new: torch.Tensor, block_size: int,
) -> torch.Tensor:
    """Cosine of the pairs ``(qi, gj)`` whose gallery row takes the query in: the row's descriptor is
    ``alpha u + (1 - alpha) (c + share m_q)``."""
    if len(qi) * f_q.shape[1] <= block_size:
        fq_i, m_i, u_j, c_j = f_q[qi], m[qi], p.u[gj], p.c[gj]
        fu, fc, mu, mc = ((a * b).sum(1) for a, b in ((fq_i, u_j), (fq_i, c_j), (m_i, u_j), (m_i, c_j)))
    else:
        pairs = ((f_q, p.u), (f_q, p.c), (m, p.u), (m, p.c))
        fu, fc, mu, mc = ((a @ b.T)[qi, gj] for a, b in pairs)
    alpha = _alpha(sstn, p.mass[gj], s_new)
    beta, share = 1 - alpha, p.share[gj]
    dot = alpha * fu + beta * (fc + share * (f_q * m).sum(1)[qi])
    norm = (
        alpha**2 * p.uu[gj]
        + beta**2 * (p.cc[gj] + 2 * share * mc + share**2 * (m * m).sum(1)[qi])
        + 2 * alpha * beta * (p.uc[gj] + share * mu)
    )
    return dot / norm.clamp_min(1e-12).sqrt()


def _query_similarity(sstn: SSTN, rows: Nodes, g: Nodes) -> torch.Tensor:
    """:meth:`similarity` of a query block with the gallery; a block that shares no modality with
    the gallery (the usual cross-modality query) needs the shared product alone."""
    if rows.sp is None or set(g.modality.unique().tolist()).isdisjoint(rows.modality.unique().tolist()):
        return rows.sh @ g.sh.T
    return sstn.similarity(rows, g)


def _mass(sstn: SSTN, value: torch.Tensor) -> torch.Tensor:
    """Weight mass of kept similarities (``-inf`` padding excluded): log-sum-exp for softmax, sum for sum."""
    value = value.float()
    if sstn.normalize == "softmax":
        return torch.logsumexp(value / sstn.temperature, dim=1)  # -inf for a row of padding
    return (((1.0 + value) / 2.0).clamp_min(EPS) * (value > NEG_INF)).sum(dim=1)


def _alpha(sstn: SSTN, mass: torch.Tensor, s_new: torch.Tensor) -> torch.Tensor:
    """Share of a group's weight left on its kept neighbours once a node of similarity ``s_new`` joins."""
    if sstn.normalize == "softmax":
        return torch.sigmoid(mass - s_new / sstn.temperature)
    w_new = ((1.0 + s_new) / 2.0).clamp_min(EPS)
    return mass / (mass + w_new)


def _query_graph(
    sstn: SSTN, rows: Nodes, g: Nodes, s_qg: torch.Tensor | None = None
) -> tuple[torch.Tensor, Graph]:
    """Fused descriptor of each query with the gallery (and itself if self loops) as candidates, and
    its kept edges (gallery nodes numbered from 0; with self loops, the query itself is ``-1``)."""
    if s_qg is None:
        s_qg = _query_similarity(sstn, rows, g).float()
    same = rows.modality.unsqueeze(1) == g.modality.unsqueeze(0)
    if sstn.self_loops:  # the query is column 0, ahead of the gallery: it wins ties
        s_self = _self_similarity(rows).unsqueeze(1).float()
        value, index = sstn.select(torch.cat([s_self, s_qg], dim=1), F.pad(same, (1, 0), value=True))
        index = index - 1
    else:
        value, index = sstn.select(s_qg, same)
    nb = g.x[index.clamp_min(0)]
    nb = torch.where((index < 0).unsqueeze(-1), rows.x.unsqueeze(1), nb)
    graph = Graph(index, sstn.weights(value), value)
    return sstn.descriptor(rows.x, (graph.weight.to(nb.dtype).unsqueeze(-1) * nb).sum(dim=1)), graph


def _self_similarity(rows: Nodes) -> torch.Tensor:
    s = (rows.sh * rows.sh).sum(1)
    return s if rows.sp is None else (s + (rows.sp * rows.sp).sum(1)) / 2
