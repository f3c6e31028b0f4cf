"""Shared fixtures: tiny generated datasets in the real layouts, and the real split files."""

from __future__ import annotations

import shutil
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
# The real public split files (SYSU-MM01 exp/, RegDB idx/), vendored: see tests/fixtures/README.md.
SPLIT_FILES = REPO_ROOT / "tests" / "fixtures" / "split_files.tar.xz"
TINY = {"height": 64, "width": 32, "seed": 0, "progress": False}

# Overrides for training runs in tests: 64x32 images, 2 ids x 2 images per modality, a small ResNet on the CPU.
TINY_DATA = [
    "data.height=64",
    "data.width=32",
    "data.ids_per_batch=2",
    "data.images_per_id=2",
    "data.num_workers=0",
    "model.backbone=resnet18",
    "model.pretrained=none",
    "train.device=cpu",
]
# A tiny full model trained for 2 steps with no evaluation on the way: a real checkpoint, fast.
TINY_CHECKPOINT_RUN = [
    *TINY_DATA,
    "model.specific_from=layer4",
    "train.epochs=1",
    "train.iters_per_epoch=2",
    "train.optimizer=adam",
    "train.lr=3e-4",
    "train.warmup_epochs=0",
    "train.eval_every=0",
    "train.deterministic=true",
    "eval.batch_size=32",
    "eval.compare_modes=[]",
]
# The shared-only model: a small checkpoint and a quick step, for tests about the loop rather than the method.
SHARED_ONLY = ["model.use_specific=false", "model.project_adversarial=false", "model.reconstruction=false"]


def unpack_split_files(target: Path) -> Path:
    """Unpack the vendored split files into ``target`` (``sysu-mm01/exp/...``, ``regdb/idx/...``)."""
    with tarfile.open(SPLIT_FILES, "r:xz") as archive:
        if hasattr(tarfile, "data_filter"):  # refuse links and absolute paths where Python can
            archive.extractall(target, filter="data")
        else:
            archive.extractall(target)
    return target


@pytest.fixture(scope="session")
def split_files(tmp_path_factory) -> Path:
    """The real public split files, unpacked once per session from the repository's fixture, so no test
    depends on anything beside the checkout."""
    return unpack_split_files(tmp_path_factory.mktemp("split_files"))


@pytest.fixture(scope="module")
def module_scratch(tmp_path_factory, request) -> Iterator[Path]:
    """A folder for what a module's tests share (trained runs, checkpoints), removed once the module is done
    unless one of its tests failed, so a test session never holds more than one module's runs on disk."""
    path = tmp_path_factory.mktemp(request.module.__name__.rpartition(".")[2])
    failed_before = request.session.testsfailed
    yield path
    if request.session.testsfailed == failed_before:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def sysu_root(tmp_path_factory) -> Path:
    """A 12-identity SYSU-MM01 tree of 64x32 images, generated once per test session."""
    from cmssft.data.synthetic import generate_dataset

    root = tmp_path_factory.mktemp("sysu") / "SYSU-MM01"
    generate_dataset("sysu", root, ids=12, **TINY)
    return root


@pytest.fixture(scope="session")
def regdb_root(tmp_path_factory) -> Path:
    """A 12-identity RegDB tree of 64x32 images with its 10 trial splits."""
    from cmssft.data.synthetic import generate_dataset

    root = tmp_path_factory.mktemp("regdb") / "RegDB"
    generate_dataset("regdb", root, ids=12, **TINY)
    return root
