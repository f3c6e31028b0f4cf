"""benchmarks/gpu_report.py and benchmarks/profile_step.py end to end, in their CPU smoke modes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from .conftest import REPO_ROOT


def run_script(name: str, *args: str) -> subprocess.CompletedProcess:
    path = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, str(REPO_ROOT / "benchmarks" / name), *args]
    return subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)


def test_gpu_report_smoke_run_prints_the_whole_table(tmp_path):
    out = tmp_path / "report.md"
    done = run_script("gpu_report.py", "--device", "cpu", "--tiny", "--out", str(out), "--json", str(tmp_path / "r"))
    assert done.returncode == 0, done.stderr[-2000:]
    table = out.read_text()
    assert table == done.stdout
    rows = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert [row.split(" | ")[0] for row in rows] == ["| full cm-SSFT", "| shared-only baseline", "| bare resnet18"]
    records = [json.loads(line) for line in (tmp_path / "r").read_text().splitlines()]
    assert all(r["status"] == "ok" and r["ceiling"] > 0 for r in records)
    assert all(r["loaded"] > 0 for r in records if r["model"] != "bare")


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
def test_gpu_report_without_cuda_refuses_in_one_line():
    done = run_script("gpu_report.py")
    assert done.returncode == 2 and done.stdout == ""
    assert len(done.stderr.strip().splitlines()) == 1 and "no CUDA device" in done.stderr


def profile(*extra: str) -> dict:
    done = run_script("profile_step.py", "--device", "cpu", "--tiny", "--model", "baseline", *extra)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "forward" in done.stdout and "backward" in done.stdout and "optimizer" in done.stdout
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_profile_step_reports_every_phase_and_the_host_reads():
    """The baseline (no transfer) reads values back every step on the default CPU path, and never
    between log steps with a fused optimizer and device augmentation."""
    default = profile()
    assert {"data_wait", "h2d", "forward", "backward", "optimizer"} <= set(default["profiled"]["host_ms"])
    assert default["synchronised"]["step_ms"] > 0 and default["profiled"]["step_ms"] > 0
    assert sum(default["profiled"]["host_reads"].values()) > 0 and default["reads_back_every_step"]
    fast = profile("--set", "train.fused_optimizer=on", "data.augment_on=device")
    assert fast["fused_optimizer"] and not fast["reads_back_every_step"]
    assert fast["profiled"]["host_reads"] == {} and fast["profiled"]["host_ms"]["augment"] > 0
