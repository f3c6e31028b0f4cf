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

Test time: :meth:`SSTN.distance` in ``transductive``, ``single_query`` or ``off`` mode.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from cmssft.errors import UserError
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


def top_k(similarity: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exactly ``k`` largest entries per row, ties broken towards the lower column (stable sort)."""
    value, index = torch.sort(similarity, dim=1, descending=True, stable=True)
    return value[:, :k], index[:, :k]


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
        """Cosine distance ``[Q, G]`` (``1 - cos``) between fused descriptors; inputs are
        (shared, specific or None, modality) triples of bank features.

        ``transductive``: one graph over query + gallery (queries first).
        ``single_query``: each query with the gallery alone, exactly as a one-query
        transductive call, vectorised over blocks of queries.
        """
        q = self.nodes(*query)
        g = self.nodes(*gallery)
        if mode == "transductive":
            return self._transductive(q, g)
        if mode == "single_query":
            return self._single_query(q, g)
        raise UserError(f"SSTN test mode {mode!r} is not transductive or single_query")

    def _transductive(self, q: Nodes, g: Nodes) -> torch.Tensor:
        nodes = Nodes(*(torch.cat([a, b]) if a is not None else None for a, b in zip(q, g, strict=True)))
        feats = []
        for start in range(0, nodes.x.shape[0], self.chunk):
            rows = Nodes(*(t[start : start + self.chunk] if t is not None else None for t in nodes))
            graph = self.graph(self.similarity(rows, nodes), row_offset=start)
            feats.append(self.descriptor(rows.x, propagate(graph, nodes.x)))
        feats = F.normalize(torch.cat(feats).float(), dim=1)
        num_q = q.x.shape[0]
        return 1.0 - feats[:num_q] @ feats[num_q:].T

    def _single_query(self, q: Nodes, g: Nodes) -> torch.Tensor:
        num_g = g.x.shape[0]
        candidates = num_g if self.self_loops else num_g - 1  # a gallery row's gallery-only candidates
        k = min(self.topk, candidates + 1)  # as in a one-query graph of num_g + 1 nodes
        # The gallery's own graph, once: each row's top-k among gallery nodes.
        gg = self.graph(self.similarity(g, g))
        f0 = self.descriptor(g.x, propagate(gg, g.x)).float()  # the query is not among the neighbours
        # If the query enters a gallery row it evicts the k-th neighbour; the row's fused feature is then
        # the affine combination alpha * u + (1 - alpha) * (c + m_q) with the parts below.
        a = torch.zeros_like(g.x)
        if k > 1:
            weight = edge_weights(gg.value[:, : k - 1], self.normalize, self.temperature)
            a = propagate(Graph(gg.index[:, : k - 1], weight, gg.value[:, : k - 1]), g.x)
        u = self.descriptor(g.x, a).float()
        c = self.descriptor(g.x, torch.zeros_like(g.x)).float()
        if candidates >= k:
            kth = gg.value[:, k - 1].float()
        else:  # a gallery of at most k images: every row keeps all of it and the query too
            kth = torch.full((num_g,), float("-inf"), device=g.x.device)
        kept_mass = self._mass(gg.value[:, : k - 1])  # [G] softmax: log-sum-exp; sum: plain sum
        out = []
        for start in range(0, q.x.shape[0], self.chunk):
            rows = Nodes(*(t[start : start + self.chunk] if t is not None else None for t in q))
            s_qg = self.similarity(rows, g).float()  # S is symmetric: s(g, q) = s(q, g)
            f_q = F.normalize(self._query_descriptor(rows, g, s_qg).float(), dim=1)
            zero = torch.zeros_like(rows.x)
            m = (self.descriptor(zero, rows.x) - self.descriptor(zero, zero)).float()
            enter = s_qg >= kth.unsqueeze(0)  # the query has index 0: it wins ties
            alpha = self._alpha(kept_mass.unsqueeze(0), s_qg)
            dot1 = alpha * (f_q @ u.T) + (1 - alpha) * (f_q @ c.T + (f_q * m).sum(1, keepdim=True))
            norm1 = (
                alpha**2 * (u * u).sum(1)
                + (1 - alpha) ** 2 * ((c * c).sum(1) + 2 * (m @ c.T) + (m * m).sum(1, keepdim=True))
                + 2 * alpha * (1 - alpha) * ((u * c).sum(1) + m @ u.T)
            )
            cos1 = dot1 / norm1.clamp_min(1e-12).sqrt()
            cos0 = (f_q @ f0.T) / f0.norm(dim=1).clamp_min(1e-12)
            out.append(1.0 - torch.where(enter, cos1, cos0))
        return torch.cat(out)

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
