"""The cm-SSFT criterion: every term, weighted, plus their sum."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import nn

from cmssft.losses.identity import IdentityLoss
from cmssft.losses.regularisers import ModalityLoss, ProjectionLoss, ReconstructionLoss
from cmssft.losses.triplet import build_triplet

TERMS = (
    "id_shared",
    "triplet_shared",
    "id_specific",
    "triplet_specific",
    "id_fused",
    "triplet_fused",
    "modality",
    "project",
    "reconstruction",
)


class CmSSFTCriterion(nn.Module):
    """Turns the model's output dict into weighted loss terms and their ``total``.

    A term is computed when the model produced its inputs and its weight is not
    zero; otherwise it is absent from the result (so a shared-only model gets
    only the shared terms).

    Args:
        weights: weight per term name (see ``TERMS``); missing names weigh 0.
        label_smoothing: of every identity loss.
        margin, hard_negatives: of every ``hard`` triplet loss (``hard_negatives = 1``: batch-hard).
        fused_triplet: pair form of the fused triplet (``all``, ``cross`` or ``single``).
        normalize_fused: the fused triplet compares L2-normalised fused features.
        triplet: form of every triplet term: ``hard`` (batch-hard / kNN-margin) or ``wrt`` (weighted
            regularised, no margin); each term keeps its pairs (shared: ``shared_triplet``, specific:
            ``single``, fused: ``fused_triplet``).
        shared_triplet: pair form of the shared-feature triplet (``cross`` or ``all``).
    """

    def __init__(
        self,
        weights: Mapping[str, float],
        label_smoothing: float = 0.0,
        margin: float = 0.3,
        hard_negatives: int = 1,
        fused_triplet: str = "all",
        normalize_fused: bool = False,
        triplet: str = "hard",
        shared_triplet: str = "cross",
    ) -> None:
        super().__init__()
        unknown = set(weights) - set(TERMS)
        if unknown:
            raise ValueError(f"unknown loss terms {sorted(unknown)}; known: {TERMS}")
        self.weights = {name: float(weights.get(name, 0.0)) for name in TERMS}
        self.identity = IdentityLoss(label_smoothing)
        options = {"margin": margin, "hard_negatives": hard_negatives}
        self.triplet_shared = build_triplet(triplet, shared_triplet, **options)
        self.triplet_specific = build_triplet(triplet, "single", **options)
        self.triplet_fused = build_triplet(triplet, fused_triplet, **options, normalize=normalize_fused)
        self.modality = ModalityLoss()
        self.project = ProjectionLoss()
        self.reconstruction = ReconstructionLoss()

    def _terms(
        self, labels: torch.Tensor, modality: torch.Tensor
    ) -> dict[str, tuple[tuple[str, ...], Callable[..., torch.Tensor]]]:
        """Term name -> (output keys it reads, function of those tensors)."""
        return {
            "id_shared": (("shared_logits",), lambda x: self.identity(x, labels)),
            "triplet_shared": (("shared_feat",), lambda x: self.triplet_shared(x, labels, modality)),
            "id_specific": (("specific_logits",), lambda x: self.identity(x, labels)),
            "triplet_specific": (("specific_feat",), lambda x: self.triplet_specific(x, labels, modality)),
            "id_fused": (("fused_logits",), lambda x: self.identity(x, labels)),
            "triplet_fused": (("fused_feat",), lambda x: self.triplet_fused(x, labels, modality)),
            "modality": (("modality_logits",), lambda x: self.modality(x, modality)),
            "project": (("project_pred", "project_target"), self.project),
            "reconstruction": (("recon", "recon_target"), self.reconstruction),
        }

    def forward(
        self, out: Mapping[str, torch.Tensor], labels: torch.Tensor, modality: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """``out`` from the model, ``labels [B]``, ``modality [B]`` -> weighted scalar terms + ``total``."""
        terms: dict[str, torch.Tensor] = {}
        for name, (keys, fn) in self._terms(labels, modality).items():
            weight = self.weights[name]
            if weight != 0.0 and all(k in out for k in keys):
                terms[name] = weight * fn(*(out[k] for k in keys))
        if not terms:
            raise ValueError(f"no loss term applies to model outputs {sorted(out)}")
        terms["total"] = torch.stack(list(terms.values())).sum()
        return terms
