"""The seeded ablation runner on a tiny tree: every row x seed trained, scored in every mode, aggregated."""

from __future__ import annotations

import json
import sys

import pytest

from .conftest import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
import ablation  # noqa: E402


@pytest.fixture(scope="module")
def ablated(module_scratch, sysu_root):
    """baseline and full, seeds 0 and 1, at a tiny scale (2 steps each)."""
    tmp = module_scratch
    scale = tmp / "tiny.yaml"
    scale.write_text(
        f"data:\n  root: {sysu_root}\n  height: 64\n  width: 32\n  ids_per_batch: 2\n  images_per_id: 2\n"
        "  num_workers: 0\nmodel:\n  backbone: resnet18\n  pretrained: none\n  sstn:\n    topk: 3\n    cross_k: 3\n"
        "train:\n  epochs: 1\n  iters_per_epoch: 2\n  device: cpu\neval:\n  trials: 2\n  batch_size: 64\n"
        "  flip: false\n"
    )
    args = ["--scale", str(scale), "--rows", "baseline", "full", "--seeds", "0", "1", "--out", str(tmp / "out")]
    ablation.main(args)
    return tmp, scale, args


def test_every_row_seed_and_mode_is_reported_with_mean_and_std(ablated):
    tmp, _, _ = ablated
    summary = json.loads((tmp / "out" / "tiny" / "summary.json").read_text())
    modes = {(e["row"], e["mode"]) for e in summary["table"]}
    assert modes == {("baseline", "off"), ("baseline", "off+rerank"), ("full", "transductive"),
                     ("full", "single_query"), ("full", "off"), ("full", "off+rerank")}
    for entry in summary["table"]:
        assert entry["seeds"] == 2
        mean, std = entry["mAP"]
        per_seed = [json.loads((tmp / "out" / "tiny" / entry["row"] / f"seed{s}" / "modes.json").read_text())
                    [entry["mode"]]["mAP"] for s in (0, 1)]
        assert mean == pytest.approx(sum(per_seed) / 2)
        assert std == pytest.approx(abs(per_seed[0] - per_seed[1]) / 2**0.5)  # sample std of two values
    full_trans = next(e for e in summary["table"] if (e["row"], e["mode"]) == ("full", "transductive"))
    assert full_trans["graph/query_cross_edges"][0] == pytest.approx(1.0)  # cross_k = topk: only cross edges
    table = (tmp / "out" / "tiny" / "summary.md").read_text()
    assert "| full | transductive | 2 |" in table and "±" in table


def test_seeds_are_applied_and_runs_are_deterministic(ablated, sysu_root):
    tmp, scale, _ = ablated
    runs = tmp / "out" / "tiny" / "baseline"
    first = json.loads((runs / "seed0" / "modes.json").read_text())
    assert first != json.loads((runs / "seed1" / "modes.json").read_text())
    again = tmp / "again"
    ablation.main(["--scale", str(scale), "--rows", "baseline", "--seeds", "0", "--out", str(again)])
    assert json.loads((again / "tiny" / "baseline" / "seed0" / "modes.json").read_text()) == first


def test_finished_runs_are_reused_and_set_overrides_get_their_own_folder(ablated):
    tmp, scale, args = ablated
    marker = tmp / "out" / "tiny" / "full" / "seed0" / "train.out"
    before = marker.stat().st_mtime_ns
    ablation.main(args)
    assert marker.stat().st_mtime_ns == before
    overrides = ablation.parse_args(["--scale", str(scale), "--set", "model.sstn.cross_k=0"])
    assert overrides.overrides == ["model.sstn.cross_k=0"]
    command = ablation.train_command("full", 3, tmp / "x", ["model.sstn.cross_k=0"])
    assert command[-2:] == ["model.sstn.cross_k=0", "seed=3"] and "train.deterministic=true" in command


def test_score_set_rescores_the_same_checkpoints_with_test_time_settings(ablated):
    tmp, _, args = ablated
    run = tmp / "out" / "tiny" / "full" / "seed0"
    marker = run / "best.pth"
    before = marker.stat().st_mtime_ns
    ablation.main([*args, "--rows", "full", "--modes", "transductive", "off",
                   "--score-set", "model.sstn.test_intra_k=2"])
    assert marker.stat().st_mtime_ns == before  # nothing retrained
    plain = json.loads((run / "modes.json").read_text())
    widened = json.loads((run / "modes@model.sstn.test_intra_k=2.json").read_text())
    assert widened["off"] == plain["off"]  # no transfer: the test graph does not matter
    # the tiny scale trains cross-only graphs (topk 3): scored with 2 own-modality neighbours, the queries'
    # kept edges are 3 of 5 cross, and the transductive numbers move
    assert plain["transductive"]["graph/query_cross_edges"] == pytest.approx(1.0)
    assert widened["transductive"]["graph/query_cross_edges"] == pytest.approx(3 / 5)
    assert widened["transductive"] != plain["transductive"]
    summary = json.loads((tmp / "out" / "tiny" / "summary@model.sstn.test_intra_k=2.json").read_text())
    assert summary["score_overrides"] == ["model.sstn.test_intra_k=2"]
    with pytest.raises(SystemExit):
        ablation.parse_args(["--score-set", "train.lr=0.1"])


def test_a_stopped_runner_stops_the_trainings_it_started(tmp_path, monkeypatch):
    """SIGTERM to the runner: its trainings are terminated, not left writing into run folders."""
    import os
    import signal
    import subprocess
    import time
    from types import SimpleNamespace

    started = []

    class Recording(subprocess.Popen):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            started.append(self)

    def sleep(_seconds):
        os.kill(os.getpid(), signal.SIGTERM)  # the runner is told to stop while both trainings run

    monkeypatch.setattr(ablation.subprocess, "Popen", Recording)
    monkeypatch.setattr(ablation, "time", SimpleNamespace(time=time.time, sleep=sleep))
    monkeypatch.setattr(ablation, "train_command",
                        lambda *_: [sys.executable, "-c", "import time; time.sleep(120)"])
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit, match="signal"):
        ablation.train_all([("full", 0, tmp_path / "a"), ("full", 1, tmp_path / "b")], [], parallel=2)
    assert len(started) == 2 and all(proc.returncode is not None for proc in started)
    assert signal.getsignal(signal.SIGTERM) is before


def test_paired_differences_are_seed_by_seed():
    results = {"agw": {0: {"off": {"rank1": 0.30, "mAP": 0.40}}, 1: {"off": {"rank1": 0.20, "mAP": 0.30}},
                       2: {"off": {"rank1": 0.25, "mAP": 0.35}}},
               "full": {0: {"transductive": {"rank1": 0.33, "mAP": 0.41}, "off": {"rank1": 0.31, "mAP": 0.40}},
                        1: {"transductive": {"rank1": 0.21, "mAP": 0.34}, "off": {"rank1": 0.19, "mAP": 0.29}}}}
    rows = {(e["row"], e["mode"]): e for e in ablation.paired(results, "agw", ["transductive", "off"])}
    assert set(rows) == {("full", "transductive"), ("full", "off")}  # the reference itself is left out
    mean, se, above, below = rows[("full", "transductive")]["rank1"]
    assert rows[("full", "transductive")]["seeds"] == 2  # seed 2 has no full run: not paired
    assert mean == pytest.approx(0.02) and se == pytest.approx(0.01) and (above, below) == (2, 0)
    mean, se, above, below = rows[("full", "off")]["mAP"]
    assert mean == pytest.approx(-0.005) and se == pytest.approx(0.005) and (above, below) == (0, 1)
    assert "| full | transductive | agw:off | 2 | +2.00 ± 1.00 (2 above, 0 below) |" in ablation.paired_markdown(
        list(rows.values()))
    with pytest.raises(SystemExit, match="row 'caj'"):
        ablation.paired(results, "caj", ["off"])
