"""The memory-mapped image cache: exact pixels, reuse, invalidation, crash safety, workers, bad images."""

from __future__ import annotations

import dataclasses
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import cmssft.data.cache as cache_module
from cmssft.config import load_config
from cmssft.data.cache import CacheReader, ImageCache, build_cache, cache_path
from cmssft.data.datasets import load_dataset
from cmssft.data.loader import ImageDataset, build_test_loader
from cmssft.data.records import Modality
from cmssft.data.transforms import build_eval_transform, read_image, resize
from cmssft.errors import DatasetError

HEIGHT, WIDTH = 48, 24  # not the stored 64 x 32: the cache resizes


@pytest.fixture()
def samples(sysu_root, tmp_path):
    """Ten training samples (both modalities) whose files are private copies this test may change."""
    train = load_dataset("sysu_mm01", sysu_root).train
    chosen = [s for s in train if s.modality == Modality.RGB][:5] + [s for s in train if s.modality == Modality.IR][:5]
    out = []
    for i, sample in enumerate(chosen):
        path = tmp_path / "images" / f"{i:02d}{Path(sample.path).suffix}"
        path.parent.mkdir(exist_ok=True)
        shutil.copy2(sample.path, path)
        out.append(dataclasses.replace(sample, path=str(path)))
    return out


def count_decodes(monkeypatch) -> list[str]:
    calls: list[str] = []
    real = cache_module.read_image

    def counting(path, modality):
        calls.append(path)
        return real(path, modality)

    monkeypatch.setattr(cache_module, "read_image", counting)
    return calls


def test_cached_pixels_equal_the_resized_decode(samples, tmp_path):
    cache = build_cache(samples, HEIGHT, WIDTH, tmp_path / "cache", progress=False)
    reader = CacheReader(cache, samples)
    for i, sample in enumerate(samples):
        expected = resize(read_image(sample.path, sample.modality), HEIGHT, WIDTH)
        got = reader(i)
        assert got.dtype == np.uint8 and got.shape == (HEIGHT, WIDTH, 3)
        assert np.array_equal(got, expected)


def test_second_build_reuses_the_file_without_decoding(samples, tmp_path, monkeypatch):
    calls = count_decodes(monkeypatch)
    first = build_cache(samples, HEIGHT, WIDTH, tmp_path / "cache", progress=False)
    assert len(calls) == len(samples)
    second = build_cache(samples, HEIGHT, WIDTH, tmp_path / "cache", progress=False)
    assert len(calls) == len(samples)
    assert second.path == first.path
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [first.path.name]  # no temporary left behind
    other_size = build_cache(samples, HEIGHT, WIDTH + 8, tmp_path / "cache", progress=False)
    assert other_size.path != first.path and len(calls) == 2 * len(samples)


def test_a_changed_file_invalidates_the_cache(samples, tmp_path, monkeypatch):
    old = build_cache(samples, HEIGHT, WIDTH, tmp_path / "cache", progress=False)
    stat = os.stat(samples[3].path)
    os.utime(samples[3].path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 5_000_000_000))  # touched
    assert cache_path(samples, HEIGHT, WIDTH, tmp_path / "cache") != old.path
    shutil.copy2(samples[0].path, samples[1].path)  # new content in place of another image
    calls = count_decodes(monkeypatch)
    new = build_cache(samples, HEIGHT, WIDTH, tmp_path / "cache", progress=False)
    assert new.path != old.path and len(calls) == len(samples)
    assert np.array_equal(CacheReader(new, samples)(1), CacheReader(new, samples)(0))


def test_a_build_that_dies_midway_leaves_no_usable_cache(samples, tmp_path, monkeypatch):
    real = cache_module.read_image
    calls = []

    def dies(path, modality):
        calls.append(path)
        if len(calls) == 4:
            raise RuntimeError("killed")
        return real(path, modality)

    monkeypatch.setattr(cache_module, "read_image", dies)
    with pytest.raises(RuntimeError, match="killed"):
        build_cache(samples, HEIGHT, WIDTH, tmp_path / "cache", threads=1, progress=False)
    assert list((tmp_path / "cache").iterdir()) == []  # neither the cache nor its temporary
    monkeypatch.setattr(cache_module, "read_image", real)
    cache = build_cache(samples, HEIGHT, WIDTH, tmp_path / "cache", progress=False)
    assert all(cache.valid(i) for i in range(len(samples)))


def test_a_truncated_file_is_refused(samples, tmp_path):
    cache = build_cache(samples, HEIGHT, WIDTH, tmp_path / "cache", progress=False)
    with open(cache.path, "r+b") as handle:
        handle.truncate(cache.path.stat().st_size - 10)
    with pytest.raises(DatasetError, match="truncated"):
        ImageCache(cache.path)


def test_an_unreadable_image_is_flagged_and_raises_on_read(samples, tmp_path):
    Path(samples[2].path).write_bytes(b"not an image")
    cache = build_cache(samples, HEIGHT, WIDTH, tmp_path / "cache", progress=False)
    assert not cache.valid(2)
    assert all(cache.valid(i) for i in range(len(samples)) if i != 2)
    reader = CacheReader(cache, samples)
    with pytest.raises(DatasetError, match=Path(samples[2].path).name):
        reader(2)


def test_cache_pickles_as_its_path(samples, tmp_path):
    cache = build_cache(samples, HEIGHT, WIDTH, tmp_path / "cache", progress=False)
    cache[0]  # opens the memory map
    blob = pickle.dumps(cache)
    assert len(blob) < 1000
    assert np.array_equal(pickle.loads(blob)[4], cache[4])


@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_a_worker_loader_reads_the_cache(samples, tmp_path, context):
    cfg = load_config(overrides=[f"data.height={HEIGHT}", f"data.width={WIDTH}", "data.cache=true",
                                 f"data.cache_dir={tmp_path / 'cache'}", "data.num_workers=2",
                                 "data.prefetch_factor=3", "eval.batch_size=4"])
    loader = build_test_loader(cfg, samples)
    assert loader.prefetch_factor == 3
    assert isinstance(loader.dataset.reader, CacheReader)
    loader = torch.utils.data.DataLoader(loader.dataset, batch_size=4, num_workers=2,
                                         multiprocessing_context=context)
    images = torch.cat([batch["image"] for batch in loader])
    transform = build_eval_transform(cfg.data)
    expected = torch.stack([transform(read_image(s.path, s.modality), s.modality) for s in samples])
    assert torch.allclose(images, expected, atol=1e-6)  # resize is exact; the cache only skips decoding


def test_without_the_cache_the_disk_reader_is_used(samples):
    cfg = load_config(overrides=["data.num_workers=0", "eval.batch_size=4"])
    loader = build_test_loader(cfg, samples)
    assert not isinstance(loader.dataset.reader, CacheReader)
    assert loader.prefetch_factor is None
    assert isinstance(loader.dataset, ImageDataset)
