"""Run a :class:`~cmssft.evaluation.protocols.Protocol` over a feature bank.

The evaluator knows nothing about models. It takes

- a **bank**: features of every candidate of the protocol, row i for
  ``protocol.candidates[i]``; either one (N, D) tensor or a dict of named tensors
  whose first dimension is N (e.g. ``{"shared": (N, Ds), "specific": (N, Dp)}``), so a
  model's test-time graph step can use several features;
- an optional **score function** ``score_fn(query_bank, gallery_bank) -> (Q, G)``
  distances (smaller = more similar): either a tensor, or a
  :class:`~cmssft.scoring.DistanceBlocks` that computes query blocks
  ``[rows, G]`` on demand. It receives the bank sliced to the trial's query rows and
  gallery rows (same type as the bank: tensor or dict), so a transductive model can
  build its graph from exactly that trial's query and gallery. Default: :func:`cosine_blocks`
  on a plain tensor.

Re-ranking (k-reciprocal) needs query-query and gallery-gallery distances in the same space as the
query-gallery ones. A :class:`~cmssft.scoring.DistanceBlocks` result gives them itself
(``within``): the transductive SSTN from its one graph over query + gallery, so all three come from
the same descriptors. A result without ``within`` (the single-query SSTN, where each query has a
graph of its own and two queries share none) cannot be re-ranked: a one-line ``UserError``. A plain
tensor result is taken to come from a function of the two banks alone, which is then also called as
``score_fn(query, query)`` and ``score_fn(gallery, gallery)``.

Per trial it slices the bank, scores, optionally re-ranks and computes metrics; the
bank itself is built once by the caller and reused by every trial. Blocks are ranked
as they come, so peak memory is O(block x G) rather than O(Q x G). Re-ranking
(k-reciprocal) needs the full (Q, G), (Q, Q) and (G, G) matrices: with it on, blocks are
materialised first.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from cmssft.errors import UserError
from cmssft.evaluation.graph_stats import trial_graph_statistics
from cmssft.evaluation.metrics import MAX_RANK, RankingMetrics, evaluate_ranking
from cmssft.evaluation.protocols import Protocol, Trial
from cmssft.evaluation.rerank import k_reciprocal_rerank
from cmssft.scoring import DistanceBlocks, KeptEdges, cosine_distance_blocks, full_distances

Bank = Tensor | Mapping[str, Tensor]
ScoreFn = Callable[[Bank, Bank], Tensor | DistanceBlocks]


def _unit_rows(query: Bank, gallery: Bank) -> tuple[Tensor, Tensor]:
    if not isinstance(query, Tensor) or not isinstance(gallery, Tensor):
        raise TypeError("the default score function needs a plain (N, D) tensor bank; "
                        "pass score_fn for a dict of named features")
    return F.normalize(query.float(), dim=1), F.normalize(gallery.float(), dim=1)


def cosine_distance(query: Bank, gallery: Bank) -> Tensor:
    """1 - cosine similarity of (Q, D) and (G, D) feature rows -> (Q, G)."""
    q, g = _unit_rows(query, gallery)
    return 1.0 - q @ g.T


def cosine_blocks(query: Bank, gallery: Bank) -> DistanceBlocks:
    """:func:`cosine_distance` as query blocks, so a large gallery never needs the (Q, G) matrix."""
    return cosine_distance_blocks(*_unit_rows(query, gallery))


def bank_size(bank: Bank) -> int:
    """Number of rows N of a bank; every named tensor must agree."""
    if isinstance(bank, Tensor):
        return bank.shape[0]
    sizes = {name: t.shape[0] for name, t in bank.items()}
    if len(set(sizes.values())) != 1:
        raise ValueError(f"bank tensors disagree on the number of rows: {sizes}")
    return next(iter(sizes.values()))


def slice_bank(bank: Bank, index: Tensor) -> Bank:
    """Rows ``index`` of every tensor of the bank (same type as ``bank``)."""
    if isinstance(bank, Tensor):
        return bank.index_select(0, index.to(bank.device))
    return {name: t.index_select(0, index.to(t.device)) for name, t in bank.items()}


def move_bank(bank: Bank, device: torch.device | str) -> Bank:
    if isinstance(bank, Tensor):
        return bank.to(device)
    return {name: t.to(device) for name, t in bank.items()}


@dataclass
class TrialResult:
    """Metrics of one trial of one protocol."""

    protocol: str
    trial: int
    metrics: RankingMetrics
    num_query: int
    num_gallery: int
    graph: dict[str, float] | None = None  # statistics of the scorer's test graph, when it has one


class Evaluator:
    """Score and measure each trial of a protocol; see the module docstring for the contract."""

    def __init__(
        self,
        score_fn: ScoreFn | None = None,
        *,
        rerank: bool = False,
        k1: int = 20,
        k2: int = 6,
        lambda_value: float = 0.3,
        max_rank: int = MAX_RANK,
        device: torch.device | str | None = None,
    ) -> None:
        self.score_fn = score_fn or cosine_blocks
        self.rerank = rerank
        self.rerank_params = {"k1": k1, "k2": k2, "lambda_value": lambda_value}
        self.max_rank = max_rank
        self.device = torch.device(device) if device is not None else None

    def distances(self, protocol: Protocol, trial: Trial, bank: Bank) -> Tensor:
        """The full (Q, G) distances of one trial (re-ranked when enabled)."""
        return full_distances(self.trial_distances(protocol, trial, bank))

    def trial_distances(self, protocol: Protocol, trial: Trial, bank: Bank) -> Tensor | DistanceBlocks:
        """(Q, G) distances of one trial as the score function gives them (blocks stay blocks),
        or the re-ranked full matrix when re-ranking is on."""
        return self._scored(trial, bank)[0]

    def _scored(self, trial: Trial, bank: Bank) -> tuple[Tensor | DistanceBlocks, DistanceBlocks | None]:
        """The trial's distances (re-ranked when enabled) and the score function's own blocks, which
        may carry the test graph's edges."""
        q_idx = torch.as_tensor(trial.query_idx, dtype=torch.long)
        g_idx = torch.as_tensor(trial.gallery_idx, dtype=torch.long)
        return self.scored_pair(slice_bank(bank, q_idx), slice_bank(bank, g_idx))

    def scored_pair(self, q_bank: Bank, g_bank: Bank) -> tuple[Tensor | DistanceBlocks, DistanceBlocks | None]:
        """Distances of a query bank to a gallery bank ``(Q, G)``, re-ranked when enabled, and the score
        function's own blocks."""
        q_g = self.score_fn(q_bank, g_bank)
        expected = (bank_size(q_bank), bank_size(g_bank))
        if tuple(q_g.shape) != expected:
            raise ValueError(f"score_fn returned shape {tuple(q_g.shape)}, expected (Q, G) = {expected}")
        raw = q_g if isinstance(q_g, DistanceBlocks) else None
        if self.rerank:
            q_q, g_g = self._within(q_g, q_bank, g_bank)
            q_g = k_reciprocal_rerank(full_distances(q_g), q_q, g_g, **self.rerank_params)
        return q_g, raw

    def _within(self, q_g: Tensor | DistanceBlocks, q_bank: Bank, g_bank: Bank) -> tuple[Tensor, Tensor]:
        """Query-query and gallery-gallery distances in the space of ``q_g`` (see the module docstring)."""
        if not isinstance(q_g, DistanceBlocks):
            return full_distances(self.score_fn(q_bank, q_bank)), full_distances(self.score_fn(g_bank, g_bank))
        if q_g.within is None:  # of the model's scorings only the single-query SSTN's; it scores each query alone
            raise UserError("re-ranking needs query-query and gallery-gallery distances from the same test graph "
                            "as the query-gallery ones, and the single-query SSTN scores each query in a graph of "
                            "its own; re-rank in model.sstn.test_mode=transductive or off")
        q_q, g_g = q_g.within()
        return full_distances(q_q), full_distances(g_g)

    def evaluate_trial(self, protocol: Protocol, trial: Trial, bank: Bank) -> TrialResult:
        """Metrics of one trial; ``bank`` rows follow ``protocol.candidates``."""
        return self._evaluate_trial(protocol, trial, bank, candidate_labels(protocol))

    def evaluate(self, protocol: Protocol, bank: Bank) -> list[TrialResult]:
        """Every trial of ``protocol`` against one bank computed once for its candidates."""
        if bank_size(bank) != len(protocol.candidates):
            raise ValueError(f"bank has {bank_size(bank)} rows, the protocol has "
                             f"{len(protocol.candidates)} candidates")
        if self.device is not None:
            bank = move_bank(bank, self.device)
        if self.score_fn in (cosine_distance, cosine_blocks) and isinstance(bank, Tensor):
            bank = F.normalize(bank.float(), dim=1)  # once for all trials; cosine_distance re-normalises cheaply
        labels = candidate_labels(protocol)
        return [self._evaluate_trial(protocol, trial, bank, labels) for trial in protocol.trials]

    @torch.no_grad()
    def _evaluate_trial(
        self, protocol: Protocol, trial: Trial, bank: Bank, labels: tuple[np.ndarray, np.ndarray, np.ndarray]
    ) -> TrialResult:
        pids, cams, modality = labels
        dist, raw = self._scored(trial, bank)
        metrics = evaluate_ranking(
            dist,
            pids[trial.query_idx], pids[trial.gallery_idx],
            cams[trial.query_idx], cams[trial.gallery_idx],
            exclusion=protocol.exclusion,
            dedup=protocol.dedup,
            max_rank=self.max_rank,
        )
        graph = None
        if raw is not None and raw.edges is not None:  # nodes: the trial's queries, then its gallery
            nodes = np.concatenate([trial.query_idx, trial.gallery_idx])
            edges = KeptEdges(*(t.cpu() for t in raw.edges()))
            graph = trial_graph_statistics(edges, torch.as_tensor(modality[nodes]), torch.as_tensor(pids[nodes]),
                                           len(trial.query_idx))
        return TrialResult(protocol.name, trial.index, metrics, len(trial.query_idx), len(trial.gallery_idx), graph)


def candidate_labels(protocol: Protocol) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(N,) pid, camid and modality arrays of the protocol's candidates."""
    n = len(protocol.candidates)
    pids = np.fromiter((s.pid for s in protocol.candidates), dtype=np.int64, count=n)
    cams = np.fromiter((s.camid for s in protocol.candidates), dtype=np.int64, count=n)
    modality = np.fromiter((int(s.modality) for s in protocol.candidates), dtype=np.int64, count=n)
    return pids, cams, modality
