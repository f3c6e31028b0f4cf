"""Checkpoints that survive a crash at any moment and never run code when read.

A checkpoint is written to a temporary file in the same folder (created with the
permissions the umask allows, like any other file of the run), flushed to disk
and renamed over the old one, so the previous checkpoint stays loadable until
the new one is complete.

Checkpoints hold only tensors and plain Python values (dicts, lists, tuples,
numbers, strings, None) and are read with ``torch.load(weights_only=True)``: a
crafted pickle is refused before any of its code runs. Two kinds exist:

- ``last.pth`` (:data:`RESUME_KEYS`): everything a run needs to continue;
- ``best.pth`` (:data:`EVAL_KEYS` plus ``train_state``): the weights and what
  rebuilding the model needs, no optimizer state.

:class:`CheckpointSchedule` says when ``last.pth`` is due during training, and
:func:`remove_stale_temporaries` clears what a kill left of an unfinished write.
"""

from __future__ import annotations

import logging
import os
import pickle
import time
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from cmssft.errors import UserError
from cmssft.models.candidate_memory import memory_state_keys

LAST = "last.pth"
BEST = "best.pth"
EVAL_KEYS = ("model", "config", "num_classes")  # what evaluation and export need
RESUME_KEYS = (*EVAL_KEYS, "optimizer", "scheduler", "scaler", "train_state", "rng")  # what --resume needs
TEMPORARY_GLOB = ".*.pth.*.tmp"  # what save_atomic writes before its rename
LOG = logging.getLogger("cmssft")


class CheckpointWriteError(UserError):
    """A checkpoint could not be written (disk full, permissions); the previous one is untouched."""


def save_atomic(state: dict[str, Any], path: str | Path) -> None:
    path = Path(path)
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex[:12]}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies, as for open()
    try:
        with os.fdopen(fd, "wb") as handle:
            _save_reporting_write_errors(state, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def write_checkpoint(state: dict[str, Any], path: Path) -> None:
    """:func:`save_atomic`, with a failed write (disk full, permissions) as a :class:`CheckpointWriteError`
    that says the previous checkpoint is intact and how to go on."""
    try:
        save_atomic(state, path)
    except OSError as err:
        message = (
            f"could not write {path} ({err.strerror or err}); the previous checkpoint is intact: "
            "free space or fix permissions, then run again with --resume"
        )
        LOG.error("%s", message)
        raise CheckpointWriteError(message) from err


def remove_stale_temporaries(folder: Path) -> None:
    """Temporary files of writes that a kill interrupted; the finished checkpoints never need them."""
    for stale in folder.glob(TEMPORARY_GLOB):
        LOG.info("removing %s, left by an interrupted checkpoint write", stale.name)
        stale.unlink(missing_ok=True)


@dataclass
class CheckpointSchedule:
    """When ``last.pth`` is due: ``minutes`` of wall clock or ``steps`` optimizer steps since the previous
    one (``train.checkpoint_minutes`` / ``train.checkpoint_steps``; 0 turns a rule off)."""

    minutes: float
    steps: int
    saved_clock: float = field(default_factory=time.monotonic)
    saved_step: int = 0

    def mark(self, step: int) -> None:
        """``last.pth`` was written (or training starts) now, at ``step``."""
        self.saved_clock, self.saved_step = time.monotonic(), step

    def due(self, step: int) -> bool:
        return (self.steps > 0 and step - self.saved_step >= self.steps) or (
            self.minutes > 0 and time.monotonic() - self.saved_clock >= 60.0 * self.minutes
        )


class _WriteErrorRecorder:
    """A file handle that remembers the first OSError its ``write`` raised."""

    def __init__(self, handle: Any) -> None:
        self.handle = handle
        self.error: OSError | None = None

    def write(self, data: bytes) -> int:
        try:
            return self.handle.write(data)
        except OSError as err:
            self.error = self.error or err
            raise

    def flush(self) -> None:
        self.handle.flush()

    def fileno(self) -> int:
        return self.handle.fileno()


def _save_reporting_write_errors(state: dict[str, Any], handle: Any) -> None:
    """``torch.save``, but a failed write stays the OSError it was (ENOSPC, EIO, EDQUOT).

    torch's zip writer turns an exception from ``write`` into a RuntimeError that no longer says why
    ("unexpected pos ..."), so a full disk would look like a bug and skip the caller's advice.
    """
    recorder = _WriteErrorRecorder(handle)
    try:
        torch.save(state, recorder)
    except RuntimeError as err:
        if recorder.error is None:
            raise
        raise recorder.error from err


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def load_checkpoint(
    path: str | Path, map_location: str | torch.device = "cpu", need: tuple[str, ...] = EVAL_KEYS
) -> dict[str, Any]:
    """Read a checkpoint without executing anything in it; ``need``: the entries the caller uses.

    Anything but a readable cmssft checkpoint holding ``need`` is a one-line :class:`UserError`.
    """
    path = Path(path)
    if path.is_dir():
        raise UserError(f"checkpoint {path} is a directory; give the checkpoint file in it (e.g. {path / 'best.pth'})")
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist")
    try:
        with warnings.catch_warnings():  # a foreign pickle protocol warns before it is refused
            warnings.simplefilter("ignore", UserWarning)
            state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        reason = unpickling_reason(str(err))
        if "global" in reason.lower():  # a reference to a function or class: what a crafted pickle calls
            raise UserError(
                f"checkpoint {path} was refused and nothing in it was run: it names a Python object, not only "
                f"tensors and plain values ({reason}); cmssft checkpoints never do"
            ) from None
        raise UserError(f"checkpoint {path} cannot be read (not a file written by torch.save: {reason})") from None
    except Exception as err:  # noqa: BLE001 - a truncated or foreign file fails in many ways
        first = (str(err).splitlines() or [""])[0].split(". ")[0]
        raise UserError(f"checkpoint {path} cannot be read ({type(err).__name__}: {first[:200]})") from None
    if not isinstance(state, dict):
        raise UserError(f"{path} is not a cmssft checkpoint (it holds a {type(state).__name__}, not a dict)")
    missing = [key for key in need if key not in state]
    if missing:
        raise UserError(
            f"{path} is not a cmssft checkpoint of the kind needed here: it lacks {', '.join(map(repr, missing))} "
            f"(train.py writes {', '.join(need)})"
        )
    return state


def unpickling_reason(message: str) -> str:
    """The one informative line of torch's weights-only refusal (which spans a dozen lines)."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    for line in lines:
        if "unsupported" in line.lower():
            return line[:200]
    return (lines[0] if lines else "unreadable")[:200]


def load_model_state(model: torch.nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """Load weights, naming the keys that differ when the architecture does not match. A candidate
    memory the checkpoint lacks (written before it existed, or with ``model.sstn.memory=0``) starts empty."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state_dict) - memory_state_keys(model))
    unexpected = sorted(set(state_dict) - set(own))
    mismatched = sorted(k for k in set(own) & set(state_dict) if own[k].shape != state_dict[k].shape)
    if missing or unexpected or mismatched:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape differs", mismatched)):
            if keys:
                shown = ", ".join(keys[:3]) + (f" (+{len(keys) - 3} more)" if len(keys) > 3 else "")
                parts.append(f"{label}: {shown}")
        raise UserError(f"{source} does not match this model's architecture/config; " + "; ".join(parts))
    model.load_state_dict(state_dict, strict=False)  # everything but an absent memory was checked above
