"""Time the vectorised metrics against a per-query NumPy loop on SYSU-sized inputs.

``python benchmarks/eval_speed.py [--device cpu|cuda] [--loop-queries 1000] [--repeat 3] [--skip-large]``

Cases (random distances, SYSU-like labels):

- ``sysu_single_shot``: 3,803 x 301, 10 trials (a new gallery draw per trial), SYSU
  camera rule, identity-deduplicated CMC;
- ``sysu_multi_shot``: 3,803 x 3,010, one trial, same rule;
- ``custom_20k``: 20,000 x 20,000, same-identity-same-camera rule, plain CMC. The loop
  runs on the first ``--loop-queries`` queries only and its time is extrapolated
  linearly to all 20,000 (``loop_extrapolated: true``); numbers are compared on
  that subset.

The loop is :func:`cmssft.evaluation.oracle.loop_ranking`, a faithful per-query
re-statement of the community ``eval_sysu`` / ``eval_regdb`` (with a stable argsort).
Each case prints one JSON line; ``identical`` means CMC, per-query AP and INP agree
to 1e-9. Every timing is the best of ``--repeat`` runs (the machine may be shared);
``method`` is the rank-finding method ``auto`` picked.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from cmssft.evaluation.metrics import COUNT_MAX_MATCHES, RankingMetrics, evaluate_ranking
from cmssft.evaluation.oracle import loop_ranking


def sysu_labels(rng: np.random.Generator, shots: int) -> tuple[np.ndarray, ...]:
    """3,803 IR queries over 96 ids; 301 (id, RGB camera) gallery slots x ``shots`` images."""
    ids = np.arange(96)
    q_pids = np.concatenate([ids, rng.choice(ids, 3803 - 96)])
    q_cams = rng.choice([3, 6], size=3803)
    slots = [(pid, cam) for pid in ids for cam in (1, 2, 4, 5)]
    keep = np.sort(np.concatenate([np.arange(0, 384, 4), rng.choice(
        [i for i in range(384) if i % 4], 301 - 96, replace=False)]))  # every id keeps camera 1
    slots = [slots[i] for i in keep]
    g_pids = np.repeat([p for p, _ in slots], shots)
    g_cams = np.repeat([c for _, c in slots], shots)
    return q_pids, q_cams, g_pids, g_cams


def same(a: RankingMetrics, b: RankingMetrics) -> tuple[bool, float]:
    diff = max(np.abs(a.cmc - b.cmc).max(), np.abs(a.ap - b.ap).max(), np.abs(a.inp - b.inp).max())
    return bool(diff < 1e-9 and a.num_valid == b.num_valid), float(diff)


def timed(repeat: int, fn, *args, **kw):
    """Result and best wall time of ``repeat`` calls."""
    best = float("inf")
    for _ in range(max(1, repeat)):
        start = time.perf_counter()
        out = fn(*args, **kw)
        best = min(best, time.perf_counter() - start)
    return out, best


def auto_method(q_pids: np.ndarray, g_pids: np.ndarray) -> str:
    """What ``method="auto"`` picks: ``count`` when no query has more than COUNT_MAX_MATCHES matches."""
    pids, counts = np.unique(g_pids, return_counts=True)
    per_query = dict(zip(pids.tolist(), counts.tolist(), strict=True))
    most = max(per_query.get(p, 0) for p in q_pids.tolist())
    return "count" if most <= COUNT_MAX_MATCHES else "sort"


def run_sysu(case: str, shots: int, trials: int, device: str, repeat: int) -> dict:
    rng = np.random.default_rng(0)
    q_pids, q_cams, g_pids, g_cams = sysu_labels(rng, shots)
    dists = [rng.random((len(q_pids), len(g_pids)), dtype=np.float32) for _ in range(trials)]
    ours_s = loop_s = 0.0
    worst, ok = 0.0, True
    for dist in dists:
        d = torch.from_numpy(dist).to(device)
        if device == "cuda":
            torch.cuda.synchronize()
        fast, t_fast = timed(repeat, evaluate_ranking, d, q_pids, g_pids, q_cams, g_cams, "sysu", True)
        slow, t_slow = timed(repeat, loop_ranking, dist, q_pids, g_pids, q_cams, g_cams, "sysu", True)
        ours_s, loop_s = ours_s + t_fast, loop_s + t_slow
        equal, diff = same(fast, slow)
        ok, worst = ok and equal, max(worst, diff)
    return {"case": case, "Q": len(q_pids), "G": len(g_pids), "trials": trials, "device": device,
            "ours_s": round(ours_s, 3), "loop_s": round(loop_s, 3), "loop_extrapolated": False,
            "speedup": round(loop_s / ours_s, 1), "identical": ok, "max_abs_diff": worst,
            "method": auto_method(q_pids, g_pids)}


def run_custom(num: int, loop_queries: int, device: str, repeat: int) -> dict:
    rng = np.random.default_rng(1)
    q_pids, g_pids = rng.integers(0, 1500, num), rng.integers(0, 1500, num)
    q_cams, g_cams = rng.integers(1, 7, num), rng.integers(1, 7, num)
    dist = rng.random((num, num), dtype=np.float32)
    d = torch.from_numpy(dist).to(device)
    fast, ours_s = timed(repeat, evaluate_ranking, d, q_pids, g_pids, q_cams, g_cams, "same_camera", False)
    sub = slice(0, loop_queries)
    slow, t_sub = timed(repeat, loop_ranking, dist[sub], q_pids[sub], g_pids, q_cams[sub], g_cams, "same_camera", False)
    fast_sub = evaluate_ranking(d[sub], q_pids[sub], g_pids, q_cams[sub], g_cams, "same_camera", False)
    equal, diff = same(fast_sub, slow)
    loop_s = t_sub * num / loop_queries
    return {"case": "custom_20k", "Q": num, "G": num, "trials": 1, "device": device,
            "ours_s": round(ours_s, 3), "loop_s": round(loop_s, 3), "loop_extrapolated": True,
            "loop_measured_queries": loop_queries, "loop_measured_s": round(t_sub, 3),
            "speedup": round(loop_s / ours_s, 1), "identical": equal, "max_abs_diff": diff,
            "method": auto_method(q_pids, g_pids)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--loop-queries", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=3, help="time each call this often, keep the best")
    parser.add_argument("--skip-large", action="store_true", help="skip the 20,000 x 20,000 case")
    args = parser.parse_args()
    print(json.dumps(run_sysu("sysu_single_shot", 1, 10, args.device, args.repeat)), flush=True)
    print(json.dumps(run_sysu("sysu_multi_shot", 10, 1, args.device, args.repeat)), flush=True)
    if not args.skip_large:
        print(json.dumps(run_custom(20000, args.loop_queries, args.device, args.repeat)), flush=True)


if __name__ == "__main__":
    main()
