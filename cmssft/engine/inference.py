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

from cmssft.config import Config, config_from_dict
from cmssft.data.loader import build_test_loader
from cmssft.data.records import Sample
from cmssft.engine.checkpoint import load_checkpoint, load_model_state
from cmssft.evaluation.metrics import DistanceBlocks
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


def model_from_checkpoint(state: dict, source: str, test_time: Config | None = None) -> tuple[nn.Module, Config]:
    """Rebuild the model a checkpoint was trained as, and load its weights; ``test_time`` (a ``--config``)
    sets the test-time choices (:func:`~cmssft.models.apply_test_time`). Returns the trained config."""
    from cmssft.models import apply_test_time, build_model

    trained_cfg = config_from_dict(state["config"])
    build_cfg = copy.deepcopy(trained_cfg)
    build_cfg.model.pretrained = "none"  # the checkpoint brings every weight
    if test_time is not None:
        apply_test_time(build_cfg, test_time)
    model = build_model(build_cfg, state["num_classes"])
    load_model_state(model, state["model"], source)
    return model, trained_cfg


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
    source: str, test_time: Config | None = None,
) -> ScoreFn:
    """The scoring of the checkpoint whose config and ``sstn.*`` tensors these are, without its backbone.

    Equal to :func:`model_score_fn` of that checkpoint's model for the same banks, mode and ``test_time``.
    """
    from cmssft.models import apply_test_time, build_bank_scorer

    scorer_cfg = config_from_dict(dict(config))
    scorer = build_bank_scorer(apply_test_time(scorer_cfg, test_time) if test_time is not None else scorer_cfg)
    load_model_state(scorer, {k: torch.as_tensor(np.asarray(v)) for k, v in tensors.items()}, source)
    device = torch.device(device)
    return model_score_fn(scorer.to(device), mode, device)


@dataclass
class Extraction:
    """A checkpoint's features of a sample list, its scoring function, and what a features file stores."""

    bank: Bank
    score_fn: ScoreFn
    scorer: ScorerState


def extract_checkpoint(cfg: Config, checkpoint_path: str | Path, samples: Sequence[Sample]) -> Extraction:
    """Features of ``samples`` from a trained checkpoint, its scoring function and scorer state.

    The architecture comes from the checkpoint; data settings and the test-time
    choices come from ``cfg`` (so ``model.sstn.test_mode=...`` or
    ``model.agw.test_feature=...`` can be changed at evaluation time).
    """
    state = load_checkpoint(checkpoint_path)
    model, _ = model_from_checkpoint(state, str(checkpoint_path), test_time=cfg)
    device = resolve_device(cfg.train.device)
    model.to(device)
    loader = build_test_loader(cfg, samples, device_is_cuda=device.type == "cuda")
    bank = extract_features(model, loader, device, flip=cfg.eval.flip)
    return Extraction(bank, model_score_fn(model, cfg.model.sstn.test_mode, device), scorer_state(state))


def extract_bank(cfg: Config, checkpoint_path: str | Path, samples: Sequence[Sample]) -> tuple[Bank, ScoreFn]:
    """:func:`extract_checkpoint` without the scorer state."""
    extraction = extract_checkpoint(cfg, checkpoint_path, samples)
    return extraction.bank, extraction.score_fn
