"""Losses: ``build_criterion(cfg)`` gives the criterion the training loop calls."""

from __future__ import annotations

import dataclasses

from cmssft.config import Config
from cmssft.losses.criterion import TERMS, CmSSFTCriterion
from cmssft.losses.identity import IdentityLoss
from cmssft.losses.regularisers import ModalityLoss, ProjectionLoss, ReconstructionLoss
from cmssft.losses.triplet import TripletLoss, WeightedRegularizedTriplet, build_triplet, pairwise_distance

__all__ = [
    "TERMS",
    "CmSSFTCriterion",
    "IdentityLoss",
    "ModalityLoss",
    "ProjectionLoss",
    "ReconstructionLoss",
    "TripletLoss",
    "WeightedRegularizedTriplet",
    "build_criterion",
    "build_triplet",
    "pairwise_distance",
]


def build_criterion(cfg: Config) -> CmSSFTCriterion:
    """The criterion for ``cfg.loss``; ``terms = criterion(out, labels, modality)``."""
    loss = cfg.loss
    return CmSSFTCriterion(
        dataclasses.asdict(loss.weights),
        label_smoothing=loss.label_smoothing,
        margin=loss.triplet_margin,
        hard_negatives=loss.hard_negatives,
        fused_triplet=loss.fused_triplet,
        normalize_fused=loss.normalize_fused,
        triplet=loss.triplet,
        shared_triplet=loss.shared_triplet,
    )
