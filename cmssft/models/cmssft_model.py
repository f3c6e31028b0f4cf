"""The cm-SSFT model: two-stream extractor, BN-necks and classifiers, SSTN, complementary heads.

Tensor shapes at this boundary (B images, C backbone width, K classes):

Training, ``model(images [B,3,H,W] float, modality [B] long (0 RGB, 1 IR), labels [B] long | None)``
returns a dict, each entry present only when its part is enabled:

====================  ============  =============================================================
key                   shape         meaning
====================  ============  =============================================================
shared_feat           [B, C]        pooled h_sh (before the BN-neck): triplet input
shared_logits         [B, K]        identity logits of h_sh
specific_feat         [B, C]        pooled h_sp of the sample's own modality branch
specific_logits       [B, K]        identity logits of h_sp (per-modality classifier)
fused_feat            [B, D']       SSTN-fused feature (before its BN-neck)
fused_logits          [B, K]        identity logits of the fused feature
modality_logits       [B, 2]        discriminator logits on reversed h_sh
project_pred          [B, C]        projector's prediction of h_sp from reversed h_sh (model.project_space:
                                    pooled, or both through their BN-necks)
project_target        [B, C]        h_sp (pooled or BN-necked) behind gradient reversal
recon                 [B, 3, h, w]  decoder output from [h_sh, h_sp], h = H // recon_downsample
recon_target          [B, 3, h, w]  the input, average-pooled (no gradient)
stats                 dict          detached scalars for logging (sstn/*, heads/*)
====================  ============  =============================================================

Test time: ``extract`` gives a bank ``{"shared": [N, C], "specific": [N, C], "modality": [N]}``
of BN-neck features (``specific`` only with a specific branch); ``extract_modality`` the same for a
batch of one modality without the data-dependent grouping (what an exported graph runs);
``score_blocks`` turns a query bank and a gallery bank into distances ``[Q, G]`` (smaller = more
similar) handed out in query blocks ``[rows, G]`` (:class:`~cmssft.scoring.DistanceBlocks`);
``score`` is its full matrix. :class:`BankScorer` is that scoring without the extractor: the SSTN
and its settings alone, which is all a features file needs next to the bank.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from cmssft.errors import UserError
from cmssft.models.extractor import TwoStreamExtractor, backbone_and_heads
from cmssft.models.heads import ModalityDiscriminator
from cmssft.models.neck import BNNeck, make_pool
from cmssft.models.routing import group_by_modality, per_modality
from cmssft.models.sstn import MODES, SSTN
from cmssft.scoring import DistanceBlocks, cosine_distance_blocks

Bank = dict[str, torch.Tensor]
# Rows [B, ...] of this process -> (rows of every process in rank order [W*B, ...], start of this process's
# rows); gradients flow back through it. Injected by the engine; None trains on the local batch alone.
BatchGather = Callable[[torch.Tensor], tuple[torch.Tensor, int]]


class CmSSFT(nn.Module):
    """Cross-modality re-id with shared-specific feature transfer.

    Args:
        extractor: the two-stream backbone (its parameters form the ``backbone`` group).
        feat_dim: width C of its pooled features.
        num_classes: training identities.
        pooling: ``avg`` or ``gem`` (one pooling module per branch); ``gem_learn_p``: GeM learns its
            exponent ``gem_p`` (else it stays fixed, AGW's form).
        bnneck: BN-neck before every classifier.
        sstn: the transfer network, or None for no transfer.
        modality_head, projectors, decoders: complementary heads, or None; projectors and
            decoders hold one module per modality.
        recon_downsample: the decoder's target is the input average-pooled by this factor.
        test_mode: default mode of :meth:`score`.
        off_features: features of the ``off`` mode, ``shared`` or ``concat`` (shared and specific).
        project_space: what the projectors see: ``pooled`` features, or their BN-neck outputs (``neck``).
    """

    def __init__(
        self,
        extractor: TwoStreamExtractor,
        feat_dim: int,
        num_classes: int,
        pooling: str = "avg",
        gem_p: float = 3.0,
        bnneck: bool = True,
        sstn: SSTN | None = None,
        modality_head: ModalityDiscriminator | None = None,
        projectors: nn.ModuleList | None = None,
        decoders: nn.ModuleList | None = None,
        recon_downsample: int = 8,
        test_mode: str = "transductive",
        off_features: str = "shared",
        num_modalities: int = 2,
        project_space: str = "pooled",
        gem_learn_p: bool = True,
    ) -> None:
        super().__init__()
        if (projectors is not None or decoders is not None) and not extractor.has_specific:
            raise UserError("project_adversarial and reconstruction need the specific branch (use_specific)")
        if test_mode not in MODES:
            raise UserError(f"test mode {test_mode!r} is not one of {MODES}")
        if project_space not in ("pooled", "neck"):
            raise UserError(f"project_space {project_space!r} is not 'pooled' or 'neck'")
        self.extractor = extractor
        self.num_modalities = num_modalities
        self.pool_sh = make_pool(pooling, gem_p, gem_learn_p)
        self.neck_sh = BNNeck(feat_dim, bnneck)
        self.cls_sh = nn.Linear(feat_dim, num_classes, bias=False)
        self.pool_sp = self.necks_sp = self.cls_sp = None
        if extractor.has_specific:
            self.pool_sp = make_pool(pooling, gem_p, gem_learn_p)
            self.necks_sp = nn.ModuleList(BNNeck(feat_dim, bnneck) for _ in range(num_modalities))
            self.cls_sp = nn.ModuleList(
                nn.Linear(feat_dim, num_classes, bias=False) for _ in range(num_modalities)
            )
        self.sstn = sstn
        self.cls_fused = nn.Linear(sstn.out_dim, num_classes, bias=False) if sstn is not None else None
        self.modality_head = modality_head
        self.projectors = projectors
        self.decoders = decoders
        self.recon_downsample = recon_downsample
        self.test_mode = test_mode
        self.off_features = off_features
        self.project_space = project_space
        self.batch_gather: BatchGather | None = None  # set by distributed training for a global-batch SSTN
        for layer in (self.cls_sh, self.cls_fused, *(self.cls_sp or [])):
            if layer is not None:
                nn.init.normal_(layer.weight, std=0.001)

    # ------------------------------------------------------------------ training

    def forward(
        self, images: torch.Tensor, modality: torch.Tensor, labels: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor | dict[str, torch.Tensor]]:
        """Every tensor the criterion needs; see the module docstring for keys and shapes."""
        grouping = group_by_modality(modality, self.num_modalities)
        sizes = grouping.sizes
        x = images.index_select(0, grouping.order)
        h_sh, h_sp, bn_sh, bn_sp = self._features(x, sizes)
        out: dict[str, torch.Tensor] = {"shared_feat": h_sh, "shared_logits": self.cls_sh(bn_sh)}
        if h_sp is not None:
            out["specific_feat"] = h_sp
            out["specific_logits"] = per_modality(bn_sp, sizes, self.cls_sp)
        if self.modality_head is not None:
            out["modality_logits"] = self.modality_head(h_sh)
        if self.projectors is not None:
            src, dst = (bn_sh, bn_sp) if self.project_space == "neck" else (h_sh, h_sp)
            pairs = [p(a, b) for p, a, b in zip(self.projectors, src.split(sizes), dst.split(sizes), strict=True)]
            out["project_pred"] = torch.cat([pred for pred, _ in pairs])
            out["project_target"] = torch.cat([target for _, target in pairs])
        if self.decoders is not None:
            size = (x.shape[2] // self.recon_downsample, x.shape[3] // self.recon_downsample)
            code = torch.cat([h_sh, h_sp], dim=1).split(sizes)
            out["recon"] = torch.cat([d(z, size) for d, z in zip(self.decoders, code, strict=True)])
            out["recon_target"] = F.adaptive_avg_pool2d(x.detach(), size)
        out = {k: v.index_select(0, grouping.inverse) for k, v in out.items()}  # back to the caller's order
        stats: dict[str, torch.Tensor] = {}
        if self.sstn is not None:
            bn_sh = bn_sh.index_select(0, grouping.inverse)
            bn_sp = None if bn_sp is None else bn_sp.index_select(0, grouping.inverse)
            fused, fused_bn, sstn_stats = self._transfer(bn_sh, bn_sp, modality, labels)
            out["fused_feat"] = fused
            out["fused_logits"] = self.cls_fused(fused_bn)
            stats.update(sstn_stats)
        stats.update(self._head_stats(out, modality))
        out["stats"] = stats
        return out

    def _transfer(
        self, bn_sh: torch.Tensor, bn_sp: torch.Tensor | None, modality: torch.Tensor, labels: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """The SSTN graph over this batch, or, with ``batch_gather`` set, over the batches of every
        process (one larger graph, as if one process held them all); this batch's rows are returned."""
        if self.batch_gather is None:
            out = self.sstn(bn_sh, bn_sp, modality, labels)
            return out.fused, out.fused_bn, out.stats()
        rows = bn_sh.shape[0]
        all_sh, start = self.batch_gather(bn_sh)
        all_sp = None if bn_sp is None else self.batch_gather(bn_sp)[0]
        all_modality = self.batch_gather(modality)[0]
        all_labels = None if labels is None else self.batch_gather(labels)[0]
        out = self.sstn(all_sh, all_sp, all_modality, all_labels)
        own = slice(start, start + rows)
        return out.fused[own], out.fused_bn[own], out.stats()

    def _features(
        self, x: torch.Tensor, sizes: list[int]
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
        """Pooled and BN-necked shared/specific features of grouped images."""
        sh_map, sp_map = self.extractor(x, sizes)
        h_sh = self.pool_sh(sh_map)
        bn_sh = self.neck_sh(h_sh)
        if sp_map is None:
            return h_sh, None, bn_sh, None
        h_sp = self.pool_sp(sp_map)
        return h_sh, h_sp, bn_sh, per_modality(h_sp, sizes, self.necks_sp)

    @staticmethod
    def _head_stats(out: dict[str, torch.Tensor], modality: torch.Tensor) -> dict[str, torch.Tensor]:
        stats = {}
        with torch.no_grad():
            if "modality_logits" in out:
                hit = out["modality_logits"].argmax(dim=1) == modality
                stats["heads/modality_accuracy"] = hit.float().mean()
            if "project_pred" in out:
                cos = F.cosine_similarity(out["project_pred"].float(), out["project_target"].float(), dim=1)
                stats["heads/project_cosine"] = cos.mean()
        return stats

    # ------------------------------------------------------------------ test time

    @property
    def bank_parts(self) -> tuple[str, ...]:
        """The float features of a bank, in the order an exported graph returns them."""
        return ("shared", "specific") if self.extractor.has_specific else ("shared",)

    @torch.no_grad()
    def extract(self, images: torch.Tensor, modality: torch.Tensor) -> Bank:
        """Per-image bank features (call ``eval()`` first); banks of batches concatenate key by key."""
        grouping = group_by_modality(modality, self.num_modalities)
        _, _, bn_sh, bn_sp = self._features(images.index_select(0, grouping.order), grouping.sizes)
        bank = {"shared": bn_sh.float().index_select(0, grouping.inverse), "modality": modality.clone()}
        if bn_sp is not None:
            bank["specific"] = bn_sp.float().index_select(0, grouping.inverse)
        return bank

    @torch.no_grad()
    def extract_modality(self, images: torch.Tensor, modality: int) -> Bank:
        """:meth:`extract` of a batch whose images are all of ``modality``, without ``"modality"``.

        No grouping, no sizes read from tensors: a traced or exported graph keeps a dynamic batch.
        """
        sh_map, sp_map = self.extractor.forward_modality(images, modality)
        bank = {"shared": self.neck_sh(self.pool_sh(sh_map)).float()}
        if sp_map is not None:
            bank["specific"] = self.necks_sp[modality](self.pool_sp(sp_map)).float()
        return bank

    @torch.no_grad()
    def score(self, query_bank: Bank, gallery_bank: Bank, mode: str | None = None) -> torch.Tensor:
        """Distances ``[Q, G]`` (cosine distance, smaller = more similar): :meth:`score_blocks` in full."""
        return self.score_blocks(query_bank, gallery_bank, mode).full()

    @torch.no_grad()
    def score_blocks(self, query_bank: Bank, gallery_bank: Bank, mode: str | None = None) -> DistanceBlocks:
        """Distances ``[Q, G]`` in query blocks (see :func:`score_bank_blocks`), by default in the
        configured test mode."""
        return score_bank_blocks(self.sstn, self.off_features, query_bank, gallery_bank, mode or self.test_mode)

    # ------------------------------------------------------------------ optimisation

    def param_groups(self, base_lr: float, backbone_lr_mult: float = 1.0) -> list[dict]:
        """Optimizer groups: ``backbone`` (ResNet stages) at ``base_lr * backbone_lr_mult``, ``heads``
        (everything else) at ``base_lr``; frozen parameters are left out."""
        return backbone_and_heads(self, self.extractor, base_lr, backbone_lr_mult)


class BankScorer(nn.Module):
    """The test-time scoring of a :class:`CmSSFT` without its extractor.

    Its state dict is the model's ``sstn.*`` entries under the same names, so a features file
    that stores them (with the settings that rebuild the SSTN) scores exactly like the model.
    """

    def __init__(self, sstn: SSTN | None, test_mode: str = "transductive", off_features: str = "shared") -> None:
        super().__init__()
        if test_mode not in MODES:
            raise UserError(f"test mode {test_mode!r} is not one of {MODES}")
        self.sstn = sstn
        self.test_mode = test_mode
        self.off_features = off_features

    @torch.no_grad()
    def score_blocks(self, query_bank: Bank, gallery_bank: Bank, mode: str | None = None) -> DistanceBlocks:
        """As :meth:`CmSSFT.score_blocks`."""
        return score_bank_blocks(self.sstn, self.off_features, query_bank, gallery_bank, mode or self.test_mode)


def score_bank_blocks(
    sstn: SSTN | None, off_features: str, query_bank: Bank, gallery_bank: Bank, mode: str
) -> DistanceBlocks:
    """Distances ``[Q, G]`` between two banks in query blocks, so a large gallery never needs the whole matrix.

    ``mode``: ``transductive`` (one SSTN graph over query + gallery; every node's descriptor is
    computed here, blocks are products), ``single_query`` (each query alone with the gallery; per
    query block on demand) or ``off`` (no transfer: cosine of :func:`plain_features`). Without an
    SSTN every mode is ``off``.
    """
    if mode not in MODES:
        raise UserError(f"test mode {mode!r} is not one of {MODES}")
    if sstn is None or mode == "off":
        q, g = plain_features(query_bank, off_features), plain_features(gallery_bank, off_features)
        return cosine_distance_blocks(q, g)

    def triple(bank: Bank) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        return bank["shared"].float(), _maybe_float(bank.get("specific")), bank["modality"]

    return sstn.distance_blocks(triple(query_bank), triple(gallery_bank), mode)


def plain_features(bank: Bank, off_features: str = "shared") -> torch.Tensor:
    """Unit rows ``[N, C]`` (``shared``) or ``[N, 2C]`` (``concat``: shared and specific, each unit, over sqrt 2)."""
    shared = F.normalize(bank["shared"].float(), dim=1)
    if off_features == "concat" and "specific" in bank:
        specific = F.normalize(bank["specific"].float(), dim=1)
        return torch.cat([shared, specific], dim=1) / math.sqrt(2.0)
    return shared


def _maybe_float(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.float()
