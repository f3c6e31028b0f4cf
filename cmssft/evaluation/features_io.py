"""Feature files: evaluate features computed elsewhere (another framework, an old run).

Format: a NumPy ``.npz`` with

- ``paths``: (N,) strings, image paths relative to the dataset root with forward
  slashes (``cam3/0006/0001.jpg``, ``Thermal/88/female_back_t_01102_88.bmp``);
- ``features``: (N, D) float array, row i for ``paths[i]``.

Rows may come in any order and may include images no protocol uses (train images);
every candidate of the protocol must be present. For path-named datasets
(SYSU-MM01, RegDB) identity, camera and modality are read from each used path with
``parse_sample_path`` and must agree with the dataset's own record of that image.
"""

from __future__ import annotations

import struct
import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from cmssft.data.records import Sample
from cmssft.errors import UserError

TRIAL_PLACEHOLDER = "{trial}"


def save_features(path: str | Path, paths: Sequence[str], features: Tensor | np.ndarray) -> None:
    """Write ``paths`` (N,) and ``features`` (N, D) in the format :func:`load_features` reads."""
    feats = features.detach().cpu().numpy() if isinstance(features, Tensor) else np.asarray(features)
    np.savez(path, paths=np.asarray([str(p) for p in paths], dtype=str), features=feats.astype(np.float32))


def load_features(path: str | Path) -> tuple[list[str], np.ndarray]:
    """Read a features file; every problem is a one-line :class:`UserError`."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"features file {path} does not exist")
    with open(path, "rb") as handle:
        if handle.read(4) != b"PK\x03\x04":
            raise UserError(f"{path} is not a .npz file (no zip header); write it with numpy.savez or save_features")
    try:
        with np.load(path, allow_pickle=False) as data:
            missing = [k for k in ("paths", "features") if k not in data.files]
            if missing:
                raise UserError(f"{path} lacks array(s) {', '.join(missing)}; expected 'paths' (N strings) "
                                f"and 'features' (N x D floats), found {', '.join(data.files) or 'nothing'}")
            paths = data["paths"]
            feats = _mapped_member(path, data.zip, "features.npy")
            if feats is None:
                feats = data["features"]
    except UserError:
        raise
    except Exception as err:  # zipfile / format errors for files that are not npz
        if isinstance(err, ValueError) and "pickle" in str(err):  # object arrays need pickle: we refuse to unpickle
            raise UserError(f"{path}: cannot read without pickle ({err}); store 'paths' as a plain string array") \
                from None
        raise UserError(f"{path} is not a readable .npz file ({type(err).__name__}: {err})") from None
    if feats.ndim != 2 or not np.issubdtype(feats.dtype, np.floating) or feats.shape[1] == 0:
        raise UserError(f"{path}: 'features' must be an N x D float array (D >= 1), got {feats.dtype} {feats.shape}")
    if paths.ndim != 1 or paths.dtype.kind not in "US" or len(paths) != len(feats):
        raise UserError(f"{path}: 'paths' must be {len(feats)} strings (one per feature row), "
                        f"got {paths.dtype} {paths.shape}")
    try:
        return [p.decode() if isinstance(p, bytes) else str(p) for p in paths.tolist()], feats
    except UnicodeDecodeError as err:
        raise UserError(f"{path}: 'paths' holds bytes that are not UTF-8 ({err.reason})") from None


def _mapped_member(path: Path, archive: zipfile.ZipFile, name: str) -> np.ndarray | None:
    """A stored (uncompressed) ``.npy`` member of an npz as a copy-on-write memory map, else None.

    ``np.load`` reads a member through ``zipfile`` into a fresh array; mapping the file instead
    skips that copy (the bank gathers its rows from the map). Compressed or unusual members,
    and object arrays, return None and go through ``np.load``.
    """
    try:
        info = archive.getinfo(name)
    except KeyError:
        return None
    if info.compress_type != zipfile.ZIP_STORED or info.flag_bits & 0x1:
        return None
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        local = f.read(30)
        if len(local) != 30 or local[:4] != b"PK\x03\x04":
            return None
        name_len, extra_len = struct.unpack("<HH", local[26:30])
        start = info.header_offset + 30 + name_len + extra_len
        f.seek(start)
        try:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
            elif version == (2, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
            else:
                return None
        except ValueError:
            return None
        offset = f.tell()
    count = int(np.prod(shape))
    if dtype.hasobject or count == 0 or offset + dtype.itemsize * count > start + info.file_size:
        return None
    return np.memmap(path, dtype=dtype, mode="c", shape=shape, order="F" if fortran else "C", offset=offset)


def trial_path(template: str | Path, trial: int) -> Path:
    """``feats_{trial}.npz`` -> ``feats_3.npz``; a name without the placeholder is used as is."""
    return Path(str(template).replace(TRIAL_PLACEHOLDER, str(trial)))


def candidate_key(sample: Sample, root: Path) -> str:
    """The key a candidate is looked up by: its path relative to ``root`` (posix), else as given."""
    prefix = str(root).rstrip("/\\") + "/"
    path = sample.path.replace("\\", "/")
    if path.startswith(prefix.replace("\\", "/")):
        return path[len(prefix):]
    try:
        return Path(sample.path).relative_to(root).as_posix()
    except ValueError:
        return Path(sample.path).as_posix()


def bank_from_features(
    candidates: Sequence[Sample],
    root: str | Path,
    paths: Sequence[str],
    features: np.ndarray,
    *,
    dataset_name: str,
    source: str = "features file",
    protocol: str = "",
) -> Tensor:
    """(N, D) float32 bank with row i for ``candidates[i]``, gathered from a features file."""
    root = Path(root)
    row_of: dict[str, int] = {}
    repeated: set[str] = set()
    for i, p in enumerate(paths):
        key = _normalise(p)
        if key in row_of:
            repeated.add(key)
        row_of[key] = i
    keys = [candidate_key(s, root) for s in candidates]
    rows = [row_of.get(k, -1) for k in keys]
    what = f"the {protocol} protocol's" if protocol else "the protocol's"
    missing = [k for k, r in zip(keys, rows, strict=True) if r < 0]
    if missing:
        raise UserError(f"{source} lacks {len(missing)} of {what} {len(keys)} candidate images "
                        f"(e.g. {_examples(missing)}); it must hold every query and gallery candidate")
    ambiguous = [k for k in keys if k in repeated]
    if ambiguous:
        raise UserError(f"{source} has several rows for {len(ambiguous)} of {what} candidate images "
                        f"(e.g. {_examples(ambiguous)}); give each image one row")
    _check_labels(candidates, keys, root, dataset_name, source)
    index = np.asarray(rows, dtype=np.intp)
    if len(index) == len(features) and np.array_equal(index, np.arange(len(index))):
        bank = features  # already in candidate order: no gather
    else:
        bank = features[index]
    bank = np.ascontiguousarray(bank, dtype=np.float32)
    finite = np.isfinite(bank).all(axis=1)
    if not finite.all():
        bad = [k for k, ok in zip(keys, finite.tolist(), strict=True) if not ok]
        raise UserError(f"{source}: {len(bad)} of {what} {len(keys)} candidate rows hold NaN or infinite "
                        f"values (e.g. {_examples(bad)})")
    return torch.from_numpy(bank)


def _examples(keys: Sequence[str], shown: int = 3) -> str:
    return ", ".join(keys[:shown]) + (f" and {len(keys) - shown} more" if len(keys) > shown else "")


def _normalise(path: str) -> str:
    path = path.replace("\\", "/")
    return path[2:] if path.startswith("./") else path


def _check_labels(candidates: Sequence[Sample], keys: Sequence[str], root: Path, name: str, source: str) -> None:
    """Path-named datasets: the identity/camera a path encodes must be the candidate's."""
    from cmssft.data.datasets import path_parser

    # the same parser parse_sample_path uses, without building a Sample and a Path per image
    parse = path_parser(name)
    if parse is None:
        return  # manifest datasets name their labels in the manifest, not in the path
    for sample, key in zip(candidates, keys, strict=True):
        pid, camid, modality = parse(key)
        if (pid, camid, modality) != (sample.pid, sample.camid, sample.modality):
            raise UserError(f"{source}: path {key} reads as identity {pid} camera {camid}, "
                            f"the dataset has identity {sample.pid} camera {sample.camid}")
