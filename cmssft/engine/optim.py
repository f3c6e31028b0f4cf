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


def use_fused(cfg: TrainConfig, device: torch.device) -> bool:
    """``train.fused_optimizer``: ``auto`` fuses on CUDA only, so the CPU default stays the plain loop."""
    return cfg.fused_optimizer == "on" or (cfg.fused_optimizer == "auto" and device.type == "cuda")


def build_optimizer(model: nn.Module, cfg: TrainConfig, fused: bool = False) -> torch.optim.Optimizer:
    """SGD (Nesterov) or Adam over :func:`parameter_groups`; ``fused``: one kernel per step for all
    parameters, which also lets a non-finite step be skipped on the device (``found_inf``)."""
    groups = parameter_groups(model, cfg)
    options = {"fused": True} if fused else {}  # unfused: torch's default (foreach on CUDA)
    if cfg.optimizer == "sgd":
        optimizer = torch.optim.SGD(
            groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=True, **options
        )
        if fused:
            zero_momentum_buffers(optimizer)
        return optimizer
    return torch.optim.Adam(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, **options)


def zero_momentum_buffers(optimizer: torch.optim.SGD) -> None:
    """Start every momentum buffer at zero (the same first step: buffer = gradient).

    Fused SGD creates a buffer on its first step even when ``found_inf`` skips that step, and
    leaves it uninitialised (torch 2.14); a zero buffer makes a skipped first step harmless.
    """
    for group in optimizer.param_groups:
        if group["momentum"] == 0:
            continue
        for param in group["params"]:
            optimizer.state[param].setdefault("momentum_buffer", torch.zeros_like(param))


def skips_on_device(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer.step`` honours a ``found_inf`` tensor (fused kernels), so a step can be
    skipped without reading the loss back to the host."""
    return all(group.get("fused") for group in optimizer.param_groups)


def set_fused(optimizer: torch.optim.Optimizer, fused: bool) -> None:
    """Keep this run's kernel choice after ``load_state_dict``, which copies the saved groups' flags."""
    for group in optimizer.param_groups:
        group["fused"] = True if fused else None


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
