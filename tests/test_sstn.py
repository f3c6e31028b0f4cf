"""SSTN: unified features, block affinity, top-k graph, propagation, test-time modes."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cmssft.errors import UserError
from cmssft.models.affinity_graph import Graph, affinity_stats, edge_weights, propagate, top_k, unify
from cmssft.models.sstn import SSTN
from cmssft.models.sstn_reference import to_dense
from cmssft.utils.host_reads import count_host_reads

DIM = 8


def make_sstn(seed: int = 1, **kwargs) -> SSTN:
    """An SSTN in eval mode whose BN-neck is a non-trivial affine map."""
    torch.manual_seed(seed)
    kwargs.setdefault("temperature", 0.3)
    sstn = SSTN(DIM, **kwargs)
    bn = sstn.neck.bn
    if bn is not None:
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.data.normal_()
    return sstn.eval()


def make_bank(n: int, seed: int, specific: bool = True, modality: int | None = None):
    gen = torch.Generator().manual_seed(seed)
    mod = torch.randint(0, 2, (n,), generator=gen) if modality is None else torch.full((n,), modality)
    sp = torch.randn(n, DIM, generator=gen) if specific else None
    return torch.randn(n, DIM, generator=gen), sp, mod


def row(bank, i: int):
    return tuple(t[i : i + 1] if t is not None else None for t in bank)


def test_unify_pads_the_missing_modality_with_zeros():
    shared, specific = torch.ones(2, 3), torch.full((2, 3), 2.0)
    x = unify(shared, specific, torch.tensor([0, 1]))
    assert x.tolist() == [[1, 1, 1, 2, 2, 2, 0, 0, 0], [1, 1, 1, 0, 0, 0, 2, 2, 2]]
    assert unify(shared, None, torch.tensor([0, 1])) is shared


def test_affinity_is_intra_shared_plus_specific_and_inter_shared_only():
    sstn = make_sstn()
    shared = torch.tensor([[1.0] + [0.0] * 7, [1.0] + [0.0] * 7, [1.0] + [0.0] * 7])
    specific = torch.tensor([[1.0] + [0.0] * 7, [-1.0] + [0.0] * 7, [0.0, 1.0] + [0.0] * 6])
    nodes = sstn.nodes(shared, specific, torch.tensor([0, 0, 1]))
    s = sstn.similarity(nodes, nodes)
    assert s[0, 1].item() == pytest.approx(0.0)  # same modality: (1 + (-1)) / 2
    assert s[0, 2].item() == pytest.approx(1.0)  # cross modality: the shared cosine alone
    assert s[0, 0].item() == pytest.approx(1.0)
    assert torch.allclose(s, s.T)


@pytest.mark.parametrize("normalize", ["softmax", "sum"])
@pytest.mark.parametrize("self_loops", [False, True])
@pytest.mark.parametrize("k", [1, 3, 5])
def test_graph_keeps_exactly_k_entries_per_row_summing_to_one(normalize, self_loops, k):
    sstn = make_sstn(topk=k, normalize=normalize, self_loops=self_loops)
    nodes = sstn.nodes(*make_bank(10, seed=k))
    graph = sstn.graph(sstn.similarity(nodes, nodes))
    dense = to_dense(graph, 10)
    assert ((dense > 0).sum(dim=1) == k).all()
    assert torch.allclose(dense.sum(dim=1), torch.ones(10))
    if not self_loops:
        assert (dense.diagonal() == 0).all()


def test_topk_ties_go_to_the_lower_index():
    s = torch.tensor([[0.5, 0.9, 0.5, 0.5, 0.9, 0.1]])
    value, index = top_k(s, 3)
    assert index.tolist() == [[1, 4, 0]]
    assert torch.equal(value, torch.tensor([[0.9, 0.9, 0.5]]))


def test_edge_weights_softmax_and_sum():
    value = torch.tensor([[1.0, 0.0, -1.0 + 1e-3]])
    soft = edge_weights(value, "softmax", 0.5)
    assert torch.allclose(soft, torch.softmax(value / 0.5, dim=1))
    plain = edge_weights(value, "sum", 0.5)
    expected = torch.tensor([[1.0, 0.5, 5e-4]])
    assert torch.allclose(plain, expected / expected.sum(), atol=1e-6)
    assert (plain > 0).all()


def test_propagate_is_the_dense_product():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(6, 4, generator=gen)
    index = torch.tensor([[1, 2], [0, 5], [3, 4], [2, 1], [0, 3], [4, 2]])
    weight = torch.softmax(torch.randn(6, 2, generator=gen), dim=1)
    graph = Graph(index, weight, torch.zeros(6, 2))
    assert torch.allclose(propagate(graph, x), to_dense(graph, 6) @ x, atol=1e-6)


def test_training_forward_shapes_and_residual_fusion():
    sstn = make_sstn().train()
    shared, specific, modality = make_bank(12, seed=3)
    fused, fused_bn, graph, _, _ = sstn(shared, specific, modality)
    assert fused.shape == fused_bn.shape == (12, 3 * DIM)
    assert graph.index.shape == graph.weight.shape == (12, 6)
    x = unify(shared, specific, modality)
    assert torch.allclose(fused, x + to_dense(graph, 12) @ x, atol=1e-5)
    concat = SSTN(DIM, fusion="concat", fused_dim=5)
    fused, fused_bn, *_ = concat(shared, specific, modality)
    assert fused.shape == (12, 5)


def test_affinity_stats_on_a_hand_made_graph():
    index = torch.tensor([[1, 2], [0, 3], [0, 3], [2, 1]])
    weight = torch.tensor([[0.75, 0.25], [0.5, 0.5], [1.0, 0.0], [0.5, 0.5]])
    graph = Graph(index, weight, torch.full((4, 2), 0.5))
    modality = torch.tensor([0, 0, 1, 1])
    labels = torch.tensor([0, 1, 0, 1])
    stats = affinity_stats(graph, modality, labels)
    # cross edges: 0->2, 1->3, 2->0, 3->1 (4 of 8); same identity: 0->2, 1->3, 2->0, 3->1
    assert stats["sstn/cross_edges"].item() == pytest.approx(0.5)
    assert stats["sstn/same_id_edges"].item() == pytest.approx(0.5)
    assert stats["sstn/cross_same_id_edges"].item() == pytest.approx(1.0)
    assert stats["sstn/cross_weight"].item() == pytest.approx((0.25 + 0.5 + 1.0 + 0.5) / 4)
    assert stats["sstn/same_id_weight"].item() == pytest.approx((0.25 + 0.5 + 1.0 + 0.5) / 4)
    assert stats["sstn/max_weight"].item() == pytest.approx((0.75 + 0.5 + 1.0 + 0.5) / 4)
    assert stats["sstn/kept_similarity"].item() == pytest.approx(0.5)
    assert "sstn/same_id_edges" not in affinity_stats(graph, modality)
    assert all(not v.requires_grad for v in stats.values())


def test_affinity_stats_read_nothing_back_and_mark_the_uncounted_nan():
    """A training step must not wait for the device to log its graph; nothing counted is nan."""
    graph = Graph(torch.tensor([[1], [0]]), torch.ones(2, 1), torch.full((2, 1), 0.5))
    with count_host_reads() as reads:
        stats = affinity_stats(graph, torch.tensor([0, 0]), torch.tensor([0, 0]))  # no cross edge
    assert sum(reads.values()) == 0, reads
    assert stats["sstn/cross_edges"].item() == 0.0 and stats["sstn/same_id_edges"].item() == 1.0
    assert math.isnan(stats["sstn/cross_same_id_edges"].item())


VARIANTS = list(
    itertools.product(["softmax", "sum"], ["residual", "concat"], [False, True], [0, 5], [True, False])
)


@pytest.mark.parametrize(("normalize", "fusion", "self_loops", "affinity_dim", "specific"), VARIANTS)
def test_single_query_equals_one_query_transductive_graphs(
    normalize, fusion, self_loops, affinity_dim, specific
):
    sstn = make_sstn(
        use_specific=specific,
        topk=3,
        normalize=normalize,
        self_loops=self_loops,
        affinity_dim=affinity_dim,
        fusion=fusion,
        chunk=3,
    )
    query, gallery = make_bank(7, seed=10, specific=specific), make_bank(9, seed=11, specific=specific)
    single = sstn.distance(query, gallery, "single_query")
    separate = torch.cat([sstn.distance(row(query, i), gallery, "transductive") for i in range(7)])
    assert single.shape == (7, 9)
    assert torch.allclose(single, separate, atol=1e-5)
    one = sstn.distance(row(query, 0), gallery, "single_query")
    assert torch.allclose(one, sstn.distance(row(query, 0), gallery, "transductive"), atol=1e-5)


@settings(max_examples=25, deadline=None)
@given(
    num_q=st.integers(1, 6),
    num_g=st.integers(6, 12),
    k=st.integers(1, 5),
    seed=st.integers(0, 1000),
    normalize=st.sampled_from(["softmax", "sum"]),
)
def test_single_query_matches_transductive_property(num_q, num_g, k, seed, normalize):
    sstn = make_sstn(topk=k, normalize=normalize, chunk=4)
    query, gallery = make_bank(num_q, seed, modality=1), make_bank(num_g, seed + 1, modality=0)
    single = sstn.distance(query, gallery, "single_query")
    separate = torch.cat([sstn.distance(row(query, i), gallery, "transductive") for i in range(num_q)])
    assert torch.allclose(single, separate, atol=1e-5)


def test_transductive_uses_the_whole_graph():
    """With several queries, queries become neighbours of each other, so rows differ from SQ."""
    sstn = make_sstn(topk=3)
    query, gallery = make_bank(8, seed=5), make_bank(8, seed=6)
    full = sstn.distance(query, gallery, "transductive")
    assert full.shape == (8, 8)
    assert not torch.allclose(full, sstn.distance(query, gallery, "single_query"))
    chunked = make_sstn(topk=3, chunk=5)
    chunked.load_state_dict(sstn.state_dict())
    assert torch.allclose(full, chunked.distance(query, gallery, "transductive"), atol=1e-6)


@pytest.mark.parametrize("self_loops", [False, True])
@pytest.mark.parametrize("num_g", [1, 2, 4, 6])
def test_single_query_with_a_gallery_no_larger_than_k(num_g, self_loops):
    sstn = make_sstn(topk=6, self_loops=self_loops)
    query, gallery = make_bank(3, seed=7), make_bank(num_g, seed=8)
    single = sstn.distance(query, gallery, "single_query")
    separate = torch.cat([sstn.distance(row(query, i), gallery, "transductive") for i in range(3)])
    assert torch.allclose(single, separate, atol=1e-5)


# --------------------------------------------------------------------------- balanced (intra + cross) top-k


@pytest.mark.parametrize(("topk", "cross_k"), [(6, 3), (6, 6), (4, 1), (5, 5)])
def test_balanced_rows_keep_exactly_the_configured_intra_and_cross_counts(topk, cross_k):
    sstn = make_sstn(topk=topk, cross_k=cross_k)
    shared, specific, modality = make_bank(20, seed=4)
    nodes = sstn.nodes(shared, specific, modality)
    graph = sstn.graph(sstn.similarity(nodes, nodes), modality[:, None] == modality[None, :])
    cross = modality[graph.index] != modality.unsqueeze(1)
    assert graph.valid.all()  # 20 nodes: every block has enough candidates
    assert (cross[:, topk - cross_k :]).all() and not cross[:, : topk - cross_k].any()
    assert (cross.sum(dim=1) == cross_k).all()
    assert (graph.index != torch.arange(20).unsqueeze(1)).all()  # no self loops
    assert torch.allclose(graph.weight.sum(dim=1), torch.ones(20))
    # each block holds the most similar candidates of its kind
    s = sstn.similarity(nodes, nodes).fill_diagonal_(float("-inf"))
    same = modality[:, None] == modality[None, :]
    best_cross = s.masked_fill(same, float("-inf")).topk(cross_k, dim=1).values
    assert torch.allclose(graph.value[:, topk - cross_k :], best_cross)


def test_balanced_equals_plain_top_k_when_cross_k_is_0():
    plain, balanced = make_sstn(topk=4), make_sstn(topk=4, cross_k=0)
    nodes = plain.nodes(*make_bank(15, seed=9))
    same = nodes.modality[:, None] == nodes.modality[None, :]
    s = plain.similarity(nodes, nodes)
    a, b = plain.graph(s), balanced.graph(s, same)
    assert torch.equal(a.index, b.index) and torch.equal(a.weight, b.weight)


def test_short_blocks_are_padded_with_zero_weight_edges():
    """Two IR nodes among RGB ones: an IR row has one IR candidate for its 2-wide intra block."""
    sstn = make_sstn(topk=4, cross_k=2)
    shared, specific, _ = make_bank(8, seed=2)
    modality = torch.tensor([0, 0, 0, 0, 0, 0, 1, 1])
    nodes = sstn.nodes(shared, specific, modality)
    graph = sstn.graph(sstn.similarity(nodes, nodes), modality[:, None] == modality[None, :])
    assert graph.valid[6].tolist() == [True, False, True, True]
    assert graph.weight[6, 1] == 0 and torch.allclose(graph.weight.sum(dim=1), torch.ones(8))


def test_block_norm_gives_each_block_its_share():
    sstn = make_sstn(topk=6, cross_k=2, block_norm=True)
    shared, specific, modality = make_bank(20, seed=6)
    nodes = sstn.nodes(shared, specific, modality)
    graph = sstn.graph(sstn.similarity(nodes, nodes), modality[:, None] == modality[None, :])
    assert torch.allclose(graph.weight[:, :4].sum(dim=1), torch.full((20,), 4 / 6))
    assert torch.allclose(graph.weight[:, 4:].sum(dim=1), torch.full((20,), 2 / 6))
    # within a block: the softmax of the block's similarities
    assert torch.allclose(graph.weight[:, 4:] * 3, torch.softmax(graph.value[:, 4:] / sstn.temperature, dim=1))
    # a row whose cross block is empty gives the whole weight to its intra block
    lonely = torch.zeros(5, dtype=torch.long)
    nodes = sstn.nodes(shared[:5], specific[:5], lonely)
    graph = sstn.graph(sstn.similarity(nodes, nodes), torch.ones(5, 5, dtype=torch.bool))
    assert torch.allclose(graph.weight.sum(dim=1), torch.ones(5)) and (graph.weight[:, 4:] == 0).all()


BALANCED = list(itertools.product([(3, 1), (3, 3), (4, 2)], [False, True], ["softmax", "sum"], [False, True]))


@pytest.mark.parametrize(("k", "block_norm", "normalize", "self_loops"), BALANCED)
def test_balanced_single_query_equals_one_query_transductive_graphs(k, block_norm, normalize, self_loops):
    topk, cross_k = k
    sstn = make_sstn(topk=topk, cross_k=cross_k, block_norm=block_norm, normalize=normalize,
                     self_loops=self_loops, chunk=4)
    for q_mod, g_mod in ((1, 0), (None, None)):  # cross-modality queries; mixed queries and gallery
        query, gallery = make_bank(6, seed=21, modality=q_mod), make_bank(9, seed=22, modality=g_mod)
        single = sstn.distance(query, gallery, "single_query")
        separate = torch.cat([sstn.distance(row(query, i), gallery, "transductive") for i in range(6)])
        assert torch.allclose(single, separate, atol=1e-5)


def tied_bank(n: int, seed: int, modality: int | None = None):
    """Features with four entries of +-1 and four zeros: unit vectors of entries +-1/2, so every cosine is an
    exact multiple of 1/4 and ties (between gallery nodes, and between a query and a row's k-th) abound."""
    gen = torch.Generator().manual_seed(seed)

    def vectors() -> torch.Tensor:
        out = torch.zeros(n, DIM)
        for i in range(n):
            out[i, torch.randperm(DIM, generator=gen)[:4]] = torch.randint(0, 2, (4,), generator=gen) * 2.0 - 1
        return out

    mod = torch.randint(0, 2, (n,), generator=gen) if modality is None else torch.full((n,), modality)
    return vectors(), vectors(), mod


TIED = [((3, 0), False), ((4, 0), False), ((4, 2), False), ((4, 2), True), ((3, 1), True)]


@pytest.mark.parametrize(("k", "block_norm"), TIED)
@pytest.mark.parametrize("normalize", ["softmax", "sum"])
@pytest.mark.parametrize("self_loops", [False, True])
def test_single_query_breaks_ties_like_the_one_query_graph(k, block_norm, normalize, self_loops):
    """In a one-query graph the query is node 0, so it wins every tie: it enters a gallery row whose k-th
    similarity it only equals, and evicts that k-th. Single-query scoring must follow the same rule."""
    sstn = make_sstn(topk=k[0], cross_k=k[1], block_norm=block_norm, normalize=normalize, self_loops=self_loops,
                     chunk=4)
    entered = 0
    for seed, (q_mod, g_mod) in enumerate([(1, 0), (None, None), (0, 0)]):
        query, gallery = tied_bank(6, 100 + seed, q_mod), tied_bank(10, 200 + seed, g_mod)
        single = sstn.distance(query, gallery, "single_query")
        separate = torch.cat([sstn.distance(row(query, i), gallery, "transductive") for i in range(6)])
        assert torch.allclose(single, separate, atol=1e-5)
        q, g = sstn.nodes(*query), sstn.nodes(*gallery)
        kth = sstn.graph(sstn.similarity(g, g), g.modality[:, None] == g.modality[None, :]).value[:, -1]
        entered += int((sstn.similarity(q, g) == kth).sum())
    assert entered > 0  # the banks do hold queries that tie with a row's last kept neighbour


@pytest.mark.parametrize(("k", "block_norm"), [((3, 1), False), ((4, 2), True), ((3, 3), False)])
@pytest.mark.parametrize("mode", ["transductive", "single_query"])
def test_balanced_chunked_equals_the_dense_reference(k, block_norm, mode):
    from cmssft.models.sstn_reference import dense_distance

    sstn = make_sstn(topk=k[0], cross_k=k[1], block_norm=block_norm, chunk=3)
    query, gallery = make_bank(5, seed=31), make_bank(13, seed=32)
    assert torch.allclose(sstn.distance(query, gallery, mode), dense_distance(sstn, query, gallery, mode), atol=1e-5)


def test_test_graph_edges_come_with_the_distances():
    sstn = make_sstn(topk=3, cross_k=3)
    query, gallery = make_bank(4, seed=1, modality=1), make_bank(7, seed=2, modality=0)
    modality = torch.cat([query[2], gallery[2]])
    # transductive: every row keeps 3 nodes of the other modality (a gallery row: 3 of the 4 queries)
    edges = sstn.distance_blocks(query, gallery, "transductive").edges()
    assert edges.index.shape == (11, 3) and edges.valid.all()
    assert (modality[edges.index] != modality.unsqueeze(1)).all()
    # single-query: each query in its own graph keeps 3 gallery nodes; the gallery rows are reported
    # among the gallery alone, where an RGB row has no IR candidate, so their cross block is padding
    edges = sstn.distance_blocks(query, gallery, "single_query").edges()
    assert edges.valid[:4].all() and not edges.valid[4:].any()
    assert (modality[edges.index[:4]] == 0).all()


def test_single_query_self_loop_edges_point_at_each_query_itself():
    """With self loops a query is its own most similar candidate; its test-graph edge must name its own node,
    in every query block (chunk) alike."""
    sstn = make_sstn(topk=3, self_loops=True, chunk=2)
    query, gallery = make_bank(5, seed=3, modality=1), make_bank(7, seed=4, modality=0)
    edges = sstn.distance_blocks(query, gallery, "single_query").edges()
    own = torch.arange(5).unsqueeze(1)
    assert (edges.index[:5] == own).any(dim=1).all()
    assert ((edges.index[:5] == own) | (edges.index[:5] >= 5)).all()  # else gallery nodes, numbered after the queries


def test_centring_uses_the_running_means_at_test_time():
    """``center=True``: at test time every node is centred by its modality's running mean, whatever else is in the
    batch, so single-query scoring still equals one-query graphs; training updates the means by ``momentum``."""
    sstn = make_sstn(topk=3, cross_k=1, center=True, center_momentum=0.25)
    sstn.modality_mean.normal_()
    shared, specific, modality = make_bank(9, seed=12)
    nodes = sstn.nodes(shared, specific, modality)
    expected = torch.nn.functional.normalize(shared - sstn.modality_mean[modality], dim=1)
    assert torch.allclose(nodes.sh, expected, atol=1e-6)
    assert torch.allclose(sstn.nodes(*row((shared, specific, modality), 4)).sh, nodes.sh[4:5], atol=1e-6)
    query, gallery = make_bank(5, seed=13), make_bank(8, seed=14)
    single = sstn.distance(query, gallery, "single_query")
    separate = torch.cat([sstn.distance(row(query, i), gallery, "transductive") for i in range(5)])
    assert torch.allclose(single, separate, atol=1e-5)
    before = sstn.modality_mean.clone()
    sstn.train()(shared, specific, modality)
    for m in (0, 1):
        batch_mean = shared[modality == m].mean(dim=0)
        assert torch.allclose(sstn.modality_mean[m], before[m] + 0.25 * (batch_mean - before[m]), atol=1e-6)


# --------------------------------------------------------------------------- test-time own-modality block


def copy_weights(dst: SSTN, src: SSTN) -> SSTN:
    dst.load_state_dict(src.state_dict())
    return dst.eval()


@pytest.mark.parametrize(("topk", "cross_k", "intra_k"), [(3, 3, 2), (4, 2, 1), (3, 3, 3)])
@pytest.mark.parametrize("mode", ["transductive", "single_query"])
def test_test_intra_k_scores_like_the_widened_block_normalised_graph(topk, cross_k, intra_k, mode):
    """``test_intra_k`` is the row layout ``topk + intra_k`` / ``cross_k`` with block weights, at test time only."""
    sstn = make_sstn(topk=topk, cross_k=cross_k, test_intra_k=intra_k, chunk=4)
    wide = copy_weights(make_sstn(topk=topk + intra_k, cross_k=cross_k, block_norm=True, chunk=4), sstn)
    plain = copy_weights(make_sstn(topk=topk, cross_k=cross_k, chunk=4), sstn)
    for q_mod, g_mod in ((1, 0), (None, None)):
        query, gallery = make_bank(6, seed=31, modality=q_mod), make_bank(9, seed=32, modality=g_mod)
        got = sstn.distance(query, gallery, mode)
        assert torch.allclose(got, wide.distance(query, gallery, mode), atol=1e-5)
        assert not torch.allclose(got, plain.distance(query, gallery, mode), atol=1e-3)


def test_test_intra_k_widens_test_rows_by_own_modality_neighbours_and_leaves_training_alone():
    sstn = make_sstn(topk=3, cross_k=3, test_intra_k=2)
    query, gallery = make_bank(5, seed=3, modality=1), make_bank(8, seed=4, modality=0)
    modality = torch.cat([query[2], gallery[2]])
    edges = sstn.distance_blocks(query, gallery, "transductive").edges()
    assert edges.index.shape == (13, 5) and edges.valid.all()
    cross = modality[edges.index] != modality.unsqueeze(1)
    assert not cross[:, :2].any() and cross[:, 2:].all()  # 2 own-modality, then 3 other-modality neighbours
    assert torch.allclose(edges.weight[:, :2].sum(1), torch.full((13,), 2 / 5))
    # single-query: a lone query has no own-modality candidate; the rest of its row is its 3 gallery nodes
    edges = sstn.distance_blocks(query, gallery, "single_query").edges()
    assert not edges.valid[:5, :2].any() and edges.valid[:5, 2:].all()
    assert torch.allclose(edges.weight[:5].sum(1), torch.ones(5))
    # the training graph keeps its own layout: 3 neighbours, all from the other modality
    shared, specific, mod = make_bank(12, seed=5)
    graph = sstn.train()(shared, specific, mod).graph
    assert graph.index.shape == (12, 3) and (mod[graph.index] != mod.unsqueeze(1)).all()


def test_test_intra_k_is_ignored_by_one_top_k_per_row():
    sstn = make_sstn(topk=3, cross_k=0, test_intra_k=2)
    plain = copy_weights(make_sstn(topk=3, cross_k=0), sstn)
    query, gallery = make_bank(5, seed=7), make_bank(8, seed=8)
    assert sstn.test_view() is sstn
    assert torch.equal(sstn.distance(query, gallery, "transductive"), plain.distance(query, gallery, "transductive"))
    with pytest.raises(UserError, match="test_intra_k"):
        SSTN(DIM, topk=3, cross_k=3, test_intra_k=-1)
