"""Earlier batches' samples as extra candidates of the SSTN's training graph.

A training batch of P identities x K images per modality offers each node other-modality candidates
of which about 1 / P are its identity (25 % at the demo's P = 4); a test graph offers 1 / (number of
test identities) (4 % on the demo's 24). A graph trained where a kept neighbour is usually right
meets one at test time where it usually is not. Adding the last ``size`` samples of earlier batches
as candidates (columns that send messages but receive none) makes training graphs look like test
graphs: more candidates, few of them the right identity.

Stored per slot (``size`` slots, a FIFO ring; detached, so no gradient reaches earlier batches):

    shared, specific  [size, C]  BN-neck features as the SSTN received them (``specific`` only with
                                 a specific branch)
    modality, labels  [size]     long; labels only feed the logged graph statistics

All of it is registered as buffers, so a checkpoint resumes with the memory it had. The fill level
and the write position are mirrored in Python integers, so a training step reads nothing back from
the device (on a GPU every read waits for the queued work).
"""

from __future__ import annotations

import torch
from torch import nn


class CandidateMemory(nn.Module):
    """A FIFO ring of the last ``size`` samples the SSTN saw in training."""

    def __init__(self, size: int, dim: int, use_specific: bool) -> None:
        super().__init__()
        if size < 1:
            raise ValueError(f"memory size must be >= 1, got {size}")
        self.size = size
        self.register_buffer("shared", torch.zeros(size, dim))
        self.register_buffer("specific", torch.zeros(size, dim) if use_specific else None)
        self.register_buffer("modality", torch.zeros(size, dtype=torch.long))
        self.register_buffer("labels", torch.full((size,), -1, dtype=torch.long))
        self.register_buffer("filled", torch.zeros((), dtype=torch.long))  # slots holding a sample
        self.register_buffer("cursor", torch.zeros((), dtype=torch.long))  # next slot to overwrite
        self._filled = self._cursor = 0  # host copies of the two buffers above

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args, **kwargs) -> None:
        if not any(key.startswith(prefix) for key in state_dict):  # saved without a memory: start empty
            self.clear()
            return
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._filled, self._cursor = int(self.filled), int(self.cursor)

    def clear(self) -> None:
        """Forget every stored sample (the memory of a run that has not trained yet)."""
        self.filled.zero_()
        self.cursor.zero_()
        self._filled = self._cursor = 0

    def entries(self) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
        """``(shared [F, C], specific [F, C] | None, modality [F], labels [F])`` of the F filled slots."""
        count = self._filled
        specific = None if self.specific is None else self.specific[:count]
        return self.shared[:count], specific, self.modality[:count], self.labels[:count]

    @torch.no_grad()
    def push(
        self, shared: torch.Tensor, specific: torch.Tensor | None, modality: torch.Tensor, labels: torch.Tensor | None
    ) -> None:
        """Store a batch (``[B, C]``, ``[B, C]``, ``[B]``, ``[B]``), overwriting the oldest slots; a batch
        larger than the memory keeps its last ``size`` samples."""
        rows = shared.shape[0]
        start = max(0, rows - self.size)
        slots = (self._cursor + torch.arange(rows - start, device=self.shared.device)) % self.size
        self.shared[slots] = shared[start:].detach().to(self.shared.dtype)
        if self.specific is not None and specific is not None:
            self.specific[slots] = specific[start:].detach().to(self.specific.dtype)
        self.modality[slots] = modality[start:]
        self.labels[slots] = labels[start:] if labels is not None else -1
        self._cursor = (self._cursor + rows - start) % self.size
        self._filled = min(self.size, self._filled + rows - start)
        self.cursor.fill_(self._cursor)
        self.filled.fill_(self._filled)


def memory_state_keys(model: nn.Module) -> set[str]:
    """State-dict keys of every candidate memory inside ``model``: training-only state that checkpoints
    written before the memory existed lack (loading one, the memory simply starts empty)."""
    keys = set()
    for name, module in model.named_modules():
        if isinstance(module, CandidateMemory):
            keys.update(f"{name}.{key}" if name else key for key in module.state_dict())
    return keys
