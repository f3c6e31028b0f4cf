"""Identity classification loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class IdentityLoss(nn.Module):
    """Cross-entropy with label smoothing ``eps``: the target is ``1 - eps`` on the true class
    plus ``eps / K`` on every class, which keeps re-id classifiers from over-confident logits."""

    def __init__(self, label_smoothing: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label smoothing must be in [0, 1), got {label_smoothing}")
        self.label_smoothing = label_smoothing

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """``logits [B, K]``, ``labels [B]`` -> scalar."""
        return F.cross_entropy(logits.float(), labels, label_smoothing=self.label_smoothing)
