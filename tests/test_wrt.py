"""The weighted regularised triplet (loss.triplet=wrt) and how the criterion wires the triplet options."""

from __future__ import annotations

import math

import pytest
import torch

from cmssft.config import Config, load_config
from cmssft.errors import ConfigError
from cmssft.losses import TripletLoss, WeightedRegularizedTriplet, build_criterion, pairwise_distance
from cmssft.losses.triplet import masked_softmax, pair_masks

# 1-D features 0, 1, 3, 7: d01=1 d02=3 d03=7 d12=2 d13=6 d23=4
FEATS = torch.tensor([[0.0], [1.0], [3.0], [7.0]])
LABELS = torch.tensor([0, 0, 1, 1])
e = math.exp


def softplus(x: float) -> float:
    """log(1 + e^x): SoftMarginLoss of (d_n - d_p) with target 1."""
    return math.log1p(math.exp(x))


def test_wrt_hand_case_all_pairs():
    # one positive per anchor; negatives weighted by exp(-d) (the closer, the heavier)
    dn0 = (3 * e(-3) + 7 * e(-7)) / (e(-3) + e(-7))
    dn1 = (2 * e(-2) + 6 * e(-6)) / (e(-2) + e(-6))
    dn2 = (3 * e(-3) + 2 * e(-2)) / (e(-3) + e(-2))
    dn3 = (7 * e(-7) + 6 * e(-6)) / (e(-7) + e(-6))
    expected = (softplus(1 - dn0) + softplus(1 - dn1) + softplus(4 - dn2) + softplus(4 - dn3)) / 4
    got = WeightedRegularizedTriplet("all")(FEATS, LABELS, torch.tensor([0, 1, 0, 1]))
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_wrt_weights_positives_by_exp_distance_and_skips_anchors_without_positive():
    # 0, 1, 3 one identity, 10 another (alone: no positive, contributes nothing)
    feats = torch.tensor([[0.0], [1.0], [3.0], [10.0]])
    labels = torch.tensor([0, 0, 0, 1])
    dp0 = (1 * e(1) + 3 * e(3)) / (e(1) + e(3))  # farther positives weigh more
    dp1 = (1 * e(1) + 2 * e(2)) / (e(1) + e(2))
    dp2 = (3 * e(3) + 2 * e(2)) / (e(3) + e(2))
    expected = (softplus(dp0 - 10) + softplus(dp1 - 9) + softplus(dp2 - 7)) / 3
    got = WeightedRegularizedTriplet("all")(feats, labels, torch.zeros(4, dtype=torch.long))
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_wrt_respects_cross_and_single_pairs():
    # cross, modality 0 1 1 0: anchor 0 sees 1 (pos, 1), 2 (neg, 3); anchor 1 sees 0 (pos, 1), 3 (neg, 6);
    # anchor 2 sees 3 (pos, 4), 0 (neg, 3); anchor 3 sees 2 (pos, 4), 1 (neg, 6)
    cross = WeightedRegularizedTriplet("cross")(FEATS, LABELS, torch.tensor([0, 1, 1, 0]))
    expected = (softplus(1 - 3) + softplus(1 - 6) + softplus(4 - 3) + softplus(4 - 6)) / 4
    assert cross.item() == pytest.approx(expected, rel=1e-6)
    # single, modality 0 0 0 1: anchor 0 sees 1 (pos, 1), 2 (neg, 3); anchor 1 sees 0 (pos, 1), 2 (neg, 2);
    # anchor 2 has no positive of its modality and anchor 3 no partner at all: both contribute nothing
    single = WeightedRegularizedTriplet("single")(FEATS, LABELS, torch.tensor([0, 0, 0, 1]))
    assert single.item() == pytest.approx((softplus(1 - 3) + softplus(1 - 2)) / 2, rel=1e-6)


def test_no_valid_anchor_gives_zero_with_zero_gradient():
    feats = FEATS.clone().requires_grad_(True)
    loss = WeightedRegularizedTriplet("single")(feats, LABELS, torch.tensor([0, 1, 0, 1]))  # no same-modality positive
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(feats.grad, torch.zeros_like(feats))


def weighted_distances(feats: torch.Tensor, labels: torch.Tensor, modality: torch.Tensor, form: str):
    """Each anchor's softmax-weighted positive and negative distance, as the loss forms them."""
    dist = pairwise_distance(feats)
    pos, neg = pair_masks(labels, modality, form)
    return (masked_softmax(dist, pos) * dist).sum(1), (masked_softmax(-dist, neg) * dist).sum(1)


def gradient_step(feats: torch.Tensor, labels, modality, form: str, lr: float) -> tuple[torch.Tensor, torch.Tensor]:
    x = feats.clone().requires_grad_(True)
    loss = WeightedRegularizedTriplet(form)(x, labels, modality)
    (grad,) = torch.autograd.grad(loss, x)
    after = x.detach() - lr * grad
    assert WeightedRegularizedTriplet(form)(after, labels, modality) < loss
    return after, grad


def test_a_gradient_step_pulls_positives_in_and_pushes_negatives_out():
    modality = torch.tensor([0, 1, 0, 1])
    d_p, d_n = weighted_distances(FEATS, LABELS, modality, "all")
    after, _ = gradient_step(FEATS, LABELS, modality, "all", lr=0.1)
    d_p1, d_n1 = weighted_distances(after, LABELS, modality, "all")
    assert (d_p1 < d_p).all() and (d_n1 > d_n).all()  # every anchor
    # in 8-D, on average over the anchors
    feats = torch.randn(16, 8, generator=torch.Generator().manual_seed(0))
    labels, modality = torch.arange(4).repeat_interleave(4), torch.tensor([0, 0, 1, 1] * 4)
    d_p, d_n = weighted_distances(feats, labels, modality, "cross")
    after, _ = gradient_step(feats, labels, modality, "cross", lr=0.1)
    d_p1, d_n1 = weighted_distances(after, labels, modality, "cross")
    assert d_p1.mean() < d_p.mean() and d_n1.mean() > d_n.mean()


def reference_wrt(feats: torch.Tensor, labels, modality, form: str) -> float:
    """The definition, literally: float64, one anchor at a time, exp without any shift or mask."""
    x = feats.double()
    total, count = 0.0, 0
    for a in range(len(labels)):
        partners = [j for j in range(len(labels)) if j != a and
                    {"all": True, "cross": modality[j] != modality[a], "single": modality[j] == modality[a]}[form]]
        pos = [float((x[a] - x[j]).norm()) for j in partners if labels[j] == labels[a]]
        neg = [float((x[a] - x[j]).norm()) for j in partners if labels[j] != labels[a]]
        if not pos or not neg:
            continue
        d_p = sum(d * math.exp(d) for d in pos) / sum(math.exp(d) for d in pos)
        d_n = sum(d * math.exp(-d) for d in neg) / sum(math.exp(-d) for d in neg)
        total += softplus(d_p - d_n)
        count += 1
    return total / max(count, 1)


@pytest.mark.parametrize("form", ["all", "cross", "single"])
@pytest.mark.parametrize("seed", [0, 1])
def test_wrt_matches_the_literal_definition(form, seed):
    gen = torch.Generator().manual_seed(seed)
    feats = torch.randn(16, 5, generator=gen) * 2
    labels = torch.randint(0, 4, (16,), generator=gen)  # uneven identities, some anchors without positives
    modality = torch.randint(0, 2, (16,), generator=gen)
    got = WeightedRegularizedTriplet(form)(feats, labels, modality)
    assert got.item() == pytest.approx(reference_wrt(feats, labels, modality, form), rel=1e-5, abs=1e-6)


def test_large_distances_stay_finite_and_tend_to_the_hardest_pairs():
    gen = torch.Generator().manual_seed(0)
    feats = (torch.randn(16, 8, generator=gen) * 1000).requires_grad_(True)
    labels, modality = torch.arange(4).repeat_interleave(4), torch.tensor([0, 1] * 8)
    loss = WeightedRegularizedTriplet("cross")(feats, labels, modality)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(feats.grad).all() and feats.grad.abs().sum() > 0
    # gaps of hundreds make the softmax weights one-hot: batch-hard with a soft margin
    dist = pairwise_distance(feats.detach()).double()
    pos, neg = pair_masks(labels, modality, "cross")
    hardest = dist.masked_fill(~pos, -math.inf).amax(1) - dist.masked_fill(~neg, math.inf).amin(1)
    assert loss.item() == pytest.approx(torch.nn.functional.softplus(hardest).mean().item(), rel=1e-4)


def test_masked_entries_never_set_the_shift():
    # negatives 1000 away: a shift taken over the masked zeros as well would underflow every negative's
    # weight to 0 (d_n = 0, loss = softplus(d_p)); over the allowed entries d_n = 1000 and the loss vanishes
    feats = torch.tensor([[0.0], [0.5], [1000.0], [1000.5]])
    loss = WeightedRegularizedTriplet("all")(feats, LABELS, torch.zeros(4, dtype=torch.long))
    assert loss.item() == pytest.approx(softplus(0.5 - 999.5), abs=1e-30)
    weights = masked_softmax(torch.tensor([[5.0, -1e4, 3.0]]), torch.tensor([[False, True, True]]))
    assert weights[0, 0] == 0 and weights.sum().item() == pytest.approx(1.0)  # the masked 5 is no max
    assert torch.equal(masked_softmax(torch.ones(1, 3), torch.zeros(1, 3, dtype=torch.bool)), torch.zeros(1, 3))


@pytest.mark.parametrize("scale", [1.0, 1000.0])
def test_bf16_inputs_give_a_finite_float32_loss_and_gradients(scale):
    gen = torch.Generator().manual_seed(1)
    base = (torch.randn(16, 32, generator=gen) * scale).bfloat16()
    feats = base.clone().requires_grad_(True)
    labels, modality = torch.arange(4).repeat_interleave(4), torch.tensor([0, 1] * 8)
    loss = WeightedRegularizedTriplet("all")(feats, labels, modality)
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert feats.grad.dtype == torch.bfloat16 and torch.isfinite(feats.grad).all()
    # the arithmetic is float32's: the same as the bf16 values given in float32
    assert loss.item() == WeightedRegularizedTriplet("all")(base.float(), labels, modality).item()


# --------------------------------------------------------------------------- configuration and criterion

LABELS8 = torch.tensor([0, 0, 1, 1, 0, 0, 1, 1])
MOD8 = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])


def features(seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {"shared_feat": torch.randn(8, 6, generator=gen), "specific_feat": torch.randn(8, 6, generator=gen),
            "fused_feat": torch.randn(8, 18, generator=gen)}


@pytest.mark.parametrize("shared", ["cross", "all"])
def test_loss_triplet_wrt_sets_every_term_each_with_its_pairs(shared):
    cfg = load_config(overrides=["loss.triplet=wrt", f"loss.shared_triplet={shared}"])
    out = features()
    terms = build_criterion(cfg)(out, LABELS8, MOD8)
    expected = {
        "triplet_shared": WeightedRegularizedTriplet(shared)(out["shared_feat"], LABELS8, MOD8),
        "triplet_specific": WeightedRegularizedTriplet("single")(out["specific_feat"], LABELS8, MOD8),
        "triplet_fused": WeightedRegularizedTriplet("all", normalize=True)(out["fused_feat"], LABELS8, MOD8),
    }
    for name, value in expected.items():
        assert terms[name].item() == pytest.approx(value.item(), rel=1e-6), name


@pytest.mark.parametrize("shared", ["cross", "all"])
def test_hard_triplet_default_is_unchanged_and_shared_pairs_follow_the_key(shared):
    cfg = Config() if shared == "cross" else load_config(overrides=["loss.shared_triplet=all"])
    out = features(1)
    terms = build_criterion(cfg)(out, LABELS8, MOD8)
    assert terms["triplet_shared"].item() == TripletLoss(0.3, 1, shared)(out["shared_feat"], LABELS8, MOD8).item()
    assert terms["triplet_specific"].item() == TripletLoss(0.3, 1, "single")(out["specific_feat"], LABELS8, MOD8).item()
    other = TripletLoss(0.3, 1, "all" if shared == "cross" else "cross")(out["shared_feat"], LABELS8, MOD8)
    assert terms["triplet_shared"].item() != other.item()  # the two pair sets give different values here


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (["loss.triplet=wrt", "loss.hard_negatives=3"], "applies to loss.triplet=hard only"),
        (["loss.triplet=soft"], "loss.triplet: 'soft' is not one of 'hard', 'wrt'"),
        (["loss.shared_triplet=single"], "loss.shared_triplet: 'single' is not one of 'cross', 'all'"),
    ],
)
def test_bad_triplet_settings_are_one_line_errors(override, message):
    with pytest.raises(ConfigError, match=message) as info:
        load_config(overrides=override)
    assert "\n" not in str(info.value)
