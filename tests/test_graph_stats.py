"""Test-graph statistics: a hand-built graph, and their way through the evaluator into the report."""

from __future__ import annotations

import pytest
import torch

from cmssft.evaluation.graph_stats import edge_statistics, trial_graph_statistics
from cmssft.evaluation.report import format_table, summarize
from cmssft.scoring import DistanceBlocks, KeptEdges

# Nodes 0, 1: IR queries of identities 0, 1; nodes 2, 3, 4: RGB gallery of identities 0, 1, 0.
MODALITY = torch.tensor([1, 1, 0, 0, 0])
LABELS = torch.tensor([0, 1, 0, 1, 0])
EDGES = KeptEdges(
    index=torch.tensor([[2, 1], [3, 4], [0, 0], [4, 1], [2, 3]]),
    weight=torch.tensor([[0.75, 0.25], [0.5, 0.5], [1.0, 0.0], [0.6, 0.4], [0.5, 0.5]]),
    valid=torch.tensor([[True, True], [True, True], [True, False], [True, True], [True, True]]),
)


def test_statistics_of_a_hand_built_test_graph():
    stats = trial_graph_statistics(EDGES, MODALITY, LABELS, num_query=2)
    assert stats["query_cross_edges"] == pytest.approx(3 / 4)  # 0->2; 1->3, 1->4 (0->1 stays IR)
    assert stats["gallery_cross_edges"] == pytest.approx(2 / 5)  # 2->0, 3->1 of 5 valid (the padding is no edge)
    assert stats["same_id_edges"] == pytest.approx(5 / 9)
    assert stats["same_id_weight"] == pytest.approx((0.75 + 0.5 + 1.0 + 0.4 + 0.5) / 5)
    assert stats["cross_same_id_edges"] == pytest.approx(4 / 5)  # 0->2, 1->3, 2->0, 3->1 of 5 cross
    assert stats["cross_same_id_weight"] == pytest.approx((0.75 + 0.5 + 1.0 + 0.4) / (0.75 + 1.0 + 1.0 + 0.4))
    assert stats["query_same_id_candidates"] == pytest.approx(3 / 6)  # RGB ids 0, 1, 0 for queries 0 and 1


def test_rows_without_a_counted_edge_give_nan_not_a_number():
    none_cross = edge_statistics(KeptEdges(*(t[4:] for t in EDGES)), MODALITY, LABELS, rows=torch.tensor([4]))
    assert none_cross["cross_edges"] == 0.0
    assert none_cross["cross_same_id_edges"] != none_cross["cross_same_id_edges"]  # nan: no cross edge


def test_the_evaluator_reports_the_graph_of_the_scorer(sysu_root):
    from cmssft.data.datasets import load_dataset
    from cmssft.evaluation import Evaluator, sysu_community

    protocol = sysu_community(load_dataset("sysu_mm01", sysu_root), trials=2)

    def scorer(query, gallery):
        """Cosine distances, plus a graph where every query links to gallery node 0 alone."""
        num_q, num_g = len(query), len(gallery)
        dist = 1 - torch.nn.functional.normalize(query, dim=1) @ torch.nn.functional.normalize(gallery, dim=1).T
        index = torch.full((num_q + num_g, 1), num_q)
        edges = KeptEdges(index, torch.ones(num_q + num_g, 1), torch.ones(num_q + num_g, 1, dtype=torch.bool))
        return DistanceBlocks(dist.shape, lambda a, b: dist[a:b], edges=lambda: edges)

    bank = torch.randn(len(protocol.candidates), 8)
    results = Evaluator(scorer).evaluate(protocol, bank)
    for result in results:
        assert result.graph["query_cross_edges"] == 1.0  # IR queries -> an RGB gallery node
        assert result.graph["gallery_cross_edges"] == 0.0
    summary = summarize("sysu", results)
    assert summary["graph"]["query_cross_edges"] == 1.0
    assert "test graph: cross-modality edges 100.0% of queries', 0.0% of gallery's" in format_table(summary)
    plain = summarize("sysu", Evaluator().evaluate(protocol, bank))
    assert "graph" not in plain and "test graph" not in format_table(plain)
