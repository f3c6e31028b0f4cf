"""Non-local blocks inside ResNet stages, as AGW places and computes them.

A non-local block lets every position of a feature map ``x [B, C, H, W]`` see every other one
(N = H * W positions, w intermediate channels)::

    theta, phi, g = 1x1 convs of x            [B, w, H, W] each, flattened to [B, N, w]
    y_i = (1 / N) sum_j <theta_i, phi_j> g_j  [B, N, w]   (AGW divides by N; the non-local paper's
                                                           embedded Gaussian takes a softmax instead)
    out = x + BN(W(y))                        [B, C, H, W] (W: 1x1 conv back to C channels)

The BatchNorm after W starts at zero weight and bias, so a new block is the identity and a
pretrained ResNet's function is unchanged until training moves it. AGW's public code uses
w = 1 (its ``reduc_ratio // reduc_ratio``); the non-local paper uses w = C / 2. Without the
softmax the block is linear in its affinities, so ``y = theta (phi^T g) / N`` is computed in that
order: [N, w] x [w, w] instead of the [N, N] affinity matrix (equal up to rounding).

:func:`add_non_local` puts ``counts[s]`` blocks after the last ``counts[s]`` residual blocks of
stage ``layer{s+1}``; a stage without non-local blocks stays the plain ``nn.Sequential``, so
its parameter names (``layer3.2.conv1.weight``) are those of torchvision's ResNet.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from cmssft.errors import UserError

LAYERS = ("layer1", "layer2", "layer3", "layer4")


class NonLocalBlock(nn.Module):
    """``x [B, C, H, W] -> x + BN(W(y)) [B, C, H, W]``, y the dot-product non-local response divided by N."""

    def __init__(self, channels: int, width: int = 1) -> None:
        super().__init__()
        if width < 1:
            raise UserError(f"model.non_local_width must be >= 1, got {width}")
        self.width = width
        self.g = nn.Conv2d(channels, width, kernel_size=1)
        self.w_conv = nn.Conv2d(width, channels, kernel_size=1)
        self.w_bn = nn.BatchNorm2d(channels)
        self.theta = nn.Conv2d(channels, width, kernel_size=1)
        self.phi = nn.Conv2d(channels, width, kernel_size=1)
        nn.init.zeros_(self.w_bn.weight)  # the block starts as the identity
        nn.init.zeros_(self.w_bn.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        theta = self.theta(x).flatten(2).transpose(1, 2).float()  # [B, N, w]; fp32: sums over N overflow fp16
        phi = self.phi(x).flatten(2).float()  # [B, w, N]
        g = self.g(x).flatten(2).transpose(1, 2).float()  # [B, N, w]
        y = theta @ ((phi @ g) / (h * w))  # [B, N, w] = (theta phi / N) g
        y = y.transpose(1, 2).reshape(b, self.width, h, w).to(x.dtype)
        return x + self.w_bn(self.w_conv(y))


class NonLocalStage(nn.Module):
    """A ResNet stage (``blocks``, its residual blocks) with a non-local block after each of its last
    ``count`` blocks: ``[B, C_in, H, W] -> [B, C, h, w]`` like the stage alone."""

    def __init__(self, blocks: nn.Sequential, count: int, width: int = 1) -> None:
        super().__init__()
        if not 0 < count <= len(blocks):
            raise UserError(f"a stage of {len(blocks)} blocks cannot take {count} non-local blocks")
        self.blocks = blocks
        self.non_local = nn.ModuleList(NonLocalBlock(out_channels(blocks), width) for _ in range(count))
        self.first = len(blocks) - count  # index of the first block followed by a non-local block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i >= self.first:
                x = self.non_local[i - self.first](x)
        return x


def out_channels(blocks: nn.Sequential) -> int:
    """Channels a stage of torchvision ResNet blocks puts out (Bottleneck: bn3, BasicBlock: bn2)."""
    last = blocks[-1]
    return (last.bn3 if hasattr(last, "bn3") else last.bn2).num_features


def add_non_local(stages: nn.ModuleDict, counts: Sequence[int], width: int = 1) -> nn.ModuleDict:
    """``stages`` with ``counts[s]`` non-local blocks after the last blocks of ``layer{s+1}`` (in place)."""
    if len(counts) != len(LAYERS):
        raise UserError(f"model.non_local: {list(counts)} must hold {len(LAYERS)} counts, one per stage")
    for name, count in zip(LAYERS, counts, strict=True):
        if not 0 <= count <= len(stages[name]):
            raise UserError(f"model.non_local: {count} non-local blocks in {name}, which has {len(stages[name])} "
                            "blocks")
        if count > 0:
            stages[name] = NonLocalStage(stages[name], count, width)
    return stages
