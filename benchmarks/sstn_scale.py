"""Test-time SSTN at scale: time and peak memory of the chunked graph against the dense computation.

    python benchmarks/sstn_scale.py [--sizes 2000 4000] [--modes transductive single_query] [--dim 64]
        [--topk 6] [--chunk 512] [--dense-max 10000] [--dense-queries 2] [--device cpu|cuda]

For each N (nodes: N/2 IR queries, N/2 RGB gallery images, random shared and specific features of
width ``--dim``) and mode, a fresh subprocess builds ``SSTN.distance_blocks`` and walks every
``[rows, G]`` block (keeping each query's best distance, as a ranking would), so the (Q, G) matrix is
never held. Peak memory: on CUDA ``torch.cuda.max_memory_allocated``; on the CPU the process's peak
RSS (``ru_maxrss``) minus its RSS before the call. Up to ``--dense-max`` nodes the dense reference
(``cmssft.models.sstn_reference.dense_distance``: the N x N similarity, full sort, dense A x) runs in its own
subprocess too; dense single-query builds one (G+1)-node graph per query, so it runs on the first
``--dense-queries`` queries and its time is scaled to all queries (``dense_extrapolated``).
``max_abs_diff`` compares the chunked and dense distances on the rows both computed.
Prints one JSON line per (N, mode).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch


def banks(n: int, dim: int, device: str):
    gen = torch.Generator().manual_seed(0)
    num_q = n // 2

    def bank(m: int, modality: int):
        feats = (torch.randn(m, dim, generator=gen), torch.randn(m, dim, generator=gen), torch.full((m,), modality))
        return tuple(t.to(device) for t in feats)

    return bank(num_q, 1), bank(n - num_q, 0)


def point(args: argparse.Namespace) -> dict:
    """One measurement in this (fresh) process."""
    from cmssft.models.sstn import SSTN
    from cmssft.models.sstn_reference import dense_distance

    torch.set_num_threads(torch.get_num_threads())
    query, gallery = banks(args.n, args.dim, args.device)
    cross_k = args.topk if args.cross_k < 0 else args.cross_k
    sstn = SSTN(args.dim, topk=args.topk, cross_k=cross_k, chunk=args.chunk).eval().to(args.device)
    cuda = args.device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    if args.dense:
        rows = query if args.mode == "transductive" else tuple(t[: args.dense_queries] for t in query)
        dist = dense_distance(sstn, rows, gallery, args.mode)
        head = dist[: args.dense_queries].float().cpu()
    else:
        best, head = [], None
        for first, block in sstn.distance_blocks(query, gallery, args.mode):
            best.append(block.min(dim=1).values)
            if first == 0:
                head = block[: args.dense_queries].float().cpu()
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = (torch.cuda.max_memory_allocated() - base) if cuda else (
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024
    if args.dense and args.mode == "single_query":
        seconds *= len(query[0]) / min(args.dense_queries, len(query[0]))
    return {"seconds": seconds, "peak_bytes": peak, "head": head.tolist()}


def spawn(args: argparse.Namespace, n: int, mode: str, dense: bool) -> dict:
    command = [sys.executable, __file__, "--point", "--n", str(n), "--mode", mode, "--dim", str(args.dim),
               "--topk", str(args.topk), "--cross-k", str(args.cross_k), "--chunk", str(args.chunk),
               "--dense-queries", str(args.dense_queries), "--device", args.device] + (["--dense"] if dense else [])
    proc = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[2000, 4000])
    parser.add_argument("--modes", nargs="+", default=["transductive", "single_query"])
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--topk", type=int, default=6)
    parser.add_argument("--cross-k", type=int, default=-1, help="model.sstn.cross_k (-1: all topk, the default)")
    parser.add_argument("--chunk", type=int, default=512)
    parser.add_argument("--dense-max", type=int, default=10000)
    parser.add_argument("--dense-queries", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--point", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    parser.add_argument("--dense", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.point:
        print(json.dumps(point(args)))
        return
    for n in args.sizes:
        for mode in args.modes:
            chunked = spawn(args, n, mode, dense=False)
            record = {"benchmark": "sstn_scale", "N": n, "Q": n // 2, "G": n - n // 2, "mode": mode, "dim": args.dim,
                      "D_fused": 3 * args.dim, "topk": args.topk, "chunk": args.chunk, "device": args.device,
                      "threads": torch.get_num_threads(), "chunked_s": round(chunked["seconds"], 2),
                      "chunked_peak_mb": round(chunked["peak_bytes"] / 2**20, 1)}
            if n <= args.dense_max:
                dense = spawn(args, n, mode, dense=True)
                diff = (torch.tensor(chunked["head"]) - torch.tensor(dense["head"])).abs().max().item()
                record.update(dense_s=round(dense["seconds"], 2), dense_peak_mb=round(dense["peak_bytes"] / 2**20, 1),
                              dense_extrapolated=mode == "single_query", max_abs_diff=diff)
            print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
