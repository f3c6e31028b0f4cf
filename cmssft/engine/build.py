"""Assemble a training run from a config: data, model, loss, optimizer, evaluators.

This is the only place that turns a whole :class:`Config` into objects; the
objects themselves take plain arguments.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from cmssft.config import Config
from cmssft.data.datasets import build_dataset
from cmssft.data.loader import build_train_loader
from cmssft.data.records import CrossModalDataset
from cmssft.engine.evaluate import build_evaluators
from cmssft.engine.metrics_log import MetricsLogger
from cmssft.engine.optim import build_optimizer, build_scheduler
from cmssft.engine.trainer import Trainer

LOG = logging.getLogger("cmssft")
SYNTHETIC_LAYOUTS = {"sysu_mm01": "sysu", "regdb": "regdb", "llcm": "llcm"}


def prepare_dataset(cfg: Config) -> CrossModalDataset:
    """Load the dataset, first generating the synthetic one when it is enabled and missing."""
    synthetic = cfg.data.synthetic
    if synthetic.enabled:
        from cmssft.data.synthetic import ensure_synthetic

        layout = SYNTHETIC_LAYOUTS.get(cfg.data.name)
        if layout is None:
            from cmssft.errors import UserError

            raise UserError(f"data.synthetic.enabled works with {', '.join(SYNTHETIC_LAYOUTS)}, not {cfg.data.name}")
        if ensure_synthetic(Path(cfg.data.root), layout, synthetic):
            LOG.info("generated synthetic %s data at %s", layout, cfg.data.root)
    return build_dataset(cfg.data)


def build_trainer(cfg: Config, dataset: CrossModalDataset, device: torch.device, run_dir: Path) -> Trainer:
    from cmssft.losses import build_criterion
    from cmssft.models import build_model

    num_classes = dataset.num_train_ids
    model = build_model(cfg, num_classes).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    criterion = build_criterion(cfg).to(device)
    loader = build_train_loader(cfg, dataset.train, device_is_cuda=device.type == "cuda")
    optimizer = build_optimizer(model, cfg.train)
    scheduler = build_scheduler(optimizer, cfg.train, len(loader))
    metrics = MetricsLogger(run_dir)
    evaluators, select_on = build_evaluators(cfg, dataset, device, metrics, run_dir)
    return Trainer(
        cfg,
        model,
        criterion,
        optimizer,
        scheduler,
        loader,
        device,
        run_dir,
        metrics,
        evaluators=evaluators,
        select_on=select_on,
        num_classes=num_classes,
    )
