"""Torch datasets and data loaders over :class:`Sample` lists.

A loaded item is a dict: ``image`` float [3, H, W] (training items with
``data.augment_on=device``: uint8 [H, W, 3], resized, not augmented), ``label``,
``pid``, ``camid``, ``modality`` (ints) and ``index`` (position in the sample
list); collated batches carry the same keys with a leading batch dimension. Training
items are fetched by ``(index, seed)`` keys so that each augmentation is fixed
by its seed (see :class:`KeyedBatchSampler`); with ``data.channel_aug_joint`` the keys
are ``(index, seed, view)`` and the items also carry ``view`` (1: the channel-exchanged
second copy of an RGB image, 0 otherwise).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from cmssft.config import Config
from cmssft.data.bad_images import guard_training_reader
from cmssft.data.records import Modality, Sample
from cmssft.data.sampler import CrossModalityIdentitySampler, KeyedBatchSampler, default_num_batches
from cmssft.data.transforms import build_eval_transform, build_train_transform, read_image

Transform = Callable[[np.ndarray, Modality, torch.Generator | None], torch.Tensor]
# Pixels of sample ``index``: uint8 [H, W, 3] (IR replicated to 3 channels), any size.
ImageReader = Callable[[int], np.ndarray]


class DiskReader:
    """Decodes the image file of a sample on every call."""

    def __init__(self, samples: Sequence[Sample]) -> None:
        self.samples = list(samples)

    def __call__(self, index: int) -> np.ndarray:
        sample = self.samples[index]
        return read_image(sample.path, sample.modality)


class ImageDataset(Dataset):
    """Reads (through ``reader``: disk, cache, bad-image policy) and transforms one sample at a time."""

    def __init__(self, samples: Sequence[Sample], transform: Transform, reader: ImageReader | None = None) -> None:
        self.samples = list(samples)
        self.transform = transform
        self.reader = reader or DiskReader(self.samples)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: int | tuple[int, int] | tuple[int, int, int]) -> dict:
        index, seed, view = _split_key(key)
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        sample = self.samples[index]
        image = self.reader(index)
        if view is None:
            image = self.transform(image, sample.modality, generator)
        else:
            image = self.transform(image, sample.modality, generator, view=view)
        item = {
            "image": image,
            "label": sample.label,
            "pid": sample.pid,
            "camid": sample.camid,
            "modality": int(sample.modality),
            "index": index,
        }
        if view is not None:
            item["view"] = view
        return item


def _split_key(key: int | tuple[int, ...]) -> tuple[int, int | None, int | None]:
    """``index``, ``(index, seed)`` or ``(index, seed, view)`` -> (index, seed or None, view or None)."""
    if not isinstance(key, tuple):
        return key, None, None
    return key[0], key[1], key[2] if len(key) > 2 else None


def build_base_reader(cfg: Config, samples: Sequence[Sample], *, progress: bool = True) -> ImageReader:
    """Where pixels come from: the image cache (``data.cache``; built on first use) or the disk.

    Policies such as skipping bad images wrap this reader, whichever it is.
    """
    if not cfg.data.cache:
        return DiskReader(samples)
    from cmssft.data.cache import CacheReader, build_cache

    directory = cfg.data.cache_dir or Path(cfg.output_dir) / "cache"
    cache = build_cache(samples, cfg.data.height, cfg.data.width, directory, progress=progress)
    return CacheReader(cache, samples)


def _loader_options(cfg: Config, device_is_cuda: bool) -> dict:
    workers = cfg.data.num_workers
    options = {
        "num_workers": workers,
        "pin_memory": cfg.data.pin_memory and device_is_cuda,
        "persistent_workers": cfg.data.persistent_workers and workers > 0,
    }
    if workers > 0:
        options["prefetch_factor"] = cfg.data.prefetch_factor
    return options


def build_train_loader(
    cfg: Config,
    samples: Sequence[Sample],
    *,
    device_is_cuda: bool = False,
    rank: int = 0,
    world_size: int = 1,
) -> DataLoader:
    """P x K cross-modality batches; call ``loader.batch_sampler.set_epoch(e)`` before each epoch."""
    num_batches = cfg.train.iters_per_epoch or default_num_batches(
        samples, cfg.data.ids_per_batch, cfg.data.images_per_id
    )
    sampler = CrossModalityIdentitySampler(
        samples,
        cfg.data.ids_per_batch,
        cfg.data.images_per_id,
        num_batches,
        seed=cfg.seed,
        rank=rank,
        world_size=world_size,
        joint=cfg.data.channel_aug_joint,
    )
    base_reader = build_base_reader(cfg, samples)  # the image cache or the disk
    reader = guard_training_reader(samples, base_reader, cfg.data.bad_images)  # data.bad_images=stop fails here
    return DataLoader(
        ImageDataset(samples, build_train_transform(cfg.data), reader),
        batch_sampler=KeyedBatchSampler(sampler),
        **_loader_options(cfg, device_is_cuda),
    )


def build_test_loader(cfg: Config, samples: Sequence[Sample], *, device_is_cuda: bool = False) -> DataLoader:
    """Samples in their given order, unaugmented (through the image cache when enabled: repeated
    evaluations then decode nothing)."""
    return DataLoader(
        ImageDataset(samples, build_eval_transform(cfg.data), reader=build_base_reader(cfg, samples)),
        batch_size=cfg.eval.batch_size,
        shuffle=False,
        **_loader_options(cfg, device_is_cuda),
    )
