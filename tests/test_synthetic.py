"""The synthetic generator: real layouts and shapes, determinism, and traits shared across modalities."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pytest
import scipy.io
from hypothesis import given, settings
from hypothesis import strategies as st

from cmssft.config import SyntheticConfig
from cmssft.data.records import Modality
from cmssft.data.synthetic import (
    difficulty_params,
    ensure_synthetic,
    generate_dataset,
    plan_dataset,
    plan_metadata,
)
from cmssft.data.synthetic.__main__ import main as cli_main
from cmssft.data.synthetic.generate import make_spec, render_file
from cmssft.errors import UserError, run_cli

TINY = {"height": 64, "width": 32, "progress": False}
SYSU_RE = re.compile(r"^cam([1-6])/(\d{4})/(\d{4})\.jpg$")
REGDB_RE = re.compile(r"^(Visible|Thermal)/(\d+)/(male|female)_(front|back)_([vt])_(\d{5})_(\d+)\.bmp$")
IDX_LINE_RE = re.compile(r"^(\S+) (\d+)$")


def tree_files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def sysu_tree(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synth") / "SYSU-MM01"
    generate_dataset("sysu", root, ids=8, seed=3, **TINY)
    return root


@pytest.fixture(scope="module")
def regdb_tree(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synth") / "RegDB"
    generate_dataset("regdb", root, ids=6, seed=3, **TINY)
    return root


# --------------------------------------------------------------------------- determinism


def test_same_seed_is_byte_identical_and_independent_of_workers(tmp_path, sysu_tree):
    again = tmp_path / "again"
    generate_dataset("sysu", again, ids=8, seed=3, workers=2, **TINY)
    assert tree_files(again) == tree_files(sysu_tree)


def test_different_seed_differs(tmp_path, sysu_tree):
    other = tmp_path / "other"
    generate_dataset("sysu", other, ids=8, seed=4, **TINY)
    a, b = tree_files(sysu_tree), tree_files(other)
    common = sorted(set(a) & set(b) - {"exp/train_id.txt", "exp/val_id.txt", "exp/test_id.txt"})
    assert common and sum(a[k] != b[k] for k in common) > 0.9 * len(common)


# --------------------------------------------------------------------------- SYSU-MM01 layout


def test_sysu_tree_has_the_real_naming(sysu_tree):
    files = [p.relative_to(sysu_tree).as_posix() for p in sysu_tree.rglob("*.jpg")]
    assert files and all(SYSU_RE.match(f) for f in files)
    folders: dict[tuple[str, str], list[int]] = {}
    for f in files:
        cam, pid, number = SYSU_RE.match(f).groups()
        folders.setdefault((cam, pid), []).append(int(number))
    for numbers in folders.values():  # contiguous from 0001 in every folder
        assert sorted(numbers) == list(range(1, len(numbers) + 1))
    split_ids = []
    for name in ("train", "val", "test"):
        text = (sysu_tree / "exp" / f"{name}_id.txt").read_text()
        assert re.fullmatch(r"\d+(,\d+)*\n", text), text
        ids = [int(v) for v in text.strip().split(",")]
        assert len(ids) >= 2 and ids == sorted(ids)
        split_ids += ids
    assert sorted(split_ids) == list(range(1, 9))


def test_sysu_every_identity_has_indoor_outdoor_and_ir_images():
    files = plan_dataset("sysu", ids=40, seed=1)
    cams: dict[int, set[int]] = {}
    for f in files:
        cams.setdefault(f.pid, set()).add(f.camera)
    assert sorted(cams) == list(range(1, 41))
    for seen in cams.values():
        assert seen & {1, 2} and seen & {4, 5} and seen & {3, 6}


def test_sysu_images_are_three_channel_and_ir_is_grey(sysu_tree):
    for cam in (1, 3, 4, 6):
        path = next((sysu_tree / f"cam{cam}").rglob("*.jpg"))
        image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        assert image.shape == (64, 32, 3)
        grey = bool((image[:, :, 0] == image[:, :, 1]).all() and (image[:, :, 1] == image[:, :, 2]).all())
        assert grey == (cam in (3, 6))


def test_rand_perm_cam_matches_tree(sysu_tree):
    mat = scipy.io.loadmat(str(sysu_tree / "exp" / "rand_perm_cam.mat"))["rand_perm_cam"]
    assert mat.shape == (6, 1)
    for c in range(6):
        folders = {int(p.name): len(list(p.glob("*.jpg"))) for p in (sysu_tree / f"cam{c + 1}").iterdir()}
        cell = mat[c, 0]
        assert cell.shape == (max(folders), 1)
        for pid in range(1, cell.shape[0] + 1):
            perms = cell[pid - 1, 0]
            count = folders.get(pid, 0)
            assert perms.shape == (10, count)
            for row in perms:
                assert sorted(row.tolist()) == list(range(1, count + 1))


def test_like_sysu_plan_has_the_real_shapes():
    files = plan_dataset("sysu", like_sysu=True)
    rgb = [f for f in files if f.modality == Modality.RGB]
    ir = [f for f in files if f.modality == Modality.IR]
    assert (len(rgb), len(ir)) == (30071, 15792)
    assert len({f.pid for f in files}) == 513
    assert len({f.pid for f in files if f.split == "none"}) == 22
    train_val = [f for f in files if f.split in ("train", "val")]
    assert sum(f.modality == Modality.RGB for f in train_val) == 22258
    assert sum(f.modality == Modality.IR for f in train_val) == 11909
    test = [f for f in files if f.split == "test"]
    assert sum(f.camera in (3, 6) for f in test) == 3803
    per_cam = Counter((f.pid, f.camera) for f in test if f.modality == Modality.RGB)
    assert len(per_cam) == 301
    assert sum(1 for pid, cam in per_cam if cam in (1, 2)) == 112
    assert sum(min(n, 10) for n in per_cam.values()) == 3010
    texts = plan_metadata("sysu", like_sysu=True)
    assert [len(texts[f"exp/{s}_id.txt"].split(",")) for s in ("train", "val", "test")] == [296, 99, 96]


def test_like_sysu_matches_the_real_split_files(split_files):
    texts = plan_metadata("sysu", like_sysu=True)
    for name in ("train", "val", "test"):
        real = (split_files / "sysu-mm01" / "exp" / f"{name}_id.txt").read_text()
        assert [int(v) for v in texts[f"exp/{name}_id.txt"].split(",")] == [int(v) for v in real.split(",")]


# --------------------------------------------------------------------------- RegDB layout


def test_regdb_tree_has_the_real_naming(regdb_tree):
    visible = sorted(p.relative_to(regdb_tree).as_posix() for p in (regdb_tree / "Visible").rglob("*.bmp"))
    thermal = sorted(p.relative_to(regdb_tree).as_posix() for p in (regdb_tree / "Thermal").rglob("*.bmp"))
    assert len(visible) == len(thermal) == 60
    for v, t in zip(visible, thermal, strict=True):
        mv, mt = REGDB_RE.match(v), REGDB_RE.match(t)
        assert mv and mt and mv.group(5) == "v" and mt.group(5) == "t"
        assert mv.group(2) == mv.group(7) and v.replace("Visible", "Thermal").replace("_v_", "_t_") == t
    image = cv2.imread(str(regdb_tree / thermal[0]), cv2.IMREAD_UNCHANGED)
    assert image.shape == (64, 32, 3) and (image[:, :, 0] == image[:, :, 2]).all()


def test_regdb_index_files(regdb_tree):
    names = sorted(p.name for p in (regdb_tree / "idx").iterdir())
    expected = sorted(
        f"{a}_{m}_{t}.txt" for a in ("train", "test") for m in ("visible", "thermal") for t in range(1, 11)
    )
    assert names == expected
    for trial in range(1, 11):
        train_ids: set[int] = set()
        for part in ("train", "test"):
            vis = (regdb_tree / "idx" / f"{part}_visible_{trial}.txt").read_text().splitlines()
            thr = (regdb_tree / "idx" / f"{part}_thermal_{trial}.txt").read_text().splitlines()
            assert len(vis) == len(thr) == 30
            labels, pids = [], []
            for lv, lt in zip(vis, thr, strict=True):
                pv, label = IDX_LINE_RE.match(lv).groups()
                assert lt == f"{pv.replace('Visible', 'Thermal').replace('_v_', '_t_')} {label}"
                assert (regdb_tree / pv).is_file()
                labels.append(int(label))
                pids.append(int(pv.split("/")[1]))
            order = list(dict.fromkeys(pids))  # labels 0..n-1 in file order, one per identity
            assert labels == [order.index(p) for p in pids]
            if part == "train":
                train_ids = set(order)
            else:
                assert not train_ids & set(order) and len(train_ids | set(order)) == 6


def test_regdb_full_size_plan():
    files = plan_dataset("regdb", ids=412)
    assert len(files) == 8240
    texts = plan_metadata("regdb", ids=412)
    assert len(texts) == 40
    for trial in (1, 10):
        for part in ("train", "test"):
            lines = texts[f"idx/{part}_visible_{trial}.txt"].splitlines()
            assert len(lines) == 2060
            assert len({line.split("/")[1] for line in lines}) == 206
            assert {int(line.split()[1]) for line in lines} == set(range(206))


# --------------------------------------------------------------------------- traits


def test_rgb_and_ir_share_the_silhouette_at_difficulty_zero():
    spec = make_spec("sysu", ids=10, difficulty=0.0, height=128, width=64)
    files = plan_dataset("sysu", ids=10, difficulty=0.0)
    context: dict = {}
    first = {}
    for f in files:
        first.setdefault((f.pid, f.modality), render_file(spec, f, context)[1])

    def iou(a: np.ndarray, b: np.ndarray) -> float:
        return float((a & b).sum() / max((a | b).sum(), 1))

    pids = sorted({f.pid for f in files})
    same = [iou(first[p, Modality.RGB], first[p, Modality.IR]) for p in pids]
    other = [iou(first[p, Modality.RGB], first[q, Modality.IR]) for p in pids for q in pids if p != q]
    assert min(same) > 0.95
    assert np.mean(other) < 0.9


def test_identities_differ_more_than_images_of_one_identity():
    """Average pixel distance between RGB images: same identity across cameras < different identities."""
    spec = make_spec("sysu", ids=10, difficulty=0.3)
    files = [f for f in plan_dataset("sysu", ids=10, difficulty=0.3) if f.modality == Modality.RGB]
    context: dict = {}
    images: dict[int, list[np.ndarray]] = {}
    for f in files:
        images.setdefault(f.pid, []).append(render_file(spec, f, context)[0].astype(np.float32))
    pids = sorted(images)
    same = np.mean([np.abs(images[p][0] - images[p][-1]).mean() for p in pids])
    diff = np.mean([np.abs(images[p][0] - images[q][-1]).mean() for p in pids for q in pids if p != q])
    assert same < diff


def test_difficulty_is_monotone():
    low, mid, high = (difficulty_params(d) for d in (0.0, 0.5, 1.0))
    for name in ("prototype_share", "colour_jitter", "pose", "noise", "occlusion", "blur", "clutter"):
        assert getattr(low, name) <= getattr(mid, name) < getattr(high, name)
    assert low.ir_contrast > mid.ir_contrast > high.ir_contrast


# --------------------------------------------------------------------------- entry points


def test_cli_refuses_non_empty_out_and_bad_arguments(tmp_path, capsys):
    out = tmp_path / "data"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert run_cli(cli_main, ["--layout", "regdb", "--out", str(out), "--ids", "2", "--size", "32x16"]) == 2
    assert "not empty" in capsys.readouterr().err
    for bad in (["--layout", "nope"], ["--size", "12"], ["--difficulty", "2"], ["--like-sysu", "--ids", "8"]):
        args = ["--layout", "sysu", "--out", str(tmp_path / "x"), *bad]
        assert run_cli(cli_main, args) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1
    code = run_cli(cli_main, ["--layout", "regdb", "--out", str(out), "--ids", "2", "--size", "32x16", "--force"])
    assert code == 0
    assert (out / "keep.txt").read_text() == "mine" and (out / "idx" / "train_visible_1.txt").is_file()
    assert "images/s" in capsys.readouterr().out


def test_generate_rejects_bad_arguments(tmp_path):
    with pytest.raises(UserError):
        generate_dataset("market", tmp_path / "a", progress=False)
    with pytest.raises(UserError):
        generate_dataset("regdb", tmp_path / "a", like_sysu=True, progress=False)
    with pytest.raises(UserError):
        generate_dataset("sysu", tmp_path / "a", ids=3, progress=False)


def test_ensure_synthetic_only_fills_missing_roots(tmp_path):
    cfg = SyntheticConfig(enabled=True, ids=6, height=32, width=16)
    root = tmp_path / "SYSU-MM01"
    assert ensure_synthetic(root, "sysu", cfg) is True
    assert (root / "exp" / "test_id.txt").is_file()
    assert ensure_synthetic(root, "sysu", cfg) is False
    assert ensure_synthetic(tmp_path / "off", "regdb", SyntheticConfig(enabled=False)) is False
    assert not (tmp_path / "off").exists()


def test_ensure_synthetic_leaves_nothing_behind_when_generation_fails(tmp_path, monkeypatch):
    from cmssft.data.synthetic import generate as gen

    def crash(spec, root, files, workers, progress):
        (root / "cam1" / "0001").mkdir(parents=True, exist_ok=True)
        (root / "cam1" / "0001" / "0001.jpg").write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(gen, "_render_all", crash)
    root = tmp_path / "SYSU-MM01"
    with pytest.raises(KeyboardInterrupt):
        ensure_synthetic(root, "sysu", SyntheticConfig(enabled=True, ids=6, height=32, width=16))
    assert sorted(tmp_path.iterdir()) == []  # no partial tree that a later run would take for data
    monkeypatch.undo()
    assert ensure_synthetic(root, "sysu", SyntheticConfig(enabled=True, ids=6, height=32, width=16)) is True


def test_runs_started_together_install_one_whole_tree(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    cfg = SyntheticConfig(enabled=True, ids=6, height=32, width=16)
    root = tmp_path / "SYSU-MM01"
    root.mkdir()  # an empty root is filled as a missing one
    with ThreadPoolExecutor(3) as pool:
        generated = list(pool.map(lambda _: ensure_synthetic(root, "sysu", cfg), range(3)))
    assert generated.count(True) >= 1
    assert [p.name for p in tmp_path.iterdir()] == ["SYSU-MM01"]
    alone = tmp_path.parent / (tmp_path.name + "-alone")
    generate_dataset("sysu", alone, ids=6, height=32, width=16, progress=False)
    files = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
    assert files == sorted(str(p.relative_to(alone)) for p in alone.rglob("*") if p.is_file())
    assert all((root / f).read_bytes() == (alone / f).read_bytes() for f in files)


@settings(max_examples=25, deadline=None)
@given(ids=st.integers(min_value=6, max_value=300), seed=st.integers(min_value=0, max_value=2**31))
def test_small_sysu_splits_partition_the_ids(ids, seed):
    texts = plan_metadata("sysu", ids=ids, seed=seed)
    splits = [[int(v) for v in texts[f"exp/{s}_id.txt"].split(",")] for s in ("train", "val", "test")]
    assert all(len(s) >= 2 for s in splits)
    assert sorted(sum(splits, [])) == list(range(1, ids + 1))
    assert abs(len(splits[2]) - 0.25 * ids) <= 2 and abs(len(splits[1]) - 0.15 * ids) <= 2
