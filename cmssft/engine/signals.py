"""Turn SIGINT/SIGTERM into a request to stop at the next safe point.

The training loop polls :attr:`StopSignals.signum` between steps, saves a
checkpoint and exits; nothing is lost and ``--resume`` continues from there. A
second signal of the same kind gets the default behaviour (e.g. Ctrl-C twice
aborts at once).
"""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType

LOG = logging.getLogger("cmssft")
HANDLED = (signal.SIGINT, signal.SIGTERM)


class TrainingInterrupted(Exception):
    """Raised by the loop after it saved a checkpoint in answer to a signal."""

    def __init__(self, signum: int, checkpoint: str) -> None:
        self.signum = signum
        self.exit_code = 128 + signum
        super().__init__(
            f"stopped by {signal.Signals(signum).name}; checkpoint saved to {checkpoint}; continue with --resume"
        )


class StopSignals:
    """Context manager recording the first SIGINT/SIGTERM instead of dying on it."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in HANDLED:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.signum = signum
        signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))  # a second one acts at once
        LOG.warning("%s received: saving a checkpoint after the current step", signal.Signals(signum).name)
