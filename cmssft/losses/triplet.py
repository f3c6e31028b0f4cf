"""Triplet losses with in-batch hard mining: batch-hard and its kNN-margin generalisation."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

FORMS = ("all", "cross", "single")


def pairwise_distance(x: torch.Tensor) -> torch.Tensor:
    """Euclidean distances ``[B, B]`` of ``[B, D]`` features, in float32, with a safe gradient at 0."""
    x = x.float()
    sq = (x * x).sum(dim=1)
    d2 = (sq.unsqueeze(1) + sq.unsqueeze(0) - 2.0 * (x @ x.T)).clamp_min(1e-12)
    return d2.sqrt()


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
        if form not in FORMS:
            raise ValueError(f"triplet form {form!r} is not one of {FORMS}")
        if hard_negatives < 1:
            raise ValueError(f"hard_negatives must be >= 1, got {hard_negatives}")
        self.margin, self.hard_negatives, self.form = margin, hard_negatives, form

    def forward(self, feats: torch.Tensor, labels: torch.Tensor, modality: torch.Tensor) -> torch.Tensor:
        """``feats [B, D]``, ``labels [B]``, ``modality [B]`` -> scalar."""
        dist = pairwise_distance(F.normalize(feats.float(), dim=1) if self.normalize else feats)
        same_id = labels.unsqueeze(1) == labels.unsqueeze(0)
        same_mod = modality.unsqueeze(1) == modality.unsqueeze(0)
        allowed = {"all": torch.ones_like(same_mod), "cross": ~same_mod, "single": same_mod}[self.form]
        eye = torch.eye(len(labels), dtype=torch.bool, device=labels.device)
        pos = same_id & allowed & ~eye
        neg = ~same_id & allowed
        d_ap = dist.masked_fill(~pos, float("-inf")).max(dim=1).values
        k = min(self.hard_negatives, dist.shape[1])
        d_an = torch.topk(dist.masked_fill(~neg, float("inf")), k, dim=1, largest=False).values
        valid = pos.any(dim=1) & neg.any(dim=1)
        d_ap = torch.where(valid, d_ap, torch.zeros_like(d_ap))  # keep -inf out of the arithmetic
        hinge = (self.margin + d_ap.unsqueeze(1) - d_an).clamp_min(0.0)  # inf negatives give 0
        per_anchor = hinge.sum(dim=1) * valid.float()
        return per_anchor.sum() / valid.sum().clamp_min(1)
