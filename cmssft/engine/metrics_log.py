"""Scalars and pictures to TensorBoard and ``metrics.jsonl``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from torch.utils.tensorboard import SummaryWriter


class MetricsLogger:
    """One place that every number of a run goes through."""

    def __init__(self, run_dir: Path) -> None:
        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        self.jsonl = (run_dir / "metrics.jsonl").open("a")

    def scalars(self, values: dict[str, float], step: int, *, epoch: int | None = None) -> None:
        """Write ``{tag: value}`` at ``step``; tags use '/' to group curves in TensorBoard."""
        record: dict[str, float | int] = {"step": step}
        if epoch is not None:
            record["epoch"] = epoch
        for tag, value in values.items():
            value = float(value)
            self.writer.add_scalar(tag, value, step)
            record[tag] = value
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()

    def image(self, tag: str, image: np.ndarray, step: int) -> None:
        """``image``: uint8 [H, W, 3]."""
        self.writer.add_image(tag, image, step, dataformats="HWC")

    def flush(self) -> None:
        self.writer.flush()
        self.jsonl.flush()

    def close(self) -> None:
        self.writer.close()
        self.jsonl.close()
