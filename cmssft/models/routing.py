"""Send each modality's sub-batch through its own module, and only through it.

The model sorts a mixed batch once into *grouped order* (all RGB, then all IR),
runs per-modality modules on contiguous slices, and restores the caller's order
at the end. Sizes are read from tensor shapes, never from tensor values.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn


class Grouping(NamedTuple):
    """``order`` sorts a batch into grouped order, ``inverse`` undoes it, ``sizes[m]`` counts modality m."""

    order: torch.Tensor
    inverse: torch.Tensor
    sizes: list[int]


@torch.compiler.disable  # data-dependent sizes: one deliberate break; P x K batches give constant sizes
def group_by_modality(modality: torch.Tensor, num_modalities: int = 2) -> Grouping:
    """Grouping of ``modality`` (long ``[B]``, values in ``0..num_modalities-1``); stable within a group."""
    parts = [torch.nonzero(modality == m).flatten() for m in range(num_modalities)]
    order = torch.cat(parts)
    return Grouping(order, torch.argsort(order), [int(p.shape[0]) for p in parts])


def per_modality(x: torch.Tensor, sizes: list[int], modules: nn.ModuleList | list[nn.Module]) -> torch.Tensor:
    """Apply ``modules[m]`` to modality m's slice of grouped ``x`` and concatenate the results."""
    return torch.cat([module(part) for module, part in zip(modules, x.split(sizes), strict=True)])
