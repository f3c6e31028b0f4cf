"""Models: ``build_model(cfg, num_classes)`` builds the one named by ``cfg.model.name``."""

from __future__ import annotations

from torch import nn

from cmssft.config import Config
from cmssft.errors import UserError
from cmssft.models.backbone import feature_dim, resnet_stages
from cmssft.models.cmssft_model import BankScorer, CmSSFT
from cmssft.models.extractor import TwoStreamExtractor
from cmssft.models.heads import Decoder, ModalityDiscriminator, Projector
from cmssft.models.sstn import SSTN
from cmssft.registry import MODELS

__all__ = ["BankScorer", "CmSSFT", "SSTN", "TwoStreamExtractor", "build_bank_scorer", "build_cmssft", "build_model",
           "build_sstn"]


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
    stages = resnet_stages(m.backbone, m.pretrained, m.last_stride, m.download_timeout)
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
    )


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


def build_bank_scorer(cfg: Config) -> BankScorer:
    """The test-time scoring of the model ``cfg`` describes, without its extractor (load ``sstn.*`` into it)."""
    if cfg.model.name != "cmssft":
        raise UserError(f"scoring without the extractor is implemented for model.name=cmssft, not {cfg.model.name!r}")
    s = cfg.model.sstn
    return BankScorer(build_sstn(cfg), test_mode=s.test_mode, off_features=s.off_features)
