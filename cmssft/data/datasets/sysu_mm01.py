"""SYSU-MM01 as shipped: ``cam1..cam6/NNNN/NNNN.jpg`` and ``exp/{train,val,test}_id.txt``."""

from __future__ import annotations

import os
import re
from pathlib import Path

from cmssft.data.datasets.base import found_entries, list_image_names, read_id_list, require_dir
from cmssft.data.records import CrossModalDataset, Modality, Sample, assign_labels
from cmssft.errors import DatasetError
from cmssft.registry import DATASETS

RGB_CAMERAS = (1, 2, 4, 5)
IR_CAMERAS = (3, 6)
INDOOR_CAMERAS = (1, 2)
LAYOUT = "SYSU-MM01 layout: cam1..cam6/<4-digit id>/<NNNN>.jpg and exp/{train,val,test}_id.txt"
_PATH_RE = re.compile(r"^cam([1-6])/(\d{4})/[^/]+$")


def camera_modality(camid: int) -> Modality:
    return Modality.IR if camid in IR_CAMERAS else Modality.RGB


def parse_path(relpath: str) -> tuple[int, int, Modality]:
    """``cam3/0006/0001.jpg`` -> (pid 6, camera 3, IR)."""
    match = _PATH_RE.match(relpath.replace("\\", "/"))
    if not match:
        raise DatasetError(f"{relpath!r} is not a SYSU-MM01 image path (expected cam<1-6>/<NNNN>/<file>)")
    camid = int(match.group(1))
    return int(match.group(2)), camid, camera_modality(camid)


def _check_tree(root: Path) -> None:
    require_dir(root, LAYOUT)
    expected = [f"cam{c}" for c in sorted((*RGB_CAMERAS, *IR_CAMERAS))] + ["exp"]
    missing = [name for name in expected if not (root / name).is_dir()]
    if missing:
        raise DatasetError(f"{root} lacks {', '.join(missing)}; expected {LAYOUT} (found {found_entries(root)})")


def _samples(root: Path, pids: list[int], cameras: tuple[int, ...]) -> list[Sample]:
    """Identity-major, camera-minor, files sorted: the order the community protocol draws in."""
    samples = []
    camera_dirs = {camid: str(root / f"cam{camid}") for camid in cameras}
    for pid in sorted(pids):
        for camid in cameras:
            folder = os.path.join(camera_dirs[camid], f"{pid:04d}")  # == str(root / f"cam{camid}" / f"{pid:04d}")
            try:
                names = list_image_names(folder)
            except (FileNotFoundError, NotADirectoryError):
                continue  # this identity has no images from this camera
            modality = camera_modality(camid)
            prefix = os.path.join(folder, "")
            samples.extend(Sample(prefix + name, pid, camid, modality) for name in names)
    return samples


@DATASETS.register("sysu_mm01")
def load_sysu_mm01(root: str | Path, *, train_ids: str = "train+val", **_: object) -> CrossModalDataset:
    """Load SYSU-MM01; ``train_ids="train"`` keeps the val identities out for model selection."""
    root = Path(root)
    _check_tree(root)
    exp = root / "exp"
    train, val, test = (read_id_list(exp / f"{s}_id.txt") for s in ("train", "val", "test"))
    if train_ids not in ("train+val", "train"):
        raise DatasetError(f"data.train_ids must be 'train+val' or 'train', got {train_ids!r}")
    train_pids = train + val if train_ids == "train+val" else train
    train_samples = _samples(root, train_pids, (*RGB_CAMERAS, *IR_CAMERAS))
    if not train_samples:
        raise DatasetError(f"{root}: no training images found; expected {LAYOUT}")
    _require_images(train_samples, train_pids, exp / ("train_id.txt" if train_ids == "train" else "{train,val}_id.txt"))
    dataset = CrossModalDataset(
        name="sysu_mm01",
        root=root,
        train=assign_labels(train_samples),
        query=_samples(root, test, IR_CAMERAS),
        gallery=_samples(root, test, RGB_CAMERAS),
    )
    if train_ids == "train":
        dataset.val_query = _samples(root, val, IR_CAMERAS)
        dataset.val_gallery = _samples(root, val, RGB_CAMERAS)
    if not dataset.query or not dataset.gallery:
        raise DatasetError(f"{root}: no test images for the ids of exp/test_id.txt; expected {LAYOUT}")
    _require_images(dataset.query + dataset.gallery, test, exp / "test_id.txt")
    return dataset


def _require_images(samples: list[Sample], pids: list[int], listed_in: Path) -> None:
    """Every listed identity needs images: an empty or missing folder in all six cameras is an incomplete copy."""
    empty = sorted(set(pids) - {s.pid for s in samples})
    if empty:
        shown = ", ".join(f"{pid:04d}" for pid in empty[:5]) + (f" and {len(empty) - 5} more" if len(empty) > 5 else "")
        raise DatasetError(f"{listed_in} lists {len(empty)} identit{'y' if len(empty) == 1 else 'ies'} without "
                           f"images in any camera folder (cam1..cam6/<id>/ empty or missing): {shown}")
