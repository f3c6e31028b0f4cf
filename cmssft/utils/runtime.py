"""Seeds, RNG state and device selection."""

from __future__ import annotations

import os
import random

import numpy as np
import torch

from cmssft.errors import UserError


def seed_everything(seed: int, deterministic: bool = False, device: torch.device | None = None) -> None:
    """Seed Python, NumPy and torch, and choose the kernels (:func:`choose_kernels`) for ``device``."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    choose_kernels(device or torch.device("cpu"), deterministic)


def choose_kernels(device: torch.device, deterministic: bool) -> None:
    """``deterministic``: forbid nondeterministic kernels. Otherwise, on CUDA, let cuDNN time its convolution
    algorithms once per input shape and keep the fastest: training batches all have one size, so the
    search is paid once (evaluation's last, smaller batch adds one more)."""
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True


def rng_state() -> dict:
    """Every generator's state in tensors and plain values, so a checkpoint loads with ``weights_only``."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.int64).astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when present; asking for CUDA without it is a user error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("train.device=cuda but no CUDA device is available (use train.device=cpu)")
    return torch.device(name)
