"""Models: ``build_model(cfg, num_classes)`` builds the one named by ``cfg.model.name`` (``cmssft``, ``agw``).

Adding one: docs/USAGE.md, "Adding a model".
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from torch import nn

from cmssft.config import Config, ModelConfig
from cmssft.errors import UserError
from cmssft.models.agw import AGW, AGWScorer
from cmssft.models.backbone import feature_dim, resnet_stages
from cmssft.models.cmssft_model import BankScorer, CmSSFT
from cmssft.models.extractor import TwoStreamExtractor
from cmssft.models.heads import Decoder, ModalityDiscriminator, Projector
from cmssft.models.neck import make_pool
from cmssft.models.sstn import SSTN
from cmssft.registry import MODELS

__all__ = ["AGW", "AGWScorer", "BankScorer", "CmSSFT", "SSTN", "TwoStreamExtractor", "build_agw", "build_bank_scorer",
           "build_cmssft", "build_model", "build_sstn", "apply_test_time", "fixed_scoring",
           "ignored_model_settings"]

LOG = logging.getLogger("cmssft")
# The model.* keys every model may read; the others (but a model's own sub-section) are cm-SSFT's.
COMMON_MODEL_KEYS = ("name", "backbone", "pretrained", "download_timeout", "last_stride", "pooling", "gem_p",
                     "gem_learn_p", "bnneck", "non_local", "non_local_width")


def build_model(cfg: Config, num_classes: int) -> nn.Module:
    """The model named by ``cfg.model.name`` for ``num_classes`` training identities."""
    return MODELS.get(cfg.model.name)(cfg, num_classes)


@MODELS.register("cmssft")
def build_cmssft(cfg: Config, num_classes: int) -> CmSSFT:
    """cm-SSFT, or with the specific branch, SSTN and heads off, the shared-only baseline."""
    m = cfg.model
    if not m.use_specific and (m.project_adversarial or m.reconstruction):
        raise UserError(
            "model.use_specific=false leaves no specific features for the project_adversarial/reconstruction "
            "heads; set model.project_adversarial=false and model.reconstruction=false"
        )
    dim = feature_dim(m.backbone)
    stages = resnet_stages(m.backbone, m.pretrained, m.last_stride, m.download_timeout, m.non_local, m.non_local_width)
    extractor = TwoStreamExtractor(stages, m.shared_from, m.specific_from if m.use_specific else None)
    s = m.sstn
    sstn = build_sstn(cfg)
    modality_head = projectors = decoders = None
    if m.modality_adaptation:
        modality_head = ModalityDiscriminator(dim, m.head_hidden, grl_scale=m.grl_modality)
    if m.project_adversarial:
        projectors = nn.ModuleList(Projector(dim, m.head_hidden, grl_scale=m.grl_project) for _ in range(2))
    if m.reconstruction:
        decoders = nn.ModuleList(Decoder(2 * dim) for _ in range(2))
    return CmSSFT(
        extractor,
        dim,
        num_classes,
        pooling=m.pooling,
        gem_p=m.gem_p,
        bnneck=m.bnneck,
        sstn=sstn,
        modality_head=modality_head,
        projectors=projectors,
        decoders=decoders,
        recon_downsample=m.recon_downsample,
        test_mode=s.test_mode,
        off_features=s.off_features,
        project_space=m.project_space,
        gem_learn_p=m.gem_learn_p,
    )


@MODELS.register("agw")
def build_agw(cfg: Config, num_classes: int) -> AGW:
    """AGW: per-modality ``conv1`` stems, shared layer1..layer4, with the common ``model.*`` keys and ``model.agw``.

    cm-SSFT's own keys do not apply; those set to other than their defaults are named in one INFO line
    (the ablation rows inherit the demo's ``model.specific_from``).
    """
    m = cfg.model
    ignored = ignored_model_settings(m, ("agw",))
    if ignored:
        LOG.info("model.name=agw ignores cm-SSFT settings: %s", ", ".join(ignored))
    stages = resnet_stages(m.backbone, m.pretrained, m.last_stride, m.download_timeout, m.non_local, m.non_local_width)
    extractor = TwoStreamExtractor(stages, shared_from="layer1", specific_from=None)
    pool = make_pool(m.pooling, m.gem_p, m.gem_learn_p)
    return AGW(extractor, feature_dim(m.backbone), num_classes, pool, bnneck=m.bnneck, test_feature=m.agw.test_feature)


def ignored_model_settings(model: ModelConfig, own: tuple[str, ...]) -> list[str]:
    """``model.key=value`` for every key a model reads neither among the common keys nor in its ``own``
    sub-sections, whose value differs from the default."""
    reads = (*COMMON_MODEL_KEYS, *own)
    given, default = _flat(dataclasses.asdict(model)), _flat(dataclasses.asdict(ModelConfig()))
    return [f"model.{key}={value}" for key, value in given.items()
            if key.split(".")[0] not in reads and value != default.get(key)]


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def apply_test_time(build: Config, current: Config) -> Config:
    """``build`` (a checkpoint's config) with the test-time choices of ``current`` (``--config``): AGW's
    ``model.agw.test_feature``, as cm-SSFT's ``model.sstn.test_mode`` is taken from it at evaluation."""
    build.model.agw.test_feature = current.model.agw.test_feature
    return build


def fixed_scoring(cfg: Config) -> str | None:
    """How a model without SSTN test modes ranks, in the words of a table title (``cosine of AGW's FC
    features``); None for cm-SSFT, whose test mode (or ``off``) says it."""
    if cfg.model.name == "agw":
        return f"cosine of AGW's {cfg.model.agw.test_feature.upper()} features"
    return None


def build_sstn(cfg: Config) -> SSTN | None:
    """The transfer network ``cfg.model.sstn`` describes, or None when it is disabled."""
    m, s = cfg.model, cfg.model.sstn
    if not s.enabled:
        return None
    return SSTN(
        feature_dim(m.backbone),
        use_specific=m.use_specific,
        topk=s.topk,
        cross_k=s.topk if s.cross_k < 0 else s.cross_k,
        block_norm=s.block_norm,
        center=s.center,
        normalize=s.normalize,
        temperature=s.temperature,
        self_loops=s.self_loops,
        affinity_dim=s.affinity_dim,
        fusion=s.fusion,
        fused_dim=s.fused_dim,
        bnneck=m.bnneck,
        chunk=s.chunk,
        memory=s.memory,
        test_intra_k=s.test_intra_k,
    )


def build_bank_scorer(cfg: Config) -> BankScorer | AGWScorer:
    """The test-time scoring of the model ``cfg`` describes, without its extractor (load ``sstn.*`` into it)."""
    if cfg.model.name == "agw":
        return AGWScorer(cfg.model.agw.test_feature)
    if cfg.model.name != "cmssft":
        raise UserError(f"scoring without the extractor is implemented for model.name=cmssft, not {cfg.model.name!r}")
    s = cfg.model.sstn
    return BankScorer(build_sstn(cfg), test_mode=s.test_mode, off_features=s.off_features)
