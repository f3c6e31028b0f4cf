"""RegDB: ``Visible/<id>/*.bmp``, ``Thermal/<id>/*.bmp``, ``idx/{train,test}_{visible,thermal}_{t}.txt``."""

from __future__ import annotations

import re
from pathlib import Path

from cmssft.data.datasets.base import found_entries, read_text_lines, require_dir
from cmssft.data.records import CrossModalDataset, Modality, Sample
from cmssft.errors import DatasetError
from cmssft.registry import DATASETS

VISIBLE_CAMERA = 1
THERMAL_CAMERA = 2
TRIALS = range(1, 11)
LAYOUT = "RegDB layout: Visible/<id>/*.bmp, Thermal/<id>/*.bmp, idx/{train,test}_{visible,thermal}_<1-10>.txt"
_PATH_RE = re.compile(r"^(Visible|Thermal)/(\d+)/[^/]+$")
_LABEL_RE = re.compile(r"-?[0-9]+")


def parse_path(relpath: str) -> tuple[int, int, Modality]:
    """``Thermal/88/female_back_t_01102_88.bmp`` -> (pid 88, camera 2, IR)."""
    match = _PATH_RE.match(relpath.replace("\\", "/"))
    if not match:
        raise DatasetError(f"{relpath!r} is not a RegDB image path (expected Visible|Thermal/<id>/<file>)")
    if match.group(1) == "Visible":
        return int(match.group(2)), VISIBLE_CAMERA, Modality.RGB
    return int(match.group(2)), THERMAL_CAMERA, Modality.IR


def read_index(root: Path, path: Path) -> list[Sample]:
    """Parse one idx file; each line is ``<relative path> <label>``.

    Listed images are not opened here: evaluating a features file needs only the idx files, and
    training checks its images before the first step (:mod:`cmssft.data.bad_images`).
    """
    samples = []
    for number, line in enumerate(read_text_lines(path), start=1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2 or not _LABEL_RE.fullmatch(parts[1]):
            raise DatasetError(f"{path}:{number}: expected '<path> <label>', got {line.strip()!r}")
        try:
            pid, camid, modality = parse_path(parts[0])
        except DatasetError as err:
            raise DatasetError(f"{path}:{number}: {err}") from None
        samples.append(Sample(str(root / parts[0]), pid, camid, modality, int(parts[1])))
    if not samples:
        raise DatasetError(f"{path}: no entries")
    return samples


@DATASETS.register("regdb")
def load_regdb(root: str | Path, *, trial: int = 1, **_: object) -> CrossModalDataset:
    """One RegDB trial: train on its ``train_*`` files, query visible and gallery thermal by default."""
    root = Path(root)
    require_dir(root, LAYOUT)
    missing = [sub for sub in ("Visible", "Thermal", "idx") if not (root / sub).is_dir()]
    if missing:
        raise DatasetError(f"{root} lacks {', '.join(missing)}; expected {LAYOUT} (found {found_entries(root)})")
    if trial not in TRIALS:
        raise DatasetError(f"RegDB trial must be 1..10, got {trial}")
    idx = root / "idx"
    train_vis = read_index(root, idx / f"train_visible_{trial}.txt")
    train_thr = read_index(root, idx / f"train_thermal_{trial}.txt")
    _check_labels(train_vis, idx / f"train_visible_{trial}.txt")
    _check_labels(train_thr, idx / f"train_thermal_{trial}.txt")
    return CrossModalDataset(
        name="regdb",
        root=root,
        train=train_vis + train_thr,
        query=_unlabelled(read_index(root, idx / f"test_visible_{trial}.txt")),
        gallery=_unlabelled(read_index(root, idx / f"test_thermal_{trial}.txt")),
    )


def _check_labels(samples: list[Sample], path: Path) -> None:
    """Training labels must be contiguous and name one identity each."""
    pids_of: dict[int, set[int]] = {}
    for s in samples:
        pids_of.setdefault(s.label, set()).add(s.pid)
    labels = sorted(pids_of)
    if labels != list(range(len(labels))):
        raise DatasetError(f"{path}: labels are not contiguous from 0 (found {labels[:5]}...)")
    mixed = [label for label, pids in pids_of.items() if len(pids) > 1]
    if mixed:
        raise DatasetError(f"{path}: label {mixed[0]} is given to several identity folders")


def _unlabelled(samples: list[Sample]) -> list[Sample]:
    return [Sample(s.path, s.pid, s.camid, s.modality) for s in samples]
