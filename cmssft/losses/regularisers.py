"""Losses of the complementary-learning heads (the gradient reversal lives in the model)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ModalityLoss(nn.Module):
    """Cross-entropy of the modality discriminator against the true modality."""

    def forward(self, logits: torch.Tensor, modality: torch.Tensor) -> torch.Tensor:
        """``logits [B, M]``, ``modality [B]`` -> scalar."""
        return F.cross_entropy(logits.float(), modality)


class ProjectionLoss(nn.Module):
    """Squared error between L2-normalised prediction and target (``2 - 2 cos``, in [0, 4]):
    bounded, so the adversarial side cannot grow it by scaling features."""

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """``pred [B, C]``, ``target [B, C]`` -> scalar."""
        pred = F.normalize(pred.float(), dim=1)
        target = F.normalize(target.float(), dim=1)
        return (pred - target).pow(2).sum(dim=1).mean()


class ReconstructionLoss(nn.Module):
    """Mean squared error of the decoded image against its (downsampled) target."""

    def forward(self, recon: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """``recon [B, 3, h, w]``, ``target [B, 3, h, w]`` -> scalar."""
        return F.mse_loss(recon.float(), target.float())
