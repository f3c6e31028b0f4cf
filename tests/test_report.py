"""Per-trial results -> summary: the mean and the population std over trials, per metric, and the table."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cmssft.evaluation.evaluator import TrialResult
from cmssft.evaluation.metrics import RankingMetrics
from cmssft.evaluation.report import SUMMARY_KEYS, format_table, graph_line, summarize, write_json

# Three trials with a different value at every reported rank, so that a wrong column or statistic shows.
MAP = [0.1, 0.2, 0.6]
MINP = [0.05, 0.15, 0.4]
BASE = [0.30, 0.42, 0.81]


def cmc(base: float) -> np.ndarray:
    return np.minimum(1.0, base + 0.01 * np.arange(20))  # rank k: base + (k - 1) / 100


def results() -> list[TrialResult]:
    out = []
    for t, (b, ap, inp) in enumerate(zip(BASE, MAP, MINP, strict=True)):
        metrics = RankingMetrics(cmc=cmc(b), mAP=ap, mINP=inp, num_queries=50 + t, num_valid=48 + t)
        out.append(TrialResult("regdb", t + 1, metrics, num_query=50 + t, num_gallery=300 + t))  # trials 1..3
    return out


def expected(values: list[float]) -> tuple[float, float]:
    """Mean and population standard deviation (ddof 0), written out."""
    mean = sum(values) / len(values)
    return mean, (sum((v - mean) ** 2 for v in values) / len(values)) ** 0.5


def test_summary_means_and_population_std_per_metric():
    summary = summarize("sysu", results(), {"mode": "all", "_private": 1})
    columns = {
        "rank1": list(BASE),
        "rank5": [b + 0.04 for b in BASE],
        "rank10": [min(1.0, b + 0.09) for b in BASE],
        "rank20": [min(1.0, b + 0.19) for b in BASE],
        "mAP": MAP,
        "mINP": MINP,
    }
    assert tuple(summary["mean"]) == tuple(summary["std"]) == SUMMARY_KEYS
    for key, values in columns.items():
        mean, std = expected(values)
        assert summary["mean"][key] == pytest.approx(mean, abs=1e-12), key
        assert summary["std"][key] == pytest.approx(std, abs=1e-12), key
    assert summary["std"]["mAP"] == pytest.approx(0.2160246899, abs=1e-9)  # not the sample std, 0.2645751311
    assert summary["protocol"] == "sysu" and summary["settings"] == {"mode": "all"}


def test_summary_keeps_every_trial():
    summary = summarize("sysu", results())
    assert [t["trial"] for t in summary["trials"]] == [1, 2, 3]
    for t, trial in enumerate(summary["trials"]):
        assert trial["cmc"] == pytest.approx(cmc(BASE[t]).tolist())
        assert (trial["mAP"], trial["mINP"]) == (MAP[t], MINP[t])
        assert (trial["num_query"], trial["num_gallery"], trial["num_valid_query"]) == (50 + t, 300 + t, 48 + t)
    with pytest.raises(ValueError, match="no trial results"):
        summarize("sysu", [])


def test_one_trial_has_zero_std():
    summary = summarize("regdb", results()[:1])
    assert summary["mean"]["mAP"] == MAP[0] and all(v == 0 for v in summary["std"].values())


def test_table_prints_every_trial_the_mean_and_the_std_in_percent(tmp_path):
    summary = summarize("sysu", results())
    lines = format_table(summary, title="test: SYSU-MM01").splitlines()
    assert lines[0] == "test: SYSU-MM01"
    rows = {line.split()[0]: line.split()[1:] for line in lines[1:] if line and not line.startswith("-")}
    for t in range(3):
        values = [float(v) for v in rows[str(t + 1)][2:]]
        wanted = [100 * x for x in (cmc(BASE[t])[[0, 4, 9, 19]].tolist() + [MAP[t], MINP[t]])]
        assert values == pytest.approx(wanted, abs=0.006)
        assert rows[str(t + 1)][:2] == [str(50 + t), str(300 + t)]
    std_line = next(line for line in lines if line.lstrip().startswith("+- std")).split()[2:]
    assert [float(v) for v in rows["mean"]] == pytest.approx([100 * summary["mean"][k] for k in SUMMARY_KEYS],
                                                             abs=0.006)
    assert [float(v) for v in std_line] == pytest.approx([100 * summary["std"][k] for k in SUMMARY_KEYS], abs=0.006)
    write_json(summary, tmp_path / "out" / "summary.json")
    assert json.loads((tmp_path / "out" / "summary.json").read_text()) == summary


def test_graph_statistics_are_averaged_over_the_trials_that_counted_them():
    nan = float("nan")
    graphs = [{"same_id_edges": 0.2, "cross_same_id_edges": nan}, {"same_id_edges": 0.6, "cross_same_id_edges": 0.5},
              {"same_id_edges": 0.4, "cross_same_id_edges": nan}]
    trials = results()
    for trial, graph in zip(trials, graphs, strict=True):
        trial.graph = graph
    summary = summarize("sysu", trials)
    assert summary["graph"]["same_id_edges"] == pytest.approx(0.4)
    assert summary["graph"]["cross_same_id_edges"] == pytest.approx(0.5)  # the nan trials counted nothing
    assert [t["graph"] for t in summary["trials"]] == graphs
    for trial in trials:
        trial.graph = {"cross_same_id_edges": nan}
    assert summarize("sysu", trials)["graph"]["cross_same_id_edges"] != summarize("sysu", trials)["graph"][
        "cross_same_id_edges"]  # nan where no trial counted anything
    assert "graph" not in summarize("sysu", results())


def test_chance_level_is_random_ranking(tmp_path):
    """Random rankings of a single-shot SYSU-MM01 gallery: rank-1 near 1 / identities, and the draw follows the seed."""
    from cmssft.data.datasets import load_dataset
    from cmssft.evaluation.protocols import sysu_community
    from cmssft.evaluation.report import chance_level, chance_line
    from tests.test_eval_cli import TEST_IDS, make_tree

    protocol = sysu_community(load_dataset("sysu_mm01", make_tree(tmp_path / "SYSU-MM01")), trials=10)
    chance = chance_level(protocol, draws=5, seed=0)
    assert chance["rank1"] == pytest.approx(1 / len(TEST_IDS), abs=0.04)
    assert chance["rank20"] == 1.0 and 0 < chance["mAP"] < 0.5
    assert chance == chance_level(protocol, draws=5, seed=0)
    assert chance != chance_level(protocol, draws=5, seed=1)
    assert chance_line(protocol) == (f"chance level (random ranking): rank-1 {chance['rank1']:.2%}  "
                                     f"mAP {chance['mAP']:.2%}")


def test_graph_line_names_every_statistic_with_its_own_value():
    keys = ["query_cross_edges", "gallery_cross_edges", "same_id_edges", "same_id_weight", "cross_same_id_edges",
            "cross_same_id_weight", "query_same_id_candidates"]
    graph = {key: (i + 1) / 10 for i, key in enumerate(keys)}
    assert graph_line(graph) == (
        "test graph: cross-modality edges 10.0% of queries', 20.0% of gallery's; same identity 30.0% of edges "
        "(40.0% of weight), 50.0% of cross edges (60.0% of their weight; chance 70.0%)"
    )
    assert "same identity n/a of edges" in graph_line({**graph, "same_id_edges": float("nan")})
