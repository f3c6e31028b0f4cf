"""Ranking metrics (CMC, mAP, mINP) as pure, vectorised functions of distances and labels.

Shapes at this boundary:

- ``distmat``: (Q, G) float tensor, smaller is more similar;
- ``q_pids``/``q_camids``: (Q,) integers; ``g_pids``/``g_camids``: (G,) integers.

Everything runs in torch on the distance matrix's device, chunked over queries so
that peak memory is a few (chunk, G) tensors, never (Q, G, anything). There is no
Python loop over queries.

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
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
from torch import Tensor

ExclusionName = Literal["none", "sysu", "same_camera"]
# A rule maps (query pids (Q,1), query cams (Q,1), gallery pids (1,G), gallery cams (1,G)) to a
# (Q, G) bool mask of gallery items to *remove*.
ExclusionFn = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]
Exclusion = ExclusionName | ExclusionFn

MAX_RANK = 20
Method = Literal["auto", "sort", "count"]
COUNT_MAX_MATCHES = 16  # "auto" ranks by counting when no query has more true matches than this
# Elements of one (chunk, G) working tensor; a handful of these live at once.
DEFAULT_CHUNK_ELEMENTS = 1 << 22


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
    distmat: Tensor | np.ndarray,
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

    ``method`` picks how ranks are found; both give identical numbers. ``count`` ranks
    only each query's true matches by comparing them with the whole row
    (O(Q * M * G) for at most M true matches per query: fast for SYSU single-shot, where
    M <= 4); ``sort`` sorts every row (O(Q * G log G): better when M is large);
    ``auto`` takes ``count`` when M <= 16. Raises ``ValueError`` when no query has a
    true match (nothing to average).
    """
    dist = torch.as_tensor(distmat)
    if dist.dim() != 2:
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
    if not bool(torch.isfinite(dist).all()):
        raise ValueError("distmat holds NaN or infinite values")
    rule = get_exclusion(exclusion)
    # Contiguous identity index for the dedup scatter: (G,) in 0..P-1.
    g_pid_index = torch.unique(gp, return_inverse=True)[1] if dedup else None
    num_pids = int(g_pid_index.max()) + 1 if dedup and num_g else 0

    if method not in ("auto", "sort", "count"):
        raise ValueError(f"method must be auto, sort or count, got {method!r}")
    max_matches = 1
    if method != "sort":
        max_matches = max(1, int(_max_matches(qp, gp)))
    if method == "auto":
        method = "count" if max_matches <= COUNT_MAX_MATCHES else "sort"
    chunk_fn = _chunk_metrics_count if method == "count" else _chunk_metrics
    width = num_g * (max_matches if method == "count" else 1)
    step = max(1, chunk_elements // max(width, 1))
    first_ranks, aps, inps, valids = [], [], [], []
    for start in range(0, num_q, step):
        stop = min(start + step, num_q)
        r, ap, inp, valid = chunk_fn(dist[start:stop], qp[start:stop], qc[start:stop], gp, gc,
                                     rule, g_pid_index, num_pids)
        first_ranks.append(r)
        aps.append(ap)
        inps.append(inp)
        valids.append(valid)
    first_rank = torch.cat(first_ranks) if first_ranks else torch.zeros(0, dtype=torch.long)
    valid = torch.cat(valids) if valids else torch.zeros(0, dtype=torch.bool)
    num_valid = int(valid.sum())
    if num_valid == 0:
        raise ValueError("no query has a true match in the gallery after exclusions")
    ranks = torch.arange(1, max_rank + 1, device=device)
    cmc = (first_rank[valid, None] <= ranks[None, :]).double().mean(0)
    ap_valid = torch.cat(aps)[valid].cpu().numpy()
    inp_valid = torch.cat(inps)[valid].cpu().numpy()
    return RankingMetrics(
        cmc=cmc.cpu().numpy(),
        mAP=float(ap_valid.mean()),
        mINP=float(inp_valid.mean()),
        num_queries=num_q,
        num_valid=num_valid,
        ap=ap_valid,
        inp=inp_valid,
    )


def _chunk_metrics(
    dist: Tensor,
    qp: Tensor,
    qc: Tensor,
    gp: Tensor,
    gc: Tensor,
    rule: ExclusionFn,
    g_pid_index: Tensor | None,
    num_pids: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-query (first-match rank, AP, INP, valid) for one chunk of queries (C, G)."""
    num_c, num_g = dist.shape
    order = torch.sort(dist, dim=1, stable=True).indices  # (C, G)
    keep = ~rule(qp[:, None], qc[:, None], gp[None, :], gc[None, :])
    keep = keep.expand(num_c, num_g).gather(1, order)  # in ranked order
    match = (gp[order] == qp[:, None]) & keep  # (C, G) true matches, ranked
    num_rel = match.sum(1)
    valid = num_rel > 0

    kept_rank = keep.cumsum(1)  # 1-based rank among kept items (meaningful where keep)
    positions = torch.arange(num_g, device=dist.device).expand(num_c, num_g)
    first_pos = torch.where(match, positions, num_g).amin(1).clamp_max(num_g - 1)  # (C,)
    last_pos = torch.where(match, positions, -1).amax(1).clamp_min(0)

    if g_pid_index is not None:
        # Rank on the identity-deduplicated list: 1 + identities whose first kept item precedes
        # the first true match (the true identity's first item *is* the first match).
        first_of_pid = torch.full((num_c, num_pids), num_g, dtype=torch.long, device=dist.device)
        first_of_pid.scatter_reduce_(1, g_pid_index[order], torch.where(keep, positions, num_g),
                                     reduce="amin")
        first_rank = (first_of_pid < first_pos[:, None]).sum(1) + 1
    else:
        first_rank = kept_rank.gather(1, first_pos[:, None]).squeeze(1)

    hits = match.cumsum(1).double()
    precision = torch.where(match, hits / kept_rank.clamp_min(1).double(), 0.0)
    rel = num_rel.double().clamp_min(1)
    ap = precision.sum(1) / rel
    inp = num_rel.double() / kept_rank.gather(1, last_pos[:, None]).squeeze(1).clamp_min(1).double()
    return first_rank, ap, inp, valid


def _count(mask: Tensor, dim: int) -> Tensor:
    """Number of True along ``dim`` (int32); summing bytes avoids a bool -> int64 copy."""
    return mask.view(torch.uint8).sum(dim, dtype=torch.int32)


def _max_matches(qp: Tensor, gp: Tensor) -> int:
    """The most gallery items any query's identity has (an upper bound on true matches)."""
    pids, counts = torch.unique(gp, return_counts=True)
    pos = torch.searchsorted(pids, qp).clamp_max(len(pids) - 1)
    per_query = torch.where(pids[pos] == qp, counts[pos], 0)
    return int(per_query.max()) if len(per_query) else 0


def _chunk_metrics_count(
    dist: Tensor,
    qp: Tensor,
    qc: Tensor,
    gp: Tensor,
    gc: Tensor,
    rule: ExclusionFn,
    g_pid_index: Tensor | None,
    num_pids: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Same as :func:`_chunk_metrics`, ranking only the true matches by counting.

    Item j precedes item p when ``(d_j, j) < (d_p, p)``: ascending distance, ties in
    gallery order, exactly the stable sort's order.
    """
    num_c, num_g = dist.shape
    device = dist.device
    keep = ~rule(qp[:, None], qc[:, None], gp[None, :], gc[None, :]).expand(num_c, num_g)
    match = (gp[None, :] == qp[:, None]) & keep  # (C, G), gallery order
    num_rel = _count(match, 1).long()
    valid = num_rel > 0
    width = max(1, int(num_rel.max()) if num_c else 1)
    # Gallery index of each query's k-th true match, (C, M); unused slots point at column 0.
    slot = torch.where(match, match.cumsum(1) - 1, width)
    match_idx = torch.zeros(num_c, width + 1, dtype=torch.long, device=device)
    match_idx.scatter_(1, slot, torch.arange(num_g, device=device).expand(num_c, num_g))
    match_idx = match_idx[:, :width]
    used = torch.arange(width, device=device)[None, :] < num_rel[:, None]  # (C, M)
    match_d = dist.gather(1, match_idx)
    columns = torch.arange(num_g, device=device)
    kept_d = dist.masked_fill(~keep, float("inf"))  # excluded items never precede (distances are finite)
    d3, m3 = kept_d[:, None, :], match_d[:, :, None]
    ahead_count = _count(d3 < m3, 2) + _count((d3 == m3) & (columns[None, None, :] < match_idx[:, :, None]), 2)
    unsorted = torch.where(used, ahead_count.long() + 1, num_g + 1)  # (C, M)
    rank = unsorted.sort(1).values  # 1-based ranks among kept items, ascending; unused slots last
    hits = torch.arange(1, width + 1, device=device, dtype=torch.float64)[None, :]
    rel = num_rel.double().clamp_min(1)
    ap = torch.where(used, hits / rank.double(), 0.0).sum(1) / rel
    last = rank.gather(1, (num_rel - 1).clamp_min(0)[:, None]).squeeze(1)
    inp = num_rel.double() / last.double()
    if g_pid_index is None:
        return rank[:, 0], ap, inp, valid
    # Deduplicated rank: 1 + identities with a kept item ahead of the best-ranked true match.
    best = unsorted.argmin(1, keepdim=True)  # slot of the best-ranked true match
    best_idx, best_d = match_idx.gather(1, best), match_d.gather(1, best)
    ahead = (kept_d < best_d) | ((kept_d == best_d) & (columns[None, :] < best_idx))
    seen = torch.zeros(num_c, num_pids, dtype=torch.long, device=device)
    seen.scatter_reduce_(1, g_pid_index.expand(num_c, num_g), ahead.long(), reduce="amax")
    return seen.sum(1) + 1, ap, inp, valid
