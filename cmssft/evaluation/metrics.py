"""Ranking metrics (CMC, mAP, mINP) as pure, vectorised functions of distances and labels.

Shapes at this boundary:

- ``distmat``: (Q, G) float tensor, smaller is more similar, or a :class:`DistanceBlocks` that
  computes those rows a block at a time (then peak memory is O(block x G), never O(Q x G));
- ``q_pids``/``q_camids``: (Q,) integers; ``g_pids``/``g_camids``: (G,) integers.

Everything runs in torch on the distance matrix's device (on CPU the row sort is
NumPy's, which is several times faster than ``torch.sort`` there), chunked over
queries so that peak memory is a few (chunk, G) tensors, never (Q, G, anything).
There is no Python loop over queries.

Only the true matches are ranked. The gallery columns of each identity are known
up front, so each query's true matches are M slots of (C, M) tensors; the rank of a
match is 1 + the number of kept items ahead of it in the order (distance, gallery
index), found either by a binary search in the sorted row (``sort``) or by comparing
it with the whole row (``count``).

Conventions (identical to the community reference code, see docs/EVALUATION.md):

- each query's gallery is ranked by ascending distance with a **stable** sort: ties
  keep gallery order, so results are deterministic (the reference's ``np.argsort``
  default, quicksort, may order tied distances differently);
- an *exclusion rule* removes gallery items from a query's ranked list before any
  metric is computed;
- a query with no true match left after exclusion is *invalid*: it is skipped by
  every metric and counted in :attr:`RankingMetrics.num_invalid`;
- CMC at rank k: fraction of valid queries whose first true match is within the top
  k. With ``dedup=True`` the ranked list first drops repeated identities (first
  occurrence kept), as SYSU-MM01 protocols do; AP and INP always use the full list;
- AP: mean over true matches of precision at that match's rank;
- INP: number of true matches / rank of the hardest (last) true match.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from cmssft.scoring import DistanceBlocks

ExclusionName = Literal["none", "sysu", "same_camera"]
# A rule maps (query pids (Q,1), query cams (Q,1), gallery pids (1,G), gallery cams (1,G)) to a
# (Q, G) bool mask of gallery items to *remove*.
ExclusionFn = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]
Exclusion = ExclusionName | ExclusionFn

MAX_RANK = 20
Method = Literal["auto", "sort", "count"]
COUNT_MAX_MATCHES = 2  # "auto" ranks by counting when no query has more true matches than this
# Elements of one (chunk, G) working tensor; a handful of these live at once.
DEFAULT_CHUNK_ELEMENTS = 1 << 22


def ranked_top_k(dist: Tensor | DistanceBlocks, k: int) -> tuple[Tensor, Tensor]:
    """The ``k`` nearest gallery columns of every query row, in ranking order: ascending distance,
    ties to the lower gallery index (the stable sort every metric here ranks by).

    Returns long indices ``[Q, k']`` and their distances ``[Q, k']`` (``k' = min(k, G)``), on the CPU.
    A :class:`DistanceBlocks` is read a block at a time: memory stays O(block x G).
    """
    if isinstance(dist, Tensor):
        return _stable_top_k(dist.detach().cpu(), k)
    parts = [_stable_top_k(rows.detach().cpu(), k) for _, rows in dist]
    if not parts:
        width = min(k, dist.shape[1])
        return torch.empty(0, width, dtype=torch.long), torch.empty(0, width)
    return torch.cat([i for i, _ in parts]), torch.cat([v for _, v in parts])


def _stable_top_k(rows: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """:func:`ranked_top_k` of one ``[b, G]`` block: ``topk``, ties ordered by index; rows with a tie
    across the k-th place (``topk`` may keep any of the tied columns) are sorted in full."""
    k = min(k, rows.shape[1])
    values, index = torch.topk(rows, k, dim=1, largest=False, sorted=True)
    by_index = index.argsort(dim=1)
    index, values = index.gather(1, by_index), values.gather(1, by_index)
    by_value = values.argsort(dim=1, stable=True)
    index, values = index.gather(1, by_value), values.gather(1, by_value)
    if k:
        crowded = (rows <= values[:, -1:]).sum(dim=1) > k
        if bool(crowded.any()):
            full = torch.sort(rows[crowded], dim=1, stable=True)
            index[crowded], values[crowded] = full.indices[:, :k], full.values[:, :k]
    return index, values


def exclude_none(q_pids: Tensor, q_cams: Tensor, g_pids: Tensor, g_cams: Tensor) -> Tensor:
    """Keep every gallery item (RegDB, cross-modality custom data)."""
    return torch.zeros(torch.broadcast_shapes(q_pids.shape, g_pids.shape), dtype=torch.bool,
                       device=g_pids.device)


def exclude_sysu(q_pids: Tensor, q_cams: Tensor, g_pids: Tensor, g_cams: Tensor) -> Tensor:
    """SYSU-MM01: camera 3 (IR) and camera 2 (RGB) share a room, so a camera-3 query
    ignores every camera-2 gallery image, whatever its identity."""
    return (q_cams == 3) & (g_cams == 2)


def exclude_same_camera(q_pids: Tensor, q_cams: Tensor, g_pids: Tensor, g_cams: Tensor) -> Tensor:
    """Market-1501 style: drop gallery images of the query's identity from the query's camera."""
    return (q_pids == g_pids) & (q_cams == g_cams)


EXCLUSIONS: dict[str, ExclusionFn] = {
    "none": exclude_none,
    "sysu": exclude_sysu,
    "same_camera": exclude_same_camera,
}


def get_exclusion(rule: Exclusion) -> ExclusionFn:
    """Resolve a rule name (``none``, ``sysu``, ``same_camera``) or pass a callable through."""
    if callable(rule):
        return rule
    try:
        return EXCLUSIONS[rule]
    except KeyError:
        raise ValueError(f"unknown exclusion rule {rule!r}; expected one of {sorted(EXCLUSIONS)}") from None


@dataclass
class RankingMetrics:
    """Metrics of one query/gallery evaluation; CMC and means are fractions in [0, 1].

    ``ap`` and ``inp`` hold one value per *valid* query, in query order.
    """

    cmc: np.ndarray  # (max_rank,) float64
    mAP: float
    mINP: float
    num_queries: int
    num_valid: int
    ap: np.ndarray = field(repr=False, default_factory=lambda: np.zeros(0))
    inp: np.ndarray = field(repr=False, default_factory=lambda: np.zeros(0))

    @property
    def num_invalid(self) -> int:
        return self.num_queries - self.num_valid

    def rank(self, k: int) -> float:
        return float(self.cmc[k - 1])


def _as_long(x: Tensor | np.ndarray | list[int], device: torch.device) -> Tensor:
    return torch.as_tensor(np.asarray(x) if not isinstance(x, Tensor) else x, device=device).long()


def evaluate_ranking(
    distmat: Tensor | np.ndarray | DistanceBlocks,
    q_pids: Tensor | np.ndarray,
    g_pids: Tensor | np.ndarray,
    q_camids: Tensor | np.ndarray,
    g_camids: Tensor | np.ndarray,
    exclusion: Exclusion = "none",
    dedup: bool = False,
    max_rank: int = MAX_RANK,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
    method: Method = "auto",
) -> RankingMetrics:
    """CMC at ranks 1..``max_rank``, mAP and mINP of a (Q, G) distance matrix.

    ``method`` picks how the true matches are ranked; all give identical numbers.
    ``sort`` sorts each row's (kept) distances and places every true match by binary
    search (O(G log G) per query, NumPy's sort on CPU); ``count`` compares each true match
    with the whole row (O(M * G) per query for at most M true matches); ``auto`` takes
    ``count`` when M <= 2, else ``sort``. A :class:`DistanceBlocks` is consumed a chunk of
    queries at a time and gives the same numbers as its full matrix. Raises ``ValueError``
    when no query has a true match (nothing to average).
    """
    dist = distmat if isinstance(distmat, DistanceBlocks) else torch.as_tensor(distmat)
    if len(dist.shape) != 2:
        raise ValueError(f"distmat must be (Q, G), got shape {tuple(dist.shape)}")
    num_q, num_g = dist.shape
    device = dist.device
    qp, gp = _as_long(q_pids, device), _as_long(g_pids, device)
    qc, gc = _as_long(q_camids, device), _as_long(g_camids, device)
    if qp.shape != (num_q,) or qc.shape != (num_q,) or gp.shape != (num_g,) or gc.shape != (num_g,):
        raise ValueError("pid/camid vectors must match the distance matrix: "
                         f"dist {tuple(dist.shape)}, q {tuple(qp.shape)}/{tuple(qc.shape)}, "
                         f"g {tuple(gp.shape)}/{tuple(gc.shape)}")
    if num_g == 0:
        raise ValueError("the gallery is empty")
    if method not in ("auto", "sort", "count"):
        raise ValueError(f"method must be auto, sort or count, got {method!r}")
    if num_q == 0:
        raise ValueError("no query has a true match in the gallery after exclusions")
    rows_of = _row_reader(dist)
    rule = get_exclusion(exclusion)
    ids = _Identities(qp, gp)
    width = ids.max_matches
    if method == "auto":
        method = "count" if width <= COUNT_MAX_MATCHES else "sort"
    step = max(1, chunk_elements // (num_g * (width if method == "count" else 1)))
    outputs, sorter = [], _RowSorter()
    for start in range(0, num_q, step):
        rows = slice(start, min(start + step, num_q))
        idx, present = ids.slots(rows)
        outputs.append(_chunk_metrics(rows_of(rows), qp[rows], qc[rows], gp, gc, rule, idx, present, method,
                                      ids.g_index if dedup else None, ids.q_index[rows], ids.num_pids,
                                      chunk_elements, sorter))
    first_rank, ap, inp, valid = (torch.cat(parts) for parts in zip(*outputs, strict=True))
    num_valid = int(valid.sum())
    if num_valid == 0:
        raise ValueError("no query has a true match in the gallery after exclusions")
    ranks = torch.arange(1, max_rank + 1, device=device)
    cmc = (first_rank[valid, None] <= ranks[None, :]).double().mean(0)
    ap_valid = ap[valid].cpu().numpy()
    inp_valid = inp[valid].cpu().numpy()
    return RankingMetrics(
        cmc=cmc.cpu().numpy(),
        mAP=float(ap_valid.mean()),
        mINP=float(inp_valid.mean()),
        num_queries=num_q,
        num_valid=num_valid,
        ap=ap_valid,
        inp=inp_valid,
    )


def _row_reader(dist: Tensor | DistanceBlocks) -> Callable[[slice], Tensor]:
    """Rows of the distances as a float32/64 tensor, checked finite (all at once for a full matrix)."""

    def prepare(block: Tensor) -> Tensor:
        if block.dtype not in (torch.float32, torch.float64):
            block = block.double()  # exact for half, bfloat16 and integers below 2**53
        return block

    if isinstance(dist, Tensor):
        dist = prepare(dist)
        if not _all_finite(dist):
            raise ValueError("distmat holds NaN or infinite values")
        return lambda rows: dist[rows]

    def read(rows: slice) -> Tensor:
        block = prepare(dist.rows(rows.start, rows.stop))
        if not _all_finite(block):
            raise ValueError("distmat holds NaN or infinite values")
        return block

    return read


def _all_finite(dist: Tensor) -> bool:
    """``torch.isfinite(dist).all()`` without a (Q, G) temporary: min and max propagate NaN."""
    low, high = torch.aminmax(dist)
    return bool(torch.isfinite(low) & torch.isfinite(high))


class _Identities:
    """Gallery columns grouped by identity, so each query's true matches can be listed directly.

    ``g_order`` holds the gallery columns sorted by identity, gallery order within an
    identity; identity ``i`` (of ``num_pids``) owns ``g_order[starts[i]:starts[i] + counts[i]]``.
    """

    def __init__(self, qp: Tensor, gp: Tensor) -> None:
        self.g_order = torch.sort(gp, stable=True).indices
        pids, self.counts = torch.unique_consecutive(gp[self.g_order], return_counts=True)
        self.starts = self.counts.cumsum(0) - self.counts
        self.num_pids = len(pids)
        pos = torch.searchsorted(pids, qp).clamp_max(self.num_pids - 1)
        self.q_index = torch.where(pids[pos] == qp, pos, -1)  # (Q,) identity of each query, -1 if absent
        self.per_query = torch.where(self.q_index >= 0, self.counts[pos], 0)  # (Q,) gallery items of its identity
        self.max_matches = max(1, int(self.per_query.max()) if len(qp) else 1)
        self.g_index = torch.empty_like(gp)  # (G,) identity of each gallery column
        self.g_index[self.g_order] = torch.repeat_interleave(torch.arange(self.num_pids, device=gp.device),
                                                             self.counts)

    def slots(self, rows: slice) -> tuple[Tensor, Tensor]:
        """(C, M) gallery column of each query's k-th same-identity item (ascending) and whether it exists."""
        k = torch.arange(self.max_matches, device=self.g_order.device)
        present = k[None, :] < self.per_query[rows, None]
        first = self.starts[self.q_index[rows].clamp_min(0)]
        flat = (first[:, None] + k[None, :]).clamp_max(len(self.g_order) - 1)
        return self.g_order[flat], present


def _chunk_metrics(
    dist: Tensor,
    qp: Tensor,
    qc: Tensor,
    gp: Tensor,
    gc: Tensor,
    rule: ExclusionFn,
    idx: Tensor,
    present: Tensor,
    method: str,
    g_index: Tensor | None,
    q_index: Tensor,
    num_pids: int,
    chunk_elements: int,
    sorter: _RowSorter,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-query (first-match rank, AP, INP, valid) for one chunk of queries: ``dist`` is (C, G).

    ``idx``/``present`` (C, M) list each query's same-identity gallery columns. Item j is
    ahead of item p when ``(d_j, j) < (d_p, p)``: ascending distance, ties in gallery
    order, exactly a stable sort's order.
    """
    num_c, num_g = dist.shape
    if rule is exclude_none or rule is exclude_same_camera:
        # These rules only ever remove items of the query's own identity: rank among all
        # items, then discount the removed same-identity items ahead of each match.
        keep = None
        kept_d = dist
        keep_at = ~rule(qp[:, None], qc[:, None], gp[idx], gc[idx])  # (C, M)
    else:
        keep = ~rule(qp[:, None], qc[:, None], gp[None, :], gc[None, :]).expand(num_c, num_g)
        kept_d = dist.masked_fill(~keep, float("inf"))  # removed items are never ahead (distances are finite)
        keep_at = keep.gather(1, idx)
    match_d = dist.gather(1, idx)  # (C, M)
    if method == "count":
        ahead = _ahead_by_count(kept_d, match_d, idx)
    else:
        ahead = _ahead_by_search(kept_d, match_d, idx, present & keep_at, chunk_elements, sorter)
    used = present & keep_at  # true matches
    removed = present & ~keep_at
    if keep is None and bool(removed.any()):
        # Slots in ranked order: a stable sort by distance keeps ties in slot order, which is gallery order.
        order = torch.sort(match_d.masked_fill(~present, float("inf")), dim=1, stable=True).indices
        removed_ranked = removed.gather(1, order).to(ahead.dtype)
        removed_before = removed_ranked.cumsum(1) - removed_ranked
        ahead = ahead - torch.empty_like(removed_before).scatter_(1, order, removed_before)
    num_rel = _count(used, 1)
    valid = num_rel > 0
    rank = torch.where(used, ahead + 1, num_g + 1)  # 1-based rank among kept items; num_g + 1 = no match
    ranked = rank.sort(1).values  # ascending: the k-th true match's rank in column k - 1
    width = idx.shape[1]
    hits = torch.arange(1, width + 1, device=dist.device, dtype=torch.float64)
    rel = num_rel.double()
    ap = torch.where(ranked <= num_g, hits / ranked.double(), 0.0).sum(1) / rel.clamp_min(1)
    inp = rel / ranked.gather(1, (num_rel.long() - 1).clamp_min(0)[:, None]).squeeze(1).double()
    if g_index is None:
        return ranked[:, 0].long(), ap, inp, valid
    # Deduplicated rank: 1 + the other identities with a kept item ahead of the best-ranked match.
    best = rank.argmin(1, keepdim=True)
    best_d, best_idx = match_d.gather(1, best), idx.gather(1, best)
    columns = torch.arange(num_g, device=dist.device)
    ahead_best = (kept_d < best_d) | ((kept_d == best_d) & (columns[None, :] < best_idx))
    flag = torch.uint8 if dist.device.type == "cpu" else torch.int32  # byte atomics are not everywhere
    seen = torch.zeros(num_c, num_pids + 1, dtype=flag, device=dist.device)
    seen.scatter_reduce_(1, g_index.expand(num_c, num_g), ahead_best.to(flag), reduce="amax")
    # the query's own identity has no kept item ahead of its best match, but may have removed ones
    seen.scatter_(1, torch.where(q_index >= 0, q_index, num_pids)[:, None], 0)
    return seen.sum(1, dtype=torch.int64) + 1, ap, inp, valid


def _count(mask: Tensor, dim: int) -> Tensor:
    """Number of True along ``dim`` (int32); summing bytes avoids a bool -> int64 copy."""
    return mask.view(torch.uint8).sum(dim, dtype=torch.int32)


def _ahead_by_count(kept_d: Tensor, match_d: Tensor, idx: Tensor) -> Tensor:
    """(C, M) number of items of ``kept_d`` (C, G) ahead of each slot, by comparing with the whole row."""
    columns = torch.arange(kept_d.shape[1], device=kept_d.device)
    d3, m3 = kept_d[:, None, :], match_d[:, :, None]
    return _count(d3 < m3, 2) + _count((d3 == m3) & (columns[None, None, :] < idx[:, :, None]), 2)


def _ahead_by_search(
    kept_d: Tensor, match_d: Tensor, idx: Tensor, used: Tensor, chunk_elements: int, sorter: _RowSorter
) -> Tensor:
    """Same as :func:`_ahead_by_count` for the ``used`` slots, by binary search in the sorted rows.

    The search counts the items with a strictly smaller distance. A used slot's own distance
    is in its row, so it is tied with another item exactly when the next sorted value equals it;
    only those slots then count their equal items of smaller gallery index.
    """
    num_g = kept_d.shape[1]
    ordered, ahead = sorter(kept_d, match_d)
    following = ordered.gather(1, (ahead + 1).clamp_max(num_g - 1))
    tied = used & (ahead + 1 < num_g) & (following == match_d)
    if bool(tied.any()):
        rows, slots = tied.nonzero(as_tuple=True)
        columns = torch.arange(num_g, device=kept_d.device)
        step = max(1, chunk_elements // num_g)
        for start in range(0, len(rows), step):  # over tied (query, match) pairs, a few (step, G) at a time
            r, s = rows[start:start + step], slots[start:start + step]
            equal_before = (kept_d[r] == match_d[r, s, None]) & (columns[None, :] < idx[r, s, None])
            ahead[r, s] += _count(equal_before, 1).to(ahead.dtype)
    return ahead


def _bisect_left_rows(ordered: np.ndarray, values: np.ndarray) -> np.ndarray:
    """(C, M) number of entries of each sorted row of ``ordered`` (C, G) below ``values`` (C, M).

    ``torch.searchsorted`` for rows, in NumPy: one vectorised halving step per bit of G. (On CPU,
    torch's version wakes its thread pool, whose spinning then slows the next sort's threads.)
    """
    num_g = ordered.shape[1]
    low = np.zeros(values.shape, dtype=np.int64)
    high = np.full(values.shape, num_g, dtype=np.int64)
    rows = np.arange(len(ordered))[:, None]
    for _ in range(num_g.bit_length()):
        mid = (low + high) >> 1
        below = ordered[rows, np.minimum(mid, num_g - 1)] < values
        below &= mid < high
        low = np.where(below, mid + 1, low)
        high = np.where(below | (mid >= high), high, mid)
    return low


class _RowSorter:
    """Sorts the rows of (C, G) chunks (values only), reusing one output buffer across chunks.

    On CPU this is NumPy's sort (SIMD quicksort, several times faster than ``torch.sort``), split
    over ``torch.get_num_threads()`` threads; NumPy releases the GIL while it sorts.
    """

    _pool: ThreadPoolExecutor | None = None

    def __init__(self) -> None:
        self._buffer: np.ndarray | None = None

    def __call__(self, x: Tensor, values: Tensor) -> tuple[Tensor, Tensor]:
        """``x`` (C, G) with sorted rows, and (C, M) how many entries of each row are below ``values``."""
        if x.device.type != "cpu":
            ordered = torch.sort(x, dim=1).values
            return ordered, torch.searchsorted(ordered, values.contiguous())
        src, targets = x.numpy(), values.numpy()
        if self._buffer is None or self._buffer.dtype != src.dtype or self._buffer.size < src.size:
            self._buffer = np.empty(src.size, dtype=src.dtype)
        out = self._buffer[:src.size].reshape(src.shape)
        below = np.empty(targets.shape, dtype=np.int64)

        def sort_rows(part: slice) -> None:
            out[part] = src[part]
            out[part].sort(axis=1)
            below[part] = _bisect_left_rows(out[part], targets[part])

        threads = min(torch.get_num_threads(), len(src), max(1, src.size >> 16))
        if threads <= 1:
            sort_rows(slice(None))
        else:
            bounds = np.linspace(0, len(src), threads + 1).astype(int).tolist()
            parts = [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
            list(self._executor(threads).map(sort_rows, parts))
        return torch.from_numpy(out), torch.from_numpy(below)

    @classmethod
    def _executor(cls, threads: int) -> ThreadPoolExecutor:
        if cls._pool is None or cls._pool._max_workers < threads:
            cls._pool = ThreadPoolExecutor(threads, thread_name_prefix="cmssft-sort")
        return cls._pool
