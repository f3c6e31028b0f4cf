"""Users' own two-modality data, described by a CSV manifest.

Columns (header required, any order): ``path,pid,camid,modality,split``.
``path`` is relative to the dataset root (or absolute); ``modality`` is ``rgb`` or
``ir`` (``visible``/``thermal``/``infrared`` also accepted); ``split`` is one of
``train``, ``query``, ``gallery``, ``val_query``, ``val_gallery``.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

from cmssft.data.datasets.base import read_text
from cmssft.data.records import CrossModalDataset, Modality, Sample, assign_labels
from cmssft.errors import DatasetError
from cmssft.registry import DATASETS

COLUMNS = ("path", "pid", "camid", "modality", "split")
SPLITS = ("train", "query", "gallery", "val_query", "val_gallery")
MODALITY_NAMES = {
    "rgb": Modality.RGB,
    "visible": Modality.RGB,
    "vis": Modality.RGB,
    "ir": Modality.IR,
    "thermal": Modality.IR,
    "infrared": Modality.IR,
    "nir": Modality.IR,
}


def parse_row(row: dict[str, str], root: Path, where: str) -> tuple[str, Sample]:
    """One manifest row -> (split, sample); errors name the file and line."""
    if None in row or any(v is None for v in row.values()):  # csv.DictReader: more or fewer fields than the header
        header = [k for k in row if k is not None]
        given = sum(row[k] is not None for k in header) + len(row.get(None) or ())
        raise DatasetError(f"{where}: {given} fields where the header has {len(header)}")
    try:
        pid, camid = int(row["pid"]), int(row["camid"])
    except (TypeError, ValueError):
        got = f"{row['pid']!r}, {row['camid']!r}"
        raise DatasetError(f"{where}: pid and camid must be integers, got {got}") from None
    modality = MODALITY_NAMES.get((row["modality"] or "").strip().lower())
    if modality is None:
        raise DatasetError(f"{where}: modality {row['modality']!r} is not one of rgb, ir")
    split = (row["split"] or "").strip().lower()
    if split not in SPLITS:
        raise DatasetError(f"{where}: split {row['split']!r} is not one of {', '.join(SPLITS)}")
    path = (row["path"] or "").strip()
    if not path or "\x00" in path:
        raise DatasetError(f"{where}: {'empty path' if not path else 'path holds a NUL character'}")
    return split, Sample(str(root / path), pid, camid, modality)


def read_manifest(path: Path, root: Path) -> dict[str, list[Sample]]:
    if not path.is_file():
        raise DatasetError(f"manifest {path} does not exist; expected a CSV with columns {','.join(COLUMNS)}")
    splits: dict[str, list[Sample]] = {s: [] for s in SPLITS}
    reader = csv.DictReader(io.StringIO(read_text(path), newline=""))
    try:
        missing = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            expected = ",".join(COLUMNS)
            raise DatasetError(f"{path}: header lacks column(s) {', '.join(missing)}; expected {expected}")
        for row in reader:
            split, sample = parse_row(row, root, f"{path}:{reader.line_num}")
            splits[split].append(sample)
    except csv.Error as err:
        raise DatasetError(f"{path}:{reader.line_num}: not valid CSV ({err})") from None
    return splits


@DATASETS.register("custom")
def load_custom(root: str | Path, *, manifest: str = "", **_: object) -> CrossModalDataset:
    """Load a manifest; relative image paths resolve against ``root``."""
    root = Path(root)
    if not manifest:
        raise DatasetError("the custom dataset needs data.manifest=<path to CSV>")
    manifest_path = Path(manifest)
    if not manifest_path.is_file() and (root / manifest).is_file():
        manifest_path = root / manifest
    splits = read_manifest(manifest_path, root)
    if not splits["train"] and not (splits["query"] and splits["gallery"]):
        raise DatasetError(f"{manifest_path}: needs train rows, or query and gallery rows")
    return CrossModalDataset(
        name="custom",
        root=root,
        train=assign_labels(splits["train"]),
        query=splits["query"],
        gallery=splits["gallery"],
        val_query=splits["val_query"],
        val_gallery=splits["val_gallery"],
    )
