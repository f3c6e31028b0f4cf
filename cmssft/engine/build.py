"""Assemble a training run from a config: data, model, loss, optimizer, evaluators.

This is the only place that turns a whole :class:`Config` into objects; the
objects themselves take plain arguments.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import torch
from torch import nn

from cmssft.config import Config
from cmssft.data.datasets import build_dataset
from cmssft.data.loader import build_train_loader
from cmssft.data.records import CrossModalDataset
from cmssft.engine.distributed import DistContext
from cmssft.engine.evaluate import build_evaluators
from cmssft.engine.metrics_log import MetricsLogger
from cmssft.engine.optim import build_optimizer, build_scheduler, use_fused
from cmssft.engine.trainer import Trainer, uses_channels_last

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
    dataset = build_dataset(cfg.data)
    check_evaluation_images(dataset)
    return dataset


def check_evaluation_images(dataset: CrossModalDataset) -> None:
    """A protocol cannot drop images, so an unreadable test image stops the run now, not after an epoch."""
    from cmssft.data.bad_images import describe, scan_images
    from cmssft.errors import DatasetError

    samples = [*dataset.query, *dataset.gallery, *dataset.val_query, *dataset.val_gallery]
    problems = scan_images(samples, desc="check evaluation images")
    if problems:
        raise DatasetError(
            f"{len(problems)} unreadable evaluation image(s), which no protocol may skip: {describe(samples, problems)}"
        )


def build_trainer(
    cfg: Config, dataset: CrossModalDataset, device: torch.device, run_dir: Path, dist: DistContext | None = None
) -> Trainer:
    """A trainer for this process; under ``torchrun`` (``dist``) it trains its shard of the batches
    through DDP, and only rank 0 gets the metrics logger and the evaluators."""
    from cmssft.losses import build_criterion
    from cmssft.models import build_model

    dist = dist or DistContext()
    num_classes = dataset.num_train_ids
    model = build_model(cfg, num_classes).to(device)
    if uses_channels_last(cfg, device):
        model = model.to(memory_format=torch.channels_last)
    criterion = build_criterion(cfg).to(device)
    # Rank 0 first: it builds the image cache (data.cache) that the others then open.
    loader = dist.main_first(
        lambda: build_train_loader(
            cfg, dataset.train, device_is_cuda=device.type == "cuda", rank=dist.rank, world_size=dist.world_size
        )
    )
    iters = dist.min(len(loader))  # shards differ by one batch when world_size does not divide the epoch
    optimizer = build_optimizer(model, cfg.train, fused=use_fused(cfg.train, device))
    scheduler = build_scheduler(optimizer, cfg.train, iters)
    metrics = MetricsLogger(run_dir) if dist.is_main else None
    evaluators, select_on = build_evaluators(cfg, dataset, device, metrics, run_dir) if dist.is_main else ({}, None)
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
        train_model=wrap_for_training(model, cfg, device, dist),
        dist=dist,
        iters_per_epoch=iters,
    )


def wrap_for_training(model: nn.Module, cfg: Config, device: torch.device, dist: DistContext) -> nn.Module:
    """What the training step calls: ``model`` in DDP under ``torchrun``, compiled with ``train.compile``.

    Checkpoints and evaluation keep using ``model`` itself, so their keys never carry a wrapper prefix.
    """
    wrapped = model
    if dist.enabled:
        if cfg.model.sstn.global_batch and hasattr(model, "batch_gather"):
            model.batch_gather = dist.all_gather
        # broadcast_buffers=False: each process keeps its own buffers. The candidate memory is a ring of this
        # process's earlier batches; broadcasting rank 0's buffers before every forward would overwrite it and
        # lose every other process's pushes. Running statistics (BatchNorm, SSTN centring) only act at test
        # time, from rank 0's copy, which is the one checkpoints save either way.
        wrapped = nn.parallel.DistributedDataParallel(
            model,
            device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=_may_leave_parameters_unused(cfg),
            broadcast_buffers=False,
        )
        LOG.info(
            "distributed: %d processes, %d images per process and step (global batch %d)%s",
            dist.world_size,
            2 * cfg.data.ids_per_batch * cfg.data.images_per_id,
            dist.world_size * 2 * cfg.data.ids_per_batch * cfg.data.images_per_id,
            "; SSTN graph over the global batch" if cfg.model.sstn.global_batch else "",
        )
    elif cfg.model.sstn.global_batch:
        LOG.info("model.sstn.global_batch has no effect in a single process")
    if cfg.train.compile:
        wrapped = torch.compile(wrapped)
    return wrapped


def _may_leave_parameters_unused(cfg: Config) -> bool:
    """A zero loss weight leaves its head without gradients, which DDP must be told to expect
    (it then searches the graph each step); with every term on, all parameters are used."""
    return any(weight == 0 for weight in dataclasses.asdict(cfg.loss.weights).values())
