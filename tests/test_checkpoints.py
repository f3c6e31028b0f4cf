"""Checkpoints: reading one never runs code; bad files are one line; the two kinds and their files."""

from __future__ import annotations

import errno
import io
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cmssft.engine.checkpoint import EVAL_KEYS, RESUME_KEYS, CheckpointSchedule, load_checkpoint, save_atomic
from cmssft.errors import UserError

from .conftest import REPO_ROOT


class _Payload:
    """Unpickling this creates ``marker``: what a crafted checkpoint would do with ``os.system``."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').close()",)


def crafted_checkpoints(folder: Path, marker: Path) -> list[Path]:
    """The payload inside a cmssft-looking dict, once in torch.save's zip format and once as a bare pickle."""
    state = {"model": {"w": torch.ones(2)}, "config": {}, "num_classes": 2, "payload": _Payload(marker)}
    zipped, bare = folder / "evil_zip.pth", folder / "evil_pickle.pth"
    torch.save(state, zipped)
    bare.write_bytes(pickle.dumps(state))
    return [zipped, bare]


def test_the_payload_runs_when_unpickled_unsafely(tmp_path):
    """The control: the crafted files really execute their payload when loaded the unsafe way."""
    for i, path in enumerate(crafted_checkpoints(tmp_path, tmp_path / "ran")):
        (tmp_path / "ran").unlink(missing_ok=True)
        if i == 0:
            torch.load(path, weights_only=False)
        else:
            pickle.loads(path.read_bytes())
        assert (tmp_path / "ran").exists()


def test_a_crafted_checkpoint_is_refused_without_running(tmp_path):
    marker = tmp_path / "ran"
    for path in crafted_checkpoints(tmp_path, marker):
        with pytest.raises(UserError) as err:
            load_checkpoint(path)
        assert "\n" not in str(err.value)
        assert not marker.exists(), f"{path.name}: the payload ran"
    with pytest.raises(UserError, match="refused and nothing in it was run"):
        load_checkpoint(tmp_path / "evil_zip.pth")


def run_script(script: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO_ROOT / script), *args], capture_output=True, text=True, cwd=cwd,
                          timeout=300)


def one_line_error(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip() and "it/s]" not in line]  # no progress bars
    assert len(lines) == 1, proc.stderr
    return lines[0]


def test_eval_py_refuses_a_crafted_checkpoint(tmp_path, sysu_root):
    marker = tmp_path / "ran"
    for path in crafted_checkpoints(tmp_path, marker):
        proc = run_script("eval.py", "--config", str(REPO_ROOT / "configs/demo.yaml"), "--checkpoint", str(path),
                          f"data.root={sysu_root}", cwd=tmp_path)
        assert one_line_error(proc).startswith("error: checkpoint")
        assert not marker.exists()


def test_resume_refuses_a_crafted_last_pth(tmp_path, sysu_root):
    from cmssft.config import load_config, save_config

    from .conftest import TINY_DATA

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    save_config(load_config(None, [f"data.root={sysu_root}", *TINY_DATA]), run_dir / "config.yaml")
    marker = tmp_path / "ran"
    crafted_checkpoints(tmp_path, marker)
    (tmp_path / "evil_zip.pth").rename(run_dir / "last.pth")
    args = ["--run-dir", str(run_dir), "--resume"]
    proc = run_script("train.py", *args, cwd=tmp_path)
    assert "refused and nothing in it was run" in one_line_error(proc)
    assert not marker.exists()


def test_foreign_truncated_and_configless_checkpoints_are_one_line(tmp_path, sysu_root):
    torch.save({"model": {"w": torch.ones(2)}}, tmp_path / "no_config.pth")  # a bare state dict someone saved
    torch.save({"model": {"w": torch.ones(4096)}, "config": {}, "num_classes": 2}, tmp_path / "whole.pth")
    data = (tmp_path / "whole.pth").read_bytes()
    (tmp_path / "truncated.pth").write_bytes(data[: len(data) // 2])
    (tmp_path / "foreign.pth").write_bytes(pickle.dumps(["a", "list", 3]))
    torch.save(torch.ones(3), tmp_path / "tensor.pth")
    expected = {
        "no_config.pth": "lacks 'config', 'num_classes'",
        "truncated.pth": "cannot be read",
        "foreign.pth": "cannot be read",
        "tensor.pth": "not a cmssft checkpoint (it holds a Tensor",
    }
    for name, message in expected.items():
        proc = run_script("eval.py", "--config", str(REPO_ROOT / "configs/demo.yaml"), "--checkpoint",
                          str(tmp_path / name), f"data.root={sysu_root}", cwd=tmp_path)
        assert message in one_line_error(proc), name


def test_resume_needs_the_resumable_kind(tmp_path):
    save_atomic({key: {} for key in EVAL_KEYS}, tmp_path / "best.pth")
    assert set(load_checkpoint(tmp_path / "best.pth")) == set(EVAL_KEYS)
    with pytest.raises(UserError, match="lacks 'optimizer', 'scheduler'"):
        load_checkpoint(tmp_path / "best.pth", need=RESUME_KEYS)


def test_checkpoint_files_follow_the_umask(tmp_path):
    previous = os.umask(0o027)
    try:
        save_atomic({"model": {}}, tmp_path / "a.pth")
    finally:
        os.umask(previous)
    assert (tmp_path / "a.pth").stat().st_mode & 0o777 == 0o640
    save_atomic({"model": {}}, tmp_path / "b.pth")
    assert (tmp_path / "b.pth").stat().st_mode & 0o777 == 0o666 & ~previous



class DiskFullForOneWrite(io.RawIOBase):
    """A file on a disk that fills up for a moment: its first write past 64 KiB fails with ENOSPC."""

    def __init__(self, fd: int) -> None:
        self.fd, self.written, self.failed = fd, 0, False

    def writable(self) -> bool:
        return True

    def fileno(self) -> int:
        return self.fd

    def write(self, data) -> int:
        if not self.failed and self.written + len(data) > 65536:
            self.failed = True
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        written = os.write(self.fd, data)
        self.written += written
        return written

    def close(self) -> None:
        if not self.closed:
            os.close(self.fd)
        super().close()


def test_a_full_disk_is_reported_as_one_and_keeps_the_previous_file(tmp_path, monkeypatch):
    """torch's own writer meets the ENOSPC: the caller must get that OSError (which the trainer turns into
    "free space, then --resume"), not torch's RuntimeError "unexpected pos", which says nothing of why."""
    path = tmp_path / "last.pth"
    save_atomic({"model": {"w": torch.ones(3)}}, path)
    monkeypatch.setattr(os, "fdopen", lambda fd, mode: io.BufferedWriter(DiskFullForOneWrite(fd)))
    with pytest.raises(OSError) as raised:
        save_atomic({"model": {"w": torch.zeros(256, 1024)}}, path)  # 1 MiB: past any write buffer
    monkeypatch.undo()
    assert raised.value.errno == errno.ENOSPC
    assert torch.equal(load_checkpoint(path, need=("model",))["model"]["w"], torch.ones(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pth"]


def test_the_checkpoint_schedule_counts_from_the_latest_write(monkeypatch):
    """Either rule makes last.pth due, counted from the latest ``mark``; 0 turns a rule off."""
    from cmssft.engine import checkpoint as checkpoint_module

    now = [1000.0]
    monkeypatch.setattr(checkpoint_module.time, "monotonic", lambda: now[0])
    by_steps = CheckpointSchedule(minutes=0, steps=3)
    by_steps.mark(5)
    assert [by_steps.due(step) for step in (6, 7, 8, 9)] == [False, False, True, True]
    by_steps.mark(8)
    assert not by_steps.due(10) and by_steps.due(11)

    by_clock = CheckpointSchedule(minutes=2, steps=0)
    by_clock.mark(0)
    now[0] += 119.0
    assert not by_clock.due(10_000)  # no step rule
    now[0] += 1.0
    assert by_clock.due(1)
    by_clock.mark(1)
    assert not by_clock.due(2)

    never = CheckpointSchedule(minutes=0, steps=0)
    now[0] += 1e9
    assert not never.due(10**9)
