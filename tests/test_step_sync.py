"""The training step without per-step host reads (fused optimizer), and with device augmentation.

``train.fused_optimizer=on`` turns on what CUDA runs get by default: the fused kernels skip a
non-finite step on the device and the step's numbers are read back only at log steps. On the CPU
the same path runs, so these tests pin its behaviour: reads only at log steps, the same logged
numbers as reading back every step, skipped steps that change nothing, warnings and the stop
after ten non-finite steps in a row as before.
"""

from __future__ import annotations

import itertools
import json
import logging
import signal
from dataclasses import dataclass

import pytest
import torch
from tqdm import tqdm

from cmssft.config import load_config
from cmssft.engine.build import build_trainer, prepare_dataset
from cmssft.engine.distributed import DistContext
from cmssft.engine.entry import train_main
from cmssft.engine.optim import build_optimizer, set_fused
from cmssft.engine.signals import TrainingInterrupted
from cmssft.engine.trainer import DeviceBatch, PendingStep, TrainingDiverged
from cmssft.utils.host_reads import count_host_reads

from .conftest import SHARED_ONLY, TINY_CHECKPOINT_RUN, TINY_DATA

# The shared-only model without the transfer: its forward reads nothing back (the SSTN's graph
# statistics do, every step; see docs/BENCHMARKS.md), so every read counted here is the trainer's.
NO_TRANSFER = [*SHARED_ONLY, "model.sstn.enabled=false"]


def make_trainer(root, tmp_path, *extra):
    overrides = [
        f"data.root={root}",
        *TINY_DATA,
        *NO_TRANSFER,
        "train.optimizer=adam",
        "train.lr=3e-4",
        "train.warmup_epochs=0",
        "train.epochs=1",
        "train.iters_per_epoch=8",
        "train.eval_every=0",
        "train.deterministic=true",
        f"output_dir={tmp_path}",
        *extra,
    ]
    cfg = load_config(None, overrides)
    torch.manual_seed(0)
    return build_trainer(cfg, prepare_dataset(cfg), torch.device("cpu"), tmp_path)


def reads_per_step(trainer, steps: int) -> list[int]:
    """Host reads inside each ``run_step`` (data loading excluded: it happens between them)."""
    trainer.model.train()
    trainer.loader.batch_sampler.set_epoch(0)
    counts = []
    for batch in itertools.islice(trainer.loader, steps):
        with count_host_reads() as reads:
            trainer.run_step(batch)
        counts.append(sum(reads.values()))
    return counts


def test_a_fused_step_reads_back_only_at_log_steps(sysu_root, tmp_path):
    trainer = make_trainer(sysu_root, tmp_path / "a", "train.fused_optimizer=on", "train.log_every=4")
    assert trainer.defer_sync
    counts = reads_per_step(trainer, 6)
    assert [c > 0 for c in counts] == [True, False, False, True, False, False]  # log steps 1 and 4
    assert counts[0] == counts[3] == 1  # one copy back for everything pending


def test_the_default_cpu_step_reads_back_every_step(sysu_root, tmp_path):
    """The counter sees the per-step reads of the unfused path (so the test above can fail)."""
    trainer = make_trainer(sysu_root, tmp_path / "b", "train.log_every=4")
    assert not trainer.fused and not trainer.defer_sync
    assert all(c > 0 for c in reads_per_step(trainer, 3))


class Poisoned(torch.nn.Module):
    """The criterion, with the total made NaN at the given (1-based) calls."""

    def __init__(self, inner: torch.nn.Module, bad: set[int]) -> None:
        super().__init__()
        self.inner, self.bad, self.calls = inner, bad, 0

    def forward(self, out, labels, modality):
        terms = self.inner(out, labels, modality)
        self.calls += 1
        return {**terms, "total": terms["total"] * float("nan")} if self.calls in self.bad else terms


def run_logged(trainer, steps: int) -> list[dict]:
    trainer.model.train()
    trainer.loader.batch_sampler.set_epoch(0)
    for batch in itertools.islice(trainer.loader, steps):
        trainer.run_step(batch)
    trainer.read_back()
    trainer.metrics.flush()
    return [json.loads(line) for line in (trainer.run_dir / "metrics.jsonl").read_text().splitlines()]


def test_reading_back_at_log_steps_logs_what_reading_back_every_step_logs(sysu_root, tmp_path, caplog):
    """Same fused optimizer, two bookkeepings: identical metrics.jsonl and skip warnings, with two
    non-finite steps (2 and 3) between finite ones."""
    logs, warnings = [], []
    for defer in (True, False):
        trainer = make_trainer(sysu_root, tmp_path / str(defer), "train.fused_optimizer=on", "train.log_every=2")
        trainer.defer_sync = defer
        trainer.criterion = Poisoned(trainer.criterion, {2, 3})
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="cmssft"):
            logs.append(run_logged(trainer, 5))
        warnings.append([r.getMessage() for r in caplog.records if "non-finite" in r.getMessage()])
    assert logs[0] == logs[1]
    assert warnings[0] == warnings[1] == [f"step {s}: non-finite loss (total); step skipped" for s in (2, 3)]
    assert [r["step"] for r in logs[0] if "loss/total" in r] == [1, 4]
    assert [r["train/skipped_steps"] for r in logs[0] if "train/skipped_steps" in r] == [1, 2]


def test_a_skipped_step_changes_no_weight_and_no_optimizer_state(sysu_root, tmp_path):
    trainer = make_trainer(sysu_root, tmp_path, "train.fused_optimizer=on", "train.log_every=100")
    trainer.criterion = Poisoned(trainer.criterion, {2})
    trainer.model.train()
    trainer.loader.batch_sampler.set_epoch(0)
    batches = iter(trainer.loader)
    trainer.run_step(next(batches))
    weights = {k: v.clone() for k, v in trainer.model.state_dict().items() if v.dtype.is_floating_point}
    moments = [s["exp_avg"].clone() for s in trainer.optimizer.state.values()]
    steps = [int(s["step"]) for s in trainer.optimizer.state.values()]
    trainer.run_step(next(batches))
    assert isinstance(trainer.pending[-1], PendingStep) and len(trainer.pending) == 1  # not read back yet
    after = trainer.model.state_dict()
    changed = [k for k, v in weights.items() if not torch.equal(v, after[k]) and "running" not in k]
    assert changed == []  # batch-norm running statistics move in the forward pass, as on the CPU path
    assert [int(s["step"]) for s in trainer.optimizer.state.values()] == steps
    assert all(torch.equal(m, s["exp_avg"]) for m, s in zip(moments, trainer.optimizer.state.values(), strict=True))
    trainer.read_back()
    assert trainer.bad_steps == 1


def test_ten_non_finite_steps_in_a_row_stop_at_the_next_read_back(sysu_root, tmp_path, caplog):
    trainer = make_trainer(
        sysu_root, tmp_path, "train.fused_optimizer=on", "train.log_every=100", "train.iters_per_epoch=12"
    )
    trainer.criterion = Poisoned(trainer.criterion, set(range(2, 14)))
    with caplog.at_level(logging.WARNING, logger="cmssft"), pytest.raises(TrainingDiverged, match="10 steps"):
        trainer.fit()  # steps 2..11 are non-finite; nothing reads back before the epoch's end
    skipped = [r.getMessage() for r in caplog.records if "non-finite loss" in r.getMessage()]
    assert len(skipped) == 10 and skipped[-1].startswith("step 11:")


def test_fused_sgd_survives_a_skipped_first_step():
    """torch's fused SGD allocates an uninitialised momentum buffer even on a skipped step; ours
    start at zero, so skipping the first step and then stepping equals stepping once."""
    from cmssft.config import TrainConfig

    cfg = TrainConfig(optimizer="sgd", lr=0.1, momentum=0.9, weight_decay=0.0)
    results = []
    for skip_first in (False, True):
        torch.manual_seed(0)
        model = torch.nn.Linear(64, 64)
        optimizer = build_optimizer(model, cfg, fused=True)
        if skip_first:
            model.weight.grad, model.bias.grad = torch.full_like(model.weight, float("nan")), torch.ones(64)
            optimizer.found_inf = torch.ones(())
            optimizer.step()
            del optimizer.found_inf
        model.weight.grad, model.bias.grad = torch.ones_like(model.weight), torch.ones(64)
        optimizer.step()
        results.append(model.weight.detach().clone())
    assert torch.equal(results[0], results[1])


def test_a_resumed_optimizer_keeps_this_runs_kernels():
    from cmssft.config import TrainConfig

    model = torch.nn.Linear(4, 4)
    plain = build_optimizer(model, TrainConfig(optimizer="adam"), fused=False)
    fused = build_optimizer(model, TrainConfig(optimizer="adam"), fused=True)
    fused.load_state_dict(plain.state_dict())  # a checkpoint written by a CPU run, resumed on CUDA
    assert not any(g["fused"] for g in fused.param_groups)  # what torch does on its own
    set_fused(fused, True)
    assert all(g["fused"] for g in fused.param_groups)


def test_a_device_batch_is_used_as_it_is(sysu_root, tmp_path):
    """What benchmarks call the model's ceiling: the step on tensors already on the device."""
    trainer = make_trainer(sysu_root, tmp_path, "data.augment_on=device")
    trainer.loader.batch_sampler.set_epoch(0)
    batch = next(iter(trainer.loader))
    assert batch["image"].dtype == torch.uint8 and batch["image"].shape[1:] == (64, 32, 3)
    ready = trainer.to_device(batch)
    assert ready.images.dtype == torch.float32 and ready.images.shape[1:] == (3, 64, 32)
    terms, _ = trainer.train_step(DeviceBatch(*ready))
    assert terms is not None and torch.isfinite(torch.tensor(terms["total"]))


def test_training_with_device_augmentation_runs_end_to_end(sysu_root, tmp_path):
    """train.py with both CUDA defaults on the CPU: device augmentation and the fused, read-back-free step."""
    run_dir = tmp_path / "run"
    args = [
        "--run-dir",
        str(run_dir),
        f"data.root={sysu_root}",
        *TINY_CHECKPOINT_RUN,
        "data.augment_on=device",
        "train.fused_optimizer=on",
        "train.iters_per_epoch=3",
        "train.log_every=2",
        "eval.trials=1",
    ]
    assert train_main(args) == 0
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss/total" in r] == [1, 2]
    assert all(torch.isfinite(torch.tensor(r["loss/total"])) for r in records if "loss/total" in r)
    assert (run_dir / "last.pth").is_file() and "test/rank1" in records[-1]


def test_device_augmentation_seeds_depend_on_the_step_only(sysu_root, tmp_path):
    """A resumed run augments step s as an uninterrupted run does."""
    trainer = make_trainer(sysu_root, tmp_path, "data.augment_on=device")
    seeds = []
    for step in (0, 1, 0):
        trainer.state.step = step
        seeds.append(trainer.augment_seed())
    assert seeds[0] == seeds[2] != seeds[1]


@dataclass(frozen=True)
class _TwoProcessesOfOne(DistContext):
    """What the trainer sees of a 2-process launch, in one process: every reduction returns this process's value."""

    def _reduce(self, tensor: torch.Tensor, op: object) -> torch.Tensor:
        return tensor

    def barrier(self) -> None:
        pass


@pytest.mark.parametrize("world_size, checks", [(1, 7), (2, 1)])
def test_a_launch_looks_for_stop_signals_only_at_log_steps(sysu_root, tmp_path, monkeypatch, world_size, checks):
    """Under torchrun the signal check is an all-reduce read back to the host: only at log steps (here
    step 4 of 8; step 8 is the epoch's end), while one process checks its own flag after every step."""
    trainer = make_trainer(sysu_root, tmp_path, "train.log_every=4")
    trainer.dist = _TwoProcessesOfOne(world_size=world_size)
    steps_checked = []
    monkeypatch.setattr(trainer, "stop_if_signalled", lambda: steps_checked.append(trainer.state.step))
    trainer.loader.batch_sampler.set_epoch(0)
    trainer.train_epoch(tqdm(disable=True))
    assert len(steps_checked) == checks and (world_size == 1 or steps_checked == [4])


def test_a_signal_under_a_launch_stops_at_the_next_log_step(sysu_root, tmp_path):
    trainer = make_trainer(sysu_root, tmp_path, "train.log_every=4")
    trainer.dist = _TwoProcessesOfOne(world_size=2)
    trainer.signals.signum = signal.SIGTERM  # as if it arrived before the first step
    with pytest.raises(TrainingInterrupted):
        trainer.train_epoch(tqdm(disable=True))
    assert trainer.state.step == 4 and (tmp_path / "last.pth").is_file()
