"""Pooling and the BN-neck that sit between a feature map and the classifiers."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class GeM(nn.Module):
    """Generalised-mean pooling with a learned exponent: ``p = 1`` is average, large ``p`` max."""

    def __init__(self, p: float = 3.0, eps: float = 1e-6) -> None:
        super().__init__()
        self.p = nn.Parameter(torch.tensor(float(p)))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float().clamp(min=self.eps).pow(self.p)  # fp32: pow under fp16 overflows
        return x.mean(dim=(2, 3)).pow(1.0 / self.p)


class FixedGeM(nn.Module):
    """Generalised-mean pooling with a fixed exponent, as AGW computes it: ``(mean(x^p) + 1e-12)^(1/p)``.

    ``[B, C, H, W] -> [B, C]``. AGW pools post-ReLU maps (x >= 0); negative entries (a non-local
    block after a stage's last block) are clamped to 0 so the root stays real.
    """

    def __init__(self, p: float = 3.0) -> None:
        super().__init__()
        self.p = float(p)

    def extra_repr(self) -> str:
        return f"p={self.p}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float().clamp(min=0).pow(self.p)  # fp32: pow under fp16 overflows
        return (x.mean(dim=(2, 3)) + 1e-12).pow(1.0 / self.p)


class AvgPool(nn.Module):
    """Global average pooling to ``[B, C]``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3))


def make_pool(kind: str, gem_p: float = 3.0, learn_p: bool = True) -> nn.Module:
    """``avg``, or ``gem`` with a learned (:class:`GeM`) or fixed (:class:`FixedGeM`) exponent."""
    if kind == "gem":
        return GeM(gem_p) if learn_p else FixedGeM(gem_p)
    if kind == "avg":
        return AvgPool()
    raise ValueError(f"unknown pooling {kind!r}")


class BNNeck(nn.Module):
    """BatchNorm1d with a frozen zero bias (BN-neck): triplet losses see the features before it,
    classifiers and test-time matching the features after it.

    ``enabled=False`` makes it the identity, for ablations.
    """

    def __init__(self, dim: int, enabled: bool = True) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(dim) if enabled else None
        if self.bn is not None:
            self.bn.bias.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.bn is None else self.bn(x)

    def inference(self, x: torch.Tensor) -> torch.Tensor:
        """Always the running-statistics (affine) form, whatever ``self.training`` is.

        Single-query scoring relies on the neck being affine.
        """
        if self.bn is None:
            return x
        bn = self.bn
        return F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)
