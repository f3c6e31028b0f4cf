"""Triplet losses with in-batch mining: batch-hard, its kNN-margin generalisation, and the
weighted regularised triplet (WRT).

Every form restricts which samples may pair with an anchor (``FORMS``): ``cross`` only the other
modality (shared features), ``single`` only its own modality (specific features), ``all`` any.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

FORMS = ("all", "cross", "single")
KINDS = ("hard", "wrt")


def pairwise_distance(x: torch.Tensor) -> torch.Tensor:
    """Euclidean distances ``[B, B]`` of ``[B, D]`` features, in float32, with a safe gradient at 0."""
    x = x.float()
    sq = (x * x).sum(dim=1)
    d2 = (sq.unsqueeze(1) + sq.unsqueeze(0) - 2.0 * (x @ x.T)).clamp_min(1e-12)
    return d2.sqrt()


def pair_masks(labels: torch.Tensor, modality: torch.Tensor, form: str) -> tuple[torch.Tensor, torch.Tensor]:
    """bool ``[B, B]`` (positives, negatives) each anchor (row) may use under ``form``; never the anchor itself."""
    same_id = labels.unsqueeze(1) == labels.unsqueeze(0)
    same_mod = modality.unsqueeze(1) == modality.unsqueeze(0)
    allowed = {"all": torch.ones_like(same_mod), "cross": ~same_mod, "single": same_mod}[form]
    eye = torch.eye(len(labels), dtype=torch.bool, device=labels.device)
    return same_id & allowed & ~eye, ~same_id & allowed


def _check_form(form: str) -> None:
    if form not in FORMS:
        raise ValueError(f"triplet form {form!r} is not one of {FORMS}")


class TripletLoss(nn.Module):
    """Hardest positive against the ``hard_negatives`` hardest negatives, summed:
    ``sum_j relu(margin + d(a, p_hard) - d(a, n_j))``, averaged over anchors.

    ``hard_negatives = 1`` is the batch-hard triplet loss; larger values give the
    kNN-margin variant. ``form`` restricts which samples may pair with an anchor:
    ``cross`` only the other modality (for shared features), ``single`` only its own
    modality (for specific features), ``all`` any. Anchors without a positive or a
    negative of the allowed kind contribute nothing; if fewer than k negatives
    exist, the missing ones contribute nothing. ``normalize`` compares L2-normalised
    features (distances in [0, 2], whatever the features' scale).
    """

    def __init__(
        self, margin: float = 0.3, hard_negatives: int = 1, form: str = "all", normalize: bool = False
    ) -> None:
        super().__init__()
        self.normalize = normalize
        _check_form(form)
        if hard_negatives < 1:
            raise ValueError(f"hard_negatives must be >= 1, got {hard_negatives}")
        self.margin, self.hard_negatives, self.form = margin, hard_negatives, form

    def forward(self, feats: torch.Tensor, labels: torch.Tensor, modality: torch.Tensor) -> torch.Tensor:
        """``feats [B, D]``, ``labels [B]``, ``modality [B]`` -> scalar."""
        dist = pairwise_distance(F.normalize(feats.float(), dim=1) if self.normalize else feats)
        pos, neg = pair_masks(labels, modality, self.form)
        d_ap = dist.masked_fill(~pos, float("-inf")).max(dim=1).values
        k = min(self.hard_negatives, dist.shape[1])
        d_an = torch.topk(dist.masked_fill(~neg, float("inf")), k, dim=1, largest=False).values
        valid = pos.any(dim=1) & neg.any(dim=1)
        d_ap = torch.where(valid, d_ap, torch.zeros_like(d_ap))  # keep -inf out of the arithmetic
        hinge = (self.margin + d_ap.unsqueeze(1) - d_an).clamp_min(0.0)  # inf negatives give 0
        per_anchor = hinge.sum(dim=1) * valid.float()
        return per_anchor.sum() / valid.sum().clamp_min(1)


def masked_softmax(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Row-wise softmax of float ``logits [B, B]`` over the entries ``mask`` allows; rows allowing none are 0.

    The shift before ``exp`` is the row maximum over the *allowed* entries: a masked entry can neither
    set it (a shift above every allowed logit underflows all their ``exp`` to 0) nor enter the
    normaliser, so the largest allowed entry always weighs ``exp(0) = 1`` and the sum is at least 1.
    """
    masked = logits.masked_fill(~mask, float("-inf"))
    shift = masked.amax(dim=1, keepdim=True)
    shift = torch.where(torch.isfinite(shift), shift, torch.zeros_like(shift)).detach()  # softmax ignores it
    exp = torch.exp(masked - shift)  # masked entries: exp(-inf) = 0, with a zero gradient
    return exp / exp.sum(dim=1, keepdim=True).clamp_min(torch.finfo(exp.dtype).tiny)


class WeightedRegularizedTriplet(nn.Module):
    """Weighted regularised triplet (WRT, AGW): every allowed positive and negative of an anchor, weighted
    by a softmax of the distances themselves, then a soft margin:

    ``d_p = sum_i softmax(d_ap)_i d_ap,i``  (farther positives weigh more),
    ``d_n = sum_j softmax(-d_an)_j d_an,j``  (closer negatives weigh more),
    ``loss = softplus(d_p - d_n)`` (``SoftMarginLoss`` with target 1), averaged over anchors.

    No margin to tune, and no hard selection: the weights approach batch-hard as distances grow.
    Computed in float32 whatever the input dtype, with the softmax shifted by the maximum of the
    allowed entries (:func:`masked_softmax`), so scaled features or bf16 inputs stay finite. ``form``
    and ``normalize`` as in :class:`TripletLoss`; anchors without a positive or a negative of the
    allowed kind contribute nothing.
    """

    def __init__(self, form: str = "all", normalize: bool = False) -> None:
        super().__init__()
        _check_form(form)
        self.form, self.normalize = form, normalize

    def forward(self, feats: torch.Tensor, labels: torch.Tensor, modality: torch.Tensor) -> torch.Tensor:
        """``feats [B, D]``, ``labels [B]``, ``modality [B]`` -> scalar (float32)."""
        dist = pairwise_distance(F.normalize(feats.float(), dim=1) if self.normalize else feats)
        pos, neg = pair_masks(labels, modality, self.form)
        d_p = (masked_softmax(dist, pos) * dist).sum(dim=1)
        d_n = (masked_softmax(-dist, neg) * dist).sum(dim=1)
        valid = pos.any(dim=1) & neg.any(dim=1)
        per_anchor = F.softplus(d_p - d_n) * valid.float()
        return per_anchor.sum() / valid.sum().clamp_min(1)


def build_triplet(
    kind: str, form: str, *, margin: float = 0.3, hard_negatives: int = 1, normalize: bool = False
) -> nn.Module:
    """The triplet term of ``kind`` (``loss.triplet``: ``hard`` or ``wrt``) mining pairs of ``form``;
    ``margin`` and ``hard_negatives`` belong to ``hard`` alone."""
    if kind == "hard":
        return TripletLoss(margin, hard_negatives, form, normalize=normalize)
    if kind == "wrt":
        return WeightedRegularizedTriplet(form, normalize=normalize)
    raise ValueError(f"triplet kind {kind!r} is not one of {KINDS}")
