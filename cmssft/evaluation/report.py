"""Per-trial results -> JSON-ready summary (mean and std over trials) and a console table."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cmssft.config import Config, EvalConfig
from cmssft.evaluation.evaluator import Evaluator, TrialResult
from cmssft.evaluation.protocols import Protocol

SUMMARY_KEYS = ("rank1", "rank5", "rank10", "rank20", "mAP", "mINP")


def _scalars(result: TrialResult) -> dict[str, float]:
    m = result.metrics
    return {"rank1": m.rank(1), "rank5": m.rank(5), "rank10": m.rank(10), "rank20": m.rank(20),
            "mAP": m.mAP, "mINP": m.mINP}


def summarize(protocol: str, results: Sequence[TrialResult], settings: dict[str, Any] | None = None) -> dict:
    """``{"protocol", "settings", "trials": [...], "mean": {...}, "std": {...}}``; fractions in [0, 1].

    ``std`` is the population standard deviation over trials (``numpy.std``, ddof 0).
    """
    if not results:
        raise ValueError("no trial results to summarise")
    trials = []
    for r in results:
        m = r.metrics
        trials.append({
            "trial": r.trial,
            "cmc": [float(x) for x in m.cmc],
            "mAP": m.mAP,
            "mINP": m.mINP,
            "num_query": r.num_query,
            "num_gallery": r.num_gallery,
            "num_valid_query": m.num_valid,
            **({"graph": r.graph} if r.graph is not None else {}),
        })
    table = np.array([[_scalars(r)[k] for k in SUMMARY_KEYS] for r in results], dtype=np.float64)
    summary = {
        "protocol": protocol,
        "settings": {k: v for k, v in (settings or {}).items() if not k.startswith("_")},
        "trials": trials,
        "mean": dict(zip(SUMMARY_KEYS, map(float, table.mean(0)), strict=True)),
        "std": dict(zip(SUMMARY_KEYS, map(float, table.std(0)), strict=True)),
    }
    graphs = [r.graph for r in results if r.graph is not None]
    if graphs:  # mean over trials of the test graph's statistics (nan where a trial counted nothing)
        summary["graph"] = {k: _nanmean([g[k] for g in graphs]) for k in graphs[0]}
    return summary


def _nanmean(values: list[float]) -> float:
    finite = [v for v in values if v == v]
    return float(np.mean(finite)) if finite else float("nan")


def graph_line(graph: dict[str, float]) -> str:
    """The test graph's statistics in one line (percent)."""

    def pct(key: str) -> str:
        value = graph.get(key, float("nan"))
        return "n/a" if value != value else f"{100 * value:.1f}%"

    return (
        f"test graph: cross-modality edges {pct('query_cross_edges')} of queries', "
        f"{pct('gallery_cross_edges')} of gallery's; same identity {pct('same_id_edges')} of edges "
        f"({pct('same_id_weight')} of weight), {pct('cross_same_id_edges')} of cross edges "
        f"({pct('cross_same_id_weight')} of their weight; chance {pct('query_same_id_candidates')})"
    )


def format_table(summary: dict, title: str = "") -> str:
    """A readable per-trial table in percent with a mean +- std line."""
    header = f"{'trial':>7} {'#query':>7} {'#gallery':>8}" + "".join(f"{k:>9}" for k in SUMMARY_KEYS)
    lines = [title] if title else []
    lines += [header, "-" * len(header)]
    for t in summary["trials"]:
        cmc = t["cmc"]
        values = [cmc[0], cmc[4], cmc[9], cmc[19], t["mAP"], t["mINP"]]
        lines.append(f"{t['trial']:>7} {t['num_query']:>7} {t['num_gallery']:>8}"
                     + "".join(f"{100 * v:>9.2f}" for v in values))
    lines.append("-" * len(header))
    mean, std = summary["mean"], summary["std"]
    lines.append(f"{'mean':>7} {'':>7} {'':>8}" + "".join(f"{100 * mean[k]:>9.2f}" for k in SUMMARY_KEYS))
    lines.append(f"{'+- std':>7} {'':>7} {'':>8}" + "".join(f"{100 * std[k]:>9.2f}" for k in SUMMARY_KEYS))
    if "graph" in summary:
        lines.append(graph_line(summary["graph"]))
    return "\n".join(lines)


MODE_TITLES = {
    "transductive": "transductive SSTN",
    "single_query": "single-query SSTN",
    "off": "off (same model, no transfer)",
}
NO_TRANSFER = "no transfer (cosine of the features)"


def scoring_title(mode: str | None) -> str:
    """How a table's distances were computed: an SSTN test mode, or ``None`` for a plain cosine."""
    return NO_TRANSFER if mode is None else MODE_TITLES.get(mode, mode)


# Which published numbers a table may stand beside: transductive scoring uses the whole test set at once.
COMPARABLE = {
    "inductive": "inductive, as AGW, CAJ and cm-SSFT SQ report",
    "transductive": "transductive, as cm-SSFT's main table reports",
    "reranked": "re-ranked, transductive",
}


def comparable_to(mode: str | None, rerank: bool = False) -> str:
    """The kind of published result a table's numbers compare with (docs/EVALUATION.md)."""
    if rerank:
        return COMPARABLE["reranked"]
    return COMPARABLE["transductive" if mode == "transductive" else "inductive"]


def table_title(split: str, mode: str | None, description: str, test_time: dict[str, Any] | None = None) -> str:
    """``test, transductive SSTN [transductive, ...]: SYSU-MM01 ...``, then the test-time settings that
    decided the scoring: the same header from train.py and eval.py."""
    rerank = bool((test_time or {}).get("eval.rerank"))
    title = f"{split}, {scoring_title(mode)} [{comparable_to(mode, rerank)}]: {description}"
    if test_time:
        title += "\ntest-time settings: " + " ".join(f"{k}={_plain(v)}" for k, v in test_time.items())
    return title


def _plain(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


# Test-time settings that change the numbers (model.sstn.chunk bounds memory only; the mode is in the title).
SHOWN_SSTN_KEYS = ("topk", "cross_k", "test_intra_k", "block_norm", "normalize", "temperature", "self_loops")


def test_time_settings(model: Config | None, evaluation: EvalConfig, flip: bool | None = None) -> dict[str, Any]:
    """What decided a trained model's scores besides its weights: its test-time model settings
    (``model`` None: features without a model) and the evaluation's (``flip`` None: unknown, as for a
    features file's rows)."""
    out: dict[str, Any] = {}
    if model is not None and model.model.name == "agw":
        out["model.agw.test_feature"] = model.model.agw.test_feature
    if model is not None and model.model.name == "cmssft" and model.model.sstn.enabled:
        sstn = model.model.sstn
        out.update({f"model.sstn.{key}": getattr(sstn, key) for key in SHOWN_SSTN_KEYS})
        if model.model.use_specific:
            out["model.sstn.off_features"] = sstn.off_features
    if flip is not None:
        out["eval.flip"] = flip
    out["eval.rerank"] = evaluation.rerank
    return out


def write_json(summary: dict, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(summary, indent=2) + "\n")


def chance_level(protocol: Protocol, draws: int = 5, seed: int = 0) -> dict[str, float]:
    """Mean metrics of random rankings under ``protocol``: the floor a model must clear."""
    generator = torch.Generator().manual_seed(seed)

    def random_scores(query: torch.Tensor, gallery: torch.Tensor) -> torch.Tensor:
        return torch.rand(len(query), len(gallery), generator=generator)

    bank = torch.zeros(len(protocol.candidates), 1)
    results = [r for _ in range(draws) for r in Evaluator(random_scores).evaluate(protocol, bank)]
    return summarize(protocol.name, results)["mean"]


def chance_line(protocol: Protocol) -> str:
    chance = chance_level(protocol)
    return f"chance level (random ranking): rank-1 {chance['rank1']:.2%}  mAP {chance['mAP']:.2%}"
