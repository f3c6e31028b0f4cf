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

Sparsification ``T_k`` keeps ``topk`` neighbours per row. With ``cross_k = 0`` they are the row's
``topk`` most similar nodes whatever their modality. With ``cross_k = c > 0`` the row keeps its
``topk - c`` most similar nodes of its own modality and its ``c`` most similar nodes of the other
modality, so every node receives messages from the modality whose slot it lacks (with one top-k
over the row, same-modality neighbours, which share the specific term of S, crowd them out).
A kept row is a list of *blocks* (``[all]``, or ``[intra, cross]``); a block with fewer candidates
than its width is padded with invalid edges (similarity ``-inf``, weight 0). Weights are a softmax
(or a normalised ``(1 + S) / 2``) over the row's valid edges, or, with ``block_norm``, over each
block apart, block b then carrying ``k_b / topk`` of the row's weight (shares renormalised over
the non-empty blocks).

Test time: :meth:`SSTN.distance_blocks` (or :meth:`SSTN.distance` for the full matrix) in
``transductive`` or ``single_query`` mode. The graph is built ``chunk`` rows at a time against all
nodes, so memory grows with N k + N D + chunk N, never N^2; distances come out in query blocks
``[rows, G]`` (:class:`~cmssft.scoring.DistanceBlocks`), which also carry the kept test
edges for :mod:`cmssft.evaluation.graph_stats`. The graph's building blocks (nodes, top-k, weights,
propagation) live in :mod:`cmssft.models.affinity_graph`, the exact one-pass single-query scoring in
:mod:`cmssft.models.sstn_single_query`, and the dense ``N x N`` reference used to check all of this in
:mod:`cmssft.models.sstn_reference`.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from cmssft.errors import UserError
from cmssft.models.affinity_graph import (
    NEG_INF,
    Graph,
    Nodes,
    affinity_stats,
    edge_weights,
    propagate,
    row_layout,
    slice_nodes,
    take_nodes,
    top_k,
    unify,
)
from cmssft.models.candidate_memory import CandidateMemory
from cmssft.models.neck import BNNeck
from cmssft.models.sstn_single_query import single_query_distance
from cmssft.scoring import DistanceBlocks, cosine_distance_blocks

MODES = ("transductive", "single_query", "off")


class BatchTransfer(NamedTuple):
    """The training forward's output: fused features ``[N, D']`` before and after the BN-neck, the
    batch graph (``[N, k]``, indices into its columns) and its columns' ``modality`` / ``labels``
    (``[N + F]``: the batch, then F remembered samples; labels None when none were given)."""

    fused: torch.Tensor
    fused_bn: torch.Tensor
    graph: Graph
    column_modality: torch.Tensor
    column_labels: torch.Tensor | None

    def stats(self) -> dict[str, torch.Tensor]:
        """:func:`affinity_stats` of the graph."""
        return affinity_stats(self.graph, self.column_modality, self.column_labels)


class SSTN(nn.Module):
    """Affinity, top-k sparsification, propagation and fusion over one graph of samples.

    Args:
        dim: width C of the shared and specific features.
        use_specific: whether nodes carry specific features (else ``x = h_sh`` and S is shared only).
        topk: neighbours kept per row.
        cross_k: how many of them come from the other modality (0: any modality, one top-k per row).
        block_norm: normalise the weights of the intra and cross blocks apart (``cross_k > 0``).
        normalize: ``softmax`` (over kept entries, temperature ``temperature``) or ``sum``.
        self_loops: whether a node may be its own neighbour.
        affinity_dim: >0 adds learned linear transforms (one for shared, one for specific
            features) before the cosine; 0 compares the features themselves.
        fusion: ``residual`` (x + z) or ``concat`` (Linear([x, z]) to ``fused_dim``).
        fused_dim: output width of the concat fusion (0: C).
        bnneck: BN-neck on the fused features (classifier and test side).
        chunk: rows per block at test time (memory only).
        center: subtract each modality's mean from the shared affinity embedding before the cosine
            (batch means in training, their running average at test time), removing the offset
            between the modalities that biases cross-modality similarities.
        memory: >0 keeps that many samples of earlier training batches as extra candidates of the
            training graph (:mod:`~cmssft.models.candidate_memory`), so that, as at test time, few
            of a node's candidates are its identity; no effect at test time.
        test_intra_k: >0 widens every *test* graph's row by that many most similar nodes of the
            row's own modality (an intra block beside the cross block, the two weighted apart as
            with ``block_norm``): a node's shared part and own specific slot are then also averaged
            with its own-modality neighbours' (as query expansion does), while its other-modality
            slot still comes from the cross block alone. Needs a cross block (``cross_k > 0``;
            ignored with ``cross_k = 0``); training graphs are unchanged.
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
        cross_k: int = 0,
        block_norm: bool = False,
        center: bool = False,
        center_momentum: float = 0.1,
        memory: int = 0,
        test_intra_k: int = 0,
    ) -> None:
        super().__init__()
        if topk < 1:
            raise UserError(f"model.sstn.topk must be >= 1, got {topk}")
        if not 0 <= cross_k <= topk:
            raise UserError(f"model.sstn.cross_k must be in [0, topk={topk}], got {cross_k}")
        if normalize not in ("softmax", "sum"):
            raise UserError(f"model.sstn.normalize: {normalize!r} is not softmax or sum")
        if fusion not in ("residual", "concat"):
            raise UserError(f"model.sstn.fusion: {fusion!r} is not residual or concat")
        if normalize == "softmax" and temperature <= 0:
            raise UserError(f"model.sstn.temperature must be > 0, got {temperature}")
        self.use_specific = use_specific
        self.topk, self.cross_k, self.block_norm = topk, cross_k, block_norm
        self.normalize, self.temperature = normalize, temperature
        self.self_loops, self.fusion, self.chunk = self_loops, fusion, max(1, chunk)
        self.num_modalities = num_modalities
        self.in_dim = dim * (1 + num_modalities) if use_specific else dim
        self.proj_sh = nn.Linear(dim, affinity_dim, bias=False) if affinity_dim > 0 else nn.Identity()
        # with other-modality neighbours only (cross_k = topk) no intra-modality similarity is ever kept, so the
        # specific term of S is not needed (nor its transform, which would get no gradient)
        self.specific_affinity = use_specific and cross_k < topk
        self.proj_sp = nn.Linear(dim, affinity_dim, bias=False) if affinity_dim > 0 and self.specific_affinity else None
        self.fuse_linear = nn.Linear(2 * self.in_dim, fused_dim or dim) if fusion == "concat" else None
        self.out_dim = self.in_dim if self.fuse_linear is None else self.fuse_linear.out_features
        self.neck = BNNeck(self.out_dim, bnneck)
        self.center, self.center_momentum = center, center_momentum
        if center:  # per-modality mean of the shared affinity embedding, tracked like BatchNorm's running mean
            width = affinity_dim if affinity_dim > 0 else dim
            self.register_buffer("modality_mean", torch.zeros(num_modalities, width))
        if memory < 0:
            raise UserError(f"model.sstn.memory must be >= 0, got {memory}")
        if test_intra_k < 0:
            raise UserError(f"model.sstn.test_intra_k must be >= 0, got {test_intra_k}")
        self.affinity_dim = affinity_dim
        self.test_intra_k = test_intra_k if cross_k > 0 else 0
        self.memory = CandidateMemory(memory, dim, use_specific) if memory > 0 else None
        self.blocks = row_layout(topk, cross_k)

    # ------------------------------------------------------------------ building blocks

    def test_view(self) -> SSTN:
        """The module test graphs are built with: itself, or (``test_intra_k > 0``) a shallow copy that
        shares every weight and buffer and differs only in its row layout: ``topk + test_intra_k``
        neighbours, ``cross_k`` of them from the other modality, the blocks weighted apart."""
        if self.test_intra_k == 0:
            return self
        view = copy.copy(self)
        view.topk = self.topk + self.test_intra_k
        view.block_norm, view.test_intra_k = True, 0
        view.blocks = row_layout(view.topk, self.cross_k)
        # own-modality similarities use the specific cosine too, unless a learned specific transform
        # would be needed and training (cross neighbours only) never built one
        view.specific_affinity = self.use_specific and (self.affinity_dim == 0 or self.proj_sp is not None)
        return view

    def nodes(self, shared: torch.Tensor, specific: torch.Tensor | None, modality: torch.Tensor) -> Nodes:
        """Unified features and unit affinity embeddings of ``[N, C]`` shared/specific features."""
        specific = specific if self.use_specific else None
        sh = self.proj_sh(shared)
        if self.center:
            sh = sh - self._modality_means(sh, modality)[modality]
        sh = F.normalize(sh, dim=1)
        sp = None
        if specific is not None and self.specific_affinity:
            sp = F.normalize((self.proj_sp or nn.Identity())(specific), dim=1)
        return Nodes(unify(shared, specific, modality, self.num_modalities), sh, sp, modality)

    def _modality_means(self, emb: torch.Tensor, modality: torch.Tensor) -> torch.Tensor:
        """``[M, E]`` means to subtract: the batch's per modality in training (the running means updated
        from them), the running means at test time, so a single query is centred like a whole gallery."""
        if not self.training:
            return self.modality_mean.to(emb.dtype)
        means = []
        for m in range(self.num_modalities):
            rows = emb[modality == m]
            if rows.shape[0] == 0:
                means.append(self.modality_mean[m].to(emb.dtype))
                continue
            mean = rows.mean(dim=0)
            with torch.no_grad():
                self.modality_mean[m].lerp_(mean.detach().float(), self.center_momentum)
            means.append(mean)
        return torch.stack(means)

    def similarity(self, rows: Nodes, cols: Nodes) -> torch.Tensor:
        """Block affinity ``S [n_rows, n_cols]``: intra-modality pairs use shared and specific
        features (mean of the two cosines), inter-modality pairs shared features only."""
        inter = rows.sh @ cols.sh.T
        if rows.sp is None or cols.sp is None:
            return inter
        intra = (inter + rows.sp @ cols.sp.T) / 2
        same = rows.modality.unsqueeze(1) == cols.modality.unsqueeze(0)
        return torch.where(same, intra, inter)

    @property
    def block_shares(self) -> list[tuple[int, int, float]] | None:
        """``(start, width, share)`` per block of a kept row when blocks are weighted apart, else None."""
        if not self.block_norm or len(self.blocks) == 1:
            return None
        return [(b.start, b.width, b.width / self.topk) for b in self.blocks]

    def weights(self, value: torch.Tensor) -> torch.Tensor:
        """Edge weights of kept similarities laid out in :attr:`blocks`."""
        return edge_weights(value, self.normalize, self.temperature, self.block_shares)

    def select(self, similarity: torch.Tensor, same: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Kept ``(value, index)`` ``[n, topk]`` of a similarity block whose excluded entries are ``-inf``;
        ``same`` ``[n, m]`` marks same-modality pairs (needed when ``cross_k > 0``)."""
        parts = []
        for block in self.blocks:
            s = similarity
            if block.kind != "all":
                s = similarity.masked_fill(~same if block.kind == "intra" else same, NEG_INF)
            parts.append(top_k(s, block.width))
        return torch.cat([v for v, _ in parts], dim=1), torch.cat([i for _, i in parts], dim=1)

    def graph(self, similarity: torch.Tensor, same: torch.Tensor | None = None, row_offset: int = 0) -> Graph:
        """``T_k`` then row normalisation; row i is node ``row_offset + i`` of the column set."""
        if not self.self_loops:
            similarity = similarity.clone()
            similarity.diagonal(offset=row_offset).fill_(NEG_INF)
        value, index = self.select(similarity, same)
        return Graph(index, self.weights(value), value)

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
        self,
        shared: torch.Tensor,
        specific: torch.Tensor | None,
        modality: torch.Tensor,
        labels: torch.Tensor | None = None,
    ) -> BatchTransfer:
        """The mini-batch graph over ``[N, C]`` features (``labels [N]`` only feed the statistics).

        With a candidate memory (training only) the graph's columns are the batch's N nodes then the
        memory's F stored samples (their affinity embeddings recomputed with the current weights), and
        this batch is then pushed into the memory.
        """
        rows = shared.shape[0]
        specific = specific if self.use_specific else None
        remembered = self.memory.entries() if self.memory is not None and self.training else None
        if remembered is not None and remembered[0].shape[0] > 0:
            mem_shared, mem_specific, mem_modality, mem_labels = remembered
            cols = self.nodes(
                torch.cat([shared, mem_shared.to(shared.dtype)]),
                None if specific is None else torch.cat([specific, mem_specific.to(specific.dtype)]),
                torch.cat([modality, mem_modality]),
            )
            nodes = slice_nodes(cols, 0, rows)
            col_labels = None if labels is None else torch.cat([labels, mem_labels])
        else:
            nodes = cols = self.nodes(shared, specific, modality)
            col_labels = labels
        same = modality.unsqueeze(1) == cols.modality.unsqueeze(0)
        graph = self.graph(self.similarity(nodes, cols), same)
        fused = self.fuse(nodes.x, propagate(graph, cols.x))
        if remembered is not None:
            self.memory.push(shared, specific, modality, labels)
        return BatchTransfer(fused, self.neck(fused), graph, cols.modality, col_labels)

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
        triples of bank features. ``.edges()`` of the result gives the kept test edges, nodes
        numbered queries first, then gallery.

        ``transductive``: one graph over query + gallery (queries first); every node's fused
        descriptor is computed once here, blocks are then plain products.
        ``single_query``: each query with the gallery alone, exactly as a one-query
        transductive call; the gallery's graph is built here, each query block on demand. Its
        edges are each query's in its own graph and the gallery's among themselves.
        Both build their graphs with :meth:`test_view`'s row layout.
        """
        if mode not in ("transductive", "single_query"):
            raise UserError(f"SSTN test mode {mode!r} is not transductive or single_query")
        view = self.test_view()
        q = view.nodes(*query)
        g = view.nodes(*gallery)
        if mode == "transductive":
            return view._transductive(q, g)
        return single_query_distance(view, q, g)

    def row_blocks(self, nodes: Nodes) -> Iterator[tuple[torch.Tensor, Nodes, Graph]]:
        """``(ids [b], rows, graph [b, topk] of those rows against every node)`` for blocks of at most
        ``chunk`` rows, together covering every node once; one ``[chunk, N]`` similarity block at a time.

        Nodes are visited grouped by modality (stably), so each block's same-modality columns are one
        contiguous range: the intra-modality term is one in-place ``addmm`` on that range, and the
        intra block of a balanced row is a top-k over that range alone. The similarity lives in one
        buffer reused for every block (fresh allocations of this size cost page faults on the CPU).
        Neighbour indices and their tie order are those of :meth:`graph` on the whole similarity.
        """
        n = nodes.x.shape[0]
        order = torch.argsort(nodes.modality, stable=True)
        counts = torch.bincount(nodes.modality[order]).tolist()
        ends = torch.tensor(counts).cumsum(0).tolist()
        groups = [(end - count, end) for count, end in zip(counts, ends, strict=True) if count]
        sh = nodes.sh[order]
        sp = None if nodes.sp is None else nodes.sp[order]
        buffer = sh.new_empty(min(self.chunk, n), n)
        for first, last in groups:
            for start in range(first, last, self.chunk):
                stop = min(start + self.chunk, last)
                s = torch.matmul(sh[start:stop], sh.T, out=buffer[: stop - start])
                if sp is not None:  # intra-modality: (shared cosine + specific cosine) / 2
                    s[:, first:last].addmm_(sp[start:stop], sp[first:last].T, beta=0.5, alpha=0.5)
                if not self.self_loops:
                    s.diagonal(offset=start).fill_(NEG_INF)
                value, index = self._select_grouped(s, first, last, order)
                ids = order[start:stop]
                graph = Graph(index, self.weights(value), value)
                yield ids, take_nodes(nodes, ids), graph

    def _select_grouped(
        self, s: torch.Tensor, first: int, last: int, order: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`select` for rows of one modality whose same-modality columns are ``first..last`` of
        the grouped column order ``order``; indices come back as node ids. May overwrite ``s``."""
        parts = []
        for block in self.blocks:
            if block.kind == "all":
                parts.append(top_k(s, block.width, order))
            elif block.kind == "intra":  # within the range, grouped order is node order: ties go to the lower id
                value, index = top_k(s[:, first:last], block.width)
                parts.append((value, order[first:last][index]))
            else:
                s[:, first:last] = NEG_INF
                parts.append(top_k(s, block.width, order))
        return torch.cat([v for v, _ in parts], dim=1), torch.cat([i for _, i in parts], dim=1)

    def describe(self, nodes: Nodes) -> tuple[torch.Tensor, Graph]:
        """One graph over ``nodes``: every node's fused descriptor ``[N, D']`` (float32) and the graph
        itself (``[N, topk]``, rows in node order), built :attr:`chunk` rows at a time."""
        n = nodes.x.shape[0]
        feats = nodes.x.new_empty(n, self.out_dim, dtype=torch.float32)
        index = torch.zeros(n, self.topk, dtype=torch.long, device=nodes.x.device)
        weight = feats.new_zeros(n, self.topk)
        value = feats.new_full((n, self.topk), NEG_INF)
        for ids, rows, graph in self.row_blocks(nodes):
            feats[ids] = self.descriptor(rows.x, propagate(graph, nodes.x)).float()
            index[ids], weight[ids], value[ids] = graph.index, graph.weight.float(), graph.value.float()
        return feats, Graph(index, weight, value)

    def _transductive(self, q: Nodes, g: Nodes) -> DistanceBlocks:
        nodes = Nodes(*(torch.cat([a, b]) if a is not None else None for a, b in zip(q, g, strict=True)))
        feats, graph = self.describe(nodes)
        feats = F.normalize(feats, dim=1)
        num_q = q.x.shape[0]
        edges = graph.edges()
        # query-query and gallery-gallery distances of the same descriptors (re-ranking): one graph for all three
        return cosine_distance_blocks(feats[:num_q], feats[num_q:], block_rows=self.chunk, edges=lambda: edges)
