"""Command-line entry of train.py (kept in the package so it can be tested and reused)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch

from cmssft.config import Config, load_config
from cmssft.engine.checkpoint import LAST, RESUME_KEYS, load_checkpoint
from cmssft.engine.distributed import DistContext, context_from_env, process_group
from cmssft.engine.run_dir import make_run_dir, setup_logging, write_run_config
from cmssft.engine.signals import TrainingInterrupted
from cmssft.errors import UserError
from cmssft.utils.runtime import resolve_device, seed_everything

LOG = logging.getLogger("cmssft")


def parse_train_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="train.py",
        description="Train cm-SSFT. Settings come from --config and key=value overrides (e.g. train.lr=3e-4).",
    )
    parser.add_argument("--config", help="YAML config (may name one _base_)")
    parser.add_argument("--resume", action="store_true", help="continue from last.pth of the run directory")
    parser.add_argument("--run-dir", help="run directory (default: <output_dir>/<config>-<time>)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of user errors")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    return parser.parse_intermixed_args(argv)


def find_resume_dir(cfg: Config, config_path: str | None, run_dir: str | None) -> Path:
    """The run to resume: the one named (``--run-dir``, ``run_name``, or the run whose own
    ``config.yaml`` is ``--config``), else the newest run of this config holding last.pth."""
    if run_dir:
        path = Path(run_dir)
    elif config_path and (Path(config_path).parent / LAST).is_file():
        path = Path(config_path).parent  # --config runs/<run>/config.yaml: that run
    elif cfg.run_name:
        path = Path(cfg.output_dir) / cfg.run_name
    else:
        stem = Path(config_path).stem if config_path else "default"
        runs = sorted(Path(cfg.output_dir).glob(f"{stem}-*/{LAST}"), key=lambda p: p.stat().st_mtime)
        if not runs:
            raise UserError(f"--resume: no {stem}-*/{LAST} under {cfg.output_dir}; name the run with --run-dir")
        path = runs[-1].parent
    if not (path / LAST).is_file():
        raise UserError(f"--resume: {path / LAST} does not exist")
    return path


def resolve_run(args: argparse.Namespace) -> tuple[Config, Path | None]:
    """The config to train with and, when resuming, the run directory to continue."""
    cfg = load_config(args.config, args.overrides)
    if not args.resume:
        return cfg, None
    run_dir = find_resume_dir(cfg, args.config, args.run_dir)
    # The run keeps the settings it started with; overrides may still change them (e.g. more epochs).
    return load_config(run_dir / "config.yaml", args.overrides), run_dir


def new_run_dir(cfg: Config, args: argparse.Namespace) -> Path:
    if not args.run_dir:
        return make_run_dir(cfg, args.config)
    run_dir = Path(args.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def train_main(argv: list[str] | None = None) -> int:
    """``python train.py ...`` or, one process per GPU, ``torchrun --nproc_per_node=N train.py ...``."""
    args = parse_train_args(argv)
    dist = context_from_env()
    cfg, run_dir = resolve_run(args)
    setup_logging(None, logging.INFO if dist.is_main else logging.ERROR)
    device = dist.device(resolve_device(cfg.train.device))
    with process_group(dist, device):
        return _train(args, cfg, run_dir, device, dist)


def _train(
    args: argparse.Namespace, cfg: Config, run_dir: Path | None, device: torch.device, dist: DistContext
) -> int:
    from cmssft.engine.build import build_trainer, prepare_dataset
    from cmssft.engine.evaluate import ProtocolEvaluation, flat_metrics
    from cmssft.evaluation.report import chance_line

    cfg, run_dir = dist.from_main(lambda: (cfg, run_dir))  # the run rank 0 continues, if any, is everyone's
    dataset = dist.main_first(lambda: prepare_dataset(cfg))  # bad data fails here, before a run directory exists
    run_dir = dist.from_main(lambda: run_dir or new_run_dir(cfg, args))  # rank 0 names it; all write there
    if dist.is_main:
        setup_logging(run_dir)
        write_run_config(cfg, run_dir)
    LOG.info("run directory %s", run_dir)
    LOG.info("%s", dataset.summary())
    seed_everything(cfg.seed, cfg.train.deterministic, device)  # the same seed everywhere: identical weights
    trainer = build_trainer(cfg, dataset, device, run_dir, dist)
    if args.resume:
        trainer.restore(load_checkpoint(run_dir / LAST, map_location=device, need=RESUME_KEYS))
        if trainer.finished:
            LOG.info(
                "%s already finished all %d epochs; nothing to do (add train.epochs=N with N > %d to train longer)",
                run_dir, cfg.train.epochs, cfg.train.epochs,
            )
            return 0
        LOG.info("resumed from %s at epoch %d, step %d", run_dir / LAST, trainer.state.epoch, trainer.state.step)
    try:
        trainer.fit()
    except TrainingInterrupted as stop:
        LOG.warning("%s", stop)
        return stop.exit_code
    for split, evaluation in trainer.evaluators.items():
        if isinstance(evaluation, ProtocolEvaluation) and evaluation.last_summary is not None:
            LOG.info("\n%s", evaluation.table())
            for mode, summary in evaluation.compare(trainer.model, cfg.eval.compare_modes).items():
                LOG.info("\n%s", evaluation.table(summary, mode))
                if trainer.metrics is not None:
                    values = {f"{split}_{mode}/{k}": v for k, v in flat_metrics(summary).items()}
                    trainer.metrics.scalars(values, trainer.state.step, epoch=trainer.state.epoch)
            LOG.info("%s", chance_line(evaluation.protocol))
    LOG.info("finished; checkpoints in %s", run_dir)
    return 0
