"""Run directories: where a run's config, logs, metrics and checkpoints live."""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

from cmssft.config import Config, save_config

LOGGER_NAME = "cmssft"
# ``LOG.info(..., extra=FILE_ONLY)``: a line for log.txt alone (per-step losses), not the console.
FILE_ONLY = {"file_only": True}


def _not_file_only(record: logging.LogRecord) -> bool:
    return not getattr(record, "file_only", False)


def make_run_dir(cfg: Config, config_path: str | None) -> Path:
    """``<output_dir>/<run_name>``; by default ``<config name>-<YYYYmmdd-HHMMSS>``."""
    name = cfg.run_name
    if not name:
        stem = Path(config_path).stem if config_path else "default"
        name = f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir = Path(cfg.output_dir) / name
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def write_run_config(cfg: Config, run_dir: Path) -> None:
    save_config(cfg, run_dir / "config.yaml")


def setup_logging(run_dir: Path | None = None, level: int = logging.INFO) -> logging.Logger:
    """Console and ``run_dir/log.txt``; calling it again replaces the handlers."""
    logger = logging.getLogger(LOGGER_NAME)
    logger.setLevel(level)
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    formatter = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S")
    console = logging.StreamHandler(sys.stdout)
    console.setFormatter(formatter)
    console.addFilter(_not_file_only)
    logger.addHandler(console)
    if run_dir is not None:
        file_handler = logging.FileHandler(run_dir / "log.txt")
        file_handler.setFormatter(formatter)
        logger.addHandler(file_handler)
    logger.propagate = False
    return logger
