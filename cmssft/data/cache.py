"""Decoded, resized images in one memory-mapped file per (sample list, size): no JPEG decode after
the first build, and pages shared by every worker through the OS page cache.

File layout (little-endian)::

    [0, 64)             header: magic b"CMSSFTC1", then int64 N, H, W
    [64, 64 + N)        uint8 validity flag per row (0: the image could not be read)
    [pixel_offset, ...) uint8 pixels [N, H, W, 3], RGB (IR gray replicated), pixel_offset = 64 + N rounded up to 64

The file name holds a hash of (format version, height, width, and every sample's path, modality,
file size and mtime), so a changed, added or removed image gives a new file and stale pixels are
never read. A build writes a temporary file and renames it into place only when complete.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from tqdm import tqdm

from cmssft.data.records import Sample
from cmssft.data.transforms import read_image, resize
from cmssft.errors import DatasetError

LOG = logging.getLogger("cmssft")
FORMAT_VERSION = 1
MAGIC = b"CMSSFTC1"
HEADER_BYTES = 64


def _pixel_offset(count: int) -> int:
    return -(-(HEADER_BYTES + count) // 64) * 64


def cache_key(samples: Sequence[Sample], height: int, width: int) -> str:
    """Hex digest of everything the cached pixels depend on."""
    digest = hashlib.sha256(f"cmssft-image-cache v{FORMAT_VERSION} {height}x{width}\n".encode())
    for sample in samples:
        try:
            stat = os.stat(sample.path)
            size, mtime = stat.st_size, stat.st_mtime_ns
        except OSError:
            size, mtime = -1, -1
        digest.update(f"{sample.path}\0{int(sample.modality)}\0{size}\0{mtime}\n".encode())
    return digest.hexdigest()


def cache_path(samples: Sequence[Sample], height: int, width: int, directory: str | Path) -> Path:
    key = cache_key(samples, height, width)
    return Path(directory) / f"images-{len(samples)}-{height}x{width}-{key[:24]}.bin"


class ImageCache:
    """Read-only view of a finished cache file. Pickles as its path and reopens lazily, so it is safe
    to hand to DataLoader workers under fork or spawn."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.count, self.height, self.width = _read_header(self.path)
        self._valid: np.ndarray | None = None
        self._pixels: np.ndarray | None = None

    def _open(self) -> None:
        self._valid = np.memmap(self.path, np.uint8, "r", offset=HEADER_BYTES, shape=(self.count,))
        shape = (self.count, self.height, self.width, 3)
        self._pixels = np.memmap(self.path, np.uint8, "r", offset=_pixel_offset(self.count), shape=shape)

    def __getstate__(self) -> dict:
        return {"path": self.path, "count": self.count, "height": self.height, "width": self.width}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._valid = self._pixels = None

    def __len__(self) -> int:
        return self.count

    def valid(self, index: int) -> bool:
        if self._valid is None:
            self._open()
        return bool(self._valid[index])

    def __getitem__(self, index: int) -> np.ndarray:
        """uint8 [H, W, 3] (a writable copy of row ``index``)."""
        if self._pixels is None:
            self._open()
        return np.array(self._pixels[index])


def _read_header(path: Path) -> tuple[int, int, int]:
    with open(path, "rb") as handle:
        header = handle.read(HEADER_BYTES)
    if len(header) < HEADER_BYTES or header[:8] != MAGIC:
        raise DatasetError(f"{path} is not an image cache file")
    count, height, width = np.frombuffer(header[8:32], dtype="<i8").tolist()
    expected = _pixel_offset(count) + count * height * width * 3
    if path.stat().st_size != expected:
        raise DatasetError(f"image cache {path} is truncated ({path.stat().st_size} of {expected} bytes)")
    return count, height, width


def build_cache(
    samples: Sequence[Sample],
    height: int,
    width: int,
    directory: str | Path,
    *,
    threads: int | None = None,
    progress: bool = True,
) -> ImageCache:
    """The cache of ``samples`` at ``height`` x ``width``: reused when its file exists, else decoded
    once (threads: OpenCV releases the GIL), written to a temporary file and renamed into place."""
    path = cache_path(samples, height, width, directory)
    if path.is_file():
        return ImageCache(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        _write(tmp, samples, height, width, threads or min(8, os.cpu_count() or 1), progress)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return ImageCache(path)


def _write(tmp: Path, samples: Sequence[Sample], height: int, width: int, threads: int, progress: bool) -> None:
    count = len(samples)
    total = _pixel_offset(count) + count * height * width * 3
    with open(tmp, "wb") as handle:
        handle.write(MAGIC + np.array([count, height, width], dtype="<i8").tobytes())
        handle.truncate(total)
    if count == 0:
        return
    valid = np.memmap(tmp, np.uint8, "r+", offset=HEADER_BYTES, shape=(count,))
    pixels = np.memmap(tmp, np.uint8, "r+", offset=_pixel_offset(count), shape=(count, height, width, 3))

    def decode(index: int) -> None:
        sample = samples[index]
        try:
            pixels[index] = resize(read_image(sample.path, sample.modality), height, width)
            valid[index] = 1
        except DatasetError:
            valid[index] = 0  # the reader raises for this row; the caller's policy decides

    with ThreadPoolExecutor(max(1, threads)) as pool:
        jobs = pool.map(decode, range(count))
        for _ in tqdm(jobs, total=count, desc="image cache", leave=False, disable=not progress, dynamic_ncols=True):
            pass
    bad = count - int(np.count_nonzero(valid))
    pixels.flush()
    valid.flush()
    if bad:
        LOG.warning("image cache: %d of %d images could not be read", bad, count)


class CacheReader:
    """An ``ImageReader`` over an :class:`ImageCache`: sample ``index`` -> uint8 [H, W, 3].

    An image that could not be decoded at build time raises :class:`DatasetError`, as the disk
    reader would, so a bad-image policy can wrap either reader.
    """

    def __init__(self, cache: ImageCache, samples: Sequence[Sample]) -> None:
        if len(cache) != len(samples):
            raise DatasetError(f"image cache {cache.path} holds {len(cache)} images, not {len(samples)}")
        self.cache = cache
        self.paths = [s.path for s in samples]

    def __call__(self, index: int) -> np.ndarray:
        if not self.cache.valid(index):
            raise DatasetError(f"cannot read image {self.paths[index]} (missing, empty or corrupt when cached)")
        return self.cache[index]
