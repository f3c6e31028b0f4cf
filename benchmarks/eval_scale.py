"""Evaluation at scale through the blockwise path: distances handed out in query blocks and ranked as
they come, against ranking the full (Q, G) matrix.

    python benchmarks/eval_scale.py [--sizes 2000 5000] [--scores cosine sstn] [--dim 64] [--full-max 20000]
        [--test-intra-k 0]

For each size N (Q = G = N random features, random identities over N/10 ids and six cameras, the
same-camera exclusion rule) and score (``cosine``: ``cosine_blocks``; ``sstn``: the transductive
``SSTN.distance_blocks`` over the Q + G nodes), a fresh subprocess runs ``evaluate_ranking`` on the
blocks and reports time and peak RSS increase (``ru_maxrss``); up to ``--full-max`` another one
materialises the (Q, G) matrix first (``blocks.full()``), and the two sets of metrics are compared
(``identical``: CMC, per-query AP and INP equal). Prints one JSON line per point.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import numpy as np
import torch


def point(args: argparse.Namespace) -> dict:
    from cmssft.evaluation.evaluator import cosine_blocks
    from cmssft.evaluation.metrics import evaluate_ranking
    from cmssft.models.sstn import SSTN

    n, dim = args.n, args.dim
    gen = torch.Generator().manual_seed(0)
    rng = np.random.default_rng(0)
    q_pids, g_pids = rng.integers(0, max(1, n // 10), n), rng.integers(0, max(1, n // 10), n)
    q_cams, g_cams = rng.integers(1, 7, n), rng.integers(1, 7, n)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    if args.score == "cosine":
        blocks = cosine_blocks(torch.randn(n, dim, generator=gen), torch.randn(n, dim, generator=gen))
    else:
        # the default test graph: 6 other-modality neighbours (and --test-intra-k of the node's own modality)
        sstn = SSTN(dim, topk=6, cross_k=6, test_intra_k=args.test_intra_k).eval()

        def bank(modality: int):
            return torch.randn(n, dim, generator=gen), torch.randn(n, dim, generator=gen), torch.full((n,), modality)

        blocks = sstn.distance_blocks(bank(1), bank(0), "transductive")
    dist = blocks.full() if args.full else blocks
    metrics = evaluate_ranking(dist, q_pids, g_pids, q_cams, g_cams, "same_camera")
    seconds = time.perf_counter() - start
    peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024
    return {"seconds": seconds, "peak_bytes": peak, "cmc": metrics.cmc.tolist(), "ap": metrics.ap.tolist(),
            "inp": metrics.inp.tolist(), "rank1": metrics.rank(1), "mAP": metrics.mAP}


def spawn(args: argparse.Namespace, n: int, score: str, full: bool) -> dict:
    command = [sys.executable, __file__, "--point", "--n", str(n), "--score", score, "--dim", str(args.dim),
               "--test-intra-k", str(args.test_intra_k)]
    proc = subprocess.run(command + (["--full"] if full else []), capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[2000, 5000])
    parser.add_argument("--scores", nargs="+", default=["cosine", "sstn"])
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--full-max", type=int, default=20000)
    parser.add_argument("--test-intra-k", type=int, default=0, help="own-modality neighbours of the sstn test graph")
    parser.add_argument("--point", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--score", help=argparse.SUPPRESS)
    parser.add_argument("--full", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.point:
        print(json.dumps(point(args)))
        return
    for n in args.sizes:
        for score in args.scores:
            blockwise = spawn(args, n, score, full=False)
            record = {"benchmark": "eval_scale", "Q": n, "G": n, "score": score, "dim": args.dim,
                      "test_intra_k": args.test_intra_k if score == "sstn" else None,
                      "threads": torch.get_num_threads(), "blockwise_s": round(blockwise["seconds"], 2),
                      "blockwise_peak_mb": round(blockwise["peak_bytes"] / 2**20, 1),
                      "rank1": round(blockwise["rank1"], 4), "mAP": round(blockwise["mAP"], 4)}
            if n <= args.full_max:
                full = spawn(args, n, score, full=True)
                record.update(full_s=round(full["seconds"], 2), full_peak_mb=round(full["peak_bytes"] / 2**20, 1),
                              identical=all(full[k] == blockwise[k] for k in ("cmc", "ap", "inp")))
            print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
