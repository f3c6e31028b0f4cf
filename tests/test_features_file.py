"""eval.py --save-features: a checkpoint's features, scored later without the model, give its numbers."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cmssft.engine.entry import train_main
from cmssft.errors import run_cli
from cmssft.evaluation.cli import main as eval_main
from cmssft.evaluation.features_io import read_feature_file, save_features

from .conftest import TINY_CHECKPOINT_RUN

TINY_TRAIN = [*TINY_CHECKPOINT_RUN, "eval.trials=2"]
# Configured at evaluation time, for both --checkpoint and --features.
EVAL = ["eval.trials=3", "eval.batch_size=32", "train.device=cpu", "data.num_workers=0"]


@pytest.fixture(scope="module")
def run(module_scratch, sysu_root):
    """A tiny trained run (centred SSTN with balanced neighbours: every kind of SSTN state is stored)."""
    run_dir = module_scratch / "tiny"
    args = ["--run-dir", str(run_dir), f"data.root={sysu_root}", *TINY_TRAIN, "model.sstn.center=true",
            "model.sstn.cross_k=2", "model.sstn.block_norm=true"]
    assert train_main(args) == 0
    return run_dir


def evaluate(run_dir, sysu_root, tmp_path, name, *source):
    out = tmp_path / f"{name}.json"
    argv = ["--config", str(run_dir / "config.yaml"), *source, "--json", str(out), f"data.root={sysu_root}", *EVAL]
    assert run_cli(eval_main, argv) == 0
    return json.loads(out.read_text())


def assert_same_numbers(a: dict, b: dict) -> None:
    assert len(a["trials"]) == len(b["trials"]) == 3
    for ta, tb in zip(a["trials"], b["trials"], strict=True):
        for key in ("mAP", "mINP"):
            assert ta[key] == pytest.approx(tb[key], abs=1e-6), key
        assert np.allclose(ta["cmc"], tb["cmc"], atol=1e-6, rtol=0)
    for key, value in a["mean"].items():
        assert value == pytest.approx(b["mean"][key], abs=1e-6), key


@pytest.mark.parametrize("mode", ["transductive", "single_query", "off"])
def test_saved_features_reproduce_the_checkpoint(run, sysu_root, tmp_path, mode):
    feats = tmp_path / "feats.npz"
    setting = f"model.sstn.test_mode={mode}"
    direct = evaluate(run, sysu_root, tmp_path, "direct", "--checkpoint", str(run / "best.pth"),
                      "--save-features", str(feats), setting)
    scored = evaluate(run, sysu_root, tmp_path, "scored", "--features", str(feats), setting)
    assert_same_numbers(direct, scored)
    if mode == "transductive":  # the SSTN changes the numbers: the file's scorer was used, not a cosine
        plain = evaluate(run, sysu_root, tmp_path, "plain", "--features", str(feats), "model.sstn.test_mode=off")
        assert plain["mean"] != direct["mean"]


def test_file_holds_both_bank_parts_modality_and_the_sstn_state(run, sysu_root, tmp_path):
    feats = tmp_path / "feats.npz"
    evaluate(run, sysu_root, tmp_path, "direct", "--checkpoint", str(run / "best.pth"), "--save-features", str(feats))
    data = read_feature_file(feats)
    assert all(not p.startswith("/") and p.startswith("cam") for p in data.paths)  # relative to the dataset root
    assert data.specific is not None and data.specific.shape == data.features.shape
    ir = np.array([p.split("/")[0] in ("cam3", "cam6") for p in data.paths])
    assert np.array_equal(data.modality, ir.astype(np.int64))
    assert data.scorer_config["model"]["sstn"]["center"] is True
    assert {"sstn.neck.bn.running_mean", "sstn.neck.bn.running_var", "sstn.modality_mean"} <= set(data.scorer_state)
    with np.load(feats, allow_pickle=False) as raw:  # nothing in it needs pickle
        assert {"paths", "features", "specific", "modality", "scorer_config"} <= set(raw.files)


def test_paths_and_features_alone_are_scored_by_cosine(run, sysu_root, tmp_path):
    """The original two-array format (third-party files) keeps working: cosine of the shared part,
    which is what the model itself does with the SSTN off."""
    feats, bare = tmp_path / "feats.npz", tmp_path / "bare.npz"
    direct = evaluate(run, sysu_root, tmp_path, "direct", "--checkpoint", str(run / "best.pth"),
                      "--save-features", str(feats), "model.sstn.test_mode=off")
    data = read_feature_file(feats)
    save_features(bare, data.paths, data.features)
    assert_same_numbers(direct, evaluate(run, sysu_root, tmp_path, "bare", "--features", str(bare)))


def test_bad_uses_are_one_line_exit_2(run, sysu_root, tmp_path, capsys):
    feats = tmp_path / "feats.npz"
    evaluate(run, sysu_root, tmp_path, "direct", "--checkpoint", str(run / "best.pth"), "--save-features", str(feats))
    base = ["--config", str(run / "config.yaml"), f"data.root={sysu_root}", *EVAL]
    data = read_feature_file(feats)

    def fails(*argv: str) -> str:
        capsys.readouterr()
        assert run_cli(eval_main, [*base, *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err
        return err

    assert "--checkpoint" in fails("--features", str(feats), "--save-features", str(tmp_path / "again.npz"))
    assert "does not exist" in fails("--checkpoint", str(run / "best.pth"), "--save-features",
                                     str(tmp_path / "no" / "f.npz"))
    flipped = tmp_path / "flipped.npz"  # a modality array that contradicts the dataset
    save_features(flipped, data.paths, data.features, specific=data.specific, modality=1 - data.modality,
                  scorer_config=data.scorer_config, scorer_state=data.scorer_state)
    assert "'modality' disagrees" in fails("--features", str(flipped))
    partial = tmp_path / "partial.npz"  # an SSTN state that does not fit its config
    state = {k: v for k, v in data.scorer_state.items() if k != "sstn.neck.bn.running_var"}
    save_features(partial, data.paths, data.features, specific=data.specific, modality=data.modality,
                  scorer_config=data.scorer_config, scorer_state=state)
    assert "sstn.neck.bn.running_var" in fails("--features", str(partial))
    shared_only = tmp_path / "shared_only.npz"  # the SSTN of this model needs the specific part too
    save_features(shared_only, data.paths, data.features, modality=data.modality, scorer_config=data.scorer_config,
                  scorer_state=data.scorer_state)
    assert "no 'specific' array" in fails("--features", str(shared_only))
