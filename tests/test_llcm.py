"""LLCM: file-name parsing, the loader, the synthetic layout, both protocol directions and eval.py."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from cmssft.config import SyntheticConfig, load_config
from cmssft.data.datasets import load_dataset, parse_sample_path
from cmssft.data.datasets.llcm import parse_path
from cmssft.data.records import CrossModalDataset, Modality, Sample, relative_path
from cmssft.data.synthetic import ensure_synthetic, generate_dataset, plan_dataset, plan_metadata
from cmssft.data.synthetic.__main__ import main as synth_main
from cmssft.errors import DatasetError, UserError, run_cli
from cmssft.evaluation import Evaluator
from cmssft.evaluation import protocols as P
from cmssft.evaluation.cli import main as eval_main
from cmssft.evaluation.features_io import save_features

TINY = {"height": 64, "width": 32, "progress": False}
IDS, SEED = 9, 1
VIS, NIR = (1, 2, 3, 4, 5, 6, 7, 8, 9), (1, 2, 4, 5, 6, 7, 8, 9)
NAME_RE = r"(\d{4})_c(\d{2})_s\d{6}_f\d+_(vis|nir)\.jpg"
TRAIN_RE = re.compile(rf"^(vis|nir)/(\d{{4}})/{NAME_RE}$")
TEST_RE = re.compile(rf"^test_(vis|nir)/cam(\d)/(\d{{4}})/{NAME_RE}$")


@pytest.fixture(scope="module")
def llcm_root(tmp_path_factory) -> Path:
    """A 9-identity LLCM tree of 64x32 images (6 train, 3 test identities)."""
    root = tmp_path_factory.mktemp("llcm") / "LLCM"
    generate_dataset("llcm", root, ids=IDS, seed=SEED, **TINY)
    return root


@pytest.fixture(scope="module")
def llcm(llcm_root) -> CrossModalDataset:
    return load_dataset("llcm", llcm_root)


def tree_paths(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*.jpg"))


# --------------------------------------------------------------------------- file names


def test_parses_the_real_file_names():
    assert parse_path("nir/0001/0001_c01_s185535_f7010_nir.jpg") == (1, 1, Modality.IR)
    assert parse_path("vis/0712/0712_c09_s101010_f15_vis.jpg") == (712, 9, Modality.RGB)
    assert parse_path("test_nir/cam1/0003/0003_c01_s185734_f3195_nir.jpg") == (3, 1, Modality.IR)
    assert parse_path("test_vis/cam3/0003/0003_c03_s085734_f95_vis.jpg") == (3, 3, Modality.RGB)
    sample = parse_sample_path("llcm", "/data/LLCM", "test_nir/cam9/1064/1064_c09_s000000_f1_nir.jpg")
    assert (sample.pid, sample.camid, sample.modality) == (1064, 9, Modality.IR)
    assert sample.path == "/data/LLCM/test_nir/cam9/1064/1064_c09_s000000_f1_nir.jpg"


@pytest.mark.parametrize("path, message", [
    ("nir/0002/0001_c01_s185535_f7010_nir.jpg", "folder says 2"),
    ("test_nir/cam2/0003/0003_c01_s185734_f3195_nir.jpg", "folder says cam2"),
    ("nir/0001/img_0001.jpg", "does not start with"),
    ("cam3/0001/0001.jpg", "not an LLCM image path"),
])
def test_path_mistakes_are_named(path, message):
    with pytest.raises(DatasetError, match=message):
        parse_path(path)


# --------------------------------------------------------------------------- synthetic layout


def test_synthetic_tree_has_the_real_layout(llcm_root):
    paths = tree_paths(llcm_root)
    test_ids = [int(v) for v in (llcm_root / "idx" / "test_id.txt").read_text().split(",")]
    assert (llcm_root / "idx" / "test_id.txt").read_text().count("\n") == 1
    for path in paths:
        train, test = TRAIN_RE.match(path), TEST_RE.match(path)
        assert train or test, path
        if train:
            side, pid, name_pid, cam, suffix = train.groups()
            assert int(pid) not in test_ids and int(cam) in (VIS if side == "vis" else NIR)
        else:
            side, cam, pid, name_pid, name_cam, suffix = test.groups()
            assert int(pid) in test_ids and int(name_cam) == int(cam)
            assert not (side == "nir" and cam == "3")
        assert name_pid == pid and suffix == side
    test_folders = {p.rsplit("/", 1)[0] for p in paths if p.startswith("test_")}
    assert len(test_folders) < len(test_ids) * (len(VIS) + len(NIR))  # most (id, camera) folders are missing
    for name in ("train_vis", "train_nir", "test_vis", "test_nir"):
        lines = (llcm_root / "idx" / f"{name}.txt").read_text().splitlines()
        listed = [line.split(" ")[0] for line in lines]
        assert all(re.fullmatch(r"\S+ \d+", line) for line in lines)
        split, side = name.split("_")
        prefix = f"{side}/" if split == "train" else f"test_{side}/"
        assert sorted(listed) == [p for p in paths if p.startswith(prefix)]


def test_synthetic_is_deterministic_and_cli_writes_the_same_tree(llcm_root, tmp_path, capsys):
    again = tmp_path / "again"
    assert run_cli(synth_main, ["--layout", "llcm", "--out", str(again), "--ids", str(IDS), "--size", "64x32",
                                "--seed", str(SEED)]) == 0
    assert tree_paths(again) == tree_paths(llcm_root)
    for rel in tree_paths(llcm_root)[:5] + ["idx/train_vis.txt", "idx/test_id.txt"]:
        assert (again / rel).read_bytes() == (llcm_root / rel).read_bytes(), rel
    assert plan_metadata("llcm", ids=IDS, seed=SEED)["idx/test_nir.txt"] == (again / "idx/test_nir.txt").read_text()
    other = plan_dataset("llcm", ids=IDS, seed=SEED + 1)
    assert [f.path for f in other] != [f.path for f in plan_dataset("llcm", ids=IDS, seed=SEED)]
    assert run_cli(synth_main, ["--layout", "llcm", "--out", str(tmp_path / "x"), "--ids", "3"]) == 2
    assert "--ids for layout llcm" in capsys.readouterr().err


def test_ensure_synthetic_accepts_llcm(tmp_path):
    cfg = SyntheticConfig(enabled=True, ids=5, height=32, width=16)
    assert ensure_synthetic(tmp_path / "LLCM", "llcm", cfg)
    assert load_dataset("llcm", tmp_path / "LLCM").num_train_ids == 3


# --------------------------------------------------------------------------- loader


def test_loader_reads_the_generated_tree(llcm_root, llcm):
    planned = plan_dataset("llcm", ids=IDS, seed=SEED)
    train = [f for f in planned if f.split == "train"]
    assert len(llcm.train) == len(train)
    labels = sorted({s.label for s in llcm.train})
    assert labels == list(range(6)) == list(range(llcm.num_train_ids))
    pids = sorted({s.pid for s in llcm.train})
    assert all(s.label == pids.index(s.pid) for s in llcm.train)
    for pid in pids:  # the sampler needs both modalities of every training identity
        assert {s.modality for s in llcm.train if s.pid == pid} == {Modality.RGB, Modality.IR}
    assert [relative_path(s, llcm_root) for s in llcm.query] == [
        f.path for f in sorted((f for f in planned if f.split == "test" and f.modality == Modality.RGB),
                               key=lambda f: (f.pid, f.camera, f.path))]
    assert {s.modality for s in llcm.query} == {Modality.RGB} and {s.modality for s in llcm.gallery} == {Modality.IR}
    assert len(llcm.gallery) == sum(f.split == "test" and f.modality == Modality.IR for f in planned)
    for s in llcm.query + llcm.gallery + llcm.train:
        assert (s.pid, s.camid, s.modality) == parse_path(relative_path(s, llcm_root))


def copy_tree(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_index_mistakes_name_file_and_line(llcm_root, tmp_path):
    root = copy_tree(llcm_root, tmp_path / "LLCM")
    index = root / "idx" / "train_nir.txt"
    lines = index.read_text().splitlines()
    first_path, first_label = lines[0].split()
    index.write_text("\n".join([lines[0], f"{first_path} {int(first_label) + 1}"]) + "\n")
    with pytest.raises(DatasetError, match=r"train_nir\.txt:2: (label \d+ names identity|identity \d+ has label)"):
        load_dataset("llcm", root)
    index.write_text(f"{first_path.replace('_nir.jpg', 'x_nir.jpg')} 0\n")
    with pytest.raises(DatasetError, match=r"train_nir\.txt:1: listed image .* does not exist"):
        load_dataset("llcm", root)
    index.write_text(f"{first_path}\n")
    with pytest.raises(DatasetError, match=r"train_nir\.txt:1: expected '<path> <label>'"):
        load_dataset("llcm", root)
    vis_line = (root / "idx" / "train_vis.txt").read_text().splitlines()[0]
    index.write_text(vis_line + "\n")
    with pytest.raises(DatasetError, match=r"train_nir\.txt:1: .* is not under nir/"):
        load_dataset("llcm", root)


def test_loader_rejects_a_validation_split(llcm_root):
    with pytest.raises(DatasetError, match="no validation identities"):
        load_dataset("llcm", llcm_root, train_ids="train")


# --------------------------------------------------------------------------- protocol


def reference_lists(root: Path, trial: int, direction: str) -> tuple[list[str], list[str]]:
    """The reference code restated plainly: (query paths, gallery paths) as its scoring sees them."""
    with open(os.path.join(root, "idx/test_id.txt")) as handle:
        ids = [f"{int(y):04d}" for y in handle.read().splitlines()[0].split(",")]

    def folders(side: str) -> list[str]:
        cams = [f"cam{c}" for c in (VIS if side == "vis" else NIR)]
        out = []
        for pid in sorted(ids):
            for cam in cams:
                folder = os.path.join(root, "test_" + side, cam, pid)
                if os.path.isdir(folder):
                    out.append(folder)
        return out

    def everything(side: str) -> list[str]:
        files = []
        for folder in folders(side):
            files.extend(sorted(folder + "/" + name for name in os.listdir(folder)))
        return files

    def one_each(side: str) -> list[str]:
        random.seed(trial)
        return [random.choice(sorted(folder + "/" + name for name in os.listdir(folder))) for folder in folders(side)]

    if direction == "ir2vis":  # test_mode [1, 2]: NIR queries, sampled VIS gallery
        return everything("nir"), one_each("vis")
    query_img, gall_img = everything("vis"), one_each("nir")  # test_mode [2, 1] ...
    return gall_img, query_img  # ... scored as eval_llcm(-distmat, gall_label, query_label, ...)


@pytest.mark.parametrize("direction", ["ir2vis", "vis2ir"])
def test_both_directions_equal_the_reference_draw(llcm_root, llcm, direction):
    state = random.getstate()
    try:
        protocol = P.llcm(llcm, 10, direction)
        assert [t.index for t in protocol.trials] == list(range(10))
        for trial in protocol.trials:
            ref_query, ref_gallery = reference_lists(llcm_root, trial.index, direction)
            assert [s.path for s in protocol.query_samples(trial)] == ref_query
            assert [s.path for s in protocol.gallery_samples(trial)] == ref_gallery
    finally:
        random.setstate(state)
    drawn = {tuple(t.gallery_idx if direction == "ir2vis" else t.query_idx) for t in protocol.trials}
    assert len(drawn) > 1  # the trials really draw different images


def test_sizes_exclusion_and_settings(llcm):
    vis_groups = {(s.pid, s.camid) for s in llcm.query}
    nir_groups = {(s.pid, s.camid) for s in llcm.gallery}
    ir2vis, vis2ir = P.llcm(llcm, 10, "auto"), P.llcm(llcm, 3, "vis2ir")
    assert len(ir2vis.trials) == 10 and len(vis2ir.trials) == 3
    for t in ir2vis.trials:
        assert (len(t.query_idx), len(t.gallery_idx)) == (len(llcm.gallery), len(vis_groups))
    for t in vis2ir.trials:
        assert (len(t.query_idx), len(t.gallery_idx)) == (len(nir_groups), len(llcm.query))
    for protocol, direction in ((ir2vis, "ir2vis"), (vis2ir, "vis2ir")):
        assert (protocol.name, protocol.exclusion, protocol.dedup) == ("llcm", "same_camera", True)
        assert protocol.settings["direction"] == direction
    assert "VIS->IR" in vis2ir.description and "IR->VIS" in ir2vis.description
    with pytest.raises(UserError, match="LLCM direction must be ir2vis or vis2ir"):
        P.llcm(llcm, 10, "v2t")  # type: ignore[arg-type]
    with pytest.raises(UserError, match="RegDB direction must be v2t or t2v"):
        P.regdb(llcm, 1, "ir2vis")  # type: ignore[arg-type]


def test_same_identity_same_camera_gallery_image_is_ignored(tmp_path):
    """A NIR query of id 1 in camera 1: the VIS image of id 1 in camera 1 is nearest but excluded,
    id 2 comes next, the VIS image of id 1 in camera 2 counts at rank 2."""
    def sample(name: str, pid: int, cam: int, modality: Modality) -> Sample:
        return Sample(str(tmp_path / name), pid, cam, modality)

    vis = [sample("v1c1", 1, 1, Modality.RGB), sample("v1c2", 1, 2, Modality.RGB), sample("v2c3", 2, 3, Modality.RGB)]
    nir = [sample("n1c1", 1, 1, Modality.IR), sample("n2c4", 2, 4, Modality.IR)]
    dataset = CrossModalDataset("llcm", tmp_path, train=[], query=vis, gallery=nir)
    protocol = P.llcm(dataset, 1, "ir2vis")
    trial = protocol.trials[0]
    assert protocol.query_samples(trial) == nir and protocol.gallery_samples(trial) == vis
    angle = np.radians([0.0, 60.0, 30.0, 0.0, 30.0])  # v1c1, v1c2, v2c3, n1c1, n2c4
    bank = torch.tensor(np.stack([np.cos(angle), np.sin(angle)], 1), dtype=torch.float32)
    metrics = Evaluator().evaluate_trial(protocol, trial, bank).metrics
    # query n1c1: v1c1 ignored -> [v2c3, v1c2]: rank 2, AP 1/2; query n2c4: v2c3 first, AP 1
    assert metrics.rank(1) == pytest.approx(0.5) and metrics.rank(2) == pytest.approx(1.0)
    assert metrics.mAP == pytest.approx(0.75)


def test_training_evaluates_with_the_llcm_protocol(llcm_root, tmp_path):
    from cmssft.engine.evaluate import build_evaluators

    cfg = load_config("configs/llcm.yaml", [f"data.root={llcm_root}", "eval.direction=vis2ir", "data.num_workers=0",
                                            "model.pretrained=none"])
    dataset = load_dataset("llcm", llcm_root)
    evaluators, select_on = build_evaluators(cfg, dataset, torch.device("cpu"), None, tmp_path)
    assert set(evaluators) == {"test"} and select_on is None
    protocol = evaluators["test"].protocol  # type: ignore[attr-defined]
    assert protocol.name == "llcm" and protocol.settings["direction"] == "vis2ir"


# --------------------------------------------------------------------------- eval.py


def write_config(tmp_path: Path, root: Path) -> Path:
    cfg = tmp_path / "llcm.yaml"
    cfg.write_text(f"data:\n  name: llcm\n  root: {root}\n")
    return cfg


@pytest.mark.parametrize("direction", ["ir2vis", "vis2ir"])
def test_eval_features_end_to_end(llcm_root, llcm, tmp_path, direction):
    paths = tree_paths(llcm_root)  # train images too: extra rows are allowed
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(IDS + 1, 8))
    feats = np.stack([centers[int(p.rsplit("/", 1)[1][:4])] for p in paths]).astype(np.float32)
    npz, out = tmp_path / "feats.npz", tmp_path / "res.json"
    save_features(npz, paths, feats + 0.01 * rng.normal(size=feats.shape).astype(np.float32))
    argv = ["--config", str(write_config(tmp_path, llcm_root)), "--features", str(npz), "--json", str(out)]
    assert run_cli(eval_main, argv + ["--direction", direction]) == 0
    result = json.loads(out.read_text())
    assert result["protocol"] == "llcm" and result["settings"]["direction"] == direction
    assert len(result["trials"]) == 10
    sizes = {(t["num_query"], t["num_gallery"]) for t in result["trials"]}
    expected = P.llcm(llcm, 1, direction).trials[0]
    assert sizes == {(len(expected.query_idx), len(expected.gallery_idx))}
    assert result["mean"]["rank1"] == pytest.approx(1.0) and result["mean"]["mAP"] == pytest.approx(1.0)


def test_eval_rejects_foreign_directions_and_options(llcm_root, tmp_path, capsys):
    paths = tree_paths(llcm_root)
    npz = tmp_path / "feats.npz"
    save_features(npz, paths, np.ones((len(paths), 4), dtype=np.float32))
    base = ["--config", str(write_config(tmp_path, llcm_root)), "--features", str(npz)]
    for extra, message in ((["--direction", "v2t"], "LLCM direction must be ir2vis or vis2ir"),
                           (["--direction", "t2v"], "LLCM direction must be ir2vis or vis2ir"),
                           (["--shots", "10"], "single-shot"),
                           (["--mode", "indoor"], "--mode indoor is a SYSU-MM01 search mode"),
                           (["--protocol", "sysu"], "protocol sysu evaluates sysu_mm01")):
        assert run_cli(eval_main, base + extra) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and message in err


@pytest.mark.parametrize("damage, message", [
    ("idx/train_nir.txt", "lacks idx/train_nir.txt"),
    ("test_nir", "lacks test_nir"),
])
def test_eval_on_a_bad_tree_exits_2_with_one_line(llcm_root, tmp_path, capsys, damage, message):
    root = copy_tree(llcm_root, tmp_path / "LLCM")
    target = root / damage
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    npz = tmp_path / "feats.npz"
    paths = tree_paths(llcm_root)
    save_features(npz, paths, np.ones((len(paths), 4), dtype=np.float32))
    assert run_cli(eval_main, ["--config", str(write_config(tmp_path, root)), "--features", str(npz)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("error: ") and message in err and "expected LLCM layout" in err
