"""Shared-Specific Transfer Network (SSTN): a sparse affinity graph that fills each sample's
missing-modality slot with its neighbours' features.

Shapes (N nodes, C backbone width, M = 2 modalities, D = (1 + M) C with a
specific branch, else C)::

    shared, specific   [N, C]   BN-neck outputs of h_sh, h_sp (the bank features)
    x = unify(...)     [N, D]   [h_sh, h_sp_rgb, 0] for RGB, [h_sh, 0, h_sp_ir] for IR
    S                  [N, N]   intra-modality: mean of shared and specific cosine;
                                inter-modality: shared cosine (learned transforms if affinity_dim > 0)
    A = T_k(S)         [N, k]   kept neighbour indices and row-normalised weights (a Graph)
    z = A x            [N, D]
    fused = fuse(x, z) [N, D'] residual: x + z (D' = D); concat: Linear([x, z]) (D' = fused_dim)

Test time: :meth:`SSTN.distance_blocks` (or :meth:`SSTN.distance` for the full matrix) in
``transductive`` or ``single_query`` mode. The graph is built ``chunk`` rows at a time against all
nodes, so memory grows with N k + N D + chunk N, never N^2; distances come out in query blocks
``[rows, G]`` (:class:`~cmssft.evaluation.metrics.DistanceBlocks`).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from cmssft.errors import UserError
from cmssft.evaluation.metrics import DistanceBlocks
from cmssft.models.neck import BNNeck

_EPS = 1e-6
MODES = ("transductive", "single_query", "off")


class Nodes(NamedTuple):
    """Graph nodes: unified features ``x [N, D]``, unit affinity embeddings ``sh``/``sp`` ``[N, E]``
    (``sp`` None without a specific branch) and ``modality`` long ``[N]``."""

    x: torch.Tensor
    sh: torch.Tensor
    sp: torch.Tensor | None
    modality: torch.Tensor


class Graph(NamedTuple):
    """Sparse row-normalised affinity: row i keeps ``index[i]`` (``[N, k]``, sorted by decreasing
    similarity, ties to the lower index) with weights ``weight[i]`` (sum 1) and similarities ``value[i]``."""

    index: torch.Tensor
    weight: torch.Tensor
    value: torch.Tensor


class _GalleryParts(NamedTuple):
    """Single-query scoring's per-gallery-row terms: ``[G, D']`` descriptors (``f0_unit``: unit
    descriptor without the query; ``u``/``c``: the affine parts once the query enters), their
    ``[G]`` products, the k-th kept similarity ``kth``, the weight mass of the k-1 kept, and the
    modalities present in the gallery."""

    f0_unit: torch.Tensor
    u: torch.Tensor
    c: torch.Tensor
    uu: torch.Tensor
    cc: torch.Tensor
    uc: torch.Tensor
    kth: torch.Tensor
    kept_mass: torch.Tensor
    modalities: frozenset[int]


def _slice(nodes: Nodes, start: int, stop: int) -> Nodes:
    return Nodes(*(t[start:stop] if t is not None else None for t in nodes))


def _take(nodes: Nodes, ids: torch.Tensor) -> Nodes:
    return Nodes(*(t.index_select(0, ids) if t is not None else None for t in nodes))


def unify(
    shared: torch.Tensor, specific: torch.Tensor | None, modality: torch.Tensor, num_modalities: int = 2
) -> torch.Tensor:
    """Zero-padded unified features ``[h_sh, h_sp_0, ..., h_sp_{M-1}]``, only the own slot filled."""
    if specific is None:
        return shared
    slots = [specific * (modality == m).unsqueeze(1).to(specific.dtype) for m in range(num_modalities)]
    return torch.cat([shared, *slots], dim=1)


def edge_weights(value: torch.Tensor, normalize: str, temperature: float) -> torch.Tensor:
    """Row-normalise kept similarities ``[N, k]``: softmax(S / T), or (1 + S) / 2 over its row sum."""
    value = value.float()
    if normalize == "softmax":
        return torch.softmax(value / temperature, dim=1)
    if normalize == "sum":
        w = ((1.0 + value) / 2.0).clamp_min(_EPS)
        return w / w.sum(dim=1, keepdim=True)
    raise ValueError(f"unknown normalisation {normalize!r}")


# Rows at most this wide are simply sorted; wider rows go through torch.topk (O(m), not O(m log m)).
_SORT_MAX_COLS = 256


def top_k(
    similarity: torch.Tensor, k: int, columns: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exactly ``k`` largest entries per row, ties broken towards the lower column (stable sort).

    ``columns`` (a permutation, ``[m]``): column j of ``similarity`` is node ``columns[j]``; the
    returned indices are then node ids, and ties go to the lower node id.

    Wide rows: ``torch.topk`` keeps k + 1 entries; a row whose (k+1)-th value equals its k-th (a
    tie across the cut, where node order decides) falls back to the stable sort in node order. The
    others keep their k nodes, put in id order and then stably sorted by value, so equal values
    inside the kept set are in id order too.
    """
    n, m = similarity.shape
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


def to_dense(graph: Graph, num_cols: int) -> torch.Tensor:
    """The dense ``[N, num_cols]`` affinity matrix, for tests and inspection."""
    dense = graph.weight.new_zeros(graph.index.shape[0], num_cols)
    return dense.scatter(1, graph.index, graph.weight)


def affinity_stats(
    graph: Graph, modality: torch.Tensor, labels: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """Detached scalars for logging: how many kept edges cross modality, how peaked the weights are,
    and (with labels) how many kept edges, and how much weight, link the same identity."""
    with torch.no_grad():
        rows = torch.arange(graph.index.shape[0], device=graph.index.device).unsqueeze(1)
        cross = (modality[graph.index] != modality[rows]).float()
        w = graph.weight.float()
        stats = {
            "sstn/cross_edges": cross.mean(),
            "sstn/cross_weight": (w * cross).sum(dim=1).mean(),
            "sstn/max_weight": w.max(dim=1).values.mean(),
            "sstn/kept_similarity": graph.value.float().mean(),
        }
        if labels is not None:
            same = (labels[graph.index] == labels[rows]).float()
            stats["sstn/edge_accuracy"] = same.mean()
            stats["sstn/weight_accuracy"] = (w * same).sum(dim=1).mean()
            stats["sstn/cross_edge_accuracy"] = (same * cross).sum() / cross.sum().clamp_min(1.0)
    return stats


class SSTN(nn.Module):
    """Affinity, top-k sparsification, propagation and fusion over one graph of samples.

    Args:
        dim: width C of the shared and specific features.
        use_specific: whether nodes carry specific features (else ``x = h_sh`` and S is shared only).
        topk: neighbours kept per row (clamped to the number of candidates).
        normalize: ``softmax`` (over kept entries, temperature ``temperature``) or ``sum``.
        self_loops: whether a node may be its own neighbour.
        affinity_dim: >0 adds learned linear transforms (one for shared, one for specific
            features) before the cosine; 0 compares the features themselves.
        fusion: ``residual`` (x + z) or ``concat`` (Linear([x, z]) to ``fused_dim``).
        fused_dim: output width of the concat fusion (0: C).
        bnneck: BN-neck on the fused features (classifier and test side).
        chunk: rows per block at test time (memory only).
    """

    def __init__(
        self,
        dim: int,
        use_specific: bool = True,
        topk: int = 6,
        normalize: str = "softmax",
        temperature: float = 0.1,
        self_loops: bool = False,
        affinity_dim: int = 0,
        fusion: str = "residual",
        fused_dim: int = 0,
        bnneck: bool = True,
        chunk: int = 512,
        num_modalities: int = 2,
    ) -> None:
        super().__init__()
        if topk < 1:
            raise UserError(f"model.sstn.topk must be >= 1, got {topk}")
        if normalize not in ("softmax", "sum"):
            raise UserError(f"model.sstn.normalize: {normalize!r} is not softmax or sum")
        if fusion not in ("residual", "concat"):
            raise UserError(f"model.sstn.fusion: {fusion!r} is not residual or concat")
        if normalize == "softmax" and temperature <= 0:
            raise UserError(f"model.sstn.temperature must be > 0, got {temperature}")
        self.use_specific = use_specific
        self.topk, self.normalize, self.temperature = topk, normalize, temperature
        self.self_loops, self.fusion, self.chunk = self_loops, fusion, max(1, chunk)
        self.num_modalities = num_modalities
        self.in_dim = dim * (1 + num_modalities) if use_specific else dim
        self.proj_sh = nn.Linear(dim, affinity_dim, bias=False) if affinity_dim > 0 else nn.Identity()
        self.proj_sp = nn.Linear(dim, affinity_dim, bias=False) if affinity_dim > 0 and use_specific else None
        self.fuse_linear = nn.Linear(2 * self.in_dim, fused_dim or dim) if fusion == "concat" else None
        self.out_dim = self.in_dim if self.fuse_linear is None else self.fuse_linear.out_features
        self.neck = BNNeck(self.out_dim, bnneck)

    # ------------------------------------------------------------------ building blocks

    def nodes(self, shared: torch.Tensor, specific: torch.Tensor | None, modality: torch.Tensor) -> Nodes:
        """Unified features and unit affinity embeddings of ``[N, C]`` shared/specific features."""
        specific = specific if self.use_specific else None
        sh = F.normalize(self.proj_sh(shared), dim=1)
        sp = None
        if specific is not None:
            sp = F.normalize((self.proj_sp or nn.Identity())(specific), dim=1)
        return Nodes(unify(shared, specific, modality, self.num_modalities), sh, sp, modality)

    def similarity(self, rows: Nodes, cols: Nodes) -> torch.Tensor:
        """Block affinity ``S [n_rows, n_cols]``: intra-modality pairs use shared and specific
        features (mean of the two cosines), inter-modality pairs shared features only."""
        inter = rows.sh @ cols.sh.T
        if rows.sp is None or cols.sp is None:
            return inter
        intra = (inter + rows.sp @ cols.sp.T) / 2
        same = rows.modality.unsqueeze(1) == cols.modality.unsqueeze(0)
        return torch.where(same, intra, inter)

    def graph(self, similarity: torch.Tensor, row_offset: int = 0) -> Graph:
        """``T_k`` then row normalisation; row i is node ``row_offset + i`` of the column set."""
        n, m = similarity.shape
        if not self.self_loops:
            rows = torch.arange(row_offset, row_offset + n, device=similarity.device).unsqueeze(1)
            cols = torch.arange(m, device=similarity.device).unsqueeze(0)
            similarity = similarity.masked_fill(rows == cols, float("-inf"))
        k = min(self.topk, m if self.self_loops else m - 1)
        value, index = top_k(similarity, k)
        return Graph(index, edge_weights(value, self.normalize, self.temperature), value)

    def fuse(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """Fuse a node's own feature ``x`` with what it receives, ``z``; affine in (x, z)."""
        if self.fuse_linear is None:
            return x + z
        return self.fuse_linear(torch.cat([x, z], dim=1))

    def descriptor(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """Test-time fused descriptor: running-statistics BN-neck of the fusion (affine in (x, z))."""
        return self.neck.inference(self.fuse(x, z))

    # ------------------------------------------------------------------ training

    def forward(
        self, shared: torch.Tensor, specific: torch.Tensor | None, modality: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, Graph]:
        """The mini-batch graph. Returns (fused ``[N, D']`` before the neck, after the neck, graph)."""
        nodes = self.nodes(shared, specific, modality)
        graph = self.graph(self.similarity(nodes, nodes))
        fused = self.fuse(nodes.x, propagate(graph, nodes.x))
        return fused, self.neck(fused), graph

    # ------------------------------------------------------------------ test time

    def distance(
        self,
        query: tuple[torch.Tensor, torch.Tensor | None, torch.Tensor],
        gallery: tuple[torch.Tensor, torch.Tensor | None, torch.Tensor],
        mode: str,
    ) -> torch.Tensor:
        """The full ``[Q, G]`` matrix of :meth:`distance_blocks`."""
        return self.distance_blocks(query, gallery, mode).full()

    @torch.no_grad()
    def distance_blocks(
        self,
        query: tuple[torch.Tensor, torch.Tensor | None, torch.Tensor],
        gallery: tuple[torch.Tensor, torch.Tensor | None, torch.Tensor],
        mode: str,
    ) -> DistanceBlocks:
        """Cosine distance ``[Q, G]`` (``1 - cos``) between fused descriptors, in query blocks of
        ``chunk`` rows; inputs are (shared ``[N, C]``, specific ``[N, C]`` or None, modality ``[N]``)
        triples of bank features.

        ``transductive``: one graph over query + gallery (queries first); every node's fused
        descriptor is computed once here, blocks are then plain products.
        ``single_query``: each query with the gallery alone, exactly as a one-query
        transductive call; the gallery's graph is built here, each query block on demand.
        """
        if mode not in ("transductive", "single_query"):
            raise UserError(f"SSTN test mode {mode!r} is not transductive or single_query")
        q = self.nodes(*query)
        g = self.nodes(*gallery)
        if mode == "transductive":
            return self._transductive(q, g)
        return self._single_query(q, g)

    def _row_blocks(self, nodes: Nodes) -> Iterator[tuple[torch.Tensor, Nodes, Graph]]:
        """``(ids [b], rows, graph [b, k] of those rows against every node)`` for blocks of at most
        ``chunk`` rows, together covering every node once; one ``[chunk, N]`` similarity block at a time.

        With specific features the nodes are visited grouped by modality (stably), so each block's
        same-modality columns are one contiguous range: the intra-modality term is one in-place
        ``addmm`` on that range, with no [chunk, N] mask or select. The block lives in one buffer
        reused for every block (fresh allocations of this size cost page faults on the CPU).
        Neighbour indices and their tie order are those of :meth:`graph` on the whole similarity.
        """
        n = nodes.x.shape[0]
        k = min(self.topk, n if self.self_loops else n - 1)
        if nodes.sp is None:
            order, groups = None, [(0, n)]
            sh, sp = nodes.sh, None
        else:
            order = torch.argsort(nodes.modality, stable=True)
            counts = torch.bincount(nodes.modality[order]).tolist()
            ends = torch.tensor(counts).cumsum(0).tolist()
            groups = [(end - count, end) for count, end in zip(counts, ends, strict=True) if count]
            sh, sp = nodes.sh[order], nodes.sp[order]
        buffer = sh.new_empty(min(self.chunk, n), n)
        for first, last in groups:
            for start in range(first, last, self.chunk):
                stop = min(start + self.chunk, last)
                s = torch.matmul(sh[start:stop], sh.T, out=buffer[: stop - start])
                if sp is not None:  # intra-modality: (shared cosine + specific cosine) / 2
                    s[:, first:last].addmm_(sp[start:stop], sp[first:last].T, beta=0.5, alpha=0.5)
                if not self.self_loops:
                    s.diagonal(offset=start).fill_(float("-inf"))
                value, index = top_k(s, k, order)
                ids = torch.arange(start, stop, device=sh.device) if order is None else order[start:stop]
                rows = _slice(nodes, start, stop) if order is None else _take(nodes, ids)
                yield ids, rows, Graph(index, edge_weights(value, self.normalize, self.temperature), value)

    def _transductive(self, q: Nodes, g: Nodes) -> DistanceBlocks:
        nodes = Nodes(*(torch.cat([a, b]) if a is not None else None for a, b in zip(q, g, strict=True)))
        feats = nodes.x.new_empty(nodes.x.shape[0], self.out_dim, dtype=torch.float32)
        for ids, rows, graph in self._row_blocks(nodes):
            feats[ids] = self.descriptor(rows.x, propagate(graph, nodes.x)).float()
        feats = F.normalize(feats, dim=1)
        num_q = q.x.shape[0]
        f_q, f_g = feats[:num_q], feats[num_q:]
        return DistanceBlocks(
            (num_q, f_g.shape[0]),
            lambda start, stop: 1.0 - f_q[start:stop] @ f_g.T,
            block_rows=self.chunk,
            device=feats.device,
        )

    def _single_query(self, q: Nodes, g: Nodes) -> DistanceBlocks:
        gallery = self._gallery_parts(g)
        out_device = g.x.device

        def block(start: int, stop: int) -> torch.Tensor:
            return 1.0 - self._single_query_cosine(_slice(q, start, stop), g, gallery)

        return DistanceBlocks((q.x.shape[0], g.x.shape[0]), block, block_rows=self.chunk, device=out_device)

    def _gallery_parts(self, g: Nodes) -> _GalleryParts:
        """What every query block needs from the gallery's own graph, one row block at a time."""
        num_g = g.x.shape[0]
        candidates = num_g if self.self_loops else num_g - 1  # a gallery row's gallery-only candidates
        k = min(self.topk, candidates + 1)  # as in a one-query graph of num_g + 1 nodes
        f0, u, c = (g.x.new_empty(num_g, self.out_dim, dtype=torch.float32) for _ in range(3))
        kth = g.x.new_full((num_g,), float("-inf"), dtype=torch.float32)
        kept_mass = g.x.new_empty(num_g, dtype=torch.float32)
        for part, rows, gg in self._row_blocks(g):
            # the query is not among the neighbours
            f0[part] = self.descriptor(rows.x, propagate(gg, g.x)).float()
            # If the query enters a gallery row it evicts the k-th neighbour; the row's fused feature is then
            # the affine combination alpha * u + (1 - alpha) * (c + m_q) with the parts below.
            a = torch.zeros_like(rows.x)
            if k > 1:
                weight = edge_weights(gg.value[:, : k - 1], self.normalize, self.temperature)
                a = propagate(Graph(gg.index[:, : k - 1], weight, gg.value[:, : k - 1]), g.x)
            u[part] = self.descriptor(rows.x, a).float()
            c[part] = self.descriptor(rows.x, torch.zeros_like(rows.x)).float()
            if candidates >= k:  # else a gallery of at most k images: every row keeps all of it and the query
                kth[part] = gg.value[:, k - 1].float()
            kept_mass[part] = self._mass(gg.value[:, : k - 1])  # softmax: log-sum-exp; sum: plain sum
        return _GalleryParts(
            f0_unit=f0 / f0.norm(dim=1, keepdim=True).clamp_min(1e-12),
            u=u,
            c=c,
            uu=(u * u).sum(1),
            cc=(c * c).sum(1),
            uc=(u * c).sum(1),
            kth=kth,
            kept_mass=kept_mass,
            modalities=frozenset(g.modality.unique().tolist()),
        )

    def _single_query_cosine(self, rows: Nodes, g: Nodes, parts: _GalleryParts) -> torch.Tensor:
        """Cosine ``[B, G]`` of each query of ``rows`` with every gallery row of its one-query graph.

        A query changes a gallery row's descriptor only where it enters that row's top-k
        (``s >= kth``): every pair gets the product with the unchanged descriptor, and only the
        entered pairs are recomputed. Their four dot products come from the gathered rows when
        they are few, else from whole-block products.
        """
        s_qg = self._query_similarity(rows, g, parts.modalities).float()  # S is symmetric: s(g, q) = s(q, g)
        f_q = F.normalize(self._query_descriptor(rows, g, s_qg).float(), dim=1)
        zero = torch.zeros_like(rows.x)
        m = (self.descriptor(zero, rows.x) - self.descriptor(zero, zero)).float()
        cos = f_q @ parts.f0_unit.T
        qi, gj = (s_qg >= parts.kth.unsqueeze(0)).nonzero(as_tuple=True)  # the query has index 0: it wins ties
        if len(qi) == 0:
            return cos
        if len(qi) * f_q.shape[1] <= cos.numel():
            fq_i, m_i, u_j, c_j = f_q[qi], m[qi], parts.u[gj], parts.c[gj]
            fu, fc, mu, mc = ((a * b).sum(1) for a, b in ((fq_i, u_j), (fq_i, c_j), (m_i, u_j), (m_i, c_j)))
        else:
            pairs = ((f_q, parts.u), (f_q, parts.c), (m, parts.u), (m, parts.c))
            fu, fc, mu, mc = ((a @ b.T)[qi, gj] for a, b in pairs)
        alpha = self._alpha(parts.kept_mass[gj], s_qg[qi, gj])
        beta = 1 - alpha
        dot = alpha * fu + beta * (fc + (f_q * m).sum(1)[qi])
        norm = (
            alpha**2 * parts.uu[gj]
            + beta**2 * (parts.cc[gj] + 2 * mc + (m * m).sum(1)[qi])
            + 2 * alpha * beta * (parts.uc[gj] + mu)
        )
        cos[qi, gj] = dot / norm.clamp_min(1e-12).sqrt()  # the entered row: alpha u + (1 - alpha) (c + m_q)
        return cos

    def _query_similarity(self, rows: Nodes, g: Nodes, gallery_modalities: frozenset[int]) -> torch.Tensor:
        """:meth:`similarity` of a query block with the gallery; a block that shares no modality with
        the gallery (the usual cross-modality query) needs the shared product alone."""
        if rows.sp is None or gallery_modalities.isdisjoint(rows.modality.unique().tolist()):
            return rows.sh @ g.sh.T
        return self.similarity(rows, g)

    def _mass(self, value: torch.Tensor) -> torch.Tensor:
        value = value.float()
        if self.normalize == "softmax":
            return torch.logsumexp(value / self.temperature, dim=1)  # -inf for an empty row
        return ((1.0 + value) / 2.0).clamp_min(_EPS).sum(dim=1)

    def _alpha(self, kept_mass: torch.Tensor, s_new: torch.Tensor) -> torch.Tensor:
        """Share of a row's weight left on its k-1 kept neighbours once a node of similarity
        ``s_new`` joins them."""
        if self.normalize == "softmax":
            return torch.sigmoid(kept_mass - s_new / self.temperature)
        w_new = ((1.0 + s_new) / 2.0).clamp_min(_EPS)
        return kept_mass / (kept_mass + w_new)

    def _query_descriptor(self, rows: Nodes, g: Nodes, s_qg: torch.Tensor) -> torch.Tensor:
        """Fused descriptor of each query with the gallery (and itself if self loops) as candidates."""
        k = min(self.topk, s_qg.shape[1] + int(self.self_loops))
        if self.self_loops:
            s_self = self._self_similarity(rows).unsqueeze(1)
            value, index = top_k(torch.cat([s_self, s_qg], dim=1), k)
            nb = g.x[(index - 1).clamp_min(0)]
            nb = torch.where((index == 0).unsqueeze(-1), rows.x.unsqueeze(1), nb)
        else:
            value, index = top_k(s_qg, k)
            nb = g.x[index]
        w = edge_weights(value, self.normalize, self.temperature).to(nb.dtype)
        return self.descriptor(rows.x, (w.unsqueeze(-1) * nb).sum(dim=1))

    @staticmethod
    def _self_similarity(rows: Nodes) -> torch.Tensor:
        s = (rows.sh * rows.sh).sum(1)
        return s if rows.sp is None else (s + (rows.sp * rows.sp).sum(1)) / 2


def dense_distance(
    sstn: SSTN,
    query: tuple[torch.Tensor, torch.Tensor | None, torch.Tensor],
    gallery: tuple[torch.Tensor, torch.Tensor | None, torch.Tensor],
    mode: str,
) -> torch.Tensor:
    """Reference for checking :meth:`SSTN.distance`: the whole ``[N, N]`` similarity, a dense top-k
    by full stable sort, the dense ``A x`` product; single-query is one such graph per query.
    O(N^2) memory (and O(Q G^2) time for single-query): for tests and benchmarks only."""
    with torch.no_grad():
        q, g = sstn.nodes(*query), sstn.nodes(*gallery)
        if mode == "transductive":
            return _dense_transductive(sstn, q, g)
        if mode == "single_query":
            rows = [_dense_transductive(sstn, _slice(q, i, i + 1), g) for i in range(q.x.shape[0])]
            return torch.cat(rows) if rows else torch.empty(0, g.x.shape[0])
        raise UserError(f"SSTN test mode {mode!r} is not transductive or single_query")


def _dense_transductive(sstn: SSTN, q: Nodes, g: Nodes) -> torch.Tensor:
    x, sh, mod = torch.cat([q.x, g.x]), torch.cat([q.sh, g.sh]), torch.cat([q.modality, g.modality])
    n = x.shape[0]
    s = sh @ sh.T
    if q.sp is not None and g.sp is not None:
        sp = torch.cat([q.sp, g.sp])
        s = torch.where(mod[:, None] == mod[None, :], (s + sp @ sp.T) / 2, s)
    if not sstn.self_loops:
        s.fill_diagonal_(float("-inf"))
    k = min(sstn.topk, n if sstn.self_loops else n - 1)
    value, index = torch.sort(s, dim=1, descending=True, stable=True)
    weight = edge_weights(value[:, :k], sstn.normalize, sstn.temperature)
    adjacency = torch.zeros(n, n, dtype=weight.dtype, device=x.device).scatter(1, index[:, :k], weight)
    feats = F.normalize(sstn.descriptor(x, adjacency.to(x.dtype) @ x).float(), dim=1)
    num_q = q.x.shape[0]
    return 1.0 - feats[:num_q] @ feats[num_q:].T
