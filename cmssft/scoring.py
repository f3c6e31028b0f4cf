"""What a scorer hands the evaluation: distances in query blocks, and the kept edges of its test graph.

Models produce these values (``score_blocks``) and the evaluation consumes them (metrics, re-ranking,
graph statistics); both import them from here, below either.

Shapes::

    DistanceBlocks          (Q, G) float distances, smaller = more similar, computed in query blocks
                            [rows, G] on demand; ``within`` (optional) gives (Q, Q) and (G, G) in the
                            same space, ``edges`` (optional) the kept edges of the graph behind them
    KeptEdges.index   long  [N, k]  node id of each kept neighbour
    KeptEdges.weight  float [N, k]  its weight (a row sums to 1, or 0 when it kept nothing)
    KeptEdges.valid   bool  [N, k]  False for padding (a block with fewer candidates than its k)
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import NamedTuple

import torch
from torch import Tensor

# Elements of one producer block of a DistanceBlocks: rows = this // G (at least 1).
BLOCK_ELEMENTS = 1 << 22


class DistanceBlocks:
    """A (Q, G) distance matrix (smaller = more similar) handed out a block of query rows at a time.

    This is the blockwise form of a score function's result: ``compute(start, stop)`` returns the
    float rows ``[stop - start, G]`` on ``device``. It is only ever called on the aligned producer
    blocks ``[i * block_rows, min((i + 1) * block_rows, Q))`` (the last one is kept for the next
    request), so values never depend on how a consumer slices the rows and :meth:`full` equals any
    concatenation of :meth:`rows` bit for bit. A consumer walking the rows in order holds
    O(block_rows x G) at a time. Rows are computed without autograd.

    ``edges`` (optional, for graph-based scorers): a zero-argument function giving the kept edges of
    the test graph behind these distances (a :class:`~cmssft.evaluation.graph_stats.KeptEdges`,
    nodes numbered queries first, then gallery), for :mod:`~cmssft.evaluation.graph_stats`.

    ``within`` (optional): a zero-argument function giving the query-query ``[Q, Q]`` and
    gallery-gallery ``[G, G]`` distances *in the same space* as these (the same descriptors, from
    the same test graph), as two more :class:`DistanceBlocks`. k-reciprocal re-ranking needs all
    three; a scorer that cannot give them (each query scored in a graph of its own) leaves it None
    and cannot be re-ranked.
    """

    def __init__(
        self,
        shape: tuple[int, int],
        compute: Callable[[int, int], Tensor],
        *,
        block_rows: int | None = None,
        device: torch.device | str = "cpu",
        edges: Callable[[], tuple[Tensor, Tensor, Tensor]] | None = None,
        within: Callable[[], tuple[DistanceBlocks, DistanceBlocks]] | None = None,
    ) -> None:
        self.shape = (int(shape[0]), int(shape[1]))
        self.compute = compute
        self.edges = edges
        self.within = within
        default = max(1, BLOCK_ELEMENTS // max(1, self.shape[1]))
        self.block_rows = max(1, int(block_rows or default))
        self.device = torch.device(device)
        self._cached: tuple[int, Tensor] | None = None

    def _block(self, index: int) -> Tensor:
        if self._cached is None or self._cached[0] != index:
            start = index * self.block_rows
            with torch.no_grad():
                block = self.compute(start, min(start + self.block_rows, self.shape[0]))
            self._cached = (index, block)
        return self._cached[1]

    def rows(self, start: int, stop: int) -> Tensor:
        """Rows ``start..stop-1``: ``[stop - start, G]``."""
        start, stop = max(0, start), min(stop, self.shape[0])
        if stop <= start:
            return torch.empty(0, self.shape[1], device=self.device)
        first, last = start // self.block_rows, (stop - 1) // self.block_rows
        parts = []
        for index in range(first, last + 1):
            base = index * self.block_rows
            parts.append(self._block(index)[max(start, base) - base : min(stop, base + self.block_rows) - base])
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def __iter__(self) -> Iterator[tuple[int, Tensor]]:
        """``(start, rows [b, G])`` over the producer blocks, in order."""
        for start in range(0, self.shape[0], self.block_rows):
            yield start, self.rows(start, start + self.block_rows)

    def full(self) -> Tensor:
        """The whole ``[Q, G]`` matrix (re-ranking and pictures need it)."""
        if self.shape[0] == 0:
            return torch.empty(self.shape, device=self.device)
        out = [block for _, block in self]
        self._cached = None
        return out[0] if len(out) == 1 else torch.cat(out)

    def map(self, fn: Callable[[Tensor], Tensor], device: torch.device | str | None = None) -> DistanceBlocks:
        """The same blocks passed through ``fn`` (e.g. ``lambda t: t.float().cpu()``)."""
        source, within = self, self.within
        mapped_within = None if within is None else lambda: tuple(w.map(fn, device) for w in within())
        return DistanceBlocks(self.shape, lambda a, b: fn(source.compute(a, b)), block_rows=self.block_rows,
                              device=self.device if device is None else device, edges=self.edges,
                              within=mapped_within)


def cosine_distance_blocks(
    query: Tensor, gallery: Tensor, *, block_rows: int | None = None,
    edges: Callable[[], tuple[Tensor, Tensor, Tensor]] | None = None,
) -> DistanceBlocks:
    """``1 - query @ gallery.T`` of unit rows (``[Q, D]``, ``[G, D]``) in query blocks, with the
    query-query and gallery-gallery distances of the same rows as its ``within``."""

    def pair(a: Tensor, b: Tensor, **extra: object) -> DistanceBlocks:
        return DistanceBlocks((len(a), len(b)), lambda start, stop: 1.0 - a[start:stop] @ b.T,
                              block_rows=block_rows, device=a.device, **extra)

    return pair(query, gallery, edges=edges, within=lambda: (pair(query, query), pair(gallery, gallery)))


def full_distances(dist: Tensor | DistanceBlocks) -> Tensor:
    """A score function's result as one ``[Q, G]`` tensor."""
    return dist.full() if isinstance(dist, DistanceBlocks) else dist


class KeptEdges(NamedTuple):
    """The kept edges of a graph's rows; see the module docstring for shapes."""

    index: torch.Tensor
    weight: torch.Tensor
    valid: torch.Tensor
