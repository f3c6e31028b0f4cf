"""Two-stream extractor: per-modality stems, a shared trunk, per-modality specific branches.

With stages s0..s4 = conv1, layer1..layer4, ``shared_from = s_a`` and
``specific_from = s_b`` (defaults layer2 and layer3)::

    x^m --[s0..s_{a-1}]^m--> t --[s_a..s4]^S-----------------------> shared map   (H^m)
                                  (output of s_{b-1}) --[s_b..s4]^m--> specific map (P^m)

Stages before ``shared_from`` exist once per modality, stages from
``shared_from`` on exist once for the shared branch, and stages from
``specific_from`` on exist once more per modality for the specific branch.
Inputs are in grouped order (see :mod:`cmssft.models.routing`).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from cmssft.errors import UserError
from cmssft.models.backbone import STAGES
from cmssft.models.routing import per_modality


class TwoStreamExtractor(nn.Module):
    """Feature maps of the shared and (optionally) the specific branch."""

    def __init__(
        self,
        stages: nn.ModuleDict,
        shared_from: str = "layer2",
        specific_from: str | None = "layer3",
        num_modalities: int = 2,
    ) -> None:
        super().__init__()
        if shared_from not in STAGES:
            raise UserError(f"model.shared_from: {shared_from!r} is not one of {STAGES}")
        if specific_from is not None and specific_from not in STAGES[2:]:
            raise UserError(f"model.specific_from: {specific_from!r} is not one of {STAGES[2:]}")
        first_shared = STAGES.index(shared_from)
        self.stems = nn.ModuleList(
            nn.Sequential(*(copy.deepcopy(stages[n]) for n in STAGES[:first_shared]))
            for _ in range(num_modalities)
        )
        self.shared = nn.ModuleList(stages[n] for n in STAGES[first_shared:])
        self.first_shared = first_shared
        self.fork = None if specific_from is None else STAGES.index(specific_from) - 1
        self.specific = nn.ModuleList(
            nn.Sequential(*(copy.deepcopy(stages[n]) for n in STAGES[self.fork + 1 :]))
            for _ in range(num_modalities if specific_from is not None else 0)
        )

    @property
    def has_specific(self) -> bool:
        return self.fork is not None

    def forward(self, x: torch.Tensor, sizes: list[int]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Grouped images ``[B, 3, H, W]`` -> (shared map, specific map or None), each ``[B, C, h, w]``."""
        fork_parts: list[torch.Tensor] = []
        if self.first_shared > 0:
            outs = []
            for stem, part in zip(self.stems, x.split(sizes), strict=True):
                for i, stage in enumerate(stem):
                    part = stage(part)
                    if i == self.fork:
                        fork_parts.append(part)
                outs.append(part)
            x = torch.cat(outs)
        fork = torch.cat(fork_parts) if fork_parts else None
        for i, stage in enumerate(self.shared, start=self.first_shared):
            x = stage(x)
            if i == self.fork:
                fork = x
        if fork is None:
            return x, None
        return x, per_modality(fork, sizes, self.specific)

    def forward_modality(self, x: torch.Tensor, modality: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Images all of one ``modality`` ``[B, 3, H, W]`` -> (shared map, specific map or None).

        The same stages as :meth:`forward` for a batch of that modality alone; no split by sizes,
        so tracing and ONNX export keep the batch dimension dynamic.
        """
        fork = None
        stages = [*(self.stems[modality] if self.first_shared > 0 else []), *self.shared]
        for i, stage in enumerate(stages):
            x = stage(x)
            if i == self.fork:
                fork = x
        return x, None if fork is None else self.specific[modality](fork)


def backbone_and_heads(model: nn.Module, extractor: nn.Module, base_lr: float, backbone_lr_mult: float) -> list[dict]:
    """Optimizer groups of a model built on an extractor: ``backbone`` (the extractor's parameters) at
    ``base_lr * backbone_lr_mult``, ``heads`` (every other parameter) at ``base_lr``; frozen ones left out."""
    backbone = [p for p in extractor.parameters() if p.requires_grad]
    ids = {id(p) for p in extractor.parameters()}
    heads = [p for p in model.parameters() if p.requires_grad and id(p) not in ids]
    return [
        {"name": "backbone", "params": backbone, "lr": base_lr * backbone_lr_mult},
        {"name": "heads", "params": heads, "lr": base_lr},
    ]
