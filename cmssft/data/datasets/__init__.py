"""Dataset loaders, registered by name in :data:`cmssft.registry.DATASETS`.

Each loader maps a dataset root (and options) to a :class:`CrossModalDataset`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from cmssft.config import DataConfig
from cmssft.data.datasets import custom, llcm, regdb, sysu_mm01  # noqa: F401  (registers the loaders)
from cmssft.data.records import CrossModalDataset, Modality, Sample
from cmssft.errors import DatasetError
from cmssft.registry import DATASETS

_PATH_PARSERS = {
    "sysu_mm01": sysu_mm01.parse_path,
    "regdb": regdb.parse_path,
    "llcm": llcm.parse_path,
}


def load_dataset(
    name: str, root: str | Path, *, train_ids: str = "train+val", trial: int = 1, manifest: str = ""
) -> CrossModalDataset:
    """Load a registered dataset by name; unknown names list the registered ones."""
    loader = DATASETS.get(name)
    return loader(root, train_ids=train_ids, trial=trial, manifest=manifest)


def build_dataset(cfg: DataConfig) -> CrossModalDataset:
    return load_dataset(cfg.name, cfg.root, train_ids=cfg.train_ids, trial=cfg.trial, manifest=cfg.manifest)


def path_parser(name: str) -> Callable[[str], tuple[int, int, Modality]] | None:
    """The parser of a path-named dataset (relative path -> pid, camid, modality); None for manifest ones."""
    return _PATH_PARSERS.get(name)


def parse_sample_path(name: str, root: str | Path, relpath: str) -> Sample:
    """Identity, camera and modality from a path relative to the dataset root."""
    DATASETS.get(name)  # unknown names give the usual error
    parser = _PATH_PARSERS.get(name)
    if parser is None:
        raise DatasetError(f"dataset {name!r} names images through its manifest, not its paths")
    pid, camid, modality = parser(relpath)
    return Sample(str(Path(root) / relpath), pid, camid, modality)


__all__ = ["build_dataset", "load_dataset", "parse_sample_path", "path_parser"]
