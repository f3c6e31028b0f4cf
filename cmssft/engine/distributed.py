"""Process group of a ``torchrun`` launch: which process this is, and the few collectives training needs.

``torchrun`` tells each process who it is through ``RANK``, ``WORLD_SIZE`` and
``LOCAL_RANK``; without them (a plain ``python train.py``) there is one process,
rank 0 of 1, and every collective below is the identity. The context holds no
state of its own besides what :mod:`torch.distributed` keeps.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from cmssft.errors import UserError

LOG = logging.getLogger("cmssft")
T = TypeVar("T")
# Rank 0 evaluates and writes checkpoints while the others wait at a barrier: allow a long evaluation.
TIMEOUT = timedelta(minutes=60)


@dataclass(frozen=True)
class DistContext:
    """This process's place in the launch; ``world_size == 1`` means no process group."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0 logs, evaluates and writes files."""
        return self.rank == 0

    def device(self, device: torch.device) -> torch.device:
        """The device of this process: ``cuda:LOCAL_RANK`` for a CUDA run, else ``device``."""
        if device.type == "cuda" and self.enabled:
            return torch.device("cuda", self.local_rank)
        return device

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def all_gather(self, tensor: torch.Tensor) -> tuple[torch.Tensor, int]:
        """``[B, ...]`` of every process concatenated in rank order ``[W*B, ...]``, and where this
        process's rows start; gradients flow back to each process's own rows (summed over processes)."""
        if not self.enabled:
            return tensor, 0
        return _gather_rows(tensor), self.rank * tensor.shape[0]

    def any(self, flag: bool) -> bool:
        """True on every process when it is true on one of them."""
        return self.max(int(flag)) > 0

    def any_on_device(self, flag: torch.Tensor) -> torch.Tensor:
        """A bool scalar or-ed over processes, as float 0/1 on ``flag``'s device; no host sync
        (the all-reduce is queued on the device with NCCL)."""
        value = flag.reshape(1).float()
        if self.enabled:
            moved = value.to(self._comm_device())
            dist.all_reduce(moved, op=dist.ReduceOp.MAX)
            value = moved.to(flag.device)
        return value.reshape(())

    def max(self, value: int) -> int:
        """The largest ``value`` over processes (e.g. a signal number, 0 for none)."""
        return int(self._reduce(torch.tensor([float(value)], dtype=torch.float64), dist.ReduceOp.MAX)[0])

    def min(self, value: int) -> int:
        return int(self._reduce(torch.tensor([float(value)], dtype=torch.float64), dist.ReduceOp.MIN)[0])

    def mean(self, values: Mapping[str, float]) -> dict[str, float]:
        """Each value averaged over processes (the keys must be the same on every process)."""
        if not self.enabled or not values:
            return dict(values)
        keys = sorted(values)
        total = self._reduce(torch.tensor([values[k] for k in keys], dtype=torch.float64), dist.ReduceOp.SUM)
        return {k: float(v) / self.world_size for k, v in zip(keys, total.tolist(), strict=True)}

    def broadcast(self, obj: T) -> T:
        """Rank 0's ``obj`` on every process (any picklable object)."""
        if not self.enabled:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0, device=self._comm_device())
        return box[0]

    def from_main(self, fn: Callable[[], T]) -> T:
        """``fn()`` computed on rank 0 only and handed to every process (e.g. the run directory).

        A failure on rank 0 is raised there and becomes a :class:`UserError` on the others, so no
        process waits forever.
        """
        if not self.enabled:
            return fn()
        if self.is_main:
            try:
                result = fn()
            except BaseException as err:
                self.broadcast((False, f"{type(err).__name__}: {err}"))
                raise
            return self.broadcast((True, result))[1]
        ok, payload = self.broadcast(None)
        if not ok:
            raise UserError(f"rank 0 failed: {payload}")
        return payload

    def main_first(self, fn: Callable[[], T]) -> T:
        """``fn()`` on rank 0, then on the others (e.g. rank 0 generates missing data, then all read it)."""
        kept: list[T] = []
        self.from_main(lambda: kept.append(fn()))  # only rank 0 runs this; the others wait for its success
        return kept[0] if kept else fn()

    def _reduce(self, tensor: torch.Tensor, op: dist.ReduceOp) -> torch.Tensor:
        if not self.enabled:
            return tensor
        moved = tensor.to(self._comm_device())
        dist.all_reduce(moved, op=op)
        return moved.cpu()

    def _comm_device(self) -> torch.device:
        """NCCL only moves CUDA tensors; gloo CPU ones."""
        if dist.get_backend() == dist.Backend.NCCL:
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")


class _GatherRows(torch.autograd.Function):
    """All-gather along dim 0 whose backward hands each process the summed gradient of its rows.

    The sum is what DDP's gradient averaging expects: process r's loss depends on every
    process's rows, so the gradient of the mean loss reaches rows of process s from all r.
    """

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.contiguous()
        parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, tensor)
        ctx.rows = tensor.shape[0]
        return torch.cat(parts)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad)
        start = dist.get_rank() * ctx.rows
        return grad[start : start + ctx.rows]


def _gather_rows(tensor: torch.Tensor) -> torch.Tensor:
    """All ranks' rows, kept out of ``torch.compile`` graphs (imported lazily: it is slow to import)."""
    return _uncompiled(_gather_rows_eager)(tensor)


@functools.cache
def _uncompiled(fn: Callable[..., Any]) -> Callable[..., Any]:
    import torch.compiler

    return torch.compiler.disable(fn)


def _gather_rows_eager(tensor: torch.Tensor) -> torch.Tensor:
    if tensor.requires_grad:
        return _GatherRows.apply(tensor)
    parts = [torch.empty_like(tensor.contiguous()) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


def context_from_env(env: Mapping[str, str] | None = None) -> DistContext:
    """Read ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` (set by ``torchrun``); none of them: one process."""
    env = os.environ if env is None else env
    try:
        world_size = int(env.get("WORLD_SIZE", "1"))
        rank = int(env.get("RANK", "0"))
        local_rank = int(env.get("LOCAL_RANK", str(rank)))
    except ValueError as err:
        raise UserError(f"RANK/WORLD_SIZE/LOCAL_RANK must be integers ({err})") from None
    if world_size < 1 or not 0 <= rank < world_size:
        raise UserError(f"RANK={rank} is not a rank of WORLD_SIZE={world_size}")
    return DistContext(rank=rank, world_size=world_size, local_rank=local_rank)


@contextmanager
def process_group(ctx: DistContext, device: torch.device) -> Iterator[DistContext]:
    """Join the launch's process group for the ``with`` block and leave it on exit, also on error.

    NCCL for CUDA (one GPU per process, ``cuda:LOCAL_RANK``), gloo for CPU.
    """
    if not ctx.enabled:
        yield ctx
        return
    if device.type == "cuda":
        if ctx.local_rank >= torch.cuda.device_count():
            raise UserError(
                f"LOCAL_RANK={ctx.local_rank} but only {torch.cuda.device_count()} CUDA devices are visible; "
                "use --nproc_per_node <= the GPU count"
            )
        torch.cuda.set_device(ctx.local_rank)
    backend = "nccl" if device.type == "cuda" else "gloo"
    options: dict[str, Any] = {"device_id": ctx.device(device)} if backend == "nccl" else {}
    dist.init_process_group(backend, rank=ctx.rank, world_size=ctx.world_size, timeout=TIMEOUT, **options)
    try:
        yield ctx
    finally:
        dist.destroy_process_group()
