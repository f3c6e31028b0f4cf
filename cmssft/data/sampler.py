"""Cross-modality identity sampler: P identities x (K RGB + K IR images) per batch.

Batches are drawn from one global, seeded sequence per epoch, so ``world_size``
processes can each take every ``world_size``-th batch and still see whole
P x K groups.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence

import numpy as np

from cmssft.data.records import Modality, Sample
from cmssft.errors import DatasetError


class KeyedBatchSampler:
    """Adapter for ``DataLoader(batch_sampler=...)`` that hands out ``(index, seed)`` keys."""

    def __init__(self, sampler: CrossModalityIdentitySampler) -> None:
        self.sampler = sampler
        self.skip = 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        """Select the epoch's draw; ``skip`` drops this process's first batches (resume mid-epoch)."""
        self.sampler.set_epoch(epoch)
        self.skip = skip

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[list[tuple[int, int]] | list[tuple[int, int, int]]]:
        return itertools.islice(self.sampler.keyed_batches(), self.skip, None)


class CrossModalityIdentitySampler:
    """Yields lists of dataset indices, RGB block first: ``[P*K RGB, P*K IR]``.

    Identities are drawn without replacement within a batch; images of an
    identity without replacement when it has at least K of that modality, with
    replacement otherwise. Only identities with images in both modalities are
    used. ``joint`` (CAJ's joint learning, ``data.channel_aug_joint``) repeats the
    RGB block: ``[P*K RGB, the same P*K RGB, P*K IR]``, the repeat being the
    channel-exchanged copies (view 1 in :meth:`keyed_batches`); it draws the same
    identities and images as without.
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        ids_per_batch: int,
        images_per_id: int,
        num_batches: int,
        *,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        joint: bool = False,
    ) -> None:
        if ids_per_batch < 1 or images_per_id < 1 or num_batches < 1:
            raise DatasetError("sampler needs ids_per_batch, images_per_id and num_batches >= 1")
        self.rgb_by_label, self.ir_by_label = _index_by_label(samples)
        self.labels = np.array(sorted(set(self.rgb_by_label) & set(self.ir_by_label)))
        if len(self.labels) < ids_per_batch:
            raise DatasetError(
                f"only {len(self.labels)} identities have both RGB and IR training images; "
                f"data.ids_per_batch={ids_per_batch} needs at least that many"
            )
        self.p, self.k = ids_per_batch, images_per_id
        self.num_batches, self.seed = num_batches, seed
        self.rank, self.world_size = rank, world_size
        self.joint = joint
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Change the draw from epoch to epoch, reproducibly."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(range(self.rank, self.num_batches, self.world_size))

    def __iter__(self) -> Iterator[list[int]]:
        for _, batch in self._own_batches():
            yield batch

    def keyed_batches(self) -> Iterator[list[tuple[int, int]] | list[tuple[int, int, int]]]:
        """Like iteration, but each index comes with a seed for its augmentation (and, when ``joint``,
        its view: 1 for the repeated RGB block, 0 otherwise).

        The seed depends on (seed, epoch, global batch number, position) only, so
        augmentations are the same whatever the worker count or resume point; the two
        copies of a joint pair sit at different positions, so they are augmented apart.
        """
        for b, batch in self._own_batches():
            seeds = np.random.SeedSequence([self.seed, self.epoch, b]).generate_state(len(batch), np.uint64)
            keys = [(index, int(s) >> 1) for index, s in zip(batch, seeds, strict=True)]
            if self.joint:
                block = self.p * self.k
                views = [0] * block + [1] * block + [0] * (len(batch) - 2 * block)
                keys = [(index, seed, view) for (index, seed), view in zip(keys, views, strict=True)]
            yield keys

    def _own_batches(self) -> Iterator[tuple[int, list[int]]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        for b in range(self.num_batches):
            batch = self._draw(rng)
            if b % self.world_size == self.rank:
                yield b, batch

    def _draw(self, rng: np.random.Generator) -> list[int]:
        chosen = rng.choice(self.labels, size=self.p, replace=False)
        rgb = [i for label in chosen for i in _pick(rng, self.rgb_by_label[label], self.k)]
        ir = [i for label in chosen for i in _pick(rng, self.ir_by_label[label], self.k)]
        return rgb + rgb + ir if self.joint else rgb + ir


def _index_by_label(samples: Sequence[Sample]) -> tuple[dict[int, list[int]], dict[int, list[int]]]:
    rgb: dict[int, list[int]] = {}
    ir: dict[int, list[int]] = {}
    for index, sample in enumerate(samples):
        if sample.label < 0:
            raise DatasetError(f"training sample {sample.path} has no label")
        target = rgb if sample.modality == Modality.RGB else ir
        target.setdefault(sample.label, []).append(index)
    return rgb, ir


def _pick(rng: np.random.Generator, indices: list[int], k: int) -> list[int]:
    return rng.choice(indices, size=k, replace=len(indices) < k).tolist()


def default_num_batches(samples: Sequence[Sample], ids_per_batch: int, images_per_id: int) -> int:
    """One epoch = one pass over the RGB training images, as the community counts it."""
    rgb = sum(s.modality == Modality.RGB for s in samples)
    return max(1, rgb // (ids_per_batch * images_per_id))
