"""A killed or signalled train.py loses nothing: ``--resume`` reaches the uninterrupted run's weights and metrics.

Every run is a real subprocess. Interrupted runs go through a small wrapper (written to tmp_path) that
pauses at a chosen optimizer step or half-way through writing a chosen checkpoint and touches a marker
file, so the test can kill or signal it at a known moment instead of racing the clock.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cmssft.engine.checkpoint import load_checkpoint

from .conftest import REPO_ROOT, SHARED_ONLY, TINY_DATA

ITERS = 3  # optimizer steps per epoch; 2 epochs
TINY_RUN = [
    *TINY_DATA,
    *SHARED_ONLY,  # a small model keeps each checkpoint write short
    "train.epochs=2",
    f"train.iters_per_epoch={ITERS}",
    "train.lr=0.01",
    "train.warmup_epochs=1",
    "train.eval_every=0",
    f"train.checkpoint_steps={ITERS}",  # last.pth at every epoch's end, as the kills below expect
    "train.deterministic=true",
    "eval.trials=1",
    "eval.batch_size=64",
    "eval.flip=false",
]

PAUSING_TRAIN = '''
"""train.py that stops at PAUSE (step:N after global step N, save:N half-way through writing the step-N checkpoint)."""
import io, os, sys, time
from pathlib import Path

import torch

from cmssft.engine import trainer
from cmssft.engine.entry import train_main
from cmssft.errors import run_cli

KIND, AT = os.environ["PAUSE"].split(":")
AT = int(AT)
MARKER = Path(os.environ["MARKER"])


def hold(owner=None):
    """Touch the marker, then wait for the test: SIGKILL ends us here, SIGINT/SIGTERM let the loop go on."""
    MARKER.touch()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if owner is not None and owner.signals.signum is not None:
            return
        time.sleep(0.02)
    sys.exit(99)


real_step, real_save = trainer.Trainer.train_step, torch.save


def train_step(self, batch):
    out = real_step(self, batch)
    if KIND == "step" and self.state.step + 1 == AT:
        hold(self)
    return out


def save(obj, f, *args, **kwargs):
    last = isinstance(obj, dict) and "optimizer" in obj  # last.pth, not the weights-only best.pth
    if KIND == "save" and last and obj["train_state"]["step"] == AT:
        buffer = io.BytesIO()
        real_save(obj, buffer, *args, **kwargs)
        data = buffer.getvalue()
        f.write(data[: len(data) // 2])
        f.flush()
        os.fsync(f.fileno())
        hold()
    return real_save(obj, f, *args, **kwargs)


trainer.Trainer.train_step = train_step
torch.save = save
sys.exit(run_cli(train_main))
'''


def train_command(script: Path, run_dir: Path, root: Path, *extra: str) -> list[str]:
    return [sys.executable, str(script), "--run-dir", str(run_dir), f"data.root={root}", *TINY_RUN, *extra]


def child_env(**extra: str) -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": path, **extra}


def run_train(run_dir: Path, root: Path, *extra: str) -> None:
    """train.py to completion; its output goes to run_dir/../<name>.out for the failure message."""
    out = run_dir.parent / f"{run_dir.name}.out"
    with out.open("ab") as handle:
        code = subprocess.call(train_command(REPO_ROOT / "train.py", run_dir, root, *extra), cwd=REPO_ROOT,
                               stdout=handle, stderr=subprocess.STDOUT, env=child_env(), timeout=300)
    assert code == 0, out.read_text()[-3000:]


def start_paused(tmp_path: Path, run_dir: Path, root: Path, pause: str, *extra: str) -> subprocess.Popen:
    """Start the pausing wrapper and return once it sits at ``pause``."""
    script = tmp_path / "pausing_train.py"
    script.write_text(PAUSING_TRAIN)
    marker = tmp_path / f"paused-{pause.replace(':', '-')}"
    out = (run_dir.parent / f"{run_dir.name}.out").open("ab")
    proc = subprocess.Popen(train_command(script, run_dir, root, *extra), cwd=REPO_ROOT, stdout=out,
                            stderr=subprocess.STDOUT, env=child_env(PAUSE=pause, MARKER=str(marker)))
    out.close()
    deadline = time.monotonic() + 300
    while not marker.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            log = (run_dir.parent / f"{run_dir.name}.out").read_text()[-3000:]
            pytest.fail(f"the run never reached {pause} (exit {proc.poll()}):\n{log}")
        time.sleep(0.05)
    return proc


def final_test_metrics(run_dir: Path) -> dict[str, float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    final = [r for r in records if "test/mAP" in r][-1]
    return {k: v for k, v in final.items() if k.startswith("test/")}


def assert_same_result(run_dir: Path, reference: Path) -> None:
    got, want = load_checkpoint(run_dir / "last.pth"), load_checkpoint(reference / "last.pth")
    assert got["train_state"]["epoch"] == 2 and got["train_state"]["batch"] == 0
    assert got["train_state"]["step"] == want["train_state"]["step"] == 2 * ITERS
    assert got["model"].keys() == want["model"].keys()
    differ = [k for k in want["model"] if not torch.equal(got["model"][k], want["model"][k])]
    assert not differ, f"{len(differ)} tensors differ from the uninterrupted run, e.g. {differ[:3]}"
    assert final_test_metrics(run_dir) == final_test_metrics(reference)


class Reference:
    """The uninterrupted run, started in the background so that it overlaps the first interrupted one."""

    def __init__(self, run_dir: Path, root: Path) -> None:
        self.run_dir = run_dir
        self.out = run_dir.parent / f"{run_dir.name}.out"
        with self.out.open("wb") as handle:
            command = train_command(REPO_ROOT / "train.py", run_dir, root)
            self.proc = subprocess.Popen(
                command, cwd=REPO_ROOT, stdout=handle, stderr=subprocess.STDOUT, env=child_env()
            )

    def finished(self) -> Path:
        code = self.proc.wait(timeout=300)
        assert code == 0, self.out.read_text()[-3000:]
        return self.run_dir


@pytest.fixture(scope="module")
def reference(module_scratch, sysu_root):
    """One uninterrupted run every interrupted one must reproduce."""
    ref = Reference(module_scratch / "reference", sysu_root)
    yield ref
    if ref.proc.poll() is None:
        ref.proc.kill()
        ref.proc.wait()


def kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL


def test_sigkill_between_and_during_checkpoint_writes_then_resume_matches(reference, sysu_root, tmp_path):
    """SIGKILL one step past epoch 1's last.pth, resume, SIGKILL half-way through writing epoch 2's last.pth.

    After each kill epoch 1's last.pth still loads; the half-written temporary file left by the second kill
    does not disturb the final resume, which ends with the uninterrupted run's weights and test metrics.
    """
    run_dir = tmp_path / "killed"
    kill(start_paused(tmp_path, run_dir, sysu_root, f"step:{ITERS + 1}"))
    saved = load_checkpoint(run_dir / "last.pth")
    assert (saved["train_state"]["epoch"], saved["train_state"]["step"]) == (1, ITERS)

    kill(start_paused(tmp_path, run_dir, sysu_root, f"save:{2 * ITERS}", "--resume"))
    assert list(run_dir.glob(".last.pth.*")), "the kill should leave the half-written temporary file behind"
    saved = load_checkpoint(run_dir / "last.pth")
    assert (saved["train_state"]["epoch"], saved["train_state"]["step"]) == (1, ITERS)

    run_train(run_dir, sysu_root, "--resume")
    assert not list(run_dir.glob(".last.pth.*")), "resume should remove the stale temporary file"
    assert_same_result(run_dir, reference.finished())


def test_sigint_then_sigterm_mid_epoch_then_resume_matches(reference, sysu_root, tmp_path):
    """SIGINT in epoch 1 and SIGTERM in epoch 2 (after a mid-epoch resume) each exit 128+signum with
    last.pth saved after the current batch; the final resume ends with the uninterrupted run's results."""
    run_dir = tmp_path / "signalled"
    for signum, step in ((signal.SIGINT, 2), (signal.SIGTERM, ITERS + 2)):
        extra = ("--resume",) if (run_dir / "last.pth").exists() else ()
        proc = start_paused(tmp_path, run_dir, sysu_root, f"step:{step}", *extra)
        proc.send_signal(signum)
        assert proc.wait(timeout=120) == 128 + signum
        state = load_checkpoint(run_dir / "last.pth")["train_state"]
        assert (state["epoch"], state["batch"], state["step"]) == (step // ITERS, step % ITERS, step)
        assert f"stopped by {signal.Signals(signum).name}" in (run_dir / "log.txt").read_text()
    run_train(run_dir, sysu_root, "--resume")
    assert_same_result(run_dir, reference.finished())


def test_full_disk_keeps_the_previous_checkpoint_and_resume_finishes(sysu_root, tmp_path, monkeypatch):
    """ENOSPC half-way through writing epoch 2's last.pth: the run stops, epoch 1's file is intact, no
    temporary file is left, and once there is space again ``--resume`` finishes the run (in-process)."""
    import errno

    from cmssft.engine.entry import train_main

    real_save = torch.save

    def full_disk(obj, f, *args, **kwargs):
        if isinstance(obj, dict) and obj.get("train_state", {}).get("epoch") == 2:
            f.write(b"\0" * 1024)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    run_dir = tmp_path / "full"
    one_step_epochs = ["train.iters_per_epoch=1", "train.checkpoint_steps=1"]
    args = ["--run-dir", str(run_dir), f"data.root={sysu_root}", *TINY_RUN, *one_step_epochs]
    monkeypatch.setattr(torch, "save", full_disk)
    from cmssft.engine.checkpoint import CheckpointWriteError

    with pytest.raises(CheckpointWriteError, match="No space left on device.*previous checkpoint is intact"):
        train_main(args)
    assert "could not write" in (run_dir / "log.txt").read_text()
    assert load_checkpoint(run_dir / "last.pth")["train_state"]["epoch"] == 1
    assert sorted(p.name for p in run_dir.glob(".*")) == []
    monkeypatch.undo()
    assert train_main([*args, "--resume"]) == 0
    assert load_checkpoint(run_dir / "last.pth")["train_state"]["epoch"] == 2
