"""Complementary-learning heads: gradient reversal, modality discriminator, projector, decoder.

Each head is trained to *minimise* its loss; where the extractor must work
against it, the head's input passes through :func:`grad_reverse`, so one
optimizer and one backward pass serve both players.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class _GradReverse(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float | torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # noqa: ANN001
        return grad.neg() * ctx.scale, None


def grad_reverse(x: torch.Tensor, scale: float | torch.Tensor = 1.0) -> torch.Tensor:
    """Identity forward; backward multiplies the gradient by ``-scale``."""
    return _GradReverse.apply(x, scale)


class GradientReversal(nn.Module):
    """Module form of :func:`grad_reverse`; the reversed gradient is scaled by ``scale * ramp``.

    ``ramp`` (1 unless a training schedule sets it, see :func:`set_reversal_ramp`) lets the adversaries
    start weak, while the features they push against are still noise.
    """

    def __init__(self, scale: float = 1.0) -> None:
        super().__init__()
        self.scale = scale
        # a tensor changed in place, not a Python float: torch.compile would recompile for every new value
        self.register_buffer("ramp", torch.ones(()), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return grad_reverse(x, self.scale * self.ramp)

    def extra_repr(self) -> str:
        return f"scale={self.scale}"


def set_reversal_ramp(model: nn.Module, ramp: float) -> None:
    """Set the ramp of every :class:`GradientReversal` in ``model`` (its heads train at full strength
    whatever the ramp: only the gradient reaching the extractor is scaled)."""
    for module in model.modules():
        if isinstance(module, GradientReversal):
            module.ramp.fill_(ramp)


def dann_ramp(progress: float, gamma: float = 10.0) -> float:
    """The domain-adversarial schedule ``2 / (1 + exp(-gamma p)) - 1``: 0 at the start of training,
    0.68 a sixth of the way in, 0.99 by half-way; ``progress`` in [0, 1]."""
    return 2.0 / (1.0 + math.exp(-gamma * min(max(progress, 0.0), 1.0))) - 1.0


def _mlp(in_dim: int, hidden: int, out_dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, out_dim))


class ModalityDiscriminator(nn.Module):
    """Predicts the modality of a shared feature; reversed gradients make ``h_sh`` modality-blind."""

    def __init__(
        self, in_dim: int, hidden: int = 512, num_modalities: int = 2, grl_scale: float = 1.0
    ) -> None:
        super().__init__()
        self.reverse = GradientReversal(grl_scale)
        self.net = _mlp(in_dim, hidden, num_modalities)

    def forward(self, h_sh: torch.Tensor) -> torch.Tensor:
        """``[B, C] -> [B, num_modalities]`` logits."""
        return self.net(self.reverse(h_sh))


class Projector(nn.Module):
    """Predicts ``h_sp`` from ``h_sh`` (project adversarial learning).

    Both inputs pass through gradient reversal: the projector lowers the
    prediction error, the extractor raises it, so ``h_sp`` keeps what ``h_sh``
    cannot explain. The loss compares L2-normalised vectors, so the extractor
    cannot win by inflating norms.
    """

    def __init__(self, dim: int, hidden: int = 512, grl_scale: float = 1.0) -> None:
        super().__init__()
        self.reverse = GradientReversal(grl_scale)
        self.net = _mlp(dim, hidden, dim)

    def forward(self, h_sh: torch.Tensor, h_sp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (prediction, target), both ``[B, C]``; the target carries the reversed gradient."""
        return self.net(self.reverse(h_sh)), self.reverse(h_sp)


class Decoder(nn.Module):
    """Rebuilds a small image from ``[h_sh, h_sp]`` so that ``h_sp`` cannot collapse to noise.

    A linear layer lays the vector out on a ``base`` grid, ``ups`` upsample-conv
    blocks double it, and a final bilinear resize matches the target size.
    """

    def __init__(
        self,
        in_dim: int,
        channels: int = 64,
        base: tuple[int, int] = (4, 2),
        ups: int = 2,
        out_channels: int = 3,
    ) -> None:
        super().__init__()
        self.channels, self.base = channels, base
        self.fc = nn.Linear(in_dim, channels * base[0] * base[1])
        blocks: list[nn.Module] = []
        for _ in range(ups):
            blocks += [
                nn.Upsample(scale_factor=2, mode="nearest"),
                nn.Conv2d(channels, channels, 3, padding=1, bias=False),
                nn.BatchNorm2d(channels),
                nn.ReLU(inplace=True),
            ]
        self.blocks = nn.Sequential(*blocks)
        self.out = nn.Conv2d(channels, out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """``z: [B, in_dim] -> [B, out_channels, *size]``."""
        x = self.fc(z).view(z.shape[0], self.channels, *self.base)
        x = self.out(self.blocks(x))
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False)
