"""Evaluation: protocols (which images form each trial), metrics, re-ranking, pictures.

Typical use::

    protocol = sysu_community(dataset, mode="all")          # or sysu_official / regdb / llcm / custom
    bank = features_of(protocol.candidates)                   # (N, D) tensor or dict of tensors
    results = Evaluator(score_fn=None).evaluate(protocol, bank)
    summary = summarize(protocol.name, results, protocol.settings)
"""

from cmssft.evaluation.evaluator import Bank, Evaluator, ScoreFn, TrialResult, cosine_distance
from cmssft.evaluation.metrics import EXCLUSIONS, RankingMetrics, evaluate_ranking
from cmssft.evaluation.protocols import Protocol, Trial, custom, llcm, regdb, sysu_community, sysu_official
from cmssft.evaluation.report import format_table, summarize
from cmssft.evaluation.rerank import k_reciprocal_rerank

__all__ = [
    "EXCLUSIONS",
    "Bank",
    "Evaluator",
    "Protocol",
    "RankingMetrics",
    "ScoreFn",
    "Trial",
    "TrialResult",
    "cosine_distance",
    "custom",
    "evaluate_ranking",
    "format_table",
    "k_reciprocal_rerank",
    "llcm",
    "regdb",
    "summarize",
    "sysu_community",
    "sysu_official",
]
