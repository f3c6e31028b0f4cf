"""Count Python-level reads of tensor values: ``.item()``, ``.tolist()``, ``.numpy()``,
``float(t)``, ``int(t)``, ``bool(t)`` (an ``if`` on a tensor). On CUDA each one waits for every
queued kernel, i.e. a host synchronisation; on the CPU the same count says what *would* wait.

A diagnostic for tests and benchmarks (benchmarks/profile_step.py): :func:`count_host_reads`
patches those methods of ``torch.Tensor`` for the duration of its ``with`` block only. Reads
made inside torch's own C++ (``nonzero``, boolean-mask indexing) are not seen here; on CUDA,
``torch.cuda.set_sync_debug_mode`` reports those.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

READS = ("item", "tolist", "numpy", "__bool__", "__float__", "__int__")


@contextmanager
def count_host_reads(
    where: Callable[[], str | None] = lambda: None, device_type: str | None = None
) -> Iterator[Counter]:
    """Yield a Counter of reads by ``where()`` (e.g. the trainer's current phase; None: "other");
    ``device_type`` (e.g. "cuda"): count reads of tensors on that kind of device only."""
    counts: Counter = Counter()
    originals = {name: getattr(torch.Tensor, name) for name in READS}

    def counted(real: Callable) -> Callable:
        def read(self: torch.Tensor, *args, **kwargs):
            if device_type is None or self.device.type == device_type:
                counts[where() or "other"] += 1
            return real(self, *args, **kwargs)

        return read

    try:
        for name, real in originals.items():
            setattr(torch.Tensor, name, counted(real))
        yield counts
    finally:
        for name, real in originals.items():
            setattr(torch.Tensor, name, real)
