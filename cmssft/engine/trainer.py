"""The training loop.

One optimizer trains everything (extractor, SSTN, heads); adversarial terms act
through gradient reversal inside the model. The loop logs every loss term,
learning rates, gradient norm and model statistics, evaluates periodically,
writes ``last.pth`` on the schedule of ``train.checkpoint_minutes`` /
``train.checkpoint_steps`` (and at the end, and on a signal), and ``best.pth``
(weights only) by the selection rule.

Under ``torchrun`` every process runs this loop on its own shard of the batches
through the DDP-wrapped ``train_model``; decisions that must not differ between
processes (skip a non-finite step, stop on a signal) are agreed by all-reduce,
and only rank 0 logs, evaluates and writes files while the others wait.

Host synchronisation: with a fused optimizer (``train.fused_optimizer``, on by default on CUDA)
the loop reads nothing back to the host between log steps (the model's forward may; see
docs/BENCHMARKS.md). Finiteness is checked on the device, a non-finite
step is skipped by the optimizer kernel itself (``found_inf``), and each step's numbers wait on
the device (:class:`PendingStep`) until the next log step reads them all back in one copy; the
skip warnings and the stop after ``MAX_BAD_STEPS`` non-finite steps in a row then come at that
log step. Otherwise (the CPU default) each step reads its loss back and decides there.
The step's parts are ``torch.profiler`` ranges (``h2d``, ``augment``, ``forward``,
``finite_check``, ``backward``, ``optimizer``, ``read_back``; see benchmarks/profile_step.py).
"""

from __future__ import annotations

import itertools
import logging
import math
import re
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch import nn
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from cmssft.config import Config, config_to_dict
from cmssft.data.batch_augment import build_batch_augment
from cmssft.engine.checkpoint import (
    BEST,
    LAST,
    CheckpointSchedule,
    load_model_state,
    remove_stale_temporaries,
    write_checkpoint,
)
from cmssft.engine.distributed import DistContext
from cmssft.engine.metrics_log import MetricsLogger
from cmssft.engine.optim import set_fused, skips_on_device
from cmssft.engine.run_dir import FILE_ONLY
from cmssft.engine.signals import StopSignals, TrainingInterrupted
from cmssft.errors import UserError
from cmssft.models.heads import dann_ramp, set_reversal_ramp
from cmssft.utils.runtime import rng_state, set_rng_state

LOG = logging.getLogger("cmssft")

# An evaluation: model -> {"rank1": .., "mAP": .., ...} (fractions), plus optional pictures.
EvaluateFn = Callable[[nn.Module, int], dict[str, float]]
MAX_BAD_STEPS = 10
# What a step read back at once: the loss terms (None: the step was skipped) and the gradient norm.
StepResult = tuple[dict[str, float] | None, float]


def uses_channels_last(cfg: Config, device: torch.device) -> bool:
    """NHWC activations speed up CUDA convolutions; on CPU the setting is ignored."""
    return cfg.train.channels_last and device.type == "cuda"


def finite(stats: dict[str, float]) -> dict[str, float]:
    """The statistics that were counted (a model statistic is nan when there was nothing to count,
    e.g. same-identity cross edges in a graph without cross edges)."""
    return {key: value for key, value in stats.items() if math.isfinite(value)}


class TrainingDiverged(UserError):
    """The loss stayed non-finite; the last good checkpoint is kept."""


class DeviceBatch(NamedTuple):
    """A batch ready for the step: images float ``[B, 3, H, W]`` (augmented, in the step's memory
    format), labels and modality long ``[B]``, all on the training device."""

    images: torch.Tensor
    labels: torch.Tensor
    modality: torch.Tensor


@dataclass
class PendingStep:
    """A step whose numbers are still on the device (read back at the next log step).

    ``values`` float64 ``[1 + T + 1 + S]``: skipped (1: the loss was non-finite on some process
    and the optimizer left everything unchanged), the ``terms``, the gradient norm, the
    ``stats``; ``host_stats`` are statistics the model already computed on the host.
    """

    step: int
    terms: tuple[str, ...]
    stats: tuple[str, ...]
    values: torch.Tensor
    host_stats: dict[str, float] = field(default_factory=dict)


@dataclass
class TrainState:
    """What a resumed run needs besides the weights and optimizer."""

    epoch: int = 0  # epochs completed
    step: int = 0  # optimizer steps taken (or skipped) so far
    batch: int = 0  # batches of the current epoch done (non-zero only in a checkpoint saved mid-epoch)
    best_value: float = -math.inf
    best_epoch: int = -1
    history: list[dict] = field(default_factory=list)


class Trainer:
    """Runs epochs; owns nothing it did not get from its builder.

    ``model`` is the plain module (checkpoints, evaluation); ``train_model`` what the training
    step calls (the same module, or it wrapped in DDP and/or ``torch.compile``).
    ``iters_per_epoch`` (default: the loader's length) is the same on every process.
    """

    def __init__(
        self,
        cfg: Config,
        model: nn.Module,
        criterion: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        train_loader: torch.utils.data.DataLoader,
        device: torch.device,
        run_dir: Path,
        metrics: MetricsLogger | None,
        evaluators: dict[str, EvaluateFn] | None = None,
        select_on: str | None = None,
        num_classes: int = 0,
        *,
        train_model: nn.Module | None = None,
        dist: DistContext | None = None,
        iters_per_epoch: int | None = None,
    ) -> None:
        self.cfg, self.model, self.criterion = cfg, model, criterion
        self.train_model = train_model if train_model is not None else model
        self.dist = dist or DistContext()
        self._iters = iters_per_epoch
        self.channels_last = uses_channels_last(cfg, device)
        self.optimizer, self.scheduler = optimizer, scheduler
        self.loader, self.device, self.run_dir = train_loader, device, run_dir
        self.metrics = metrics
        self.evaluators = evaluators or {}
        self.select_on = select_on  # e.g. "val": best.pth by val mAP; None: best.pth = last epoch
        self.num_classes = num_classes
        self.state = TrainState()
        amp = cfg.train.amp if device.type == "cuda" else "off"
        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
        self.scaler = torch.amp.GradScaler("cuda", enabled=amp == "fp16")
        self.fused = skips_on_device(optimizer)
        self.defer_sync = self.fused and amp != "fp16"  # fp16's GradScaler decides skips itself, on the host
        self.pending: list[PendingStep] = []
        self.augment = build_batch_augment(cfg.data) if cfg.data.augment_on == "device" else None
        self.augment_generator = torch.Generator(device=device) if self.augment is not None else None
        self.current_phase: str | None = None
        self.bad_steps = 0
        self.latest_stats: dict[str, float] = {}
        self.signals = StopSignals()
        self.checkpoints = CheckpointSchedule(cfg.train.checkpoint_minutes, cfg.train.checkpoint_steps)
        self._epoch_loss = (0.0, 0)  # (sum of total losses, steps) of the current epoch, for its summary line

    # ------------------------------------------------------------------ checkpoints

    def checkpoint_state(self) -> dict:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "train_state": vars(self.state).copy(),
            "rng": rng_state(),
            "config": config_to_dict(self.cfg),
            "num_classes": self.num_classes,
        }

    def restore(self, state: dict) -> None:
        load_model_state(self.model, state["model"], "the checkpoint to resume")
        self.optimizer.load_state_dict(state["optimizer"])
        set_fused(self.optimizer, self.fused)  # the checkpoint may come from a run with the other kernels
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.state = TrainState(**state["train_state"])
        set_rng_state(state["rng"])

    def best_state(self) -> dict:
        """What evaluation needs (weights, config), and the epoch they come from; no optimizer state."""
        return {
            "model": self.model.state_dict(),
            "config": config_to_dict(self.cfg),
            "num_classes": self.num_classes,
            "train_state": vars(self.state).copy(),
        }

    def save(self, name: str) -> Path:
        """``last.pth``: the whole resumable state; ``best.pth``: :meth:`best_state`."""
        path = self.run_dir / name
        write_checkpoint(self.best_state() if name == BEST else self.checkpoint_state(), path)
        if name == LAST:
            self.checkpoints.mark(self.state.step)
        return path

    # ------------------------------------------------------------------ loop

    @property
    def iters_per_epoch(self) -> int:
        return self._iters if self._iters is not None else len(self.loader)

    @property
    def total_steps(self) -> int:
        return self.cfg.train.epochs * self.iters_per_epoch

    @property
    def finished(self) -> bool:
        return self.state.epoch >= self.cfg.train.epochs

    def fit(self) -> TrainState:
        """Train to ``train.epochs``; SIGINT/SIGTERM save ``last.pth`` and raise :class:`TrainingInterrupted`."""
        total = self.total_steps
        initial = self.state.epoch * self.iters_per_epoch + self.state.batch
        bar = tqdm(total=total, initial=initial, desc="train", dynamic_ncols=True, disable=not self.dist.is_main)
        if self.dist.is_main:
            remove_stale_temporaries(self.run_dir)
        self.checkpoints.mark(self.state.step)
        try:
            with self.signals, logging_redirect_tqdm([LOG]):
                while self.state.epoch < self.cfg.train.epochs:
                    self.train_epoch(bar)
                    self.state.epoch += 1
                    self.state.batch = 0
                    self.end_of_epoch()
                    self.stop_if_signalled()
        finally:
            bar.close()
            if self.metrics is not None:
                self.metrics.flush()
        return self.state

    def train_epoch(self, bar: tqdm) -> None:
        self.model.train()
        self.loader.batch_sampler.set_epoch(self.state.epoch, skip=self.state.batch)
        # Every process takes the same number of steps, or DDP's collectives would wait forever.
        for batch in itertools.islice(self.loader, self.iters_per_epoch - self.state.batch):
            self.run_step(batch, bar)
            if self.state.batch < self.iters_per_epoch and self.signal_check_due():  # epoch's end: saved first
                self.stop_if_signalled()
                if self.dist.is_main and self.checkpoints.due(self.state.step):
                    self.save(LAST)
        self.read_back(bar)  # the epoch's last steps, before its summary line

    def run_step(self, batch: dict | DeviceBatch, bar: tqdm | None = None) -> None:
        """One step of the loop: train on ``batch``, count it, and log it when a log step is due."""
        result = self.train_step(batch)
        self.state.step += 1
        self.state.batch += 1
        if bar is not None:
            bar.update(1)
        if isinstance(result, PendingStep):
            self.pending.append(result)
            if self.log_due(self.state.step):
                self.read_back(bar)
        else:
            self.record(*result, step=self.state.step, bar=bar)

    def log_due(self, step: int) -> bool:
        return step % self.cfg.train.log_every == 0 or step == 1

    def record(self, terms: dict[str, float] | None, grad_norm: float, *, step: int, bar: tqdm | None) -> None:
        """Count a step's read-back numbers into the epoch's loss, and log them on a log step."""
        if terms is None:
            return
        if bar is not None:
            bar.set_postfix(epoch=self.state.epoch + 1, loss=f"{terms['total']:.3f}", refresh=False)
        total, steps = self._epoch_loss
        self._epoch_loss = (total + terms["total"], steps + 1)
        if self.log_due(step):
            self.log_step(terms, grad_norm, step)

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """A named part of the step: a ``torch.profiler`` range (free when nothing profiles)."""
        self.current_phase = name
        try:
            with torch.profiler.record_function(name):
                yield
        finally:
            self.current_phase = None

    def to_device(self, batch: dict) -> DeviceBatch:
        """A loader batch on the training device, augmented there when ``data.augment_on=device``."""
        with self.phase("h2d"):
            images = batch["image"].to(self.device, non_blocking=True)
            labels = batch["label"].to(self.device, non_blocking=True)
            modality = batch["modality"].to(self.device, non_blocking=True)
        if self.augment is not None:
            with self.phase("augment"):
                view = batch.get("view")  # data.channel_aug_joint: which RGB copies to channel-exchange
                view = view.to(self.device, non_blocking=True) if view is not None else None
                self.augment_generator.manual_seed(self.augment_seed())
                images = self.augment(images, modality, self.augment_generator, view)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        elif self.augment is not None:
            images = images.contiguous()
        return DeviceBatch(images, labels, modality)

    def augment_seed(self) -> int:
        """The device augmentation's seed for the coming step: a function of (seed, step, rank) only,
        so a resumed run draws what an uninterrupted one would."""
        key = [self.cfg.seed, self.state.step, self.dist.rank]
        return int(np.random.SeedSequence(key).generate_state(1, np.uint64)[0] >> np.uint64(1))

    def train_step(self, batch: dict | DeviceBatch) -> StepResult | PendingStep:
        """One optimizer step on a loader batch (or a :class:`DeviceBatch`, used as it is).

        Returns the read-back loss terms and gradient norm (terms None: the step was skipped) or,
        when the optimizer skips on the device (:attr:`defer_sync`), a :class:`PendingStep`.
        """
        images, labels, modality = batch if isinstance(batch, DeviceBatch) else self.to_device(batch)
        if self.cfg.train.grl_schedule == "dann":
            progress = self.state.step / max(1, self.total_steps)
            set_reversal_ramp(self.model, dann_ramp(progress))
        with self.phase("forward"):
            with torch.autocast(
                self.device.type, dtype=self.amp_dtype or torch.float32, enabled=bool(self.amp_dtype)
            ):
                out = self.train_model(images, modality, labels)
                terms = self.criterion(out, labels, modality)
        self.optimizer.zero_grad(set_to_none=True)
        if self.defer_sync:
            return self._step_on_device(out, terms)
        return self._step_checked(out, terms)

    def _step_checked(self, out: dict, terms: dict[str, torch.Tensor]) -> StepResult:
        """Read the loss back, skip the step on the host when it is non-finite, else update."""
        total = terms["total"]
        with self.phase("finite_check"):
            skip = self.dist.any(not bool(torch.isfinite(total)))  # all processes skip together
        if skip:
            self.skip_step(self.state.step + 1, [k for k, v in terms.items() if not torch.isfinite(v)])
            with warnings.catch_warnings():  # the schedule advances on purpose: a skipped step still counts
                warnings.filterwarnings("ignore", message=re.escape("Detected call of `lr_scheduler.step()`"))
                self.scheduler.step()
            return None, float("nan")
        self.bad_steps = 0
        with self.phase("backward"):
            self.scaler.scale(total).backward()
        with self.phase("optimizer"):
            self.scaler.unscale_(self.optimizer)
            clip = self.cfg.train.grad_clip if self.cfg.train.grad_clip > 0 else math.inf
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip))
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.scheduler.step()
        with self.phase("read_back"):
            self.latest_stats = finite(self.dist.mean({k: float(v) for k, v in out.get("stats", {}).items()}))
            return self.dist.mean({k: float(v.detach()) for k, v in terms.items()}), grad_norm

    def _step_on_device(self, out: dict, terms: dict[str, torch.Tensor]) -> PendingStep:
        """Update without reading anything back: a non-finite loss (on any process) makes the fused
        optimizer leave parameters and state unchanged; the numbers stay on the device."""
        total = terms["total"]
        skipped = self.dist.any_on_device(~torch.isfinite(total))
        with self.phase("backward"):
            total.backward()
        with self.phase("optimizer"):
            clip = self.cfg.train.grad_clip if self.cfg.train.grad_clip > 0 else math.inf
            grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
            self.optimizer.found_inf = skipped
            try:
                self.optimizer.step()
            finally:
                del self.optimizer.found_inf
            self.scheduler.step()
            stats = out.get("stats", {})
            on_device = {k: v for k, v in stats.items() if v.device == total.device}
            host = {k: float(v) for k, v in stats.items() if k not in on_device}  # already host values
            scalars = [skipped, *terms.values(), grad_norm, *on_device.values()]
            values = torch.stack([v.detach().reshape(()).double() for v in scalars])
        return PendingStep(self.state.step + 1, tuple(terms), tuple(on_device), values, host)

    def read_back(self, bar: tqdm | None = None) -> None:
        """Resolve the pending steps with one device-to-host copy, in order: warn about each skipped
        step (stopping after ``MAX_BAD_STEPS`` in a row), add the others to the epoch's loss and
        log the log step. Every process calls this at the same steps (it may all-reduce)."""
        if not self.pending:
            return
        pending, self.pending = self.pending, []
        with self.phase("read_back"):
            flat = torch.cat([p.values for p in pending]).tolist()
        start, epoch_total, counted, last_total = 0, 0.0, 0, None
        for p in pending:
            row, start = flat[start : start + len(p.values)], start + len(p.values)
            terms = dict(zip(p.terms, row[1 : 1 + len(p.terms)], strict=True))
            if row[0]:
                self.skip_step(p.step, [k for k, v in terms.items() if not math.isfinite(v)])
                continue
            self.bad_steps = 0
            epoch_total, counted, last_total = epoch_total + terms["total"], counted + 1, terms["total"]
            if self.log_due(p.step):
                stats = {**dict(zip(p.stats, row[2 + len(p.terms) :], strict=True)), **p.host_stats}
                self.latest_stats = finite(self.dist.mean(stats))
                self.log_step(self.dist.mean(terms), row[1 + len(p.terms)], p.step)
        total, steps = self._epoch_loss
        self._epoch_loss = (total + self.dist.mean({"total": epoch_total})["total"], steps + counted)
        if bar is not None and last_total is not None:
            bar.set_postfix(epoch=self.state.epoch + 1, loss=f"{last_total:.3f}", refresh=False)

    def skip_step(self, step: int, bad_terms: list[str]) -> None:
        """Count a skipped step (``bad_terms``: this process's non-finite terms); stop after
        ``MAX_BAD_STEPS`` in a row."""
        self.bad_steps += 1
        bad = ", ".join(bad_terms) or "on another process"
        LOG.warning("step %d: non-finite loss (%s); step skipped", step, bad)
        if self.metrics is not None:
            self.metrics.scalars({"train/skipped_steps": self.bad_steps}, step)
        if self.bad_steps >= MAX_BAD_STEPS:
            raise TrainingDiverged(
                f"the loss was non-finite for {MAX_BAD_STEPS} steps in a row; stopped. "
                f"The last good checkpoint is {self.run_dir / LAST} (try a lower train.lr or train.grad_clip)"
            )

    def signal_check_due(self) -> bool:
        """Whether to look for a stop signal after this step. One process looks after every step. The
        processes of a launch must agree on it by an all-reduce, which waits for the device, so they look
        only at log steps, where the loop reads back anyway (and at each epoch's end): a signal then waits
        at most ``train.log_every`` steps, well inside torchrun's 30 s before it kills the workers."""
        return not self.dist.enabled or self.state.step % self.cfg.train.log_every == 0

    def stop_if_signalled(self) -> None:
        """Stop when any process got SIGINT/SIGTERM; all stop after the same step and rank 0 saves."""
        signum = self.dist.max(self.signals.signum or 0)
        if signum:
            self.read_back()
            path = self.save(LAST) if self.dist.is_main else self.run_dir / LAST
            self.dist.barrier()
            raise TrainingInterrupted(signum, str(path))

    def log_step(self, terms: dict[str, float], grad_norm: float, step: int) -> None:
        if self.metrics is None:
            return
        values = {f"loss/{k}": v for k, v in terms.items()}
        values["train/grad_norm"] = grad_norm
        for i, group in enumerate(self.optimizer.param_groups):
            values[f"lr/{group.get('name', i)}"] = group["lr"]
        values.update({f"model/{k}": v for k, v in self.latest_stats.items()})
        self.metrics.scalars(values, step, epoch=self.state.epoch + 1)
        losses = "  ".join(f"{k} {terms[k]:.4f}" for k in sorted(terms, key=lambda k: k != "total"))  # total first
        LOG.info("epoch %d step %d: %s  grad_norm %.3f", self.state.epoch + 1, step, losses, grad_norm,
                 extra=FILE_ONLY)

    # ------------------------------------------------------------------ evaluation and selection

    def end_of_epoch(self) -> None:
        """Rank 0 evaluates and writes checkpoints; the other processes wait for it."""
        if self.dist.is_main:
            total, steps = self._epoch_loss
            mean = f"{total / steps:.4f}" if steps else "n/a"
            LOG.info("epoch %d/%d: mean loss %s over %d steps", self.state.epoch, self.cfg.train.epochs, mean, steps)
            self._epoch_loss = (0.0, 0)
            self.evaluate_and_save()
        self.dist.barrier()

    def evaluate_and_save(self) -> None:
        """Evaluate when due; best.pth when validation improves (no validation split: the final epoch);
        last.pth at the end, when best.pth changed (so a resumed run knows its best) and when due."""
        epoch, every = self.state.epoch, self.cfg.train.eval_every
        last = epoch == self.cfg.train.epochs
        results: dict[str, dict[str, float]] = {}
        if last or (every > 0 and epoch % every == 0):
            results = self.evaluate()
        self.state.history.append({"epoch": epoch, **{f"{s}/{k}": v for s, r in results.items() for k, v in r.items()}})
        if self.select_on is None:
            improved = last
        else:
            improved = self.select_on in results and results[self.select_on]["mAP"] > self.state.best_value
        if improved:
            self.state.best_epoch = epoch
            if self.select_on is not None:
                self.state.best_value = results[self.select_on]["mAP"]
            self.save(BEST)
        if last or improved or self.checkpoints.due(self.state.step):
            self.save(LAST)

    def evaluate(self) -> dict[str, dict[str, float]]:
        results = {}
        for split, evaluate_fn in self.evaluators.items():
            results[split] = evaluate_fn(self.model, self.state.epoch)
            if self.metrics is not None:
                values = {f"{split}/{k}": v for k, v in results[split].items()}
                self.metrics.scalars(values, self.state.step, epoch=self.state.epoch)
            summary = "  ".join(f"{k} {v:.2%}" for k, v in results[split].items() if k in ("rank1", "mAP", "mINP"))
            LOG.info("epoch %d %s: %s", self.state.epoch, split, summary)
        self.model.train()
        return results
