"""Large-gallery SSTN: chunked graph == dense reference, blockwise distances and ranking, and the
memory of a 50,000-node transductive graph."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from cmssft.evaluation.evaluator import Evaluator, cosine_blocks, cosine_distance
from cmssft.evaluation.metrics import evaluate_ranking
from cmssft.models.affinity_graph import top_k
from cmssft.models.sstn_reference import dense_distance
from cmssft.scoring import DistanceBlocks

from .conftest import REPO_ROOT
from .test_sstn import DIM, make_sstn


def make_bank(n: int, seed: int, specific: bool = True):
    gen = torch.Generator().manual_seed(seed)
    modality = torch.randint(0, 2, (n,), generator=gen)
    sp = torch.randn(n, DIM, generator=gen) if specific else None
    return torch.randn(n, DIM, generator=gen), sp, modality


@pytest.mark.parametrize("chunk", [1, 4, 5, 64])  # 16 nodes: divides, does not divide, chunk > N
@pytest.mark.parametrize("normalize", ["softmax", "sum"])
@pytest.mark.parametrize("self_loops", [False, True])
@pytest.mark.parametrize("specific", [True, False])
@pytest.mark.parametrize("mode", ["transductive", "single_query"])
def test_chunked_equals_dense_reference(mode, specific, self_loops, normalize, chunk):
    sstn = make_sstn(seed=3, use_specific=specific, topk=3, normalize=normalize, self_loops=self_loops, chunk=chunk)
    query, gallery = make_bank(5, seed=chunk, specific=specific), make_bank(11, seed=chunk + 1, specific=specific)
    chunked = sstn.distance(query, gallery, mode)
    dense = dense_distance(sstn, query, gallery, mode)
    assert chunked.shape == (5, 11)
    assert torch.allclose(chunked, dense, atol=1e-5)


@pytest.mark.parametrize("mode", ["transductive", "single_query"])
@pytest.mark.parametrize(("fusion", "affinity_dim", "chunk"), [("residual", 0, 37), ("concat", 5, 300)])
def test_chunked_equals_dense_on_wide_rows(mode, fusion, affinity_dim, chunk):
    """More than 256 columns: the top-k goes through torch.topk instead of a full sort."""
    sstn = make_sstn(seed=3, topk=4, fusion=fusion, affinity_dim=affinity_dim, chunk=chunk)
    query, gallery = make_bank(12 if mode == "single_query" else 40, seed=5), make_bank(290, seed=6)
    dense = dense_distance(sstn, query, gallery, mode)
    assert torch.allclose(sstn.distance(query, gallery, mode), dense, atol=1e-5)


@pytest.mark.parametrize("k", [1, 3, 8])
def test_wide_top_k_equals_the_stable_sort_with_many_ties(k):
    gen = torch.Generator().manual_seed(k)
    s = torch.randint(0, 6, (64, 700), generator=gen).float() / 5  # every value repeats ~100 times per row
    s[:8] = torch.randn(8, 700, generator=gen)  # and a few rows without ties
    value, index = top_k(s, k)
    ref = torch.sort(s, dim=1, descending=True, stable=True)
    assert torch.equal(index, ref.indices[:, :k])
    assert torch.equal(value, ref.values[:, :k])
    perm = torch.randperm(700, generator=gen)  # columns given in another order: ties follow node ids
    value_p, index_p = top_k(s[:, perm], k, columns=perm)
    assert torch.equal(index_p, index)
    assert torch.equal(value_p, value)


def test_distance_blocks_do_not_depend_on_how_rows_are_read():
    gen = torch.Generator().manual_seed(0)
    q, g = torch.randn(37, 16, generator=gen), torch.randn(53, 16, generator=gen)
    calls = []

    def compute(start: int, stop: int) -> torch.Tensor:
        calls.append((start, stop))
        return cosine_distance(q[start:stop], g)

    blocks = DistanceBlocks((37, 53), compute, block_rows=8)
    full = blocks.full()
    assert full.shape == (37, 53)
    assert all(stop - start <= 8 and start % 8 == 0 for start, stop in calls)
    for step in (1, 3, 8, 11, 100):
        assert torch.equal(torch.cat([blocks.rows(a, a + step) for a in range(0, 37, step)]), full)
    assert torch.allclose(full, cosine_distance(q, g), atol=1e-6)


def ranking_labels(num_q: int, num_g: int, seed: int):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 9, num_q), rng.integers(0, 9, num_g), rng.integers(1, 7, num_q), rng.integers(1, 7, num_g)


@pytest.mark.parametrize(("exclusion", "dedup", "method"), [("sysu", True, "sort"), ("same_camera", False, "count"),
                                                            ("none", False, "auto")])
def test_evaluate_ranking_on_blocks_equals_the_full_matrix(exclusion, dedup, method):
    sstn = make_sstn(seed=3, topk=3, chunk=7)
    query, gallery = make_bank(30, seed=1), make_bank(45, seed=2)
    labels = ranking_labels(30, 45, seed=3)
    blocks = sstn.distance_blocks(query, gallery, "single_query")
    full = evaluate_ranking(blocks.full(), *labels, exclusion, dedup, method=method)
    # a tiny chunk_elements makes the ranking read 1-3 rows at a time, across the 7-row producer blocks
    blockwise = evaluate_ranking(blocks, *labels, exclusion, dedup, method=method, chunk_elements=100)
    assert np.array_equal(full.cmc, blockwise.cmc)
    assert np.array_equal(full.ap, blockwise.ap) and np.array_equal(full.inp, blockwise.inp)


def test_evaluate_ranking_rejects_non_finite_blocks():
    def compute(start: int, stop: int) -> torch.Tensor:
        block = torch.rand(stop - start, 6)
        block[:, 2] = float("nan") if start >= 4 else 0.5
        return block

    with pytest.raises(ValueError, match="NaN"):
        evaluate_ranking(DistanceBlocks((8, 6), compute, block_rows=4), *ranking_labels(8, 6, seed=0), "none")


def test_evaluator_blockwise_and_full_paths_agree(sysu_root):
    from cmssft.data.datasets import load_dataset
    from cmssft.evaluation.protocols import sysu_community

    protocol = sysu_community(load_dataset("sysu_mm01", sysu_root), trials=2)
    bank = torch.randn(len(protocol.candidates), 16, generator=torch.Generator().manual_seed(0))
    blockwise = Evaluator(cosine_blocks).evaluate(protocol, bank)
    full = Evaluator(lambda q, g: cosine_blocks(q, g).full()).evaluate(protocol, bank)
    reranked = Evaluator(cosine_blocks, rerank=True, k1=4, k2=2).evaluate(protocol, bank)  # needs full matrices
    for a, b, r in zip(blockwise, full, reranked, strict=True):
        assert np.array_equal(a.metrics.cmc, b.metrics.cmc) and np.array_equal(a.metrics.ap, b.metrics.ap)
        assert r.metrics.num_queries == a.metrics.num_queries


MEMORY_SCRIPT = textwrap.dedent(
    """
    import json, resource, sys, time
    import torch
    from cmssft.models.sstn import SSTN

    n, num_q, dim = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    gen = torch.Generator().manual_seed(0)

    def bank(m):
        return (torch.randn(m, dim, generator=gen), torch.randn(m, dim, generator=gen),
                torch.randint(0, 2, (m,), generator=gen))

    sstn = SSTN(dim, topk=6, chunk=512).eval()
    query, gallery = bank(num_q), bank(n - num_q)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    start = time.perf_counter()
    best = torch.full((num_q,), float("inf"))
    for first, block in sstn.distance_blocks(query, gallery, "transductive"):
        best[first : first + len(block)] = block.min(dim=1).values
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"increase_bytes": (peak - before) * 1024, "seconds": time.perf_counter() - start,
                      "finite": bool(torch.isfinite(best).all())}))
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ru_maxrss in KiB is Linux's convention")
def test_transductive_graph_of_50k_nodes_needs_far_less_than_n_squared_memory():
    n = 50_000
    path = str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")
    env = dict(os.environ, PYTHONPATH=path, OMP_NUM_THREADS="2")
    proc = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, str(n), "2000", "16"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    dense_bytes = n * n * 4  # the N x N float32 similarity alone: 10 GB
    assert result["finite"]
    assert result["increase_bytes"] < 2 * 1024**3 < dense_bytes / 4
