"""Feature extraction for evaluation: images -> a bank of named per-image features.

A *bank* is ``dict[str, Tensor]`` whose tensors share their first dimension N
(one row per sample, in the order of the sample list); it always holds
``"modality"`` (long [N]). What else it holds is the model's business
(``model.extract``); ``model.score_blocks(query_bank, gallery_bank, mode)`` turns two
banks into distances [Q, G] handed out in query blocks [rows, G] (``DistanceBlocks``;
``model.score`` gives the full matrix).

A checkpoint's scoring needs, besides the bank, only its config and its ``sstn.*`` tensors
(:class:`ScorerState`): a features file that stores them is scored without the backbone
(:func:`scorer_score_fn`).

A trained model is rebuilt from the config it was trained with; only its *test-time* settings
(:data:`~cmssft.config.TEST_TIME_MODEL_KEYS`) may be changed by ``key=value`` overrides
(:func:`test_time_config`), so ``eval.py ... model.sstn.topk=10`` scores the same weights with another
test graph, and an override that would need other weights is refused instead of ignored.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from cmssft.config import Config, config_to_dict, model_overrides, test_time_config
from cmssft.data.loader import build_test_loader
from cmssft.data.records import Sample
from cmssft.engine.checkpoint import load_checkpoint, load_model_state
from cmssft.errors import UserError
from cmssft.scoring import DistanceBlocks
from cmssft.utils.runtime import resolve_device

LOG = logging.getLogger("cmssft")
Bank = dict[str, torch.Tensor]
ScoreFn = Callable[[Bank, Bank], DistanceBlocks]


@torch.no_grad()
def extract_features(
    model: nn.Module,
    loader: torch.utils.data.DataLoader,
    device: torch.device,
    *,
    flip: bool = True,
    amp_dtype: torch.dtype | None = None,
    progress: bool = True,
    desc: str = "extract",
    extra_keys: Sequence[str] = (),
) -> Bank:
    """Run ``model.extract`` over a loader; ``flip`` averages each image with its mirror.

    ``extra_keys``: batch entries (tensors with the batch dimension first) carried into the bank
    as they are, e.g. a per-image flag the loader sets.
    """
    was_training = model.training
    model.eval()
    parts: dict[str, list[torch.Tensor]] = {}
    for batch in tqdm(loader, desc=desc, leave=False, disable=not progress, dynamic_ncols=True):
        images = batch["image"].to(device, non_blocking=True)
        modality = batch["modality"].to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            bank = model.extract(images, modality)
            if flip:
                mirrored = model.extract(images.flip(-1), modality)
                bank = {k: (v + mirrored[k]) / 2 if v.is_floating_point() else v for k, v in bank.items()}
        bank.update({key: batch[key] for key in extra_keys})
        for key, value in bank.items():
            parts.setdefault(key, []).append(value.float().cpu() if value.is_floating_point() else value.cpu())
    model.train(was_training)
    return {key: torch.cat(values) for key, values in parts.items()}


def model_score_fn(model: nn.Module, mode: str, device: torch.device) -> ScoreFn:
    """The model's test-time scoring (SSTN transductive / single-query / off) as a plain function.

    Its result is blockwise: each ``[rows, G]`` block is computed on ``device`` when the evaluator
    asks for it and handed over as float32 on the CPU, so neither side holds the whole (Q, G).
    """

    @torch.no_grad()
    def score(query: Bank, gallery: Bank) -> DistanceBlocks:
        was_training = model.training
        model.eval()
        q = {k: v.to(device) for k, v in query.items()}
        g = {k: v.to(device) for k, v in gallery.items()}
        dist = model.score_blocks(q, g, mode)
        model.train(was_training)
        return dist.map(lambda block: block.float().cpu(), device="cpu")

    return score


def model_from_checkpoint(
    state: dict, source: str, overrides: Sequence[str] = (), test_time: Config | None = None
) -> tuple[nn.Module, Config]:
    """Rebuild the model a checkpoint was trained as and load its weights. Test-time ``overrides``
    (:func:`~cmssft.config.test_time_config`) change its settings; ``test_time`` (a ``--config``) picks the
    choices a config makes at evaluation (:func:`~cmssft.models.apply_test_time`, e.g. AGW's test feature).
    Returns the model and the config it now scores with."""
    from cmssft.models import apply_test_time, build_model

    trained_cfg = test_time_config(state["config"], overrides, source)
    if test_time is not None:
        apply_test_time(trained_cfg, test_time)
    build_cfg = copy.deepcopy(trained_cfg)
    build_cfg.model.pretrained = "none"  # the checkpoint brings every weight
    model = build_model(build_cfg, state["num_classes"])
    _load_with_overrides(model, state["model"], source, overrides)
    return model, trained_cfg


def _load_with_overrides(model: nn.Module, weights: Mapping[str, torch.Tensor], source: str,
                         overrides: Sequence[str]) -> None:
    """Load ``weights``; when test-time overrides built a model these weights do not fit, say so."""
    try:
        load_model_state(model, dict(weights), source)
    except UserError as err:
        changed = model_overrides(overrides)
        if not changed:
            raise
        raise UserError(f"{' '.join(changed)} would need weights {source} does not have ({err})") from None


@dataclass
class ScorerState:
    """What scoring a bank needs besides the bank: the trained config and the ``sstn.*`` tensors."""

    config: dict
    tensors: dict[str, torch.Tensor]


def scorer_state(state: Mapping) -> ScorerState:
    """The :class:`ScorerState` of a loaded checkpoint (:func:`~cmssft.engine.checkpoint.load_checkpoint`)."""
    tensors = {k: v for k, v in state["model"].items() if k.startswith("sstn.")}
    return ScorerState(dict(state["config"]), tensors)


def scorer_score_fn(
    config: Mapping, tensors: Mapping[str, torch.Tensor | np.ndarray], mode: str, device: torch.device | str,
    source: str, overrides: Sequence[str] = (), test_time: Config | None = None,
) -> ScoreFn:
    """The scoring of the checkpoint whose config and ``sstn.*`` tensors these are, without its backbone
    (with test-time ``overrides`` and ``test_time``, as :func:`model_from_checkpoint` applies them).

    Equal to :func:`model_score_fn` of that checkpoint's model for the same banks, mode and settings.
    """
    from cmssft.models import apply_test_time, build_bank_scorer

    scorer_cfg = test_time_config(config, overrides, source)
    scorer = build_bank_scorer(apply_test_time(scorer_cfg, test_time) if test_time is not None else scorer_cfg)
    weights = {k: torch.as_tensor(np.asarray(v)) for k, v in tensors.items()}
    _load_with_overrides(scorer, weights, source, overrides)
    device = torch.device(device)
    return model_score_fn(scorer.to(device), mode, device)


@dataclass
class Extraction:
    """A checkpoint's features of a sample list, its scoring function, and what a features file stores."""

    bank: Bank
    score_fn: ScoreFn
    scorer: ScorerState


@dataclass
class LoadedCheckpoint:
    """A checkpoint read once: its model (test-time overrides applied), that model's config, and what
    a features file needs to score like it."""

    model: nn.Module
    config: Config
    scorer: ScorerState


def load_trained_model(
    checkpoint_path: str | Path, overrides: Sequence[str] = (), test_time: Config | None = None
) -> LoadedCheckpoint:
    """The model of a checkpoint file with test-time ``overrides`` and ``test_time`` choices
    (:func:`model_from_checkpoint`)."""
    state = load_checkpoint(checkpoint_path)
    model, config = model_from_checkpoint(state, str(checkpoint_path), overrides, test_time)
    scorer = scorer_state(state)
    scorer.config = {**scorer.config, "model": config_to_dict(config)["model"]}  # a features file scores alike
    return LoadedCheckpoint(model, config, scorer)


def extract_checkpoint(
    cfg: Config, checkpoint: str | Path | LoadedCheckpoint, samples: Sequence[Sample], overrides: Sequence[str] = ()
) -> Extraction:
    """Features of ``samples`` from a trained checkpoint, its scoring function and scorer state.

    The architecture and the test-time settings come from the checkpoint, changed by the test-time
    ``model.*`` items of ``overrides``; data settings, ``eval.*`` and the choices a config makes at
    evaluation (``model.sstn.test_mode``, ``model.agw.test_feature``) come from ``cfg``.
    """
    loaded = (checkpoint if isinstance(checkpoint, LoadedCheckpoint)
              else load_trained_model(checkpoint, overrides, test_time=cfg))
    device = resolve_device(cfg.train.device)
    model = loaded.model.to(device)
    loader = build_test_loader(cfg, samples, device_is_cuda=device.type == "cuda")
    bank = extract_features(model, loader, device, flip=cfg.eval.flip)
    return Extraction(bank, model_score_fn(model, cfg.model.sstn.test_mode, device), loaded.scorer)

