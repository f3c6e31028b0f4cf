"""eval.py on trained checkpoints: the right RegDB trial, test-time overrides, re-ranking with the SSTN.

Each test guards a path where a printed number could be silently wrong: a RegDB model scored on another
trial's split, an override accepted and ignored, re-ranking mixing distances of different graphs.
"""

from __future__ import annotations

import json
import shutil
import sys

import numpy as np
import pytest
import torch

from cmssft.config import load_config
from cmssft.engine.entry import train_main
from cmssft.errors import UserError, run_cli
from cmssft.evaluation.cli import main as eval_main
from cmssft.evaluation.evaluator import Evaluator
from cmssft.evaluation.features_io import save_features
from cmssft.evaluation.report import COMPARABLE
from cmssft.evaluation.rerank import k_reciprocal_rerank
from cmssft.models import build_bank_scorer
from cmssft.scoring import full_distances

from .conftest import REPO_ROOT, TINY_CHECKPOINT_RUN

sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
import ablation  # noqa: E402


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


def final_test_metrics(run_dir) -> dict:
    logged = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in logged if "test/mAP" in r][-1]


# --------------------------------------------------------------------------- RegDB: the model's own trial


@pytest.fixture(scope="module")
def regdb_trial3_run(module_scratch, regdb_root):
    """A tiny model trained on RegDB trial 3's training split."""
    run_dir = module_scratch / "regdb-trial3"
    args = ["--run-dir", str(run_dir), "data.name=regdb", f"data.root={regdb_root}", "data.trial=3",
            *TINY_CHECKPOINT_RUN]
    assert train_main(args) == 0
    return run_dir


def test_eval_scores_the_trial_the_checkpoint_was_trained_on(regdb_trial3_run, tmp_path, capsys):
    """The run's config says trial 3 and so does the checkpoint: eval.py prints train.py's table."""
    run = regdb_trial3_run
    out = tmp_path / "eval.json"
    capsys.readouterr()
    argv = ["--config", str(run / "config.yaml"), "--checkpoint", str(run / "best.pth"), "--json", str(out)]
    assert run_cli(eval_main, argv) == 0
    result = json.loads(out.read_text())
    assert [t["trial"] for t in result["trials"]] == [3]
    final = final_test_metrics(run)
    assert result["mean"]["mAP"] == pytest.approx(final["test/mAP"], abs=1e-6)
    assert result["mean"]["rank1"] == pytest.approx(final["test/rank1"], abs=1e-6)
    title, settings_line = capsys.readouterr().out.splitlines()[:2]
    assert title == f"test, transductive SSTN [{COMPARABLE['transductive']}]: RegDB trial 3, visible->thermal"
    log = (run / "log.txt").read_text()
    assert title in log and settings_line in log  # train.py printed the same header


def test_eval_with_a_generic_config_still_follows_the_checkpoint(regdb_trial3_run, regdb_root, tmp_path):
    """configs/regdb.yaml names trial 1; the checkpoint was trained on trial 3, and trial 3 is scored."""
    out = tmp_path / "eval.json"
    argv = ["--config", str(REPO_ROOT / "configs/regdb.yaml"), "--checkpoint", str(regdb_trial3_run / "best.pth"),
            f"data.root={regdb_root}", "train.device=cpu", "data.height=64", "data.width=32", "data.num_workers=0",
            "--json", str(out)]
    assert run_cli(eval_main, argv) == 0
    assert [t["trial"] for t in json.loads(out.read_text())["trials"]] == [3]


@pytest.mark.parametrize("ask", [["--trial", "1"], ["data.trial=1"]])
def test_another_trial_for_a_checkpoint_is_refused(regdb_trial3_run, capsys, ask):
    run = regdb_trial3_run
    argv = ["--config", str(run / "config.yaml"), "--checkpoint", str(run / "best.pth"), *ask]
    capsys.readouterr()
    assert run_cli(eval_main, argv) == 2
    line = one_error_line(capsys)
    assert "trained on RegDB trial 3" in line and "not on trial 1's" in line


def test_a_trial_template_checks_each_file_holds_its_trials_model(regdb_trial3_run, tmp_path, capsys):
    run = regdb_trial3_run
    shutil.copy(run / "best.pth", tmp_path / "model_3.pth")
    shutil.copy(run / "best.pth", tmp_path / "model_1.pth")  # trial 3's model under trial 1's name
    template = str(tmp_path / "model_{trial}.pth")
    out = tmp_path / "three.json"
    argv = ["--config", str(run / "config.yaml"), "--checkpoint", template, "--json", str(out)]
    assert run_cli(eval_main, [*argv, "--trial", "3"]) == 0
    assert [t["trial"] for t in json.loads(out.read_text())["trials"]] == [3]
    capsys.readouterr()
    assert run_cli(eval_main, [*argv, "--trial", "1"]) == 2
    assert "trained on RegDB trial 3, but it stands for trial 1" in one_error_line(capsys)


def test_a_features_template_scores_all_ten_trials_by_default(regdb_root, tmp_path, capsys):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"data:\n  name: regdb\n  root: {regdb_root}\neval:\n  trials: 1\n")  # RegDB ignores it
    paths = sorted(p.relative_to(regdb_root).as_posix() for p in regdb_root.glob("*/*/*.bmp"))
    pids = np.array([int(p.split("/")[1]) for p in paths])
    feats = np.eye(pids.max() + 1, dtype=np.float32)[pids]  # one direction per identity: perfect retrieval
    for trial in range(1, 11):
        save_features(tmp_path / f"f{trial}.npz", paths, feats)
    out = tmp_path / "ten.json"
    assert run_cli(eval_main, ["--config", str(cfg), "--features", str(tmp_path / "f{trial}.npz"),
                               "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert [t["trial"] for t in result["trials"]] == list(range(1, 11))
    assert result["settings"]["description"] == f"RegDB trials {', '.join(map(str, range(1, 11)))}, visible->thermal"
    assert result["mean"]["rank1"] == pytest.approx(1.0)
    assert run_cli(eval_main, ["--config", str(cfg), "--features", str(tmp_path / "f{trial}.npz"),
                               "--trial", "4", "--json", str(out)]) == 0
    assert [t["trial"] for t in json.loads(out.read_text())["trials"]] == [4]


# --------------------------------------------------------------------------- test-time overrides


@pytest.fixture(scope="module")
def sysu_run(module_scratch, sysu_root):
    """A tiny full cm-SSFT model on the shared SYSU-MM01 tree."""
    run_dir = module_scratch / "sysu"
    assert train_main(["--run-dir", str(run_dir), f"data.root={sysu_root}", *TINY_CHECKPOINT_RUN,
                       "eval.trials=2"]) == 0
    return run_dir


def evaluate(run, tmp_path, *extra) -> dict:
    out = tmp_path / "eval.json"
    argv = ["--config", str(run / "config.yaml"), "--checkpoint", str(run / "best.pth"), "--json", str(out), *extra]
    assert run_cli(eval_main, argv) == 0
    return json.loads(out.read_text())


def test_a_test_time_override_changes_the_numbers_as_the_ablation_runner_scores_it(sysu_run, tmp_path, capsys):
    default = evaluate(sysu_run, tmp_path)
    assert default["settings"]["test_time"]["model.sstn.topk"] == 6
    changed = evaluate(sysu_run, tmp_path, "model.sstn.topk=2")
    assert changed["settings"]["test_time"]["model.sstn.topk"] == 2
    assert "test-time settings: model.sstn.topk=2 " in capsys.readouterr().out
    assert changed["mean"]["mAP"] != pytest.approx(default["mean"]["mAP"], abs=1e-6)
    scored = ablation.score_modes(sysu_run, ["transductive"], ["model.sstn.topk=2"])["transductive"]
    assert changed["mean"]["mAP"] == pytest.approx(scored["mAP"], abs=1e-9)
    assert changed["mean"]["rank1"] == pytest.approx(scored["rank1"], abs=1e-9)


@pytest.mark.parametrize("override, key", [("model.backbone=resnet50", "model.backbone"),
                                           ("model.sstn.affinity_dim=8", "model.sstn.affinity_dim"),
                                           ("model.grl_modality=0.5", "model.grl_modality")])
def test_an_override_the_weights_cannot_take_is_refused(sysu_run, capsys, override, key):
    argv = ["--config", str(sysu_run / "config.yaml"), "--checkpoint", str(sysu_run / "best.pth"), override]
    capsys.readouterr()
    assert run_cli(eval_main, argv) == 2
    line = one_error_line(capsys)
    assert line.startswith(f"error: {key}=") and "was trained with" in line


def test_features_saved_with_an_override_reproduce_it(sysu_run, tmp_path):
    feats = tmp_path / "feats.npz"
    with_override = evaluate(sysu_run, tmp_path, "model.sstn.topk=2", "--save-features", str(feats))
    cfg = str(sysu_run / "config.yaml")
    out = tmp_path / "from_features.json"
    assert run_cli(eval_main, ["--config", cfg, "--features", str(feats), "--json", str(out)]) == 0
    assert json.loads(out.read_text())["mean"] == pytest.approx(with_override["mean"], abs=1e-9)


def test_a_directory_where_a_checkpoint_belongs_is_named(sysu_run, capsys):
    capsys.readouterr()
    assert run_cli(eval_main, ["--config", str(sysu_run / "config.yaml"), "--checkpoint", str(sysu_run)]) == 2
    assert "is a directory" in one_error_line(capsys)


# --------------------------------------------------------------------------- re-ranking with the SSTN


@pytest.fixture(scope="module")
def scorer_and_banks():
    """A (randomly initialised) SSTN scorer and a query / gallery bank of both modalities' features."""
    cfg = load_config(REPO_ROOT / "configs/demo.yaml")
    scorer = build_bank_scorer(cfg).eval()
    generator = torch.Generator().manual_seed(0)

    def bank(n: int, modality: int) -> dict[str, torch.Tensor]:
        shared, specific = torch.randn(2, n, 512, generator=generator)
        return {"shared": shared, "specific": specific, "modality": torch.full((n,), modality, dtype=torch.long)}

    return scorer, bank(12, 1), bank(30, 0)


def test_transductive_reranking_takes_all_three_distances_from_one_graph(scorer_and_banks):
    scorer, query, gallery = scorer_and_banks
    view = scorer.sstn.test_view()
    joint = {k: torch.cat([query[k], gallery[k]]) for k in query}
    descriptors, _ = view.describe(view.nodes(joint["shared"], joint["specific"], joint["modality"]))
    unit = torch.nn.functional.normalize(descriptors, dim=1)
    q, g = unit[:12], unit[12:]
    expected = k_reciprocal_rerank(1 - q @ g.T, 1 - q @ q.T, 1 - g @ g.T)

    def score(a, b):
        return scorer.score_blocks(a, b, "transductive")

    got = full_distances(Evaluator(score, rerank=True).scored_pair(query, gallery)[0])
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    # what re-ranking did before: the query-query and gallery-gallery blocks as one-modality graphs of their own
    mixed = k_reciprocal_rerank(full_distances(score(query, gallery)), full_distances(score(query, query)),
                                full_distances(score(gallery, gallery)))
    assert not torch.allclose(got, mixed, atol=1e-3)


def test_single_query_reranking_is_refused(scorer_and_banks):
    scorer, query, gallery = scorer_and_banks
    evaluator = Evaluator(lambda a, b: scorer.score_blocks(a, b, "single_query"), rerank=True)
    with pytest.raises(UserError, match="single-query SSTN scores each query in a graph of its own"):
        evaluator.scored_pair(query, gallery)


def test_single_query_reranking_from_eval_py_is_one_line(sysu_run, capsys):
    argv = ["--config", str(sysu_run / "config.yaml"), "--checkpoint", str(sysu_run / "best.pth"), "--rerank",
            "model.sstn.test_mode=single_query"]
    capsys.readouterr()
    assert run_cli(eval_main, argv) == 2
    assert "re-rank in model.sstn.test_mode=transductive or off" in one_error_line(capsys)
