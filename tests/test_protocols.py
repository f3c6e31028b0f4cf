"""Protocols: SYSU-MM01 community and official galleries, RegDB, custom manifests."""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import scipy.io

from cmssft.data.datasets import load_dataset
from cmssft.data.records import Modality
from cmssft.errors import UserError
from cmssft.evaluation import protocols as P


def make_sysu_tree(
    root: Path, counts: dict[int, tuple[int, ...]], train: list[int], val: list[int], test: list[int]
) -> Path:
    """Empty-file SYSU-MM01 tree; ``counts[pid]`` = images in cameras 1..6."""
    for pid, per_cam in counts.items():
        for cam, n in enumerate(per_cam, start=1):
            if n:
                folder = root / f"cam{cam}" / f"{pid:04d}"
                folder.mkdir(parents=True, exist_ok=True)
                for j in reversed(range(1, n + 1)):  # creation order differs from sorted order
                    (folder / f"{j:04d}.jpg").touch()
    for cam in range(1, 7):
        (root / f"cam{cam}").mkdir(parents=True, exist_ok=True)
    (root / "exp").mkdir(parents=True, exist_ok=True)
    for name, ids in (("train", train), ("val", val), ("test", test)):
        (root / "exp" / f"{name}_id.txt").write_text(",".join(map(str, ids)) + "\n")
    return root


def tiny_counts() -> dict[int, tuple[int, ...]]:
    rng = np.random.default_rng(5)
    counts = {}
    for pid in (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12):
        per_cam = [int(rng.integers(10, 16)) for _ in range(6)]
        if pid in (4, 9):
            per_cam[1] = 0  # no camera 2 (like many real ids)
        if pid == 7:
            per_cam[3] = per_cam[4] = 0  # indoor-only identity
        counts[pid] = tuple(per_cam)
    return counts


@pytest.fixture()
def sysu(tmp_path):
    root = make_sysu_tree(tmp_path / "SYSU-MM01", tiny_counts(), train=[1, 2], val=[3], test=list(range(4, 13)))
    return load_dataset("sysu_mm01", root)


def reference_gallery(root: Path, mode: str, trial: int) -> list[str]:
    """The documented community draw, re-stated directly on the tree with os.listdir."""
    cams = ["cam1", "cam2", "cam4", "cam5"] if mode == "all" else ["cam1", "cam2"]
    ids = open(os.path.join(root, "exp", "test_id.txt")).read().splitlines()[0].split(",")
    random.seed(trial)
    picked = []
    for pid in sorted(f"{int(x):04d}" for x in ids):
        for cam in cams:
            folder = os.path.join(root, cam, pid)
            if os.path.isdir(folder):
                picked.append(random.choice(sorted(folder + "/" + f for f in os.listdir(folder))))
    return picked


@pytest.mark.parametrize("mode", ["all", "indoor"])
def test_community_gallery_equals_reference_draw(sysu, mode):
    state = random.getstate()
    protocol = P.sysu_community(sysu, mode)
    assert random.getstate() == state  # the protocol never touches the global random state
    assert len(protocol.trials) == 10 and [t.index for t in protocol.trials] == list(range(10))
    for trial in protocol.trials:
        ours = [Path(s.path).as_posix() for s in protocol.gallery_samples(trial)]
        assert ours == [Path(p).as_posix() for p in reference_gallery(sysu.root, mode, trial.index)]
    galleries = {tuple(t.gallery_idx) for t in protocol.trials}
    assert len(galleries) > 1


def test_community_query_and_settings(sysu):
    protocol = P.sysu_community(sysu, "all")
    queries = protocol.query_samples(protocol.trials[0])
    assert len(queries) == sum(c[2] + c[5] for pid, c in tiny_counts().items() if pid >= 4)
    assert {s.camid for s in queries} == {3, 6}
    assert protocol.exclusion == "sysu" and protocol.dedup is True
    assert [(s.pid, s.camid) for s in queries] == sorted((s.pid, s.camid) for s in queries)
    gallery = protocol.gallery_samples(protocol.trials[0])
    expected = sum(1 for pid, c in tiny_counts().items() if pid >= 4 for cam in (0, 1, 3, 4) if c[cam])
    assert len(gallery) == expected


def perm_cells(counts: dict[int, tuple[int, ...]], seed: int = 0, rows: int = 10) -> np.ndarray:
    """rand_perm_cam in the real structure: 6x1 cell of (n_ids x 1) cells of rows x count uint8."""
    rng = np.random.default_rng(seed)
    top = max(counts)
    cells = np.empty((6, 1), dtype=object)
    for cam in range(6):
        inner = np.empty((top, 1), dtype=object)
        for pid in range(1, top + 1):
            n = counts.get(pid, (0,) * 6)[cam]
            inner[pid - 1, 0] = (
                np.stack([rng.permutation(n) + 1 for _ in range(rows)]).astype(np.uint8)
                if n
                else np.zeros((rows, 0), dtype=np.uint8)
            )
        cells[cam, 0] = inner
    return cells


def write_perm(path: Path, cells: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    scipy.io.savemat(str(path), {"rand_perm_cam": cells})
    return path


@pytest.mark.parametrize("mode,shots", [("all", 1), ("all", 10), ("indoor", 1), ("indoor", 10)])
def test_official_gallery_from_mat(sysu, mode, shots):
    cells = perm_cells(tiny_counts())
    write_perm(P.default_rand_perm_path(sysu.root), cells)
    protocol = P.sysu_official(sysu, mode=mode, shots=shots)
    cams = P.SYSU_GALLERY_CAMERAS[mode]
    for trial in protocol.trials:
        expected = []
        for cam in cams:  # camera-major, ids ascending, permutation order: as evaluation_SYSU_MM01.m
            for pid in range(4, 13):
                folder = sysu.root / f"cam{cam}" / f"{pid:04d}"
                if folder.is_dir():
                    files = sorted(os.listdir(folder))
                    expected += [str(folder / files[j - 1]) for j in cells[cam - 1, 0][pid - 1, 0][trial.index, :shots]]
        assert [s.path for s in protocol.gallery_samples(trial)] == expected
    assert protocol.exclusion == "sysu" and protocol.dedup
    assert len(protocol.trials[0].query_idx) == len(sysu.query)


def test_official_rejects_foreign_and_mismatched_files(sysu, tmp_path):
    other = tmp_path / "other.mat"
    scipy.io.savemat(str(other), {"something": np.eye(3)})
    with pytest.raises(UserError, match="no variable 'rand_perm_cam'"):
        P.sysu_official(sysu, other)
    (tmp_path / "junk.mat").write_bytes(b"not a mat file at all")
    with pytest.raises(UserError, match="not a readable"):
        P.sysu_official(sysu, tmp_path / "junk.mat")
    with pytest.raises(UserError, match="does not exist"):
        P.sysu_official(sysu, tmp_path / "missing.mat")
    counts = dict(tiny_counts())
    counts[5] = (counts[5][0] + 1, *counts[5][1:])  # one image more than the tree has
    with pytest.raises(UserError, match="identity 5 in camera 1"):
        P.sysu_official(sysu, write_perm(tmp_path / "wrong.mat", perm_cells(counts)))
    bad = perm_cells(tiny_counts())
    bad[0, 0][4, 0][0, :2] = 1  # row 0 of identity 5, camera 1 is no permutation
    with pytest.raises(UserError, match="not permutations"):
        P.sysu_official(sysu, write_perm(tmp_path / "bad.mat", bad))


def test_real_rand_perm_file(split_files, tmp_path):
    real_perm = split_files / "sysu-mm01" / "exp" / "rand_perm_cam.mat"
    perm = P.load_rand_perm(real_perm)
    assert len(perm) == 6
    test_ids = [int(x) for x in (real_perm.parent / "test_id.txt").read_text().split(",")]
    counts = {pid: tuple(P._perm_row(perm, cam, pid).shape[1] for cam in range(1, 7)) for pid in test_ids}
    counts[1] = (1, 0, 0, 0, 0, 0)  # one training image so the loader accepts the tree
    root = make_sysu_tree(tmp_path / "SYSU-MM01", counts, train=[1], val=[], test=test_ids)
    (root / "exp" / "val_id.txt").write_text("1\n")
    shutil.copy(real_perm, root / "exp" / "rand_perm_cam.mat")
    dataset = load_dataset("sysu_mm01", root)
    sizes = {
        (mode, shots): len(P.sysu_official(dataset, mode=mode, shots=shots, trials=1).trials[0].gallery_idx)
        for mode, shots in (("all", 1), ("indoor", 1), ("all", 10))
    }
    assert sizes == {("all", 1): 301, ("indoor", 1): 112, ("all", 10): 3010}
    official = P.sysu_official(dataset)
    assert len(official.trials[0].query_idx) == 3803
    community = P.sysu_community(dataset, "all")
    assert len(community.trials[0].gallery_idx) == 301 and len(community.trials[0].query_idx) == 3803


def make_regdb_tree(root: Path, idx_source: Path) -> Path:
    """Empty-file RegDB tree around the idx files (the loader reads paths from them)."""
    shutil.copytree(idx_source, root / "idx")
    for name in ("Visible", "Thermal"):
        (root / name).mkdir(parents=True, exist_ok=True)
    for line in (root / "idx" / "test_visible_1.txt").read_text().splitlines():
        target = root / line.split()[0]
        target.parent.mkdir(parents=True, exist_ok=True)
        target.touch()
    return root


@pytest.mark.parametrize("direction", ["v2t", "t2v"])
def test_regdb_real_idx(split_files, tmp_path, direction):
    root = make_regdb_tree(tmp_path / "RegDB", split_files / "regdb" / "idx")
    dataset = load_dataset("regdb", root, trial=1)
    protocol = P.regdb(dataset, 1, direction)
    trial = protocol.trials[0]
    queries, gallery = protocol.query_samples(trial), protocol.gallery_samples(trial)
    assert len(queries) == 2060 and len(gallery) == 2060
    assert len({s.pid for s in queries}) == 206 and {s.pid for s in queries} == {s.pid for s in gallery}
    q_mod, g_mod = ("Visible", "Thermal") if direction == "v2t" else ("Thermal", "Visible")
    assert all(f"/{q_mod}/" in s.path for s in queries) and all(f"/{g_mod}/" in s.path for s in gallery)
    lines = (root / "idx" / f"test_{'visible' if direction == 'v2t' else 'thermal'}_1.txt").read_text().split("\n")
    assert [Path(s.path).relative_to(root).as_posix() for s in queries] == [ln.split()[0] for ln in lines if ln]
    assert protocol.exclusion == "none" and not protocol.dedup and trial.index == 1


@pytest.mark.parametrize("direction", ["v2t", "t2v", "auto"])
def test_regdb_direction_picks_the_query_modality(regdb_root, direction):
    """v2t (and auto) queries the visible images against the thermal ones, t2v the reverse, every trial."""
    visible_first = direction != "t2v"
    for trial in (1, 7):
        dataset = load_dataset("regdb", regdb_root, trial=trial)
        protocol = P.regdb(dataset, trial, direction)
        (only,) = protocol.trials
        queries, gallery = protocol.query_samples(only), protocol.gallery_samples(only)
        visible, thermal = list(dataset.query), list(dataset.gallery)  # the loader: query = visible
        assert [s.path for s in queries] == [s.path for s in (visible if visible_first else thermal)]
        assert [s.path for s in gallery] == [s.path for s in (thermal if visible_first else visible)]
        q_mod, g_mod = (Modality.RGB, Modality.IR) if visible_first else (Modality.IR, Modality.RGB)
        assert {s.modality for s in queries} == {q_mod} and {s.modality for s in gallery} == {g_mod}
        q_dir, g_dir = ("Visible", "Thermal") if visible_first else ("Thermal", "Visible")
        assert all(f"/{q_dir}/" in s.path for s in queries) and all(f"/{g_dir}/" in s.path for s in gallery)
        arrow = "visible->thermal" if visible_first else "thermal->visible"
        assert protocol.description == f"RegDB trial {trial}, {arrow}" and only.index == trial
        assert protocol.settings["direction"] == ("t2v" if direction == "t2v" else "v2t")


def test_custom_manifest(tmp_path):
    rows = ["path,pid,camid,modality,split"]
    rows += [f"q{i}.jpg,{i % 3},1,ir,query" for i in range(6)]
    rows += [f"g{i}.jpg,{i % 3},2,rgb,gallery" for i in range(9)]
    (tmp_path / "m.csv").write_text("\n".join(rows) + "\n")
    dataset = load_dataset("custom", tmp_path, manifest="m.csv")
    protocol = P.custom(dataset)
    assert protocol.exclusion == "same_camera" and len(protocol.trials) == 1
    assert len(protocol.trials[0].query_idx) == 6 and len(protocol.trials[0].gallery_idx) == 9
    assert P.custom(dataset, "none").exclusion == "none"
    with pytest.raises(UserError):
        P.custom(dataset, "sysu")
