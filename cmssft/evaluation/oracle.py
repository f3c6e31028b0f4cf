"""A deliberately plain per-query NumPy re-statement of the community metric code.

This is a *test oracle and benchmark baseline*, never used by the evaluator: it
re-states, one query at a time, what the AGW cross-modality baseline's
``eval_sysu`` / ``eval_regdb`` do (exclusion mask on the ranked list, identity
deduplication with first occurrence kept, cumulative-sum CMC, AP as the mean of
precision at each true match, INP = matches / rank of the hardest match), with one
change: ``np.argsort(kind="stable")`` so ties are ordered as in
:func:`cmssft.evaluation.metrics.evaluate_ranking`.
"""

from __future__ import annotations

import numpy as np

from cmssft.evaluation.metrics import MAX_RANK, RankingMetrics


def _remove_mask(rule: str, q_pid: int, q_cam: int, g_pids: np.ndarray, g_cams: np.ndarray) -> np.ndarray:
    if rule == "none":
        return np.zeros(len(g_pids), dtype=bool)
    if rule == "sysu":
        return (q_cam == 3) & (g_cams == 2)
    if rule == "same_camera":
        return (g_pids == q_pid) & (g_cams == q_cam)
    raise ValueError(f"unknown exclusion rule {rule!r}")


def _pad(curve: np.ndarray, max_rank: int) -> np.ndarray:
    curve = curve[:max_rank]
    if len(curve) < max_rank:
        curve = np.concatenate([curve, np.full(max_rank - len(curve), curve[-1] if len(curve) else 0)])
    return curve


def loop_ranking(
    distmat: np.ndarray,
    q_pids: np.ndarray,
    g_pids: np.ndarray,
    q_camids: np.ndarray,
    g_camids: np.ndarray,
    exclusion: str = "none",
    dedup: bool = False,
    max_rank: int = MAX_RANK,
) -> RankingMetrics:
    """Per-query loop over a (Q, G) distance matrix; same contract as ``evaluate_ranking``."""
    distmat = np.asarray(distmat)
    q_pids, g_pids = np.asarray(q_pids), np.asarray(g_pids)
    q_camids, g_camids = np.asarray(q_camids), np.asarray(g_camids)
    indices = np.argsort(distmat, axis=1, kind="stable")
    cmcs, aps, inps = [], [], []
    for q_idx in range(distmat.shape[0]):
        order = indices[q_idx]
        q_pid, q_cam = q_pids[q_idx], q_camids[q_idx]
        keep = ~_remove_mask(exclusion, q_pid, q_cam, g_pids[order], g_camids[order])
        ranked_pids = g_pids[order][keep]
        raw = (ranked_pids == q_pid).astype(np.int32)
        if not raw.any():
            continue
        if dedup:
            first = np.unique(ranked_pids, return_index=True)[1]
            unique_pids = ranked_pids[np.sort(first)]
            curve = (unique_pids == q_pid).astype(np.int32).cumsum()
        else:
            curve = raw.cumsum()
        curve[curve > 1] = 1
        cmcs.append(_pad(curve, max_rank))
        hits = raw.cumsum()
        last = np.max(np.where(raw == 1)[0])
        inps.append(hits[last] / (last + 1.0))
        precision = hits / np.arange(1, len(raw) + 1)
        aps.append((precision * raw).sum() / raw.sum())
    if not cmcs:
        raise ValueError("no query has a true match in the gallery after exclusions")
    ap, inp = np.asarray(aps), np.asarray(inps)
    return RankingMetrics(
        cmc=np.asarray(cmcs, dtype=np.float64).mean(0),
        mAP=float(ap.mean()),
        mINP=float(inp.mean()),
        num_queries=distmat.shape[0],
        num_valid=len(cmcs),
        ap=ap,
        inp=inp,
    )
