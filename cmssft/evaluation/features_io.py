"""Feature files: evaluate features computed elsewhere (another framework, an old run, ``--save-features``).

Format: a NumPy ``.npz`` (read with ``allow_pickle=False``) with

- ``paths``: (N,) strings, image paths relative to the dataset root with forward
  slashes (``cam3/0006/0001.jpg``, ``Thermal/88/female_back_t_01102_88.bmp``);
- ``features``: (N, D) float array, row i for ``paths[i]``;

and, optionally, what a checkpoint's own test-time scoring needs besides its backbone
(``eval.py --checkpoint C --save-features F.npz`` writes them all):

- ``specific``: (N, D) float, cm-SSFT's modality-specific bank part (``features`` is the shared part);
- ``pool``: (N, D) float, AGW's pooled ("POOL") feature (``features`` is its BN-necked "FC" one);
- ``modality``: (N,) integers, 0 RGB, 1 IR;
- ``scorer_config``: a 0-d string, the checkpoint's config as JSON (it rebuilds the SSTN);
- ``scorer.<name>``: the checkpoint's ``sstn.*`` tensors (``scorer.sstn.neck.bn.running_mean``, ...).

Files with ``scorer_config`` are scored like the checkpoint (cm-SSFT: SSTN, ``model.sstn.test_mode``;
AGW: the cosine of its ``model.agw.test_feature``); files without it by the cosine of ``features``.
Rows may come in any order and may include images no protocol uses (train images); every
candidate of the protocol must be present. For path-named datasets (SYSU-MM01, RegDB) identity,
camera and modality are read from each used path with ``parse_sample_path`` and must agree with
the dataset's own record of that image.
"""

from __future__ import annotations

import json
import struct
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from cmssft.data.records import Sample
from cmssft.errors import UserError

TRIAL_PLACEHOLDER = "{trial}"


SCORER_CONFIG = "scorer_config"
SCORER_PREFIX = "scorer."
_KNOWN = ("paths", "features", "specific", "pool", "modality", SCORER_CONFIG)


@dataclass
class FeatureFile:
    """The arrays of a features file (see the module docstring); optional parts are None / empty."""

    paths: list[str]
    features: np.ndarray  # (N, D) float: the shared bank part
    specific: np.ndarray | None = None  # (N, D') float
    pool: np.ndarray | None = None  # (N, D) float: AGW's pooled feature
    modality: np.ndarray | None = None  # (N,) int64
    scorer_config: dict | None = None  # the checkpoint's config
    scorer_state: dict[str, np.ndarray] = field(default_factory=dict)  # sstn.* name -> array

    @property
    def has_scorer(self) -> bool:
        return self.scorer_config is not None


def _numpy(array: Tensor | np.ndarray) -> np.ndarray:
    if isinstance(array, Tensor):
        array = array.detach().cpu()
        return (array.float() if array.dtype == torch.bfloat16 else array).numpy()
    return np.asarray(array)


def save_features(
    path: str | Path,
    paths: Sequence[str],
    features: Tensor | np.ndarray,
    *,
    specific: Tensor | np.ndarray | None = None,
    pool: Tensor | np.ndarray | None = None,
    modality: Tensor | np.ndarray | None = None,
    scorer_config: Mapping | None = None,
    scorer_state: Mapping[str, Tensor | np.ndarray] | None = None,
) -> None:
    """Write ``paths`` (N,) and ``features`` (N, D), and the optional parts, as :func:`read_feature_file` reads them."""
    arrays = {"paths": np.asarray([str(p) for p in paths], dtype=str),
              "features": _numpy(features).astype(np.float32)}
    for key, part in (("specific", specific), ("pool", pool)):
        if part is not None:
            arrays[key] = _numpy(part).astype(np.float32)
    if modality is not None:
        arrays["modality"] = _numpy(modality).astype(np.int64)
    if scorer_config is not None:
        arrays[SCORER_CONFIG] = np.asarray(json.dumps(dict(scorer_config)))
        for name, tensor in (scorer_state or {}).items():
            arrays[SCORER_PREFIX + name] = _numpy(tensor)
    np.savez(path, **arrays)


def load_features(path: str | Path) -> tuple[list[str], np.ndarray]:
    """``paths`` and ``features`` of a features file; every problem is a one-line :class:`UserError`."""
    data = read_feature_file(path)
    return data.paths, data.features


def read_feature_file(path: str | Path) -> FeatureFile:
    """Every part of a features file, checked; every problem is a one-line :class:`UserError`."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"features file {path} is a directory; give the .npz file itself")
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
            arrays = {}
            for key in ("features", "specific", "pool"):
                if key in data.files:
                    mapped = _mapped_member(path, data.zip, f"{key}.npy")
                    arrays[key] = mapped if mapped is not None else data[key]
            modality = data["modality"] if "modality" in data.files else None
            config = data[SCORER_CONFIG] if SCORER_CONFIG in data.files else None
            state = {k[len(SCORER_PREFIX):]: data[k] for k in data.files if k.startswith(SCORER_PREFIX)}
    except UserError:
        raise
    except Exception as err:  # zipfile / format errors for files that are not npz
        if isinstance(err, ValueError) and "pickle" in str(err):  # object arrays need pickle: we refuse to unpickle
            raise UserError(f"{path}: cannot read without pickle ({err}); store 'paths' as a plain string array") \
                from None
        raise UserError(f"{path} is not a readable .npz file ({type(err).__name__}: {err})") from None
    feats = arrays["features"]
    if feats.ndim != 2 or not np.issubdtype(feats.dtype, np.floating) or feats.shape[1] == 0:
        raise UserError(f"{path}: 'features' must be an N x D float array (D >= 1), got {feats.dtype} {feats.shape}")
    if paths.ndim != 1 or paths.dtype.kind not in "US" or len(paths) != len(feats):
        raise UserError(f"{path}: 'paths' must be {len(feats)} strings (one per feature row), "
                        f"got {paths.dtype} {paths.shape}")
    try:
        names = [p.decode() if isinstance(p, bytes) else str(p) for p in paths.tolist()]
    except UnicodeDecodeError as err:
        raise UserError(f"{path}: 'paths' holds bytes that are not UTF-8 ({err.reason})") from None
    _refuse_repeated_paths(path, names)
    data = FeatureFile(names, feats, _checked_part(path, "specific", arrays.get("specific"), len(feats)),
                       _checked_part(path, "pool", arrays.get("pool"), len(feats)),
                       _checked_modality(path, modality, len(feats)), _checked_config(path, config),
                       _checked_state(path, state))
    model = data.scorer_config.get("model", {}) if data.has_scorer else {}
    if data.has_scorer and data.specific is None and model.get("name", "cmssft") == "cmssft" and \
            model.get("use_specific", True):
        raise UserError(f"{path}: '{SCORER_CONFIG}' describes a model with a specific branch, but the file has no "
                        f"'specific' array for its SSTN")
    return data


def _refuse_repeated_paths(path: Path, names: Sequence[str]) -> None:
    """One row per image: with two, which one a protocol would read is undefined."""
    seen: dict[str, int] = {}
    for row, name in enumerate(names):
        key = _normalise(name)
        if key in seen:
            raise UserError(f"{path}: 'paths' names {name} twice (rows {seen[key]} and {row}); give each image "
                            f"one row")
        seen[key] = row


def _checked_part(path: Path, name: str, part: np.ndarray | None, rows: int) -> np.ndarray | None:
    if part is None:
        return None
    if part.ndim != 2 or not np.issubdtype(part.dtype, np.floating) or part.shape[0] != rows:
        raise UserError(f"{path}: '{name}' must be an N x D float array with N = {rows} (one row per path), "
                        f"got {part.dtype} {part.shape}")
    return part


def _checked_modality(path: Path, modality: np.ndarray | None, rows: int) -> np.ndarray | None:
    if modality is None:
        return None
    if modality.shape != (rows,) or not np.issubdtype(modality.dtype, np.integer) or \
            (rows and (modality.min() < 0 or modality.max() > 1)):
        raise UserError(f"{path}: 'modality' must be {rows} integers 0 (RGB) or 1 (IR), "
                        f"got {modality.dtype} {modality.shape}")
    return modality.astype(np.int64)


def _checked_config(path: Path, config: np.ndarray | None) -> dict | None:
    if config is None:
        return None
    try:
        parsed = json.loads(str(config.item())) if config.dtype.kind == "U" and config.ndim == 0 else None
    except json.JSONDecodeError as err:
        raise UserError(f"{path}: '{SCORER_CONFIG}' is not valid JSON ({err.msg})") from None
    if not isinstance(parsed, dict):
        raise UserError(f"{path}: '{SCORER_CONFIG}' must be one string holding the checkpoint's config as a "
                        f"JSON object, got {config.dtype} {config.shape}")
    return parsed


def _checked_state(path: Path, state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    for name, array in state.items():
        if array.dtype.kind not in "fiub":
            raise UserError(f"{path}: '{SCORER_PREFIX}{name}' must be a numeric array, got {array.dtype}")
    return state


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
    index, keys = candidate_rows(candidates, root, paths, dataset_name=dataset_name, source=source, protocol=protocol)
    return gather_rows(features, index, keys, source=source, protocol=protocol)


def bank_from_feature_file(
    candidates: Sequence[Sample],
    root: str | Path,
    data: FeatureFile,
    *,
    dataset_name: str,
    source: str = "features file",
    protocol: str = "",
) -> Tensor | dict[str, Tensor]:
    """The candidates' bank: ``{"shared", "specific" or "pool", "modality"}`` rows when the file holds a
    scorer (what the SSTN or AGW's test feature needs), else the (N, D) ``features`` rows as
    :func:`bank_from_features` gives them."""
    index, keys = candidate_rows(candidates, root, data.paths, dataset_name=dataset_name, source=source,
                                 protocol=protocol)
    shared = gather_rows(data.features, index, keys, source=source, protocol=protocol)
    if not data.has_scorer:
        return shared
    modality = torch.tensor([int(s.modality) for s in candidates], dtype=torch.long)
    if data.modality is not None:
        wrong = np.flatnonzero(data.modality[index] != modality.numpy())
        if len(wrong):
            raise UserError(f"{source}: 'modality' disagrees with the dataset for {len(wrong)} candidate images "
                            f"(e.g. {_examples([keys[i] for i in wrong])})")
    bank = {"shared": shared, "modality": modality}
    for key, part in (("specific", data.specific), ("pool", data.pool)):
        if part is not None:
            bank[key] = gather_rows(part, index, keys, source=source, protocol=protocol)
    return bank


def candidate_rows(
    candidates: Sequence[Sample],
    root: str | Path,
    paths: Sequence[str],
    *,
    dataset_name: str,
    source: str = "features file",
    protocol: str = "",
) -> tuple[np.ndarray, list[str]]:
    """(N,) row of each candidate in a features file whose rows are ``paths``, and the candidates' keys."""
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
    what = _what(protocol)
    missing = [k for k, r in zip(keys, rows, strict=True) if r < 0]
    if missing:
        raise UserError(f"{source} lacks {len(missing)} of {what} {len(keys)} candidate images "
                        f"(e.g. {_examples(missing)}); it must hold every query and gallery candidate")
    ambiguous = [k for k in keys if k in repeated]
    if ambiguous:
        raise UserError(f"{source} has several rows for {len(ambiguous)} of {what} candidate images "
                        f"(e.g. {_examples(ambiguous)}); give each image one row")
    _check_labels(candidates, keys, root, dataset_name, source)
    return np.asarray(rows, dtype=np.intp), keys


def gather_rows(
    array: np.ndarray, index: np.ndarray, keys: Sequence[str], *, source: str = "features file", protocol: str = ""
) -> Tensor:
    """Rows ``index`` of a file's (R, D) array as float32 (N, D), refusing NaN and infinite rows."""
    if len(index) == len(array) and np.array_equal(index, np.arange(len(index))):
        rows = array  # already in candidate order: no gather
    else:
        rows = array[index]
    rows = np.ascontiguousarray(rows, dtype=np.float32)
    finite = np.isfinite(rows).all(axis=1)
    if not finite.all():
        bad = [k for k, ok in zip(keys, finite.tolist(), strict=True) if not ok]
        raise UserError(f"{source}: {len(bad)} of {_what(protocol)} {len(keys)} candidate rows hold NaN or infinite "
                        f"values (e.g. {_examples(bad)})")
    return torch.from_numpy(rows)


def _what(protocol: str) -> str:
    return f"the {protocol} protocol's" if protocol else "the protocol's"


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
