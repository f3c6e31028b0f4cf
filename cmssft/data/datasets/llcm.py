"""LLCM (low-light cross-modality): ``idx/train_{vis,nir}.txt``, ``vis|nir/<id>/``, ``test_{vis,nir}/camN/<id>/``.

File names carry identity and camera: ``0001_c01_s185535_f7010_nir.jpg`` is identity 1,
camera 1. The same nine cameras record visible images by day and near-infrared by
night, so a camera number names the same place in both modalities.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from cmssft.data.datasets.base import found_entries, list_image_names, read_id_list, read_text_lines, require_dir
from cmssft.data.records import CrossModalDataset, Modality, Sample
from cmssft.errors import DatasetError
from cmssft.registry import DATASETS

VIS_CAMERAS = (1, 2, 3, 4, 5, 6, 7, 8, 9)
NIR_CAMERAS = (1, 2, 4, 5, 6, 7, 8, 9)  # the test side has no NIR camera 3
TRAIN_INDEX = {Modality.RGB: "idx/train_vis.txt", Modality.IR: "idx/train_nir.txt"}
TEST_ID_FILE = "idx/test_id.txt"
LAYOUT = ("LLCM layout: idx/{train_vis,train_nir,test_id}.txt, vis/<id>/, nir/<id>/, "
          "test_vis/cam1..9/<id>/, test_nir/cam{1,2,4-9}/<id>/")
TREE_ENTRIES = ("idx", "vis", "nir", "test_vis", "test_nir")
_FOLDER_MODALITY = {"vis": Modality.RGB, "nir": Modality.IR}
_TRAIN_RE = re.compile(r"^(vis|nir)/(\d+)/([^/]+)$")
_TEST_RE = re.compile(r"^test_(vis|nir)/cam(\d+)/(\d+)/([^/]+)$")
_NAME_RE = re.compile(r"^(\d+)_c(\d+)_")


def parse_path(relpath: str) -> tuple[int, int, Modality]:
    """``nir/0001/0001_c01_s185535_f7010_nir.jpg`` -> (pid 1, camera 1, IR); test paths add ``camN/``.

    The identity folder and, for test images, the camera folder must agree with the file name.
    """
    path = relpath.replace("\\", "/")
    test = _TEST_RE.match(path)
    train = None if test else _TRAIN_RE.match(path)
    if not test and not train:
        raise DatasetError(f"{relpath!r} is not an LLCM image path (expected vis|nir/<id>/<file> or "
                           f"test_vis|test_nir/cam<N>/<id>/<file>)")
    modality_name, folder_pid, name = (test.group(1), test.group(3), test.group(4)) if test else train.groups()
    name_match = _NAME_RE.match(name)
    if not name_match:
        raise DatasetError(f"{relpath!r}: file name does not start with <id>_c<camera>_ (e.g. 0001_c01_...)")
    pid, camid = int(name_match.group(1)), int(name_match.group(2))
    if int(folder_pid) != pid:
        raise DatasetError(f"{relpath!r}: file name says identity {pid}, its folder says {int(folder_pid)}")
    if test and int(test.group(2)) != camid:
        raise DatasetError(f"{relpath!r}: file name says camera {camid}, its folder says cam{test.group(2)}")
    return pid, camid, _FOLDER_MODALITY[modality_name]


def _check_tree(root: Path) -> None:
    require_dir(root, LAYOUT)
    missing = [name for name in TREE_ENTRIES if not (root / name).is_dir()]
    missing += [name for name in (*TRAIN_INDEX.values(), TEST_ID_FILE) if not (root / name).is_file()]
    if missing:
        raise DatasetError(f"{root} lacks {', '.join(missing)} (found {found_entries(root)}); expected {LAYOUT}")


class _Listing:
    """Folder contents, listed once each: checks that index lines name existing files without a stat per line."""

    def __init__(self) -> None:
        self._names: dict[str, set[str]] = {}

    def exists(self, path: str) -> bool:
        folder, _, name = path.rpartition("/")
        if folder not in self._names:
            try:
                self._names[folder] = set(os.listdir(folder))
            except (FileNotFoundError, NotADirectoryError):
                self._names[folder] = set()
        return name in self._names[folder]


def read_train_index(root: Path, modality: Modality, listing: _Listing) -> list[tuple[Sample, str]]:
    """One ``idx/train_*.txt``: (sample with the file's raw label, ``file:line``) per line."""
    path = root / TRAIN_INDEX[modality]
    folder = "vis" if modality == Modality.RGB else "nir"
    out = []
    for number, line in enumerate(read_text_lines(path), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        parts = line.split()
        if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
            raise DatasetError(f"{where}: expected '<path> <label>', got {line.strip()!r}")
        rel = parts[0].replace("\\", "/")
        try:
            pid, camid, found = parse_path(rel)
        except DatasetError as err:
            raise DatasetError(f"{where}: {err}") from None
        if found != modality or rel.startswith("test_"):
            raise DatasetError(f"{where}: {rel} is not under {folder}/; {path.name} lists {folder}/<id>/ images")
        full = f"{root.as_posix()}/{rel}"
        if not listing.exists(full):
            raise DatasetError(f"{where}: listed image {rel} does not exist under {root}")
        out.append((Sample(full, pid, camid, modality, int(parts[1])), where))
    if not out:
        raise DatasetError(f"{path}: no entries; expected lines '<{folder}/<id>/<file>> <label>'")
    return out


def contiguous_labels(entries: list[tuple[Sample, str]]) -> list[Sample]:
    """Check that labels and identities correspond one to one; relabel 0..n-1 in ascending label order."""
    pid_of: dict[int, tuple[int, str]] = {}
    label_of: dict[int, tuple[int, str]] = {}
    for s, where in entries:
        pid, first = pid_of.setdefault(s.label, (s.pid, where))
        if pid != s.pid:
            raise DatasetError(f"{where}: label {s.label} names identity {s.pid}, but {first} gives it to {pid}")
        label, first = label_of.setdefault(s.pid, (s.label, where))
        if label != s.label:
            raise DatasetError(f"{where}: identity {s.pid} has label {s.label}, but {first} gives it {label}")
    mapping = {label: i for i, label in enumerate(sorted(pid_of))}
    return [Sample(s.path, s.pid, s.camid, s.modality, mapping[s.label]) for s, _ in entries]


def side_samples(root: Path, pids: list[int], modality: Modality) -> list[Sample]:
    """Identity ascending, then camera, then sorted file name: the reference's query and draw order."""
    side, cameras = ("test_vis", VIS_CAMERAS) if modality == Modality.RGB else ("test_nir", NIR_CAMERAS)
    samples = []
    for pid in sorted(set(pids)):
        for camid in cameras:
            folder = os.path.join(root, side, f"cam{camid}", f"{pid:04d}")
            try:
                names = list_image_names(folder)
            except (FileNotFoundError, NotADirectoryError):
                continue  # this identity was not seen by this camera in this modality
            prefix = os.path.join(folder, "")
            samples.extend(Sample(prefix + name, pid, camid, modality) for name in names)
    return samples


@DATASETS.register("llcm")
def load_llcm(root: str | Path, *, train_ids: str = "train+val", **_: object) -> CrossModalDataset:
    """Train on ``idx/train_{vis,nir}.txt``; test candidates are every test_vis, then every test_nir image.

    LLCM has no validation identities, so ``train_ids`` must stay ``train+val``; ``trial`` and
    ``manifest`` do not apply and are ignored.
    """
    if train_ids != "train+val":
        raise DatasetError(f"LLCM has no validation identities to hold out; data.train_ids must be 'train+val', "
                           f"got {train_ids!r}")
    root = Path(root)
    _check_tree(root)
    listing = _Listing()
    entries = read_train_index(root, Modality.RGB, listing) + read_train_index(root, Modality.IR, listing)
    test_ids = read_id_list(root / TEST_ID_FILE)
    dataset = CrossModalDataset(
        name="llcm",
        root=root,
        train=contiguous_labels(entries),
        query=side_samples(root, test_ids, Modality.RGB),
        gallery=side_samples(root, test_ids, Modality.IR),
    )
    for side, samples in (("test_vis", dataset.query), ("test_nir", dataset.gallery)):
        if not samples:
            raise DatasetError(f"{root}: no {side} images for the ids of {TEST_ID_FILE} (looked in "
                               f"{side}/cam<N>/<4-digit id>/); expected {LAYOUT}")
    return dataset
