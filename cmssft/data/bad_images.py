"""Unreadable images: find them before training starts and apply ``data.bad_images`` to them.

A file is unreadable when it is missing, empty, not the image format its bytes claim, or cut
short. OpenCV decodes many truncated JPEGs without complaint (the lost rows come out gray), so
the end of each file is checked explicitly: a JPEG must end with its end-of-image marker, a PNG
with its IEND chunk, a BMP must be as long as its header says. Files of other formats (a custom
manifest may name any) are left to the decoder.

Training may ``skip`` such images: each is replaced by another image of the same identity and
modality, picked deterministically, so batches keep their P x K shape and a resumed run draws
the same pixels. Evaluation never skips: a protocol cannot drop images.
"""

from __future__ import annotations

import logging
import os
import struct
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from tqdm import tqdm

from cmssft.data.records import Sample
from cmssft.errors import DatasetError

LOG = logging.getLogger("cmssft")
POLICIES = ("stop", "skip")
SHOWN = 3  # paths named in a summary line
_HEAD, _TAIL = 64, 256  # bytes read at each end of a file by the pre-flight check
_JPEG, _PNG, _BMP = b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"BM"
_KNOWN_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")


def content_problem(head: bytes, tail: bytes, size: int, name: str) -> str | None:
    """Why a file is not a complete JPEG/PNG/BMP, or None if it looks whole.

    ``head``/``tail``: its first and last bytes (at least 64 and 2 when it is that long);
    ``size``: its length; ``name``: its file name, which says whether it must be one of the three.
    """
    if size == 0:
        return "empty file (0 bytes)"
    if head.startswith(_JPEG):
        return None if b"\xff\xd9" in tail else "truncated JPEG (no end-of-image marker)"
    if head.startswith(_PNG):
        return None if b"IEND" in tail else "truncated PNG (no IEND chunk)"
    if head.startswith(_BMP):
        return _bmp_problem(head, size)
    if name.lower().endswith(_KNOWN_SUFFIXES):
        return f"not a JPEG, PNG or BMP image (starts with {head[:8].hex(' ')})"
    return None


def _bmp_problem(head: bytes, size: int) -> str | None:
    """A BMP is truncated when it is shorter than its pixel array (uncompressed) or its declared size."""
    if len(head) < 34:
        return "truncated BMP (incomplete header)"
    declared, offset = struct.unpack_from("<I", head, 2)[0], struct.unpack_from("<I", head, 10)[0]
    width, height, _, bits, compression = struct.unpack_from("<iiHHI", head, 18)
    needed = max(declared, offset + 1)
    if compression == 0 and width > 0 and bits > 0:  # BI_RGB: rows padded to 4 bytes
        needed = max(needed, offset + (width * bits + 31) // 32 * 4 * abs(height))
    if size < needed:
        return f"truncated BMP ({size} of {needed} bytes)"
    return None


def bytes_problem(data: bytes, name: str) -> str | None:
    """:func:`content_problem` of a whole file already in memory."""
    return content_problem(data[:_HEAD], data[-_TAIL:], len(data), name)


def file_problem(path: str | os.PathLike[str]) -> str | None:
    """Why the image file at ``path`` cannot be used, reading only its first and last bytes."""
    try:
        with open(path, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            head = handle.read(_HEAD)
            handle.seek(max(size - _TAIL, 0))
            tail = handle.read(_TAIL)
    except FileNotFoundError:
        return "file does not exist"
    except IsADirectoryError:
        return "is a directory"
    except (OSError, ValueError) as err:  # ValueError: a NUL character in the path
        return f"cannot be opened ({getattr(err, 'strerror', None) or err})"
    return content_problem(head, tail, size, Path(path).name)


def scan_images(samples: Sequence[Sample], desc: str = "check images") -> dict[int, str]:
    """``{index: problem}`` for every sample whose file is unreadable (cheap: two small reads per file)."""
    problems = {}
    for index, sample in enumerate(tqdm(samples, desc=desc, dynamic_ncols=True, leave=False, mininterval=1.0)):
        problem = file_problem(sample.path)
        if problem is not None:
            problems[index] = problem
    return problems


def describe(samples: Sequence[Sample], problems: dict[int, str]) -> str:
    """``path (problem), ...`` for the first few problems, and how many more there are."""
    shown = [f"{samples[i].path} ({p})" for i, p in list(problems.items())[:SHOWN]]
    more = f" and {len(problems) - SHOWN} more" if len(problems) > SHOWN else ""
    return ", ".join(shown) + more


class BadImageGuard:
    """An ``ImageReader`` (see :mod:`cmssft.data.loader`) that applies ``data.bad_images`` to training images.

    ``stop``: any unreadable image raises a :class:`DatasetError` naming the file. ``skip``: the
    image is replaced by the next readable image of the same label and modality, in sample-list
    order (wrapping around); the first use of each bad file logs a warning.
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        inner: Callable[[int], np.ndarray],
        policy: str,
        known_bad: dict[int, str] | None = None,
    ) -> None:
        if policy not in POLICIES:
            raise DatasetError(f"data.bad_images must be one of {', '.join(POLICIES)}, got {policy!r}")
        self.samples, self.inner, self.policy = list(samples), inner, policy
        self.bad: dict[int, str] = dict(known_bad or {})
        self.warned: set[int] = set()
        self.groups: dict[tuple[int, int], list[int]] = {}
        for index, sample in enumerate(self.samples):
            self.groups.setdefault((sample.label, int(sample.modality)), []).append(index)

    def __call__(self, index: int) -> np.ndarray:
        """uint8 [H, W, 3] of sample ``index`` or, under ``skip``, of its substitute."""
        if index not in self.bad:
            try:
                return self.inner(index)
            except DatasetError as err:
                if self.policy == "stop":
                    raise
                self.bad[index] = str(err)
        return self._substitute(index)

    @property
    def skipped(self) -> int:
        """Unreadable images this process has found so far."""
        return len(self.bad)

    def _substitute(self, index: int) -> np.ndarray:
        sample = self.samples[index]
        group = self.groups[(sample.label, int(sample.modality))]
        start = group.index(index)
        for other in group[start + 1 :] + group[:start]:
            if other in self.bad:
                continue
            try:
                image = self.inner(other)
            except DatasetError as err:
                self.bad[other] = str(err)
                continue
            self._warn(index, other)
            return image
        raise _no_substitute(sample, len(group), self.bad[index])

    def _warn(self, index: int, other: int) -> None:
        if index in self.warned:
            return
        self.warned.add(index)
        LOG.warning("unreadable training image %s (%s); using %s instead (data.bad_images=skip)",
                    self.samples[index].path, self.bad[index], self.samples[other].path)


def guard_training_reader(
    samples: Sequence[Sample], inner: Callable[[int], np.ndarray], policy: str
) -> BadImageGuard:
    """Check every training image once (progress bar), then wrap ``inner`` with the policy.

    ``stop`` fails here, before the first step, naming the first unreadable files; ``skip``
    logs how many were found (the count reaches the run's log.txt) and trains on substitutes.
    """
    problems = scan_images(samples, desc="check training images")
    if problems and policy == "stop":
        raise DatasetError(
            f"{len(problems)} unreadable training image(s): {describe(samples, problems)}; "
            "replace them, or set data.bad_images=skip to train with substitutes"
        )
    guard = BadImageGuard(samples, inner, policy, problems)
    if problems:
        LOG.warning("%d unreadable training images skipped (data.bad_images=skip): %s",
                    len(problems), describe(samples, problems))
        _require_substitutes(guard)
    return guard


def _require_substitutes(guard: BadImageGuard) -> None:
    """Under ``skip``, every label and modality that lost an image must keep a readable one."""
    for group in guard.groups.values():
        if all(i in guard.bad for i in group):
            raise _no_substitute(guard.samples[group[0]], len(group), guard.bad[group[0]])


def _no_substitute(sample: Sample, count: int, problem: str) -> DatasetError:
    return DatasetError(
        f"identity {sample.pid} has no readable {sample.modality.name} training image to substitute "
        f"(all {count} unreadable, e.g. {sample.path}: {problem})"
    )
