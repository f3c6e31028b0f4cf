"""AGW (Ye et al., TPAMI 2021), the cross-modality re-id baseline of its public code, as a model of this toolbox.

A two-stream ResNet: the ``conv1`` stage (conv1, bn1, relu, maxpool) once per modality, ``layer1``
to ``layer4`` shared (last stride 1), non-local blocks after the last blocks of some stages
(``model.non_local``; AGW: 2 in layer2, 3 in layer3), generalised-mean pooling with a fixed p = 3,
a BN-neck whose bias is frozen and a bias-free classifier. docs/METHOD.md ("AGW") maps every part
onto the public code.

Tensor shapes at this boundary (B images, C backbone width: 2048 for ResNet-50, K classes):

Training, ``model(images [B,3,H,W] float, modality [B] long (0 RGB, 1 IR), labels [B] long | None)``
returns a dict:

=============  ======  =====================================================================
key            shape   meaning
=============  ======  =====================================================================
shared_feat    [B, C]  pooled feature (before the BN-neck): the triplet's input
shared_logits  [B, K]  identity logits of the BN-necked feature
stats          dict    empty (AGW logs nothing of its own)
=============  ======  =====================================================================

Test time: ``extract`` gives a bank ``{"shared": [N, C], "pool": [N, C], "modality": [N]}``, the
public code's two test features, each L2-normalised: ``shared`` its "FC" feature (BN-necked,
the one the AGW paper reports), ``pool`` its "POOL" feature (pooled). ``extract_modality`` is the
same for a batch of one modality without the grouping (what an exported graph runs).
``score_blocks`` turns a query bank and a gallery bank into cosine distances ``[Q, G]`` of the
feature ``model.agw.test_feature`` names, in query blocks; AGW has no transfer, so every SSTN test
mode gives the same distances. :class:`AGWScorer` is that scoring without the extractor.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cmssft.errors import UserError
from cmssft.models.extractor import TwoStreamExtractor, backbone_and_heads
from cmssft.models.neck import BNNeck
from cmssft.models.routing import group_by_modality
from cmssft.models.sstn import MODES
from cmssft.scoring import DistanceBlocks, cosine_distance_blocks

Bank = dict[str, torch.Tensor]
# model.agw.test_feature -> the bank entry that holds it
TEST_FEATURES = {"fc": "shared", "pool": "pool"}


class AGW(nn.Module):
    """Two-stream ResNet, pooling, BN-neck and identity classifier, with AGW's initialisation.

    Args:
        extractor: per-modality stems and a shared trunk, no specific branch (its parameters form
            the ``backbone`` group, non-local blocks included, as in the public code's optimizer).
        feat_dim: width C of the pooled features.
        num_classes: training identities.
        pool: ``[B, C, H, W] -> [B, C]`` (AGW: :class:`~cmssft.models.neck.FixedGeM` with p = 3).
        bnneck: BN-neck between pooled feature and classifier (AGW: on).
        test_feature: ``fc`` or ``pool``, the feature :meth:`score_blocks` ranks by.
    """

    def __init__(
        self,
        extractor: TwoStreamExtractor,
        feat_dim: int,
        num_classes: int,
        pool: nn.Module,
        bnneck: bool = True,
        test_feature: str = "fc",
        num_modalities: int = 2,
    ) -> None:
        super().__init__()
        if extractor.has_specific:
            raise UserError("AGW has no modality-specific branch; build its extractor with specific_from=None")
        self.extractor = extractor
        self.num_modalities = num_modalities
        self.pool = pool
        self.neck = BNNeck(feat_dim, bnneck)
        self.classifier = nn.Linear(feat_dim, num_classes, bias=False)
        self.test_key = bank_key(test_feature)
        if self.neck.bn is not None:  # the public code's Kaiming rule for BatchNorm1d: weight N(1, 0.01), bias 0
            nn.init.normal_(self.neck.bn.weight, 1.0, 0.01)
            nn.init.zeros_(self.neck.bn.bias)
        nn.init.normal_(self.classifier.weight, std=0.001)

    # ------------------------------------------------------------------ training

    def forward(
        self, images: torch.Tensor, modality: torch.Tensor, labels: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor | dict[str, torch.Tensor]]:
        """The criterion's inputs (see the module docstring); ``labels`` is not used."""
        grouping = group_by_modality(modality, self.num_modalities)
        shared_map, _ = self.extractor(images.index_select(0, grouping.order), grouping.sizes)
        pooled = self.pool(shared_map)
        out = {"shared_feat": pooled, "shared_logits": self.classifier(self.neck(pooled))}
        out = {k: v.index_select(0, grouping.inverse) for k, v in out.items()}  # back to the caller's order
        return {**out, "stats": {}}

    # ------------------------------------------------------------------ test time

    @property
    def bank_parts(self) -> tuple[str, ...]:
        """The float features of a bank, in the order an exported graph returns them."""
        return ("shared", "pool")

    @torch.no_grad()
    def extract(self, images: torch.Tensor, modality: torch.Tensor) -> Bank:
        """Per-image bank features (call ``eval()`` first); banks of batches concatenate key by key."""
        grouping = group_by_modality(modality, self.num_modalities)
        shared_map, _ = self.extractor(images.index_select(0, grouping.order), grouping.sizes)
        bank = self._features(shared_map)
        bank = {k: v.index_select(0, grouping.inverse) for k, v in bank.items()}
        return {**bank, "modality": modality.clone()}

    @torch.no_grad()
    def extract_modality(self, images: torch.Tensor, modality: int) -> Bank:
        """:meth:`extract` of a batch whose images are all of ``modality``, without ``"modality"``."""
        shared_map, _ = self.extractor.forward_modality(images, modality)
        return self._features(shared_map)

    def _features(self, shared_map: torch.Tensor) -> Bank:
        """The public code's test output: L2-normalised FC (BN-necked) and POOL (pooled) features."""
        pooled = self.pool(shared_map)
        return {"shared": F.normalize(self.neck(pooled).float(), dim=1), "pool": F.normalize(pooled.float(), dim=1)}

    @torch.no_grad()
    def score(self, query_bank: Bank, gallery_bank: Bank, mode: str | None = None) -> torch.Tensor:
        """Distances ``[Q, G]`` (cosine distance, smaller = more similar): :meth:`score_blocks` in full."""
        return self.score_blocks(query_bank, gallery_bank, mode).full()

    @torch.no_grad()
    def score_blocks(self, query_bank: Bank, gallery_bank: Bank, mode: str | None = None) -> DistanceBlocks:
        """Cosine distances of the test feature in query blocks; ``mode`` (any SSTN test mode) changes nothing."""
        return cosine_blocks(query_bank, gallery_bank, self.test_key, mode)

    # ------------------------------------------------------------------ optimisation

    def param_groups(self, base_lr: float, backbone_lr_mult: float = 1.0) -> list[dict]:
        """``backbone`` (stems, trunk, non-local blocks) at ``base_lr * backbone_lr_mult``, ``heads`` (BN-neck,
        classifier) at ``base_lr``, as the public code's SGD groups; frozen parameters are left out."""
        return backbone_and_heads(self, self.extractor, base_lr, backbone_lr_mult)


class AGWScorer(nn.Module):
    """The test-time scoring of an :class:`AGW` without its extractor (it holds no tensors), for features files."""

    def __init__(self, test_feature: str = "fc") -> None:
        super().__init__()
        self.test_key = bank_key(test_feature)

    @torch.no_grad()
    def score_blocks(self, query_bank: Bank, gallery_bank: Bank, mode: str | None = None) -> DistanceBlocks:
        """As :meth:`AGW.score_blocks`."""
        return cosine_blocks(query_bank, gallery_bank, self.test_key, mode)


def bank_key(test_feature: str) -> str:
    """The bank entry of ``model.agw.test_feature``."""
    if test_feature not in TEST_FEATURES:
        raise UserError(f"model.agw.test_feature {test_feature!r} is not one of {tuple(TEST_FEATURES)}")
    return TEST_FEATURES[test_feature]


def cosine_blocks(query_bank: Bank, gallery_bank: Bank, key: str, mode: str | None = None) -> DistanceBlocks:
    """``1 - cos`` between the banks' ``key`` rows ``[Q, C]`` and ``[G, C]``, in query blocks ``[rows, G]``."""
    if mode is not None and mode not in MODES:
        raise UserError(f"test mode {mode!r} is not one of {MODES}")
    for bank in (query_bank, gallery_bank):
        if key not in bank:
            feature = next(name for name, entry in TEST_FEATURES.items() if entry == key)
            raise UserError(f"the features hold no {key!r} rows, which model.agw.test_feature={feature} ranks by")
    q = F.normalize(query_bank[key].float(), dim=1)
    g = F.normalize(gallery_bank[key].float(), dim=1)
    return cosine_distance_blocks(q, g)
