import os
import subprocess
import sys
import time

import pytest
import torch

from cmssft.config import TrainConfig, load_config
from cmssft.engine.checkpoint import load_checkpoint, load_model_state, save_atomic
from cmssft.engine.entry import find_resume_dir
from cmssft.engine.metrics_log import MetricsLogger
from cmssft.engine.optim import lr_factor
from cmssft.engine.trainer import finite
from cmssft.errors import UserError

from .conftest import REPO_ROOT


def test_atomic_save_replaces_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "last.pth"
    save_atomic({"model": {"w": torch.ones(2)}}, path)
    save_atomic({"model": {"w": torch.zeros(2)}}, path)
    assert torch.equal(load_checkpoint(path, need=("model",))["model"]["w"], torch.zeros(2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pth"]


def test_failed_save_keeps_the_old_checkpoint(tmp_path):
    path = tmp_path / "last.pth"
    save_atomic({"model": {"w": torch.ones(2)}}, path)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        save_atomic({"model": Unpicklable()}, path)
    assert torch.equal(load_checkpoint(path, need=("model",))["model"]["w"], torch.ones(2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pth"]


def test_bad_checkpoint_files_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_checkpoint(tmp_path / "none.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="cannot be read"):
        load_checkpoint(tmp_path / "junk.pth")
    torch.save({"weights": 1}, tmp_path / "foreign.pth")
    with pytest.raises(UserError, match="not a cmssft checkpoint"):
        load_checkpoint(tmp_path / "foreign.pth")


def test_architecture_mismatch_names_the_keys():
    model = torch.nn.Sequential(torch.nn.Linear(4, 3))
    other = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.ReLU(), torch.nn.Linear(5, 2)).state_dict()
    with pytest.raises(UserError, match=r"unexpected: 2.bias, 2.weight; shape differs: 0.bias, 0.weight"):
        load_model_state(model, other, "ckpt.pth")


def test_lr_schedule_warmup_step_and_cosine():
    cfg = TrainConfig(epochs=10, warmup_epochs=2, milestones=[5, 8], gamma=0.1)
    assert lr_factor(0, cfg) == pytest.approx(0.01)
    assert lr_factor(1, cfg) == pytest.approx(0.505)
    assert lr_factor(3, cfg) == 1.0
    assert lr_factor(6, cfg) == pytest.approx(0.1)
    assert lr_factor(9, cfg) == pytest.approx(0.01)
    cosine = TrainConfig(epochs=10, warmup_epochs=0, schedule="cosine")
    assert lr_factor(0, cosine) == pytest.approx(1.0)
    assert lr_factor(5, cosine) == pytest.approx(0.5)
    assert lr_factor(10, cosine) == pytest.approx(0.0, abs=1e-9)


def test_resume_finds_the_newest_run_of_the_config(tmp_path):
    cfg = load_config(None, [f"output_dir={tmp_path}"])
    for i, name in enumerate(["demo-1", "demo-2", "other-3"]):
        (tmp_path / name).mkdir()
        (tmp_path / name / "last.pth").write_bytes(b"x")
        os.utime(tmp_path / name / "last.pth", (time.time() + i, time.time() + i))
    assert find_resume_dir(cfg, "configs/demo.yaml", None) == tmp_path / "demo-2"
    assert find_resume_dir(cfg, "configs/demo.yaml", str(tmp_path / "demo-1")) == tmp_path / "demo-1"
    with pytest.raises(UserError, match="no nothing-"):
        find_resume_dir(cfg, "configs/nothing.yaml", None)


def test_metrics_logger_writes_jsonl_and_events(tmp_path):
    logger = MetricsLogger(tmp_path)
    logger.scalars({"loss/total": 1.5}, step=3, epoch=1)
    logger.close()
    assert '"loss/total": 1.5' in (tmp_path / "metrics.jsonl").read_text()
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


@pytest.mark.parametrize(
    "args, expected",
    [
        (["data.root=/nonexistent/SYSU"], "expected SYSU-MM01 layout"),
        (["data.name=regdb", "data.root=/nonexistent/RegDB"], "expected RegDB layout"),
        (["train.lrr=1"], "did you mean 'train.lr'"),
        (["--config", "/nonexistent.yaml"], "does not exist"),
    ],
)
def test_train_cli_user_errors_exit_2_with_one_line(tmp_path, args, expected):
    proc = subprocess.run(
        [sys.executable, str(REPO_ROOT / "train.py"), *args, f"output_dir={tmp_path}"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert proc.returncode == 2, proc.stderr
    assert expected in proc.stderr
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not any(tmp_path.iterdir())  # no run directory for a run that never started


def test_uncounted_model_statistics_are_not_logged():
    stats = {"sstn/cross_edges": 0.0, "sstn/cross_same_id_edges": float("nan"), "heads/x": float("inf")}
    assert finite(stats) == {"sstn/cross_edges": 0.0}


@pytest.mark.parametrize("schedule", ["constant", "dann"])
def test_the_grl_schedule_sets_the_ramp_before_each_step(schedule, sysu_root, tmp_path, monkeypatch):
    from cmssft.engine import trainer
    from cmssft.engine.entry import train_main
    from cmssft.models.heads import dann_ramp

    from .conftest import SHARED_ONLY, TINY_CHECKPOINT_RUN

    ramps = []
    monkeypatch.setattr(trainer, "set_reversal_ramp", lambda model, ramp: ramps.append(ramp))
    args = ["--run-dir", str(tmp_path / "run"), f"data.root={sysu_root}", *TINY_CHECKPOINT_RUN, *SHARED_ONLY,
            "train.iters_per_epoch=3", f"train.grl_schedule={schedule}"]
    assert train_main(args) == 0
    assert ramps == ([dann_ramp(step / 3) for step in range(3)] if schedule == "dann" else [])


def test_cuda_training_lets_cudnn_time_its_kernels_unless_deterministic(monkeypatch):
    """Fixed-size CUDA training turns cuDNN's autotuner on; a deterministic run and the CPU leave it off."""
    from cmssft.utils.runtime import choose_kernels

    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    monkeypatch.setattr(torch, "use_deterministic_algorithms", lambda flag: None)  # keep the process as it is
    choose_kernels(torch.device("cpu"), deterministic=False)
    assert torch.backends.cudnn.benchmark is False
    choose_kernels(torch.device("cuda"), deterministic=False)
    assert torch.backends.cudnn.benchmark is True
    choose_kernels(torch.device("cuda"), deterministic=True)
    assert torch.backends.cudnn.benchmark is False
