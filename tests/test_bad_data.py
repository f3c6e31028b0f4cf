"""Bad images, trees, split files, configs and features files: one readable line and exit code 2, or a logged skip."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from cmssft.data.bad_images import BadImageGuard, file_problem, guard_training_reader
from cmssft.data.records import Modality, Sample
from cmssft.data.transforms import read_image
from cmssft.engine.entry import train_main
from cmssft.errors import DatasetError, run_cli
from cmssft.evaluation.cli import main as eval_main
from cmssft.evaluation.features_io import save_features

from .conftest import SHARED_ONLY, TINY_DATA

QUICK_TRAIN = [
    *TINY_DATA,
    *SHARED_ONLY,
    "train.epochs=1",
    "train.iters_per_epoch=1",
    "train.eval_every=0",
    "eval.trials=1",
    "eval.flip=false",
]
TRAIN_IMAGES = {"corrupt": "cam1/0001/0001.jpg", "truncated": "cam5/0002/0001.jpg", "zero-byte": "cam3/0004/0001.jpg"}
TEST_IMAGE = "cam3/0003/0001.jpg"  # a query candidate of test identity 3


def spoil(path: Path, kind: str) -> None:
    """Turn an image file into a corrupt, truncated or zero-byte one."""
    data = path.read_bytes()
    spoiled = {"corrupt": b"this is not an image " * 20, "truncated": data[: len(data) // 2], "zero-byte": b""}
    path.write_bytes(spoiled[kind])


def user_error(main, args, capsys) -> str:
    """Run a CLI main through run_cli; it must exit 2 with one 'error:' line and no traceback."""
    code = run_cli(main, args)
    err = capsys.readouterr().err
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.startswith("error:")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.fixture()
def sysu_copy(sysu_root, tmp_path) -> Path:
    return Path(shutil.copytree(sysu_root, tmp_path / "SYSU-MM01"))


def train_args(root: Path, runs: Path, *extra: str) -> list[str]:
    return [f"data.root={root}", f"output_dir={runs}", *QUICK_TRAIN, *extra]


# --------------------------------------------------------------------------- detection


def encoded(suffix: str) -> bytes:
    image = (np.arange(64 * 32 * 3) % 251).astype(np.uint8).reshape(64, 32, 3)
    return cv2.imencode(suffix, image)[1].tobytes()


@pytest.mark.parametrize("suffix", [".jpg", ".png", ".bmp"])
def test_whole_images_pass_and_cut_ones_are_named(tmp_path, suffix):
    data = encoded(suffix)
    whole, cut = tmp_path / f"whole{suffix}", tmp_path / f"cut{suffix}"
    whole.write_bytes(data)
    cut.write_bytes(data[: len(data) * 3 // 4])
    assert file_problem(whole) is None
    assert "truncated" in file_problem(cut)
    with pytest.raises(DatasetError, match=f"cannot read image {cut}.*truncated"):
        read_image(str(cut), Modality.RGB)


def test_opencv_alone_would_accept_a_truncated_jpeg(tmp_path):
    """Why the end-of-image marker is checked: cv2.imread decodes many cut JPEGs into partly gray pixels."""
    path = tmp_path / "cut.jpg"
    data = encoded(".jpg")
    path.write_bytes(data[: len(data) - 40])
    assert cv2.imread(str(path)) is not None
    with pytest.raises(DatasetError, match="truncated JPEG"):
        read_image(str(path), Modality.IR)


@pytest.mark.parametrize(
    "content, name, problem",
    [
        (None, "missing.jpg", "does not exist"),
        (b"", "empty.jpg", "empty file"),
        (b"GIF89a and then some", "odd.png", "not a JPEG, PNG or BMP"),
        (b"BM\x00", "short.bmp", "truncated BMP"),
        (b"II*\x00 some tiff bytes", "scan.tif", None),  # other formats are left to the decoder
    ],
)
def test_file_problems(tmp_path, content, name, problem):
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    found = file_problem(path)
    assert (found is None) if problem is None else (problem in found)


# --------------------------------------------------------------------------- the skip / stop reader


def guard_setup(tmp_path: Path, bad: set[int]):
    """Six samples: label 0 RGB (0, 1, 2), label 0 IR (3), label 1 RGB (4, 5); ``bad`` indices are zero-byte."""
    layout = [(0, Modality.RGB)] * 3 + [(0, Modality.IR)] + [(1, Modality.RGB)] * 2
    samples = []
    for i, (label, modality) in enumerate(layout):
        path = tmp_path / f"{i}.png"
        path.write_bytes(b"" if i in bad else encoded(".png"))
        samples.append(Sample(str(path), pid=label + 1, camid=1, modality=modality, label=label))

    def reader(index: int) -> np.ndarray:
        """Readable samples come back filled with their index; bad ones fail as on disk."""
        if index in bad:
            return read_image(samples[index].path, samples[index].modality)
        return np.full((2, 2, 3), index, dtype=np.uint8)

    return samples, reader


@pytest.fixture()
def warnings_logged():
    """Messages the 'cmssft' logger emits (it does not propagate once a run has set up logging)."""
    messages: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: messages.append(record.getMessage())
    logger = logging.getLogger("cmssft")
    logger.addHandler(handler)
    yield messages
    logger.removeHandler(handler)


def test_skip_substitutes_the_next_image_of_the_same_label_and_modality(tmp_path, warnings_logged):
    samples, reader = guard_setup(tmp_path, bad={1, 2})
    guard = guard_training_reader(samples, reader, "skip")
    assert "2 unreadable training images skipped" in warnings_logged[0] and samples[1].path in warnings_logged[0]
    assert int(guard(1)[0, 0, 0]) == 0 and int(guard(2)[0, 0, 0]) == 0  # wraps around to index 0
    assert int(guard(1)[0, 0, 0]) == 0 and int(guard(4)[0, 0, 0]) == 4
    per_hit = [m for m in warnings_logged if "using" in m]
    assert len(per_hit) == 2 and guard.skipped == 2  # one warning per bad file, not per read


def test_skip_finds_images_that_break_after_the_check(tmp_path, warnings_logged):
    samples, reader = guard_setup(tmp_path, bad={5})
    guard = BadImageGuard(samples, reader, "skip")  # no pre-flight: the read itself fails
    assert int(guard(5)[0, 0, 0]) == 4
    assert len(warnings_logged) == 1 and samples[5].path in warnings_logged[0] and guard.skipped == 1


def test_stop_names_the_file(tmp_path):
    samples, reader = guard_setup(tmp_path, bad={4})
    with pytest.raises(DatasetError, match=rf"1 unreadable training image\(s\): {samples[4].path} \(empty"):
        guard_training_reader(samples, reader, "stop")
    with pytest.raises(DatasetError, match=f"cannot read image {samples[4].path}"):
        BadImageGuard(samples, reader, "stop")(4)


def test_skip_needs_one_readable_image_per_label_and_modality(tmp_path):
    samples, reader = guard_setup(tmp_path, bad={3})
    with pytest.raises(DatasetError, match="identity 1 has no readable IR training image"):
        guard_training_reader(samples, reader, "skip")


# --------------------------------------------------------------------------- train.py


@pytest.mark.parametrize("kind", list(TRAIN_IMAGES))
def test_bad_training_image_stops_train_py_naming_the_file(sysu_copy, tmp_path, capsys, kind):
    spoil(sysu_copy / TRAIN_IMAGES[kind], kind)
    line = user_error(train_main, train_args(sysu_copy, tmp_path / "runs"), capsys)
    assert str(sysu_copy / TRAIN_IMAGES[kind]) in line and "data.bad_images=skip" in line


def test_bad_training_images_are_skipped_and_counted_in_log_txt(sysu_copy, tmp_path):
    for kind, rel in TRAIN_IMAGES.items():
        spoil(sysu_copy / rel, kind)
    run_dir = tmp_path / "run"
    args = ["--run-dir", str(run_dir), *train_args(sysu_copy, tmp_path), "data.bad_images=skip"]
    assert run_cli(train_main, args) == 0
    log = (run_dir / "log.txt").read_text()
    assert "3 unreadable training images skipped (data.bad_images=skip)" in log
    assert all(str(sysu_copy / rel) in log for rel in TRAIN_IMAGES.values())
    assert (run_dir / "last.pth").is_file()


def test_bad_test_image_stops_even_with_skip(sysu_copy, tmp_path, capsys):
    """Checked before training starts (and before a run directory exists), not at the first evaluation."""
    spoil(sysu_copy / TEST_IMAGE, "truncated")
    line = user_error(train_main, train_args(sysu_copy, tmp_path / "runs", "data.bad_images=skip"), capsys)
    assert "1 unreadable evaluation image(s), which no protocol may skip" in line
    assert f"{sysu_copy / TEST_IMAGE} (truncated JPEG" in line
    assert not (tmp_path / "runs").exists()


def test_missing_camera_folder_is_named_before_a_run_directory_exists(sysu_copy, tmp_path, capsys):
    shutil.rmtree(sysu_copy / "cam3")
    line = user_error(train_main, train_args(sysu_copy, tmp_path / "runs"), capsys)
    assert "lacks cam3" in line and "found cam1, cam2, cam4, cam5, cam6, exp" in line
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    "break_tree, expected",
    [
        (lambda root: shutil.rmtree(root), "does not exist; expected SYSU-MM01 layout"),
        (lambda root: [p.unlink() for p in root.glob("cam*/0003/*")], "test_id.txt lists 1 identity without images"),
        (lambda root: (root / "exp/train_id.txt").write_text("1,2,x\n"), "train_id.txt: entry 3 ('x')"),
        (lambda root: (root / "exp/val_id.txt").write_bytes(b"6,\xff10\n"), "val_id.txt:1: not UTF-8"),
    ],
    ids=["missing-root", "empty-identity", "bad-id-list", "binary-id-list"],
)
def test_bad_sysu_trees_exit_2_without_a_run_directory(sysu_copy, tmp_path, capsys, break_tree, expected):
    break_tree(sysu_copy)
    assert expected in user_error(train_main, train_args(sysu_copy, tmp_path / "runs"), capsys)
    assert not (tmp_path / "runs").exists()


def test_bad_regdb_idx_line_and_missing_folder_are_named(regdb_root, tmp_path, capsys):
    root = Path(shutil.copytree(regdb_root, tmp_path / "RegDB"))
    idx = root / "idx" / "train_thermal_1.txt"
    lines = idx.read_text().splitlines()
    lines[4] = "Thermal/1/x.bmp one"
    idx.write_text("\n".join(lines) + "\n")
    args = train_args(root, tmp_path / "runs", "data.name=regdb")
    assert f"{idx}:5: expected '<path> <label>'" in user_error(train_main, args, capsys)
    shutil.rmtree(root / "Thermal")
    assert "lacks Thermal; expected RegDB layout" in user_error(train_main, args, capsys)
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    "row, expected",
    [
        ("a.jpg,1,2,rgb", ":3: 4 fields where the header has 5"),
        ("a.jpg,one,2,rgb,train", ":3: pid and camid must be integers"),
        ("a.jpg,1,2,uv,train", ":3: modality 'uv' is not one of rgb, ir"),
        ("a.jpg,1,2,rgb,tarin", ":3: split 'tarin' is not one of"),
    ],
)
def test_bad_manifest_rows_name_file_and_line(tmp_path, capsys, row, expected):
    manifest = tmp_path / "m.csv"
    manifest.write_text(f"path,pid,camid,modality,split\nb.jpg,1,1,ir,train\n{row}\n")
    args = train_args(tmp_path, tmp_path / "runs", "data.name=custom", f"data.manifest={manifest}")
    assert f"{manifest}{expected}" in user_error(train_main, args, capsys)
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    "override, expected",
    [
        ("train.lr=-0.1", "train.lr: -0.1 is out of range; allowed: > 0"),
        ("data.ids_per_batch=0", "data.ids_per_batch: 0 is out of range; allowed: >= 1"),
        ("model.sstn.topk=0", "model.sstn.topk: 0 is out of range; allowed: >= 1"),
        ("eval.trials=0", "eval.trials: 0 is out of range; allowed: >= 1"),
        ("data.height=8", "data.height: 8 is out of range; allowed: >= 16"),
        ("data.random_erasing=1.5", "data.random_erasing: 1.5 is out of range; allowed: [0, 1]"),
        ("train.momentum=0", "train.momentum: 0 is out of range for train.optimizer=sgd"),
        ("trian.epochs=3", "unknown config key 'trian' (did you mean 'train'?)"),
    ],
)
def test_config_mistakes_exit_2_without_a_run_directory(tmp_path, capsys, override, expected):
    assert expected in user_error(train_main, [f"output_dir={tmp_path / 'runs'}", override], capsys)
    assert not (tmp_path / "runs").exists()


# --------------------------------------------------------------------------- eval.py


@pytest.fixture()
def features_setup(sysu_root, tmp_path):
    """A config on the shared tree and a features file holding every image of it."""
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"data:\n  name: sysu_mm01\n  root: {sysu_root}\neval:\n  trials: 1\n")
    paths = sorted(p.relative_to(sysu_root).as_posix() for p in sysu_root.glob("cam*/*/*.jpg"))
    feats = np.random.default_rng(0).normal(size=(len(paths), 8)).astype(np.float32)
    return cfg, paths, feats


def test_features_file_problems_are_named(features_setup, tmp_path, capsys):
    cfg, paths, feats = features_setup
    target = tmp_path / "f.npz"

    def check(expected: str, **arrays) -> None:
        np.savez(target, **arrays)
        assert expected in user_error(eval_main, ["--config", str(cfg), "--features", str(target)], capsys)

    query = [i for i, p in enumerate(paths) if p.startswith("cam3/0003/")]
    nan = feats.copy()
    nan[query[:2]] = np.nan
    check("2 of the sysu protocol's", paths=np.array(paths), features=nan)
    check("NaN or infinite values (e.g. cam3/0003/", paths=np.array(paths), features=nan)
    kept = [p for i, p in enumerate(paths) if i not in query]
    check(f"lacks {len(query)} of the sysu protocol's", paths=np.array(kept), features=feats[: len(kept)])
    twice = paths[query[0]]
    check(f"'paths' names {twice} twice (rows {query[0]} and {len(paths)})", paths=np.array(paths + [twice]),
          features=np.vstack([feats, feats[:1]]))
    unused = next(p for p in paths if p.startswith("cam1/0001/"))  # a training image, no protocol reads it
    check(f"names {unused} twice", paths=np.array([unused, *paths]), features=np.vstack([feats[:1], feats]))
    check("'features' must be an N x D float array", paths=np.array(paths), features=feats.astype(np.int32))
    check("'paths' must be", paths=np.array(paths[:-1]), features=feats)
    assert "is a directory" in user_error(eval_main, ["--config", str(cfg), "--features", str(tmp_path)], capsys)
    target.write_bytes(b"\x93NUMPY not a zip")
    assert "is not a .npz file" in user_error(eval_main, ["--config", str(cfg), "--features", str(target)], capsys)


@pytest.mark.parametrize("content, expected", [("foreign", "has no variable 'rand_perm_cam'"),
                                                ("bytes", "is not a readable MATLAB .mat file")])
def test_foreign_rand_perm_mat_is_named(features_setup, tmp_path, capsys, content, expected):
    import scipy.io

    cfg, paths, feats = features_setup
    save_features(tmp_path / "f.npz", paths, feats)
    mat = tmp_path / "rand_perm_cam.mat"
    if content == "foreign":
        scipy.io.savemat(str(mat), {"perm": np.arange(6)})
    else:
        mat.write_bytes(b"MATLAB 5.0 MAT-file, but not really")
    args = ["--config", str(cfg), "--features", str(tmp_path / "f.npz"), "--protocol", "sysu-official",
            "--rand-perm", str(mat)]
    line = user_error(eval_main, args, capsys)
    assert str(mat) in line and expected in line


# --------------------------------------------------------------------------- non-finite losses


@pytest.mark.parametrize("poisoned, iters, code", [(2, 3, 0), (10, 10, 2)], ids=["recovers", "diverged"])
def test_non_finite_losses_skip_steps_then_stop(sysu_root, tmp_path, monkeypatch, capsys, poisoned, iters, code):
    """The first ``poisoned`` losses are NaN: each step is skipped with a warning; 10 in a row stop the run."""
    import torch

    import cmssft.losses as losses

    real = losses.build_criterion

    class Poisoned(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner, self.calls = inner, 0

        def forward(self, out, labels, modality):
            terms = self.inner(out, labels, modality)
            self.calls += 1
            return {**terms, "total": terms["total"] * float("nan")} if self.calls <= poisoned else terms

    monkeypatch.setattr(losses, "build_criterion", lambda cfg: Poisoned(real(cfg)))
    run_dir = tmp_path / "run"
    args = ["--run-dir", str(run_dir), *train_args(sysu_root, tmp_path), f"train.iters_per_epoch={iters}"]
    assert run_cli(train_main, args) == code
    log = (run_dir / "log.txt").read_text()
    assert log.count("non-finite loss (total); step skipped") == poisoned
    if code:
        assert "non-finite for 10 steps in a row" in capsys.readouterr().err
    else:
        assert (run_dir / "last.pth").is_file()


def test_debug_keeps_the_traceback(tmp_path):
    from cmssft.errors import ConfigError

    with pytest.raises(ConfigError, match="train.lr"):
        run_cli(train_main, ["--debug", f"output_dir={tmp_path}", "train.lr=-1"])


def test_cuda_without_a_gpu_exits_2(tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert "no CUDA device" in user_error(train_main, [f"output_dir={tmp_path / 'runs'}", "train.device=cuda"], capsys)
    assert not (tmp_path / "runs").exists()


class _FailingDataset(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 1

    def __getitem__(self, index: int) -> None:
        raise DatasetError("cannot read image x.jpg (truncated)")


def test_an_error_raised_in_a_loader_worker_prints_one_line(capsys):
    """A DataLoader worker wraps the message in its traceback; the user still sees one line."""
    from cmssft.errors import run_cli

    def main(argv):
        list(torch.utils.data.DataLoader(_FailingDataset(), num_workers=1))

    assert run_cli(main, []) == 2
    assert capsys.readouterr().err.strip() == "error: cannot read image x.jpg (truncated)"
