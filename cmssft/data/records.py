"""The sample record every dataset produces and every consumer reads."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from pathlib import Path


class Modality(enum.IntEnum):
    """Imaging modality; the integer value is what tensors carry (0 = RGB, 1 = IR)."""

    RGB = 0
    IR = 1


@dataclass(frozen=True)
class Sample:
    """One image.

    ``pid`` is the identity as the dataset names it (folder number); ``label`` is
    the contiguous training label (0..num_ids-1) or -1 outside the training split.
    ``camid`` is the dataset's own camera number (SYSU-MM01: 1..6).
    """

    path: str
    pid: int
    camid: int
    modality: Modality
    label: int = -1


@dataclass
class CrossModalDataset:
    """Everything a run needs from one dataset.

    ``query`` and ``gallery`` are the test-side *candidates*: protocols draw the
    per-trial query and gallery sets from them (see ``cmssft.evaluation``).
    ``val_query``/``val_gallery`` hold identities set aside from training for
    model selection (empty when the dataset offers none).
    """

    name: str
    root: Path
    train: list[Sample]
    query: list[Sample]
    gallery: list[Sample]
    val_query: list[Sample] = field(default_factory=list)
    val_gallery: list[Sample] = field(default_factory=list)

    @property
    def num_train_ids(self) -> int:
        return len({s.label for s in self.train})

    def summary(self) -> str:
        def line(split: str, samples: list[Sample]) -> str:
            ids = len({s.pid for s in samples})
            rgb = sum(s.modality == Modality.RGB for s in samples)
            return f"  {split:<12} {ids:>5} ids {rgb:>7} rgb {len(samples) - rgb:>7} ir"

        parts = [f"dataset {self.name} at {self.root}"]
        for split in ("train", "query", "gallery", "val_query", "val_gallery"):
            samples = getattr(self, split)
            if samples:
                parts.append(line(split, samples))
        return "\n".join(parts)


def assign_labels(samples: list[Sample]) -> list[Sample]:
    """Give training samples contiguous labels in ascending ``pid`` order."""
    mapping = {pid: i for i, pid in enumerate(sorted({s.pid for s in samples}))}
    return [Sample(s.path, s.pid, s.camid, s.modality, mapping[s.pid]) for s in samples]


def relative_path(sample: Sample, root: Path) -> str:
    """The sample's path relative to its dataset root, with forward slashes."""
    return Path(sample.path).relative_to(root).as_posix()
