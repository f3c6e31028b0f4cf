"""Optimizers and learning-rate schedules (linear warm-up, then step or cosine)."""

from __future__ import annotations

import math

import torch
from torch import nn

from cmssft.config import TrainConfig


def parameter_groups(model: nn.Module, cfg: TrainConfig) -> list[dict]:
    """Backbone parameters at ``lr * backbone_lr_mult``, the rest at ``lr``.

    A model may define ``param_groups(base_lr, backbone_lr_mult)``; otherwise all
    parameters share one group.
    """
    if hasattr(model, "param_groups"):
        return model.param_groups(cfg.lr, cfg.backbone_lr_mult)
    return [{"params": [p for p in model.parameters() if p.requires_grad], "lr": cfg.lr, "name": "all"}]


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    groups = parameter_groups(model, cfg)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=True)
    return torch.optim.Adam(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)


def lr_factor(epoch_progress: float, cfg: TrainConfig) -> float:
    """Multiplier of the base learning rate at a fractional epoch (0 = start)."""
    if cfg.warmup_epochs > 0 and epoch_progress < cfg.warmup_epochs:
        return 0.01 + 0.99 * epoch_progress / cfg.warmup_epochs
    if cfg.schedule == "cosine":
        span = max(cfg.epochs - cfg.warmup_epochs, 1e-8)
        done = min(max(epoch_progress - cfg.warmup_epochs, 0.0) / span, 1.0)
        return 0.5 * (1.0 + math.cos(math.pi * done))
    passed = sum(epoch_progress >= m for m in cfg.milestones)
    return cfg.gamma**passed


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: TrainConfig, iters_per_epoch: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Stepped once per iteration, so warm-up is smooth."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: lr_factor(it / iters_per_epoch, cfg))
