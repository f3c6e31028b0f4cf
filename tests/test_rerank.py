"""k-reciprocal re-ranking: the vectorised version against a plain per-row re-statement."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cmssft.evaluation.rerank import k_reciprocal_rerank


def rerank_per_row(q_g, q_q, g_g, k1=20, k2=6, lambda_value=0.3):
    """Zhong et al.'s algorithm written row by row with sets, the way the paper describes it."""
    dist = np.block([[q_q, q_g], [q_g.T, g_g]]) ** 2
    dist = (dist / dist.max(0)).T
    num, num_q = len(dist), len(q_g)
    rank = np.argsort(dist, axis=1, kind="stable")
    half = int(round(k1 / 2))

    def reciprocal(i, k):
        return [j for j in rank[i, : k + 1] if i in rank[j, : k + 1]]

    v = np.zeros_like(dist)
    for i in range(num):
        r = reciprocal(i, k1)
        expanded = set(r)
        for c in r:
            rc = reciprocal(c, half)
            if len(set(rc) & set(r)) > 2 / 3 * len(rc):
                expanded |= set(rc)
        idx = np.array(sorted(expanded))
        w = np.exp(-dist[i, idx])
        v[i, idx] = w / w.sum()
    if k2 != 1:
        v = np.stack([v[rank[i, :k2]].mean(0) for i in range(num)])
    jaccard = np.zeros((num_q, num))
    for i in range(num_q):
        for g in range(num):
            m = np.minimum(v[i], v[g]).sum()
            jaccard[i, g] = 1 - m / (2 - m)
    return (jaccard * (1 - lambda_value) + dist[:num_q] * lambda_value)[:, num_q:]


def random_distances(seed, num_q, num_g, dim=8):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(5, dim))
    x = centers[rng.integers(0, 5, num_q + num_g)] + 0.5 * rng.normal(size=(num_q + num_g, dim))
    d = np.sqrt(((x[:, None] - x[None]) ** 2).sum(-1))
    return d[:num_q, num_q:], d[:num_q, :num_q], d[num_q:, num_q:]


@pytest.mark.parametrize("num_q,num_g,k1,k2", [(12, 30, 5, 3), (20, 40, 20, 6), (7, 9, 4, 1), (25, 25, 8, 2)])
def test_matches_per_row_implementation(num_q, num_g, k1, k2):
    q_g, q_q, g_g = random_distances(num_q + k1, num_q, num_g)
    expected = rerank_per_row(q_g, q_q, g_g, k1, k2)
    t = [torch.from_numpy(a) for a in (q_g, q_q, g_g)]
    got = k_reciprocal_rerank(*t, k1=k1, k2=k2, pair_budget=64).numpy()  # small budget: many chunks
    assert got.shape == (num_q, num_g)
    np.testing.assert_allclose(got, expected, atol=1e-10)


def test_float32_close_to_float64():
    q_g, q_q, g_g = random_distances(3, 15, 35)
    d64 = k_reciprocal_rerank(*[torch.from_numpy(a) for a in (q_g, q_q, g_g)], k1=10, k2=4)
    d32 = k_reciprocal_rerank(*[torch.from_numpy(a).float() for a in (q_g, q_q, g_g)], k1=10, k2=4)
    assert d32.dtype == torch.float32
    np.testing.assert_allclose(d32.double().numpy(), d64.numpy(), atol=1e-5)


def test_shape_mismatch_raises():
    q_g, q_q, g_g = (torch.rand(3, 4), torch.rand(3, 3), torch.rand(5, 5))
    with pytest.raises(ValueError, match="shapes"):
        k_reciprocal_rerank(q_g, q_q, g_g)
