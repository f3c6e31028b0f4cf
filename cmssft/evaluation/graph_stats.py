"""What a sparse affinity graph kept: how many edges cross modality, and how many link the same identity.

The transfer only helps when a node's kept neighbours include the other modality (its empty slot
is filled from there) and those neighbours are mostly the right identity. These statistics say
whether that holds, in training batches and in test graphs alike.

Shapes (N rows, k kept edges per row, M nodes; :class:`~cmssft.scoring.KeptEdges` holds the edges)::

    KeptEdges         [N, k] each   index (in 0..M-1), weight, valid
    rows              long  [N]     node id of each row (default 0..N-1)
    modality, labels  long  [M]     per node
"""

from __future__ import annotations

import torch

from cmssft.scoring import KeptEdges


def edge_statistics(
    edges: KeptEdges,
    modality: torch.Tensor,
    labels: torch.Tensor | None = None,
    rows: torch.Tensor | None = None,
    on_device: bool = False,
) -> dict[str, float] | dict[str, torch.Tensor]:
    """Fractions in [0, 1] over the rows of ``edges`` (nan where nothing was counted); ``on_device``
    returns them as 0-d tensors where the edges are, read by nobody yet (a training step logs
    them only every few steps, and reading a GPU value waits for the GPU).

    - ``cross_edges``: share of kept edges whose ends differ in modality;
    - ``cross_weight``: weight a row puts on other-modality neighbours, averaged over rows;
    - ``max_weight``: a row's largest weight, averaged (1: one neighbour takes everything);
    - with ``labels``: ``same_id_edges`` / ``same_id_weight`` (edges and weight on the same identity),
      ``cross_same_id_edges`` (of the cross-modality edges, the share on the same identity) and
      ``cross_same_id_weight`` (of the cross-modality weight, the share on the same identity).
    """
    index, weight, valid = edges.index, edges.weight.float(), edges.valid
    if rows is None:
        rows = torch.arange(index.shape[0], device=index.device)
    rows = rows.unsqueeze(1)
    validf = valid.float()
    cross = (modality[index] != modality[rows]).float() * validf
    count = validf.sum()
    stats = {
        "cross_edges": _ratio(cross.sum(), count),
        "cross_weight": _mean((weight * cross).sum(dim=1)),
        "max_weight": _mean((weight * validf).max(dim=1).values if index.shape[1] else weight.new_zeros(0)),
    }
    if labels is not None:
        same = (labels[index] == labels[rows]).float() * validf
        stats["same_id_edges"] = _ratio(same.sum(), count)
        stats["same_id_weight"] = _mean((weight * same).sum(dim=1))
        stats["cross_same_id_edges"] = _ratio((same * cross).sum(), cross.sum())
        stats["cross_same_id_weight"] = _ratio((weight * same * cross).sum(), (weight * cross).sum())
    return stats if on_device else {key: float(value) for key, value in stats.items()}


def _ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    return torch.where(den > 0, num / den.clamp_min(1e-30), torch.full_like(num, float("nan")))


def _mean(values: torch.Tensor) -> torch.Tensor:
    return values.mean() if values.numel() else values.new_tensor(float("nan"))


def trial_graph_statistics(
    edges: KeptEdges, modality: torch.Tensor, labels: torch.Tensor, num_query: int
) -> dict[str, float]:
    """Statistics of a test graph whose nodes are the queries (ids ``0..num_query-1``) then the gallery:
    cross-modality edges for query rows and for gallery rows apart, identity shares over all rows, and
    ``query_same_id_candidates``, the share of a query's other-modality candidates that are its
    identity (what a random choice of cross edges would reach)."""
    n = edges.index.shape[0]
    ids = torch.arange(n, device=edges.index.device)
    q = KeptEdges(*(t[:num_query] for t in edges))
    g = KeptEdges(*(t[num_query:] for t in edges))
    overall = edge_statistics(edges, modality, labels)
    out = {
        "query_cross_edges": edge_statistics(q, modality, rows=ids[:num_query])["cross_edges"],
        "gallery_cross_edges": edge_statistics(g, modality, rows=ids[num_query:])["cross_edges"],
        **{key: overall[key] for key in ("same_id_edges", "same_id_weight", "cross_same_id_edges",
                                         "cross_same_id_weight")},
    }
    out["query_same_id_candidates"] = _same_id_candidate_share(modality, labels, num_query)
    return out


def _same_id_candidate_share(modality: torch.Tensor, labels: torch.Tensor, num_query: int) -> float:
    """Over all queries, same-identity nodes of another modality / nodes of another modality (counts, no Q x M)."""
    _, label_ids = torch.unique(labels, return_inverse=True)
    num_mod, num_lab = int(modality.max()) + 1, int(label_ids.max()) + 1
    per_mod = torch.bincount(modality, minlength=num_mod)  # nodes per modality
    per_mod_label = torch.bincount(modality * num_lab + label_ids, minlength=num_mod * num_lab).view(num_mod, num_lab)
    q_mod, q_lab = modality[:num_query], label_ids[:num_query]
    same = per_mod_label[:, q_lab].sum(dim=0) - per_mod_label[q_mod, q_lab]  # [Q] same id, other modality
    other = per_mod.sum() - per_mod[q_mod]  # [Q] other modality
    return float(_ratio(same.sum().float(), other.sum().float()))
