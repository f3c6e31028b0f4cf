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
``[rows, G]`` (:class:`~cmssft.evaluation.metrics.DistanceBlocks`), which also carry the kept test
edges for :mod:`cmssft.evaluation.graph_stats`. The dense ``N x N`` reference used to check all
of this lives in :mod:`cmssft.models.sstn_reference`.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from cmssft.errors import UserError
from cmssft.evaluation.graph_stats import KeptEdges, edge_statistics
from cmssft.evaluation.metrics import DistanceBlocks
from cmssft.models.candidate_memory import CandidateMemory
from cmssft.models.neck import BNNeck

_EPS = 1e-6
MODES = ("transductive", "single_query", "off")
_NEG_INF = float("-inf")


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
        return self.value > _NEG_INF

    def edges(self, offset: int = 0) -> KeptEdges:
        """The kept edges for :mod:`~cmssft.evaluation.graph_stats`, node ids shifted by ``offset``."""
        return KeptEdges(self.index + offset, self.weight, self.valid)


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


class _Block(NamedTuple):
    """One block of a kept row: ``kind`` (``all``, ``intra`` or ``cross``) over columns ``start..start+width``."""

    kind: str
    start: int
    width: int


def _row_layout(topk: int, cross_k: int) -> tuple[_Block, ...]:
    """The blocks of a kept row: one ``all`` block (``cross_k = 0``), else intra then cross."""
    if cross_k == 0:
        return (_Block("all", 0, topk),)
    return (_Block("intra", 0, topk - cross_k), _Block("cross", topk - cross_k, cross_k))


class _GalleryParts(NamedTuple):
    """Single-query scoring's per-gallery-row terms when the query would enter block ``block`` of a
    row: ``[G, D']`` descriptors ``u`` (the block's k-1 kept, scaled) and ``c`` (block without
    messages), their ``[G]`` products, the block's share ``share`` of the row's weight, the
    similarity ``kth`` the query must reach (``-inf``: the block has room), and the weight mass of
    the block's normalisation group once the k-th has left (``mass``)."""

    block: _Block
    u: torch.Tensor
    c: torch.Tensor
    uu: torch.Tensor
    cc: torch.Tensor
    uc: torch.Tensor
    share: torch.Tensor
    kth: torch.Tensor
    mass: torch.Tensor


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


def _raw_weights(value: torch.Tensor, normalize: str, temperature: float) -> torch.Tensor:
    """Unnormalised positive weights of kept similarities ``[N, k]``, 0 for padding; softmax terms are
    relative to each row's largest valid value (so only ratios within a row are meaningful)."""
    value = value.float()
    valid = value > _NEG_INF
    if value.shape[1] == 0:
        return value
    if normalize == "softmax":
        top = value.max(dim=1, keepdim=True).values.clamp_min(-1e30)  # a row of padding only: any finite
        return torch.exp((value - top) / temperature) * valid
    if normalize == "sum":
        return ((1.0 + value) / 2.0).clamp_min(_EPS) * valid
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
            torch.cat([value, value.new_full((n, pad), _NEG_INF)], dim=1),
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
        self.blocks = _row_layout(topk, cross_k)

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
        view.blocks = _row_layout(view.topk, self.cross_k)
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
    def _shares(self) -> list[tuple[int, int, float]] | None:
        if not self.block_norm or len(self.blocks) == 1:
            return None
        return [(b.start, b.width, b.width / self.topk) for b in self.blocks]

    def weights(self, value: torch.Tensor) -> torch.Tensor:
        """Edge weights of kept similarities laid out in :attr:`blocks`."""
        return edge_weights(value, self.normalize, self.temperature, self._shares)

    def select(self, similarity: torch.Tensor, same: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Kept ``(value, index)`` ``[n, topk]`` of a similarity block whose excluded entries are ``-inf``;
        ``same`` ``[n, m]`` marks same-modality pairs (needed when ``cross_k > 0``)."""
        parts = []
        for block in self.blocks:
            s = similarity
            if block.kind != "all":
                s = similarity.masked_fill(~same if block.kind == "intra" else same, _NEG_INF)
            parts.append(top_k(s, block.width))
        return torch.cat([v for v, _ in parts], dim=1), torch.cat([i for _, i in parts], dim=1)

    def graph(self, similarity: torch.Tensor, same: torch.Tensor | None = None, row_offset: int = 0) -> Graph:
        """``T_k`` then row normalisation; row i is node ``row_offset + i`` of the column set."""
        if not self.self_loops:
            similarity = similarity.clone()
            similarity.diagonal(offset=row_offset).fill_(_NEG_INF)
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
            nodes = _slice(cols, 0, rows)
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
        return view._single_query(q, g)

    def _row_blocks(self, nodes: Nodes) -> Iterator[tuple[torch.Tensor, Nodes, Graph]]:
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
                    s.diagonal(offset=start).fill_(_NEG_INF)
                value, index = self._select_grouped(s, first, last, order)
                ids = order[start:stop]
                graph = Graph(index, self.weights(value), value)
                yield ids, _take(nodes, ids), graph

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
                s[:, first:last] = _NEG_INF
                parts.append(top_k(s, block.width, order))
        return torch.cat([v for v, _ in parts], dim=1), torch.cat([i for _, i in parts], dim=1)

    def _transductive(self, q: Nodes, g: Nodes) -> DistanceBlocks:
        nodes = Nodes(*(torch.cat([a, b]) if a is not None else None for a, b in zip(q, g, strict=True)))
        n = nodes.x.shape[0]
        feats = nodes.x.new_empty(n, self.out_dim, dtype=torch.float32)
        index = torch.zeros(n, self.topk, dtype=torch.long, device=nodes.x.device)
        weight = feats.new_zeros(n, self.topk)
        value = feats.new_full((n, self.topk), _NEG_INF)
        for ids, rows, graph in self._row_blocks(nodes):
            feats[ids] = self.descriptor(rows.x, propagate(graph, nodes.x)).float()
            index[ids], weight[ids], value[ids] = graph.index, graph.weight.float(), graph.value.float()
        feats = F.normalize(feats, dim=1)
        num_q = q.x.shape[0]
        f_q, f_g = feats[:num_q], feats[num_q:]
        edges = Graph(index, weight, value).edges()
        return DistanceBlocks(
            (num_q, f_g.shape[0]),
            lambda start, stop: 1.0 - f_q[start:stop] @ f_g.T,
            block_rows=self.chunk,
            device=feats.device,
            edges=lambda: edges,
        )

    # ------------------------------------------------------------------ single query

    def _single_query(self, q: Nodes, g: Nodes) -> DistanceBlocks:
        gallery_graph = _GalleryGraph.build(self, g)
        parts = [self._gallery_parts(g, gallery_graph, block) for block in self._blocks_a_query_enters(q, g)]
        num_q = q.x.shape[0]

        def block(start: int, stop: int) -> torch.Tensor:
            return 1.0 - self._single_query_cosine(_slice(q, start, stop), g, gallery_graph, parts)

        def edges() -> KeptEdges:
            parts = []
            for start in range(0, num_q, self.chunk):
                stop = min(start + self.chunk, num_q)
                graph = self._query_graph(_slice(q, start, stop), g)[1]
                own = torch.arange(start, stop, device=graph.index.device).unsqueeze(1)  # self loop: index -1
                parts.append(KeptEdges(torch.where(graph.index < 0, own, graph.index + num_q), graph.weight,
                                       graph.valid))
            parts.append(gallery_graph.graph.edges(offset=num_q))
            return KeptEdges(*(torch.cat([p[i] for p in parts]) for i in range(3)))

        return DistanceBlocks((num_q, g.x.shape[0]), block, block_rows=self.chunk, device=g.x.device, edges=edges)

    def _blocks_a_query_enters(self, q: Nodes, g: Nodes) -> list[_Block]:
        """The blocks of gallery rows that some query can enter: all, or intra/cross by modality pairs."""
        q_mods, g_mods = set(q.modality.unique().tolist()), set(g.modality.unique().tolist())
        needed = []
        for block in self.blocks:
            if block.width == 0:
                continue
            if block.kind == "all" or (block.kind == "intra" and q_mods & g_mods) or (
                block.kind == "cross" and any(a != b for a in q_mods for b in g_mods)
            ):
                needed.append(block)
        return needed

    def _gallery_parts(self, g: Nodes, gg: _GalleryGraph, block: _Block) -> _GalleryParts:
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
        value = graph.value.masked_fill(~kept, _NEG_INF)
        if self._shares is None:  # one normalisation group: the whole row
            group = value
            z_red = propagate(Graph(graph.index, edge_weights(value, self.normalize, self.temperature), value), x)
            z_other, share = torch.zeros_like(z_red), torch.ones(x.shape[0], device=x.device)
        else:
            group = value[:, block.start : block.start + block.width]
            z_other, share = self._other_blocks(graph, x, block)
            blk = Graph(graph.index[:, block.start : block.start + block.width],
                        edge_weights(group, self.normalize, self.temperature), group)
            z_red = propagate(blk, x)
        share_col = share.unsqueeze(1).to(x.dtype)
        u = self.descriptor(x, z_other + share_col * z_red).float()
        c = self.descriptor(x, z_other).float()
        return _GalleryParts(
            block=block,
            u=u,
            c=c,
            uu=(u * u).sum(1),
            cc=(c * c).sum(1),
            uc=(u * c).sum(1),
            share=share.float(),
            kth=graph.value[:, last].float(),
            mass=self._mass(group),
        )

    def _other_blocks(self, graph: Graph, x: torch.Tensor, entered: _Block) -> tuple[torch.Tensor, torch.Tensor]:
        """Block-normalised rows once the query enters ``entered``: the other blocks' message ``[G, D]``
        and the entered block's share ``[G]`` (shares renormalised over the blocks then non-empty)."""
        valid = graph.valid
        masses, messages = [], []
        for block in self.blocks:
            cols = slice(block.start, block.start + block.width)
            nonempty = valid[:, cols].any(dim=1) if block is not entered else torch.ones_like(valid[:, 0])
            masses.append(block.width / self.topk * nonempty.float())
            if block is entered:
                messages.append(None)
                continue
            value = graph.value[:, cols]
            sub = Graph(graph.index[:, cols], edge_weights(value, self.normalize, self.temperature), value)
            messages.append(propagate(sub, x))
        total = torch.stack(masses).sum(dim=0).clamp_min(1e-12)
        z_other = torch.zeros_like(x)
        for mass, message in zip(masses, messages, strict=True):
            if message is not None:
                z_other = z_other + (mass / total).unsqueeze(1).to(x.dtype) * message
        share = masses[self.blocks.index(entered)] / total
        return z_other, share

    def _single_query_cosine(
        self, rows: Nodes, g: Nodes, gg: _GalleryGraph, parts: list[_GalleryParts]
    ) -> torch.Tensor:
        """Cosine ``[B, G]`` of each query of ``rows`` with every gallery row of its one-query graph.

        A query changes a gallery row's descriptor only where it enters that row's block for the
        query's modality (``s >= kth`` of that block): every pair gets the product with the unchanged
        descriptor, and only the entered pairs are recomputed. Their four dot products come from the
        gathered rows when they are few, else from whole-block products.
        """
        s_qg = self._query_similarity(rows, g).float()  # S is symmetric: s(g, q) = s(q, g)
        f_q = F.normalize(self._query_graph(rows, g, s_qg)[0].float(), dim=1)
        zero = torch.zeros_like(rows.x)
        m = (self.descriptor(zero, rows.x) - self.descriptor(zero, zero)).float()
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
                cos[qi, gj] = self._entered_cosine(f_q, m, p, qi, gj, s_qg[qi, gj], cos.numel())
        return cos

    def _entered_cosine(
        self, f_q: torch.Tensor, m: torch.Tensor, p: _GalleryParts, qi: torch.Tensor, gj: torch.Tensor,
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
        alpha = self._alpha(p.mass[gj], s_new)
        beta, share = 1 - alpha, p.share[gj]
        dot = alpha * fu + beta * (fc + share * (f_q * m).sum(1)[qi])
        norm = (
            alpha**2 * p.uu[gj]
            + beta**2 * (p.cc[gj] + 2 * share * mc + share**2 * (m * m).sum(1)[qi])
            + 2 * alpha * beta * (p.uc[gj] + share * mu)
        )
        return dot / norm.clamp_min(1e-12).sqrt()

    def _query_similarity(self, rows: Nodes, g: Nodes) -> torch.Tensor:
        """:meth:`similarity` of a query block with the gallery; a block that shares no modality with
        the gallery (the usual cross-modality query) needs the shared product alone."""
        if rows.sp is None or set(g.modality.unique().tolist()).isdisjoint(rows.modality.unique().tolist()):
            return rows.sh @ g.sh.T
        return self.similarity(rows, g)

    def _mass(self, value: torch.Tensor) -> torch.Tensor:
        """Weight mass of kept similarities (``-inf`` padding excluded): log-sum-exp for softmax, sum for sum."""
        value = value.float()
        if self.normalize == "softmax":
            return torch.logsumexp(value / self.temperature, dim=1)  # -inf for a row of padding
        return (((1.0 + value) / 2.0).clamp_min(_EPS) * (value > _NEG_INF)).sum(dim=1)

    def _alpha(self, mass: torch.Tensor, s_new: torch.Tensor) -> torch.Tensor:
        """Share of a group's weight left on its kept neighbours once a node of similarity ``s_new`` joins."""
        if self.normalize == "softmax":
            return torch.sigmoid(mass - s_new / self.temperature)
        w_new = ((1.0 + s_new) / 2.0).clamp_min(_EPS)
        return mass / (mass + w_new)

    def _query_graph(
        self, rows: Nodes, g: Nodes, s_qg: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, Graph]:
        """Fused descriptor of each query with the gallery (and itself if self loops) as candidates, and
        its kept edges (gallery nodes numbered from 0; with self loops, the query itself is ``-1``)."""
        if s_qg is None:
            s_qg = self._query_similarity(rows, g).float()
        same = rows.modality.unsqueeze(1) == g.modality.unsqueeze(0)
        if self.self_loops:  # the query is column 0, ahead of the gallery: it wins ties
            s_self = self._self_similarity(rows).unsqueeze(1).float()
            value, index = self.select(torch.cat([s_self, s_qg], dim=1), F.pad(same, (1, 0), value=True))
            index = index - 1
        else:
            value, index = self.select(s_qg, same)
        nb = g.x[index.clamp_min(0)]
        nb = torch.where((index < 0).unsqueeze(-1), rows.x.unsqueeze(1), nb)
        graph = Graph(index, self.weights(value), value)
        return self.descriptor(rows.x, (graph.weight.to(nb.dtype).unsqueeze(-1) * nb).sum(dim=1)), graph

    @staticmethod
    def _self_similarity(rows: Nodes) -> torch.Tensor:
        s = (rows.sh * rows.sh).sum(1)
        return s if rows.sp is None else (s + (rows.sp * rows.sp).sum(1)) / 2


class _GalleryGraph(NamedTuple):
    """The gallery's graph among its own nodes (``[G, topk]``, node order) and the unit descriptor
    ``f0_unit [G, D']`` of every gallery row that no query enters."""

    graph: Graph
    f0_unit: torch.Tensor

    @classmethod
    def build(cls, sstn: SSTN, g: Nodes) -> _GalleryGraph:
        num_g = g.x.shape[0]
        index = torch.zeros(num_g, sstn.topk, dtype=torch.long, device=g.x.device)
        weight = g.x.new_zeros(num_g, sstn.topk, dtype=torch.float32)
        value = g.x.new_full((num_g, sstn.topk), _NEG_INF, dtype=torch.float32)
        f0 = g.x.new_empty(num_g, sstn.out_dim, dtype=torch.float32)
        for ids, rows, graph in sstn._row_blocks(g):
            f0[ids] = sstn.descriptor(rows.x, propagate(graph, g.x)).float()
            index[ids], weight[ids], value[ids] = graph.index, graph.weight.float(), graph.value.float()
        return cls(Graph(index, weight, value), f0 / f0.norm(dim=1, keepdim=True).clamp_min(1e-12))
