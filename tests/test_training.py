"""End-to-end training on a tiny generated SYSU-MM01 tree: run directory, TensorBoard, resume, eval.py."""

from __future__ import annotations

import json

import pytest
import torch

from cmssft.engine.checkpoint import load_checkpoint
from cmssft.engine.entry import train_main
from cmssft.evaluation.report import COMPARABLE

from .conftest import TINY_DATA

TINY_TRAIN = [
    *TINY_DATA,
    "model.specific_from=layer4",
    "train.epochs=2",
    "train.iters_per_epoch=2",
    "train.optimizer=adam",
    "train.lr=3e-4",
    "train.warmup_epochs=1",
    "train.eval_every=1",
    "train.deterministic=true",  # bitwise-reproducible CPU kernels, so resume can be compared exactly
    "train.log_every=1",
    "eval.trials=2",
    "eval.batch_size=32",
]


def train(run_dir, sysu_root, *extra):
    args = ["--run-dir", str(run_dir), f"data.root={sysu_root}", *TINY_TRAIN, *extra]
    assert train_main(args) == 0


@pytest.fixture(scope="module")
def trained_run(module_scratch, sysu_root):
    run_dir = module_scratch / "tiny"
    train(run_dir, sysu_root)
    return run_dir


def test_run_directory_holds_everything(trained_run):
    for name in ("config.yaml", "log.txt", "metrics.jsonl", "last.pth", "best.pth"):
        assert (trained_run / name).is_file(), name
    state = load_checkpoint(trained_run / "last.pth")
    assert {"model", "optimizer", "scheduler", "train_state", "rng", "config"} <= set(state)
    assert state["train_state"]["epoch"] == 2 and state["train_state"]["step"] == 4
    assert list((trained_run / "ranked_lists").glob("test_epoch002.png"))


def test_tensorboard_event_files_hold_the_curves(trained_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(trained_run / "tensorboard"), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    expected = {"loss/total", "loss/id_shared", "loss/triplet_shared", "loss/id_fused", "loss/modality",
                "loss/project", "loss/reconstruction", "lr/backbone", "lr/heads", "train/grad_norm",
                "test/rank1", "test/mAP", "test/mINP"}
    assert expected <= scalars, expected - scalars
    assert any(tag.startswith("model/sstn/") for tag in scalars)
    assert len(events.Scalars("loss/total")) == 4
    assert "test/ranked_lists" in events.Tags()["images"]


def test_eval_py_reproduces_the_numbers_training_printed(trained_run, sysu_root, tmp_path, capsys):
    from cmssft.evaluation.cli import main as eval_main

    logged = [json.loads(line) for line in (trained_run / "metrics.jsonl").read_text().splitlines()]
    final = [r for r in logged if "test/mAP" in r][-1]
    out = tmp_path / "eval.json"
    code = eval_main(["--config", str(trained_run / "config.yaml"), "--checkpoint", str(trained_run / "best.pth"),
                      "--json", str(out), f"data.root={sysu_root}"])
    assert code == 0
    mean = json.loads(out.read_text())["mean"]
    assert mean["mAP"] == pytest.approx(final["test/mAP"], abs=1e-6)
    assert mean["rank1"] == pytest.approx(final["test/rank1"], abs=1e-6)
    title = capsys.readouterr().out.splitlines()[0]
    assert title.startswith(f"test, transductive SSTN [{COMPARABLE['transductive']}]: ")
    assert title in (trained_run / "log.txt").read_text()


def test_resume_continues_to_the_same_weights(trained_run, sysu_root, tmp_path):
    """1 epoch, stop, resume for the 2nd: the run *continues* (it says where, and takes only the remaining
    steps) and ends with the same final weights as the uninterrupted 2-epoch run.

    Equal weights alone prove nothing here: with ``train.deterministic=true`` a run that ignored last.pth and
    retrained from scratch would reach them too, so the log and the step numbers are checked as well.
    """
    run_dir = tmp_path / "resumed"
    train(run_dir, sysu_root, "train.epochs=1")
    train(run_dir, sysu_root, "--resume", "train.epochs=2")
    log = (run_dir / "log.txt").read_text()
    assert log.count("resumed from") == 1
    assert f"resumed from {run_dir / 'last.pth'} at epoch 1, step 2" in log
    assert log.count("epoch 1 step 1: total ") == 1 and log.count("epoch 2 step 3: total ") == 1
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    loss_steps = [r["step"] for r in records if "loss/total" in r]
    assert loss_steps == [1, 2, 3, 4]  # no step taken twice, none left out
    assert [(r["step"], r["epoch"]) for r in records if "test/mAP" in r] == [(2, 1), (4, 2)]
    straight = load_checkpoint(trained_run / "last.pth")
    resumed = load_checkpoint(run_dir / "last.pth")
    assert resumed["train_state"]["epoch"] == 2 and resumed["train_state"]["step"] == 4
    for key, value in straight["model"].items():
        assert torch.allclose(value.float(), resumed["model"][key].float(), atol=1e-6), key


def test_best_pth_holds_only_what_evaluation_needs(trained_run):
    best, last = load_checkpoint(trained_run / "best.pth"), load_checkpoint(trained_run / "last.pth")
    assert {"optimizer", "scheduler", "rng"}.isdisjoint(best)
    assert {"model", "config", "num_classes"} <= set(best) and best["train_state"]["epoch"] == 2
    assert best["model"].keys() == last["model"].keys()
    assert all(torch.equal(best["model"][k], last["model"][k]) for k in best["model"])
    assert (trained_run / "best.pth").stat().st_size < (trained_run / "last.pth").stat().st_size
    modes = {(trained_run / name).stat().st_mode & 0o777 for name in ("best.pth", "last.pth", "config.yaml")}
    assert len(modes) == 1, modes  # created like every other file of the run


def test_log_txt_keeps_the_losses_and_the_results_table(trained_run):
    log = (trained_run / "log.txt").read_text()
    assert "epoch 1 step 1: total " in log and "epoch 2 step 4: total " in log  # train.log_every=1
    assert "epoch 2/2: mean loss " in log
    assert f"test, transductive SSTN [{COMPARABLE['transductive']}]: SYSU-MM01" in log
    assert "+- std" in log and "chance level (random ranking)" in log
    # eval.compare_modes: what the transfer adds
    assert f"test, off (same model, no transfer) [{COMPARABLE['inductive']}]: SYSU-MM01" in log


def test_resume_of_a_finished_run_from_its_own_config_says_so(trained_run, capsys):
    """``--config runs/<run>/config.yaml --resume`` finds that run; it is finished, so nothing changes."""
    before = {name: (trained_run / name).read_bytes() for name in ("metrics.jsonl", "last.pth")}
    capsys.readouterr()
    assert train_main(["--config", str(trained_run / "config.yaml"), "--resume"]) == 0
    printed = capsys.readouterr().out
    assert f"{trained_run} already finished all 2 epochs; nothing to do" in printed
    assert "resumed from" not in printed and "chance level" not in printed
    assert {name: (trained_run / name).read_bytes() for name in before} == before


@pytest.mark.parametrize(
    "extra, expected",
    [
        (["train.checkpoint_minutes=0"], [("best.pth", 4), ("last.pth", 4)]),  # only at the end
        (
            ["train.checkpoint_minutes=0", "train.checkpoint_steps=3"],
            [("last.pth", 3), ("best.pth", 4), ("last.pth", 4)],  # step 3: mid-epoch 2
        ),
        ([], [("best.pth", 4), ("last.pth", 4)]),  # the default, 10 minutes, never comes due in a short run
    ],
)
def test_last_pth_is_written_on_its_schedule(tmp_path, sysu_root, monkeypatch, extra, expected):
    from cmssft.engine import checkpoint as checkpoint_module

    from .conftest import SHARED_ONLY

    written = []
    real_save = checkpoint_module.save_atomic

    def recording_save(state, path):
        written.append((path.name, state["train_state"]["step"]))
        real_save(state, path)

    monkeypatch.setattr(checkpoint_module, "save_atomic", recording_save)
    train(tmp_path / "run", sysu_root, *SHARED_ONLY, "train.eval_every=0", "eval.trials=1", *extra)
    assert written == expected


@pytest.mark.parametrize(
    "train_ids, best_epoch",
    [
        ("train", 2),  # validation ids held out: the best validation mAP (epoch 2) selects
        ("train+val", 3),  # no validation split: the last epoch, although the test split peaks at epoch 1
    ],
)
def test_the_validation_split_and_never_the_test_split_selects_best_pth(
    tmp_path, sysu_root, monkeypatch, train_ids, best_epoch
):
    """Scripted evaluations whose test mAP peaks where validation's does not: best.pth follows validation."""
    from cmssft.data.datasets import load_dataset
    from cmssft.engine import evaluate as evaluate_module

    from .conftest import SHARED_ONLY

    scripted = {"val": [0.2, 0.6, 0.4], "test": [0.9, 0.1, 0.5]}
    evaluated: dict[str, set[int]] = {}

    def scripted_evaluation(self, model, epoch):
        evaluated[self.split] = {s.pid for s in self.protocol.candidates}
        value = scripted[self.split][epoch - 1]
        return {"rank1": value, "mAP": value, "mINP": value}

    monkeypatch.setattr(evaluate_module.ProtocolEvaluation, "__call__", scripted_evaluation)
    run_dir = tmp_path / "run"
    train(run_dir, sysu_root, *SHARED_ONLY, f"data.train_ids={train_ids}", "train.epochs=3",
          "train.iters_per_epoch=1", "eval.trials=1")
    dataset = load_dataset("sysu_mm01", sysu_root, train_ids=train_ids)
    test_ids = {s.pid for s in dataset.query}
    if train_ids == "train":
        val_ids = {s.pid for s in dataset.val_query}
        assert evaluated == {"val": val_ids, "test": test_ids} and val_ids.isdisjoint(test_ids)
    else:
        assert evaluated == {"test": test_ids}
    best = load_checkpoint(run_dir / "best.pth")["train_state"]
    assert best["epoch"] == best["best_epoch"] == best_epoch
    assert load_checkpoint(run_dir / "last.pth")["train_state"]["best_epoch"] == best_epoch
    if train_ids == "train":
        assert best["best_value"] == pytest.approx(0.6)
    logged = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["test/mAP"] for r in logged if "test/mAP" in r] == pytest.approx(scripted["test"])  # still reported
