"""Identity, triplet (batch-hard, kNN-margin, cross/single-modality) and head losses; the criterion."""

from __future__ import annotations

import math

import pytest
import torch

from cmssft.config import Config
from cmssft.losses import (
    CmSSFTCriterion,
    IdentityLoss,
    ProjectionLoss,
    ReconstructionLoss,
    TripletLoss,
    build_criterion,
    pairwise_distance,
)

# 1-D features 0, 1, 3, 7: d01=1 d02=3 d03=7 d12=2 d13=6 d23=4
FEATS = torch.tensor([[0.0], [1.0], [3.0], [7.0]])
LABELS = torch.tensor([0, 0, 1, 1])


def test_label_smoothing_value():
    logits = torch.tensor([[2.0, 0.0, -1.0]])
    eps = 0.3
    logp = torch.log_softmax(logits, dim=1)[0]
    expected = -(1 - eps) * logp[0] - eps / 3 * logp.sum()
    assert IdentityLoss(eps)(logits, torch.tensor([0])).item() == pytest.approx(expected.item(), rel=1e-6)
    assert IdentityLoss(0.0)(logits, torch.tensor([0])).item() == pytest.approx(-logp[0].item(), rel=1e-6)
    uniform = torch.zeros(2, 5)  # any smoothing: log K
    assert IdentityLoss(0.5)(uniform, torch.tensor([1, 4])).item() == pytest.approx(math.log(5), rel=1e-6)


def test_batch_hard_triplet_hand_case():
    # all pairs, margin 0.5: only anchor 2 violates, 0.5 + d23 - d21 = 2.5
    loss = TripletLoss(margin=0.5, hard_negatives=1, form="all")
    assert loss(FEATS, LABELS, torch.tensor([0, 1, 0, 1])).item() == pytest.approx(2.5 / 4, abs=1e-5)


def test_knn_margin_sums_the_k_hardest_negatives():
    # anchor 2: (0.5 + 4 - 2) + (0.5 + 4 - 3) = 4; the others stay within the margin
    loss = TripletLoss(margin=0.5, hard_negatives=2, form="all")
    assert loss(FEATS, LABELS, torch.tensor([0, 1, 0, 1])).item() == pytest.approx(4.0 / 4, abs=1e-5)
    # k larger than the negatives available: missing negatives contribute nothing
    big = TripletLoss(margin=0.5, hard_negatives=10, form="all")
    assert big(FEATS, LABELS, torch.tensor([0, 1, 0, 1])).item() == pytest.approx(4.0 / 4, abs=1e-5)


def test_cross_modality_triplet_mines_only_the_other_modality():
    modality = torch.tensor([0, 1, 1, 0])
    # anchor 2 (IR) may only use RGB samples 0 and 3: 0.5 + d23 - d20 = 1.5
    cross = TripletLoss(margin=0.5, form="cross")(FEATS, LABELS, modality)
    assert cross.item() == pytest.approx(1.5 / 4, abs=1e-5)
    # single-modality: no anchor has a same-modality positive -> no valid anchor -> 0
    single = TripletLoss(margin=0.5, form="single")(FEATS, LABELS, modality)
    assert single.item() == 0.0


def _reference_triplet(feats, labels, modality, margin, k, form):
    dist = torch.cdist(feats.double(), feats.double())
    total, count = 0.0, 0
    for a in range(len(labels)):

        def allowed(j, a=a):
            same = modality[j] == modality[a]
            return {"all": True, "cross": not same, "single": same}[form]

        pos = [dist[a, j] for j in range(len(labels)) if j != a and labels[j] == labels[a] and allowed(j)]
        neg = sorted(dist[a, j] for j in range(len(labels)) if labels[j] != labels[a] and allowed(j))
        if not pos or not neg:
            continue
        total += sum(max(0.0, float(margin + max(pos) - n)) for n in neg[:k])
        count += 1
    return total / max(count, 1)  # a plain float: pytest.approx must not be handed a tensor


@pytest.mark.parametrize("form", ["all", "cross", "single"])
@pytest.mark.parametrize("k", [1, 3])
def test_triplet_matches_a_brute_force_reference(form, k):
    gen = torch.Generator().manual_seed(k)
    feats = torch.randn(16, 5, generator=gen)
    labels = torch.arange(4).repeat_interleave(4)
    modality = torch.tensor([0, 0, 1, 1] * 4)
    got = TripletLoss(margin=1.0, hard_negatives=k, form=form)(feats, labels, modality)
    assert got.item() == pytest.approx(_reference_triplet(feats, labels, modality, 1.0, k, form), abs=1e-4)


def test_triplet_gradient_is_finite_with_duplicate_features():
    feats = torch.zeros(4, 3, requires_grad=True)
    TripletLoss(form="all")(feats, LABELS, torch.tensor([0, 1, 0, 1])).backward()
    assert torch.isfinite(feats.grad).all()
    assert pairwise_distance(torch.zeros(2, 3)).max().item() < 1e-5


def test_projection_and_reconstruction_losses():
    pred = torch.tensor([[1.0, 0.0], [0.0, 3.0]])
    assert ProjectionLoss()(pred, pred * 5).item() == pytest.approx(0.0, abs=1e-6)
    assert ProjectionLoss()(pred, -pred).item() == pytest.approx(4.0)
    img = torch.ones(2, 3, 4, 2)
    assert ReconstructionLoss()(img, img * 3).item() == pytest.approx(4.0)


def _fake_out(batch: int = 8, classes: int = 4, with_specific: bool = True) -> dict:
    gen = torch.Generator().manual_seed(0)

    def r(*shape):
        return torch.randn(*shape, generator=gen)

    out = {"shared_feat": r(batch, 6), "shared_logits": r(batch, classes), "stats": {}}
    if with_specific:
        out.update(
            specific_feat=r(batch, 6),
            specific_logits=r(batch, classes),
            fused_feat=r(batch, 18),
            fused_logits=r(batch, classes),
            modality_logits=r(batch, 2),
            project_pred=r(batch, 6),
            project_target=r(batch, 6),
            recon=r(batch, 3, 4, 2),
            recon_target=r(batch, 3, 4, 2),
        )
    return out


LABELS8 = torch.tensor([0, 0, 1, 1, 0, 0, 1, 1])
MOD8 = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])


def test_criterion_returns_every_weighted_term_and_total():
    terms = build_criterion(Config())(_fake_out(), LABELS8, MOD8)
    names = {
        "id_shared",
        "triplet_shared",
        "id_specific",
        "triplet_specific",
        "id_fused",
        "triplet_fused",
        "modality",
        "project",
        "reconstruction",
    }
    assert set(terms) == names | {"total"}
    assert all(t.dim() == 0 for t in terms.values())
    assert terms["total"].item() == pytest.approx(sum(terms[n].item() for n in names), rel=1e-5)


def test_criterion_applies_weights_and_drops_zero_or_missing_terms():
    cfg = Config()
    cfg.loss.weights.modality = 0.0
    cfg.loss.weights.project = 2.0
    terms = build_criterion(cfg)(_fake_out(), LABELS8, MOD8)
    assert "modality" not in terms
    plain = ProjectionLoss()(_fake_out()["project_pred"], _fake_out()["project_target"])
    assert terms["project"].item() == pytest.approx(2.0 * plain.item(), rel=1e-6)
    shared_only = build_criterion(Config())(_fake_out(with_specific=False), LABELS8, MOD8)
    assert set(shared_only) == {"id_shared", "triplet_shared", "total"}


def test_criterion_rejects_unknown_terms():
    with pytest.raises(ValueError, match="unknown loss terms"):
        CmSSFTCriterion({"id_sharde": 1.0})
