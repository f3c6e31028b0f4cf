"""Evaluation protocols: which candidates form each trial's query and gallery.

A protocol never looks at features. It turns a dataset's test-side candidates
into a :class:`Protocol`: one candidate list (``dataset.query + dataset.gallery``,
in that order) and per-trial index arrays into it, plus the exclusion rule and the
identity-dedup flag the metrics must use. The evaluator computes one feature bank
for the candidate list and slices it per trial, so backbone features are extracted
once however many trials there are.

Implemented (details and how they match the reference code: docs/EVALUATION.md):

- :func:`sysu_community`: SYSU-MM01 as nearly every paper since 2020 evaluates it
  (the AGW baseline's ``random.seed(trial)`` + ``random.choice`` gallery);
- :func:`sysu_official`: SYSU-MM01 with the dataset authors' ``rand_perm_cam.mat``;
- :func:`regdb`: one RegDB trial, visible->thermal or thermal->visible;
- :func:`llcm`: LLCM as its authors' code evaluates it, IR->VIS or "VIS->IR";
- :func:`custom`: a manifest's query and gallery rows.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from cmssft.data.records import CrossModalDataset, Modality, Sample
from cmssft.errors import UserError
from cmssft.evaluation.metrics import ExclusionName

SYSU_GALLERY_CAMERAS = {"all": (1, 2, 4, 5), "indoor": (1, 2)}
SYSU_QUERY_CAMERAS = (3, 6)
SYSU_NUM_TRIALS = 10
SYSU_CAMERAS = 6
LLCM_VIS_CAMERAS = (1, 2, 3, 4, 5, 6, 7, 8, 9)
LLCM_NIR_CAMERAS = (1, 2, 4, 5, 6, 7, 8, 9)
LLCM_NUM_TRIALS = 10

Direction = Literal["auto", "v2t", "t2v"]
LLCMDirection = Literal["auto", "ir2vis", "vis2ir"]
Mode = Literal["all", "indoor"]


@dataclass(frozen=True)
class Trial:
    """One query/gallery draw; indices point into :attr:`Protocol.candidates`."""

    index: int  # the protocol's own trial number (SYSU 0..9, RegDB 1..10, custom 0)
    query_idx: np.ndarray  # (Q,) int64
    gallery_idx: np.ndarray  # (G,) int64


@dataclass
class Protocol:
    """Candidates, trials and the metric settings that go with them."""

    name: str  # sysu | sysu-official | regdb | llcm | custom
    description: str  # e.g. "SYSU-MM01 community, all-search, single-shot"
    candidates: list[Sample]
    trials: list[Trial]
    exclusion: ExclusionName
    dedup: bool
    settings: dict[str, object] = field(default_factory=dict)

    def query_samples(self, trial: Trial) -> list[Sample]:
        return [self.candidates[i] for i in trial.query_idx]

    def gallery_samples(self, trial: Trial) -> list[Sample]:
        return [self.candidates[i] for i in trial.gallery_idx]


def candidates_of(dataset: CrossModalDataset) -> list[Sample]:
    """The candidate list every protocol indexes: query candidates, then gallery candidates."""
    return list(dataset.query) + list(dataset.gallery)


def _indices(values: Sequence[int]) -> np.ndarray:
    return np.asarray(values, dtype=np.int64).reshape(-1)


def _gallery_groups(dataset: CrossModalDataset, cameras: Sequence[int]) -> dict[tuple[int, int], list[int]]:
    """(pid, camid) -> candidate indices in sorted file order, for gallery cameras in ``cameras``."""
    offset = len(dataset.query)
    groups: dict[tuple[int, int], list[int]] = {}
    for i, s in enumerate(dataset.gallery):
        if s.camid in cameras:
            groups.setdefault((s.pid, s.camid), []).append(offset + i)
    candidates = dataset.gallery
    for key, members in groups.items():  # sorted(os.listdir()) order, whatever the loader did
        groups[key] = sorted(members, key=lambda j: candidates[j - offset].path)
    return groups


def _check_sysu(dataset: CrossModalDataset, mode: str) -> None:
    if mode not in SYSU_GALLERY_CAMERAS:
        raise UserError(f"SYSU-MM01 mode must be one of {', '.join(SYSU_GALLERY_CAMERAS)}, got {mode!r}")
    if not dataset.query or not dataset.gallery:
        raise UserError(f"dataset {dataset.name} has no query or gallery candidates to evaluate")


def sysu_community(dataset: CrossModalDataset, mode: Mode = "all", trials: int = SYSU_NUM_TRIALS) -> Protocol:
    """The AGW-baseline SYSU-MM01 protocol, draw for draw.

    Trial t (0..trials-1): a ``random.Random(t)`` (the same stream as ``random.seed(t)``);
    for each test id ascending, for each gallery camera in order (all: 1, 2, 4, 5;
    indoor: 1, 2) that has images, ``choice`` over that (id, camera)'s sorted files.
    Queries: every IR candidate (cameras 3 and 6). Exclusion ``sysu``; rank-k on the
    identity-deduplicated list.
    """
    _check_sysu(dataset, mode)
    cameras = SYSU_GALLERY_CAMERAS[mode]
    groups = _gallery_groups(dataset, cameras)
    draw_order = [groups[(pid, cam)] for pid in sorted({p for p, _ in groups}) for cam in cameras
                  if (pid, cam) in groups]
    query_idx = _indices([i for i, s in enumerate(dataset.query) if s.camid in SYSU_QUERY_CAMERAS])
    out = []
    for t in range(trials):
        rng = random.Random(t)
        out.append(Trial(t, query_idx, _indices([rng.choice(files) for files in draw_order])))
    return Protocol(
        name="sysu",
        description=f"SYSU-MM01 community, {mode}-search, single-shot",
        candidates=candidates_of(dataset),
        trials=out,
        exclusion="sysu",
        dedup=True,
        settings={"mode": mode, "shots": 1},
    )


def default_rand_perm_path(root: str | Path) -> Path:
    return Path(root) / "exp" / "rand_perm_cam.mat"


def load_rand_perm(path: str | Path, min_trials: int = SYSU_NUM_TRIALS) -> list[list[np.ndarray]]:
    """Read and validate ``rand_perm_cam.mat``: ``perm[cam - 1][pid - 1]`` is a (trials, n) int array.

    Each row must be a permutation of 1..n (1-based indices into the sorted files of
    that identity in that camera); n = 0 means the identity has no images there.
    """
    import scipy.io

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} does not exist; the official SYSU-MM01 protocol needs the dataset "
                        "authors' rand_perm_cam.mat (evaluation/data_split/ of the SYSU-MM01 release)")
    try:
        content = scipy.io.loadmat(str(path))
    except Exception as err:  # scipy raises several unrelated types for foreign files
        raise UserError(f"{path} is not a readable MATLAB .mat file ({type(err).__name__}: {err})") from None
    foreign = f"{path} is not a SYSU-MM01 rand_perm_cam.mat"
    if "rand_perm_cam" not in content:
        names = sorted(k for k in content if not k.startswith("__"))
        raise UserError(f"{foreign}: it has no variable 'rand_perm_cam' (found {', '.join(names) or 'none'})")
    cells = content["rand_perm_cam"]
    if cells.dtype != object or cells.size != SYSU_CAMERAS:
        raise UserError(f"{foreign}: 'rand_perm_cam' must be a 6x1 cell array, got {cells.dtype} "
                        f"of shape {cells.shape}")
    perm: list[list[np.ndarray]] = []
    for cam, cam_cells in enumerate(cells.reshape(-1), start=1):
        if not isinstance(cam_cells, np.ndarray) or cam_cells.dtype != object:
            raise UserError(f"{foreign}: entry for camera {cam} is not a cell array of identities")
        rows = []
        for pid, matrix in enumerate(cam_cells.reshape(-1), start=1):
            rows.append(_check_perm_matrix(np.asarray(matrix), foreign, cam, pid, min_trials))
        perm.append(rows)
    return perm


def _check_perm_matrix(matrix: np.ndarray, foreign: str, cam: int, pid: int, min_trials: int) -> np.ndarray:
    where = f"{foreign}: camera {cam}, identity {pid}"
    if matrix.size == 0:
        return np.zeros((min_trials, 0), dtype=np.int64)
    if matrix.ndim != 2 or not np.issubdtype(matrix.dtype, np.number):
        raise UserError(f"{where}: expected a numeric trials x images matrix, got {matrix.dtype} "
                        f"{matrix.shape}")
    if matrix.shape[0] < min_trials:
        raise UserError(f"{where}: has {matrix.shape[0]} permutation rows, {min_trials} trials need as many")
    matrix = matrix.astype(np.int64)
    expected = np.arange(1, matrix.shape[1] + 1)
    if not (np.sort(matrix, axis=1) == expected).all():
        raise UserError(f"{where}: rows are not permutations of 1..{matrix.shape[1]}")
    return matrix


def sysu_official(
    dataset: CrossModalDataset,
    perm_path: str | Path | None = None,
    mode: Mode = "all",
    shots: int = 1,
    trials: int = SYSU_NUM_TRIALS,
) -> Protocol:
    """The dataset authors' SYSU-MM01 protocol (``evaluation_SYSU_MM01.m``), from ``rand_perm_cam.mat``.

    Trial t (0-based; MATLAB's run t+1) takes, per gallery camera (outer) and test id
    ascending (inner), the files at the first ``shots`` entries of permutation row t.
    Queries: every IR candidate whose id the file lists for that camera. Exclusion
    ``sysu`` (the official code maps camera 3 onto camera 2's label); rank-k counts each
    identity once, at its best-ranked image.
    """
    _check_sysu(dataset, mode)
    if shots < 1:
        raise UserError(f"shots must be >= 1 (1 single-shot, 10 multi-shot), got {shots}")
    path = Path(perm_path) if perm_path else default_rand_perm_path(dataset.root)
    perm = load_rand_perm(path, trials)
    cameras = SYSU_GALLERY_CAMERAS[mode]
    groups = _gallery_groups(dataset, cameras)
    counts = {key: len(files) for key, files in groups.items()}
    for s in dataset.query:
        if s.camid in SYSU_QUERY_CAMERAS:
            counts[(s.pid, s.camid)] = counts.get((s.pid, s.camid), 0) + 1
    for pid in {p for p, _ in counts}:  # identities absent from a camera count as 0 there
        for cam in (*cameras, *SYSU_QUERY_CAMERAS):
            counts.setdefault((pid, cam), 0)
    _check_perm_matches_tree(perm, counts, path)
    query_idx = _indices([i for i, s in enumerate(dataset.query) if s.camid in SYSU_QUERY_CAMERAS
                          and _perm_row(perm, s.camid, s.pid).shape[1] > 0])
    out = []
    for t in range(trials):
        chosen = []
        for cam in cameras:
            for pid in sorted(p for p, c in groups if c == cam):
                files = groups[(pid, cam)]
                chosen.extend(files[j - 1] for j in _perm_row(perm, cam, pid)[t, :shots])
        out.append(Trial(t, query_idx, _indices(chosen)))
    kind = "single-shot" if shots == 1 else f"multi-shot ({shots})"
    return Protocol(
        name="sysu-official",
        description=f"SYSU-MM01 official (rand_perm_cam.mat), {mode}-search, {kind}",
        candidates=candidates_of(dataset),
        trials=out,
        exclusion="sysu",
        dedup=True,
        settings={"mode": mode, "shots": shots, "rand_perm": str(path)},
    )


def _perm_row(perm: list[list[np.ndarray]], cam: int, pid: int) -> np.ndarray:
    rows = perm[cam - 1]
    return rows[pid - 1] if 0 < pid <= len(rows) else np.zeros((1, 0), dtype=np.int64)


def _check_perm_matches_tree(perm: list[list[np.ndarray]], counts: dict[tuple[int, int], int], path: Path) -> None:
    """Every (id, camera) of the test set must have as many images as the file permutes."""
    for (pid, cam), have in sorted(counts.items()):
        n = _perm_row(perm, cam, pid).shape[1]
        if n != have:
            raise UserError(f"{path} does not fit this dataset: it permutes {n} images of identity "
                            f"{pid} in camera {cam}, the tree has {have}")


def regdb(dataset: CrossModalDataset, trial: int, direction: Direction = "v2t") -> Protocol:
    """One RegDB trial: the trial's test_visible / test_thermal files as loaded, in file order.

    ``v2t`` queries the visible candidates against the thermal ones, ``t2v`` the
    reverse (``auto`` is ``v2t``). No exclusion, standard (non-deduplicated) CMC, like ``eval_regdb``.
    """
    direction = "v2t" if direction == "auto" else direction
    if direction not in ("v2t", "t2v"):
        raise UserError(f"RegDB direction must be v2t or t2v, got {direction!r} (ir2vis/vis2ir are LLCM's)")
    visible = np.arange(len(dataset.query), dtype=np.int64)
    thermal = len(dataset.query) + np.arange(len(dataset.gallery), dtype=np.int64)
    q, g = (visible, thermal) if direction == "v2t" else (thermal, visible)
    arrow = "visible->thermal" if direction == "v2t" else "thermal->visible"
    return Protocol(
        name="regdb",
        description=f"RegDB trial {trial}, {arrow}",
        candidates=candidates_of(dataset),
        trials=[Trial(trial, q, g)],
        exclusion="none",
        dedup=False,
        settings={"direction": direction},
    )


def llcm_draw_order(candidates: Sequence[Sample], modality: Modality) -> list[list[int]]:
    """Candidate indices of ``modality`` grouped per (id, camera): id ascending, camera in the reference's
    order, files sorted by path. One ``random.choice`` per group draws a single-shot set."""
    cameras = LLCM_VIS_CAMERAS if modality == Modality.RGB else LLCM_NIR_CAMERAS
    groups: dict[tuple[int, int], list[int]] = {}
    for i, s in enumerate(candidates):
        if s.modality == modality and s.camid in cameras:
            groups.setdefault((s.pid, s.camid), []).append(i)
    for members in groups.values():  # sorted(os.listdir()) order, whatever the loader did
        members.sort(key=lambda j: candidates[j].path)
    return [groups[(pid, cam)] for pid in sorted({p for p, _ in groups}) for cam in cameras if (pid, cam) in groups]


def llcm(dataset: CrossModalDataset, trials: int = LLCM_NUM_TRIALS, direction: LLCMDirection = "ir2vis") -> Protocol:
    """LLCM, draw for draw as the dataset authors' ``process_*_llcm`` + ``eval_llcm`` + ``test.py`` do.

    The *full* side is every test image of one modality (id ascending, camera order, sorted files);
    the *sampled* side is, for trial t = 0..trials-1, one ``random.Random(t).choice`` per test id
    and camera of the other modality (VIS cameras 1..9, NIR 1, 2, 4..9), id-major.

    - ``ir2vis`` (``auto``): every NIR image queries the sampled VIS gallery;
    - ``vis2ir``: the reference samples the NIR side and swaps the roles when scoring, so the
      *sampled NIR images are the queries* and *every VIS image is the gallery*.

    Exclusion ``same_camera`` (same identity and same camera index, across modalities); rank-k on
    the identity-deduplicated list, AP/INP on the full list.
    """
    direction = "ir2vis" if direction == "auto" else direction
    if direction not in ("ir2vis", "vis2ir"):
        raise UserError(f"LLCM direction must be ir2vis or vis2ir, got {direction!r} (v2t/t2v are RegDB's)")
    candidates = candidates_of(dataset)
    full = Modality.IR if direction == "ir2vis" else Modality.RGB
    sampled = Modality.RGB if direction == "ir2vis" else Modality.IR
    full_idx = _indices([i for i, s in enumerate(candidates) if s.modality == full])
    draw_order = llcm_draw_order(candidates, sampled)
    if len(full_idx) == 0 or not draw_order:
        raise UserError(f"dataset {dataset.name} lacks visible or near-infrared test candidates for LLCM")
    out = []
    for t in range(trials):
        rng = random.Random(t)
        drawn = _indices([rng.choice(files) for files in draw_order])
        out.append(Trial(t, full_idx, drawn) if direction == "ir2vis" else Trial(t, drawn, full_idx))
    if direction == "ir2vis":
        description = "LLCM IR->VIS: all NIR queries, one VIS image per id and camera"
    else:
        description = "LLCM VIS->IR (reference): one NIR query per id and camera, all VIS images as gallery"
    return Protocol(
        name="llcm",
        description=description,
        candidates=candidates,
        trials=out,
        exclusion="same_camera",
        dedup=True,
        settings={"direction": direction, "shots": 1},
    )


def custom(dataset: CrossModalDataset, exclusion: ExclusionName = "same_camera") -> Protocol:
    """A manifest's query rows against its gallery rows, one trial.

    ``same_camera`` (default) drops gallery images of the query's identity taken by the
    query's camera, as single-modality benchmarks do; it changes nothing when query and
    gallery cameras differ. ``none`` keeps everything.
    """
    if exclusion not in ("none", "same_camera"):
        raise UserError(f"custom protocol exclusion must be none or same_camera, got {exclusion!r}")
    if not dataset.query or not dataset.gallery:
        raise UserError("the manifest has no query or no gallery rows to evaluate")
    q = np.arange(len(dataset.query), dtype=np.int64)
    g = len(dataset.query) + np.arange(len(dataset.gallery), dtype=np.int64)
    return Protocol(
        name="custom",
        description=f"custom manifest, exclusion {exclusion}",
        candidates=candidates_of(dataset),
        trials=[Trial(0, q, g)],
        exclusion=exclusion,
        dedup=False,
        settings={"exclusion": exclusion},
    )
