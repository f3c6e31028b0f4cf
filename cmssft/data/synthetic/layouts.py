"""Which files a synthetic dataset has, in the exact layouts of SYSU-MM01, RegDB and LLCM.

Everything here is cheap (no rendering): the file plan, the split / index text
files and SYSU-MM01's ``exp/rand_perm_cam.mat``. ``--like-sysu`` copies the real
identities, splits and per-camera image counts from the packaged resource tables.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from importlib import resources

import numpy as np
import scipy.io

from cmssft.data.records import Modality
from cmssft.data.synthetic.traits import TAG_LAYOUT, TAG_PERMUTATION, TAG_SPLIT

SYSU_CAMERAS = (1, 2, 3, 4, 5, 6)
SYSU_RGB = (1, 2, 4, 5)
SYSU_IR = (3, 6)
SYSU_INDOOR = (1, 2, 3)
SYSU_SPLITS = ("train", "val", "test")
REGDB_VISIBLE, REGDB_THERMAL = 1, 2
REGDB_IMAGES = 10
REGDB_TRIALS = range(1, 11)
LLCM_VIS = (1, 2, 3, 4, 5, 6, 7, 8, 9)
LLCM_NIR = (1, 2, 4, 5, 6, 7, 8, 9)  # as in the real test set: no NIR camera 3
LLCM_TEST_SHARE = 0.33  # 351 of 1,064 identities
LLCM_STREAM = 3  # keeps LLCM's layout stream apart from the other layouts' (same tag, same pid)
PERM_ROWS = 10
MAT_HEADER = b"MATLAB 5.0 MAT-file, written by cmssft.data.synthetic"


@dataclass(frozen=True)
class PlannedFile:
    """One image the generator writes: where, whose, which camera, and its index within the folder."""

    path: str  # relative to the dataset root, forward slashes
    pid: int
    camera: int  # SYSU-MM01: 1..6; RegDB: 1 visible, 2 thermal; LLCM: 1..9 in either modality
    modality: Modality
    index: int  # SYSU-MM01: 1-based image number; RegDB: 0-based frame position (0..9); LLCM: 0-based per camera
    split: str = ""  # SYSU-MM01: train / val / test / none; RegDB: empty (splits vary by trial); LLCM: train / test


def sysu_modality(camera: int) -> Modality:
    return Modality.IR if camera in SYSU_IR else Modality.RGB


# --------------------------------------------------------------------------- SYSU-MM01


def real_sysu_counts() -> dict[int, tuple[int, ...]]:
    """Images per camera (cam1..cam6) of every identity folder of the real SYSU-MM01."""
    text = resources.files("cmssft.resources").joinpath("sysu_mm01_counts.csv").read_text()
    counts = {}
    for line in text.splitlines():
        if not line.strip() or line.startswith("#") or line.startswith("pid"):
            continue
        pid, *cams = (int(v) for v in line.split(","))
        counts[pid] = tuple(cams)
    return counts


def real_sysu_splits() -> dict[str, list[int]]:
    """The official train / val / test identity lists."""
    text = resources.files("cmssft.resources").joinpath("sysu_mm01_split_ids.txt").read_text()
    splits = {}
    for line in text.splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        name, _, ids = line.partition(":")
        splits[name.strip()] = [int(v) for v in ids.split(",") if v.strip()]
    return splits


def small_sysu_splits(ids: int, seed: int) -> dict[str, list[int]]:
    """Ids 1..N shuffled by seed into about 60 / 15 / 25 % train / val / test, at least 2 each."""
    test = max(2, round(0.25 * ids))
    val = max(2, round(0.15 * ids))
    order = np.random.default_rng(np.random.SeedSequence([seed, TAG_SPLIT, 0])).permutation(ids) + 1
    return {
        "train": sorted(order[test + val :].tolist()),
        "val": sorted(order[test : test + val].tolist()),
        "test": sorted(order[:test].tolist()),
    }


def small_sysu_counts(ids: int, seed: int) -> dict[int, tuple[int, ...]]:
    """A few images per camera; every id has an indoor RGB, an outdoor RGB and an IR camera."""
    counts = {}
    for pid in range(1, ids + 1):
        rng = np.random.default_rng(np.random.SeedSequence([seed, TAG_LAYOUT, pid]))
        indoor = [c for c in (1, 2) if rng.random() < 0.7] or [int(rng.choice([1, 2]))]
        outdoor = [c for c in (4, 5) if rng.random() < 0.6] or [int(rng.choice([4, 5]))]
        infrared = [c for c in (3, 6) if rng.random() < 0.75] or [int(rng.choice([3, 6]))]
        if infrared == [3] and indoor == [2]:
            indoor = [1, 2]  # camera-3 queries ignore camera 2: keep an indoor match for them
        row = []
        for cam in SYSU_CAMERAS:
            if cam in infrared:
                row.append(int(rng.integers(4, 9)))
            elif cam in indoor or cam in outdoor:
                row.append(int(rng.integers(3, 7)))
            else:
                row.append(0)
        counts[pid] = tuple(row)
    return counts


def plan_sysu(counts: dict[int, tuple[int, ...]], splits: dict[str, list[int]]) -> list[PlannedFile]:
    """``camC/NNNN/NNNN.jpg`` for every identity, camera and image, identity-major."""
    split_of = {pid: name for name in SYSU_SPLITS for pid in splits.get(name, [])}
    files = []
    for pid in sorted(counts):
        for cam, count in zip(SYSU_CAMERAS, counts[pid], strict=True):
            for i in range(1, count + 1):
                path = f"cam{cam}/{pid:04d}/{i:04d}.jpg"
                files.append(PlannedFile(path, pid, cam, sysu_modality(cam), i, split_of.get(pid, "none")))
    return files


def sysu_split_texts(splits: dict[str, list[int]]) -> dict[str, str]:
    """``exp/<split>_id.txt``: one line of comma-separated ids, as shipped."""
    return {f"exp/{name}_id.txt": ",".join(str(p) for p in splits[name]) + "\n" for name in SYSU_SPLITS}


def counts_from_files(files: list[PlannedFile]) -> dict[int, dict[int, int]]:
    """camera -> pid -> number of images."""
    out: dict[int, dict[int, int]] = {cam: {} for cam in SYSU_CAMERAS}
    for f in files:
        out[f.camera][f.pid] = out[f.camera].get(f.pid, 0) + 1
    return out


def rand_perm_cam(files: list[PlannedFile], seed: int) -> np.ndarray:
    """The official structure: a 6x1 cell of (n_c x 1) cells of 10 x count permutation matrices.

    ``n_c`` is the largest id with images in camera c; ids without images there get (10, 0).
    Row t of an entry is a random permutation of 1..count (the 1-based images of trial t).
    """
    counts = counts_from_files(files)
    outer = np.empty((len(SYSU_CAMERAS), 1), dtype=object)
    for c, cam in enumerate(SYSU_CAMERAS):
        n_c = max(counts[cam], default=0)
        inner = np.empty((n_c, 1), dtype=object)
        for pid in range(1, n_c + 1):
            count = counts[cam].get(pid, 0)
            dtype = np.uint8 if count <= 255 else np.uint16
            rng = np.random.default_rng(np.random.SeedSequence([seed, TAG_PERMUTATION, cam, pid]))
            perms = np.argsort(rng.random((PERM_ROWS, count)), axis=1) + 1
            inner[pid - 1, 0] = perms.astype(dtype)
        outer[c, 0] = inner
    return outer


def rand_perm_cam_bytes(files: list[PlannedFile], seed: int) -> bytes:
    """The .mat file's bytes, with a fixed header text so that equal seeds give equal bytes."""
    buffer = io.BytesIO()
    scipy.io.savemat(buffer, {"rand_perm_cam": rand_perm_cam(files, seed)}, format="5", do_compression=True)
    data = bytearray(buffer.getvalue())
    data[:116] = MAT_HEADER.ljust(116, b" ")
    return bytes(data)


# --------------------------------------------------------------------------- RegDB


@dataclass(frozen=True)
class RegDBIdentity:
    """How RegDB names one identity's files: gender, view and its 10 frame numbers."""

    pid: int
    gender: str
    view: str
    frames: tuple[int, ...]


def regdb_identity(pid: int, female: bool, seed: int) -> RegDBIdentity:
    """Seeded view and consecutive frame numbers (steps of 2 or 3, as in the real data)."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, TAG_LAYOUT, pid]))
    view = "front" if rng.random() < 0.45 else "back"
    step = int(rng.integers(2, 4))
    start = int(rng.integers(100, 99999 - step * REGDB_IMAGES))
    frames = tuple(start + step * k for k in range(REGDB_IMAGES))
    return RegDBIdentity(pid, "female" if female else "male", view, frames)


def regdb_path(ident: RegDBIdentity, k: int, camera: int) -> str:
    folder, letter = ("Visible", "v") if camera == REGDB_VISIBLE else ("Thermal", "t")
    name = f"{ident.gender}_{ident.view}_{letter}_{ident.frames[k]:05d}_{ident.pid}.bmp"
    return f"{folder}/{ident.pid}/{name}"


def plan_regdb(identities: list[RegDBIdentity]) -> list[PlannedFile]:
    """``Visible/<id>/..._v_<frame>_<id>.bmp`` and the thermal twin of each frame."""
    files = []
    for ident in identities:
        for camera, modality in ((REGDB_VISIBLE, Modality.RGB), (REGDB_THERMAL, Modality.IR)):
            for k in range(REGDB_IMAGES):
                files.append(PlannedFile(regdb_path(ident, k, camera), ident.pid, camera, modality, k))
    return files


def regdb_trial_split(pids: list[int], trial: int, seed: int) -> tuple[list[int], list[int]]:
    """A seeded random half of the ids for training, the rest for testing, both in drawn order."""
    order = np.random.default_rng(np.random.SeedSequence([seed, TAG_SPLIT, trial])).permutation(sorted(pids))
    half = len(order) // 2
    return order[:half].tolist(), order[half:].tolist()


def regdb_index_texts(identities: list[RegDBIdentity], seed: int) -> dict[str, str]:
    """``idx/{train,test}_{visible,thermal}_{t}.txt``: ``path label``, labels 0..n-1 in file order."""
    by_pid = {ident.pid: ident for ident in identities}
    texts = {}
    for trial in REGDB_TRIALS:
        for part, pids in zip(("train", "test"), regdb_trial_split(list(by_pid), trial, seed), strict=True):
            for camera, name in ((REGDB_VISIBLE, "visible"), (REGDB_THERMAL, "thermal")):
                lines = [
                    f"{regdb_path(by_pid[pid], k, camera)} {label}\n"
                    for label, pid in enumerate(pids)
                    for k in range(REGDB_IMAGES)
                ]
                texts[f"idx/{part}_{name}_{trial}.txt"] = "".join(lines)
    return texts


# --------------------------------------------------------------------------- LLCM


@dataclass(frozen=True)
class LLCMRecording:
    """One identity seen by one camera in one modality: how many images, and how they are named."""

    pid: int
    camera: int
    modality: Modality
    count: int
    clock: int  # hhmmss of the recording (the ``s`` field of the file name)
    frames: tuple[int, ...]  # frame numbers (the ``f`` field), one per image


def small_llcm_split(ids: int, seed: int) -> tuple[list[int], list[int]]:
    """Ids 1..N shuffled by seed into about two thirds train and one third test, at least 2 each."""
    test = min(ids - 2, max(2, round(LLCM_TEST_SHARE * ids)))
    order = np.random.default_rng(np.random.SeedSequence([seed, TAG_SPLIT, LLCM_STREAM])).permutation(ids) + 1
    return sorted(order[test:].tolist()), sorted(order[:test].tolist())


def _llcm_cameras(rng: np.random.Generator, cameras: tuple[int, ...]) -> list[int]:
    """Two to four of ``cameras``: every identity misses most (id, camera) folders, as in the real data."""
    count = int(rng.integers(2, 5))
    return sorted(int(c) for c in rng.choice(cameras, size=count, replace=False))


def llcm_recordings(ids: int, seed: int) -> list[LLCMRecording]:
    """Per identity: two to four visible and two to four NIR cameras, two to four images each.

    Two cameras per modality keep every query answerable after the same-identity same-camera exclusion.
    """
    out = []
    for pid in range(1, ids + 1):
        rng = np.random.default_rng(np.random.SeedSequence([seed, TAG_LAYOUT, LLCM_STREAM, pid]))
        for modality, cameras in ((Modality.RGB, LLCM_VIS), (Modality.IR, LLCM_NIR)):
            hours = (8, 17) if modality == Modality.RGB else (18, 23)  # visible by day, NIR at night
            for cam in _llcm_cameras(rng, cameras):
                count = int(rng.integers(2, 5))
                clock = int(rng.integers(*hours)) * 10000 + int(rng.integers(60)) * 100 + int(rng.integers(60))
                start, step = int(rng.integers(100, 9000)), int(rng.integers(5, 40))
                frames = tuple(start + step * k for k in range(count))
                out.append(LLCMRecording(pid, cam, modality, count, clock, frames))
    return out


def llcm_path(rec: LLCMRecording, k: int, split: str) -> str:
    """``nir/0001/0001_c01_s185535_f7010_nir.jpg`` (train) or ``test_nir/cam1/0001/...`` (test)."""
    side = "vis" if rec.modality == Modality.RGB else "nir"
    name = f"{rec.pid:04d}_c{rec.camera:02d}_s{rec.clock:06d}_f{rec.frames[k]}_{side}.jpg"
    if split == "test":
        return f"test_{side}/cam{rec.camera}/{rec.pid:04d}/{name}"
    return f"{side}/{rec.pid:04d}/{name}"


def plan_llcm(recordings: list[LLCMRecording], test_ids: list[int]) -> list[PlannedFile]:
    """Every recording's images, identity-major, in the train or test tree of its identity."""
    test = set(test_ids)
    files = []
    for rec in recordings:
        split = "test" if rec.pid in test else "train"
        files.extend(PlannedFile(llcm_path(rec, k, split), rec.pid, rec.camera, rec.modality, k, split)
                     for k in range(rec.count))
    return files


def llcm_index_texts(files: list[PlannedFile], test_ids: list[int]) -> dict[str, str]:
    """``idx/{train,test}_{vis,nir}.txt`` (``path label``, labels 0..n-1 in ascending id order, lines in
    sorted path order) and ``idx/test_id.txt`` (one line of comma-separated ids)."""
    texts = {"idx/test_id.txt": ",".join(str(p) for p in sorted(test_ids)) + "\n"}
    for split in ("train", "test"):
        chosen = [f for f in files if f.split == split]
        label_of = {pid: i for i, pid in enumerate(sorted({f.pid for f in chosen}))}
        for modality, side in ((Modality.RGB, "vis"), (Modality.IR, "nir")):
            lines = sorted(f"{f.path} {label_of[f.pid]}\n" for f in chosen if f.modality == modality)
            texts[f"idx/{split}_{side}.txt"] = "".join(lines)
    return texts
