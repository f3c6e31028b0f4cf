"""Shared fixtures: tiny generated datasets in the real layouts, and the real split files."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"
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
# The shared-only model: a small checkpoint and a quick step, for tests about the loop rather than the method.
SHARED_ONLY = ["model.use_specific=false", "model.project_adversarial=false", "model.reconstruction=false"]


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real public split files beside the checkout; tests that need them skip without them."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real split files not found at {SHARED_DATA} (they live beside the checkout)")
    return SHARED_DATA


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
