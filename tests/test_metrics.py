"""Ranking metrics: hand-computed cases and the vectorised code against a per-query loop."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cmssft.evaluation.metrics import evaluate_ranking
from cmssft.evaluation.oracle import loop_ranking


def run(dist, q_pids, g_pids, q_cams=None, g_cams=None, **kw):
    dist = torch.tensor(dist, dtype=torch.float64)
    q_cams = q_cams if q_cams is not None else [1] * dist.shape[0]
    g_cams = g_cams if g_cams is not None else [2] * dist.shape[1]
    return evaluate_ranking(dist, q_pids, g_pids, q_cams, g_cams, **kw)


def test_single_query_by_hand():
    # ranked pids: 2, 1, 1, 3, 1 -> true matches at ranks 2, 3, 5
    m = run([[0.1, 0.2, 0.3, 0.4, 0.5]], [1], [2, 1, 1, 3, 1])
    assert m.cmc[0] == 0 and m.cmc[1] == 1 and m.cmc[19] == 1
    assert m.mAP == pytest.approx((1 / 2 + 2 / 3 + 3 / 5) / 3)
    assert m.mINP == pytest.approx(3 / 5)
    assert m.num_valid == 1 and m.num_invalid == 0


def test_ties_keep_gallery_order():
    # all distances tie: the stable sort keeps gallery order 2, 1, 2, 1
    m = run([[0.5, 0.5, 0.5, 0.5]], [1], [2, 1, 2, 1])
    assert m.rank(1) == 0 and m.rank(2) == 1
    assert m.mAP == pytest.approx((1 / 2 + 2 / 4) / 2)
    assert m.mINP == pytest.approx(2 / 4)
    again = run([[0.5, 0.5, 0.5, 0.5]], [1], [2, 1, 2, 1])
    assert again.mAP == m.mAP  # deterministic


def test_invalid_queries_are_skipped_and_counted():
    m = run([[0.1, 0.2], [0.2, 0.1], [0.3, 0.3]], [1, 7, 2], [1, 2])
    assert m.num_queries == 3 and m.num_valid == 2 and m.num_invalid == 1
    assert m.rank(1) == pytest.approx(0.5)  # query 0 hits at rank 1, query 2 at rank 2
    assert m.mAP == pytest.approx((1 + 0.5) / 2)


def test_no_valid_query_raises():
    with pytest.raises(ValueError, match="no query"):
        run([[0.1, 0.2]], [9], [1, 2])


def test_dedup_changes_rank_not_ap():
    # ranked pids 2, 2, 3, 1: full-list rank 4, deduplicated list 2, 3, 1 -> rank 3
    dist, g = [[0.1, 0.2, 0.3, 0.4]], [2, 2, 3, 1]
    plain, dedup = run(dist, [1], g), run(dist, [1], g, dedup=True)
    assert plain.rank(3) == 0 and plain.rank(4) == 1
    assert dedup.rank(2) == 0 and dedup.rank(3) == 1
    assert plain.mAP == dedup.mAP == pytest.approx(1 / 4)
    assert plain.mINP == dedup.mINP == pytest.approx(1 / 4)


def test_dedup_short_list_is_padded():
    m = run([[0.1, 0.2, 0.3]], [1], [2, 1, 1], dedup=True)
    assert m.cmc.shape == (20,)
    assert list(m.cmc[:3]) == [0, 1, 1] and (m.cmc[3:] == 1).all()


def test_inp_uses_hardest_match():
    # matches at ranks 1 and 4: INP = 2 / 4
    m = run([[0.1, 0.2, 0.3, 0.4]], [1], [1, 2, 3, 1])
    assert m.mINP == pytest.approx(0.5)
    assert m.mAP == pytest.approx((1 + 2 / 4) / 2)


def test_sysu_rule_drops_camera2_for_camera3_queries():
    """A camera-3 query loses *every* camera-2 image, of any identity; a camera-6 query keeps them all."""
    # ranked gallery (pid/cam): 2/c2, 1/c2, 3/c1, 4/c5, 1/c4 -- another identity's camera-2 image comes first
    g_pids, g_cams = [2, 1, 3, 4, 1], [2, 2, 1, 5, 4]
    dist = [[0.05, 0.1, 0.2, 0.25, 0.3]] * 2
    for dedup in (False, True):
        m = run(dist, [1, 1], g_pids, q_cams=[3, 6], g_cams=g_cams, exclusion="sysu", dedup=dedup)
        # camera 3: list 3, 4, 1 -> rank 3, AP 1/3, INP 1/3 (dropping only its own identity's camera-2 image
        # would leave 2/c2 ahead: rank 4); camera 6: list 2, 1, 3, 4, 1 -> rank 2, AP (1/2 + 2/5) / 2, INP 2/5
        assert m.num_valid == 2
        assert m.cmc[:3].tolist() == pytest.approx([0.0, 0.5, 1.0])
        assert m.ap.tolist() == pytest.approx([1 / 3, (1 / 2 + 2 / 5) / 2])
        assert m.inp.tolist() == pytest.approx([1 / 3, 2 / 5])
    # a camera-3 query whose only match is in camera 2 has nothing left to find
    with pytest.raises(ValueError):
        run([[0.1]], [1], [1], q_cams=[3], g_cams=[2], exclusion="sysu")


def test_same_camera_rule():
    # the same-identity same-camera image is removed; other identities in that camera stay
    m = run([[0.1, 0.2, 0.3]], [1], [1, 2, 1], q_cams=[5], g_cams=[5, 5, 6], exclusion="same_camera")
    assert m.rank(1) == 0 and m.rank(2) == 1
    assert m.mAP == pytest.approx(0.5)


@pytest.mark.parametrize("exclusion", ["none", "sysu", "same_camera"])
@pytest.mark.parametrize("dedup", [False, True])
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("method", ["sort", "count"])
def test_vectorised_matches_loop(exclusion, dedup, seed, method):
    rng = np.random.default_rng(seed)
    num_q, num_g = 150, 120
    # integer distances create many ties; the stable order must agree too
    dist = rng.integers(0, 30, size=(num_q, num_g)).astype(np.float32) if seed else rng.random((num_q, num_g))
    q_pids, g_pids = rng.integers(0, 25, num_q), rng.integers(0, 25, num_g)
    q_cams, g_cams = rng.choice([3, 6], num_q), rng.choice([1, 2, 4, 5, 3], num_g)
    fast = evaluate_ranking(torch.from_numpy(dist), q_pids, g_pids, q_cams, g_cams, exclusion, dedup,
                            chunk_elements=37 * num_g, method=method)  # several uneven chunks
    slow = loop_ranking(dist, q_pids, g_pids, q_cams, g_cams, exclusion, dedup)
    assert fast.num_valid == slow.num_valid
    np.testing.assert_allclose(fast.cmc, slow.cmc, atol=1e-6)
    np.testing.assert_allclose(fast.ap, slow.ap, atol=1e-6)
    np.testing.assert_allclose(fast.inp, slow.inp, atol=1e-6)
    assert fast.mAP == pytest.approx(slow.mAP, abs=1e-6)
    assert fast.mINP == pytest.approx(slow.mINP, abs=1e-6)


@pytest.mark.parametrize("method", ["sort", "count"])
def test_methods_agree_on_hand_case(method):
    m = run([[0.5, 0.1, 0.5, 0.1, 0.3]], [1], [1, 2, 1, 3, 1], method=method, dedup=True)
    # ranked (stable): g1(2) g3(3) g4(1) g0(1) g2(1) -> dedup list 2, 3, 1: rank 3
    assert m.rank(2) == 0 and m.rank(3) == 1
    assert m.mAP == pytest.approx((1 / 3 + 2 / 4 + 3 / 5) / 3)


def test_non_finite_distances_rejected():
    with pytest.raises(ValueError, match="NaN or infinite"):
        run([[float("nan"), 0.1]], [1], [1, 2])


def test_custom_exclusion_callable_and_shape_errors():
    never = lambda qp, qc, gp, gc: torch.zeros(qp.shape[0], gp.shape[1], dtype=torch.bool)  # noqa: E731
    m = run([[0.2, 0.1]], [1], [1, 2], exclusion=never)
    assert m.rank(2) == 1
    with pytest.raises(ValueError, match="must match"):
        run([[0.2, 0.1]], [1], [1, 2, 3])
    with pytest.raises(ValueError, match="unknown exclusion"):
        run([[0.2, 0.1]], [1], [1, 2], exclusion="market")


@pytest.mark.parametrize("exclusion", ["none", "sysu", "same_camera"])
@pytest.mark.parametrize("dedup", [False, True])
@pytest.mark.parametrize("method", ["sort", "count"])
def test_many_matches_and_ties_match_loop(exclusion, dedup, method):
    # few identities -> up to ~40 true matches per query; values from a tiny set (with -0.0 and 0.0)
    # make ties everywhere, and a small chunk forces several chunks and tie batches
    rng = np.random.default_rng(7)
    num_q, num_g = 90, 200
    values = np.array([-0.0, 0.0, 0.25, 0.5, 0.75, 1.0], dtype=np.float32)
    dist = values[rng.integers(0, len(values), size=(num_q, num_g))]
    dist[:5] = 0.5  # rows where every item ties
    q_pids, g_pids = rng.integers(0, 6, num_q), rng.integers(0, 5, num_g)  # pid 5: never in the gallery
    q_cams, g_cams = rng.choice([3, 6], num_q), rng.choice([1, 2, 3, 4, 5], num_g)
    fast = evaluate_ranking(torch.from_numpy(dist), q_pids, g_pids, q_cams, g_cams, exclusion, dedup,
                            chunk_elements=11 * num_g, method=method)
    slow = loop_ranking(dist, q_pids, g_pids, q_cams, g_cams, exclusion, dedup)
    assert fast.num_valid == slow.num_valid < num_q
    np.testing.assert_allclose(fast.cmc, slow.cmc, atol=1e-6)
    np.testing.assert_allclose(fast.ap, slow.ap, atol=1e-6)
    np.testing.assert_allclose(fast.inp, slow.inp, atol=1e-6)


@pytest.mark.parametrize("dedup", [False, True])
def test_callable_rule_equals_named_rule(dedup):
    # a callable goes through the general (masked) path, the named same-camera rule through the
    # same-identity shortcut: both must agree
    from cmssft.evaluation.metrics import exclude_same_camera

    rng = np.random.default_rng(3)
    dist = rng.integers(0, 8, size=(60, 80)).astype(np.float64)
    q_pids, g_pids = rng.integers(0, 10, 60), rng.integers(0, 10, 80)
    q_cams, g_cams = rng.integers(1, 4, 60), rng.integers(1, 4, 80)
    args = (torch.from_numpy(dist), q_pids, g_pids, q_cams, g_cams)
    named = evaluate_ranking(*args, "same_camera", dedup)
    wrapped = evaluate_ranking(*args, lambda *a: exclude_same_camera(*a), dedup)
    np.testing.assert_array_equal(named.cmc, wrapped.cmc)
    np.testing.assert_allclose(named.ap, wrapped.ap, atol=1e-12)
    np.testing.assert_allclose(named.inp, wrapped.inp, atol=1e-12)


def test_non_float_distances_are_ranked_exactly():
    dist = [[3, 1, 2, 1]]
    for dtype in (torch.int64, torch.float16, torch.bfloat16):
        m = evaluate_ranking(torch.tensor(dist, dtype=dtype), [1], [2, 1, 3, 1], [1], [2, 2, 2, 2], method="sort")
        assert m.rank(1) == 1 and m.mAP == pytest.approx((1 + 2 / 2) / 2)  # ranked g1 (1), g3 (1), g2, g0


def test_row_bisection_matches_numpy_searchsorted():
    from cmssft.evaluation.metrics import _bisect_left_rows

    rng = np.random.default_rng(0)
    for num_g in (1, 2, 3, 8, 9, 100, 1025):
        ordered = np.sort(rng.integers(0, 10, (7, num_g)).astype(np.float32), axis=1)
        values = rng.integers(-1, 12, (7, 5)).astype(np.float32)
        expected = np.stack([np.searchsorted(row, v) for row, v in zip(ordered, values, strict=True)])
        np.testing.assert_array_equal(_bisect_left_rows(ordered, values), expected)
