"""Distributed training: two CPU processes under torchrun (gloo) against the same step computed in one process.

Each process draws whole P x K batches of one global sequence: with 2 global batches per epoch, rank 0
trains on batch 0 and rank 1 on batch 1, one step each. DDP averages the gradients, so that step is the
single-process step on the mean of the two shard losses (each shard's BatchNorm statistics its own).
With ``model.sstn.global_batch`` the SSTN graph spans both shards: the reference then builds, for each
shard, the graph over its rows and the other shard's rows, gradients flowing into both.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch
from torch import nn

from cmssft.config import load_config
from cmssft.engine.build import wrap_for_training
from cmssft.engine.checkpoint import load_checkpoint
from cmssft.engine.distributed import DistContext, context_from_env
from cmssft.errors import UserError
from cmssft.models.candidate_memory import CandidateMemory

from .conftest import REPO_ROOT, TINY_DATA

TINY_DDP = [
    *TINY_DATA,
    "model.specific_from=layer4",
    "train.epochs=1",
    "train.iters_per_epoch=2",  # global batches per epoch: one step per process
    "train.optimizer=sgd",  # an SGD step is linear in the gradient, so the weights check the averaging
    "train.lr=0.01",
    "train.warmup_epochs=0",
    "train.eval_every=1",
    "train.deterministic=true",
    "train.log_every=1",
    "eval.trials=1",
    "eval.batch_size=32",
    "eval.flip=false",
]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun(run_dir, sysu_root, *extra) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
        str(REPO_ROOT / "train.py"), "--run-dir", str(run_dir), f"data.root={sysu_root}", *TINY_DDP, *extra,
    ]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def logged_steps(run_dir) -> list[dict]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if "loss/total" in r]


class TwoShardGather:
    """Stands in for the all-gather of a 2-process run: this shard's rows beside the other shard's
    recorded rows (with their autograd graph), in rank order."""

    def __init__(self, rank: int, other: list[torch.Tensor] | None = None) -> None:
        self.rank, self.other, self.own = rank, other, []

    def __call__(self, rows: torch.Tensor) -> tuple[torch.Tensor, int]:
        self.own.append(rows)
        if self.other is None:
            return rows, 0
        other = self.other[len(self.own) - 1]
        return torch.cat([rows, other] if self.rank == 0 else [other, rows]), self.rank * other.shape[0]


def reference_step(sysu_root, *extra) -> tuple[dict, dict, dict]:
    """(initial parameters, parameters after the first step, mean loss terms) computed in one process."""
    from cmssft.data.loader import build_train_loader
    from cmssft.engine.build import prepare_dataset
    from cmssft.engine.optim import build_optimizer, build_scheduler
    from cmssft.losses import build_criterion
    from cmssft.models import build_model
    from cmssft.utils.runtime import seed_everything

    cfg = load_config(None, [f"data.root={sysu_root}", *TINY_DDP, *extra])
    dataset = prepare_dataset(cfg)
    seed_everything(cfg.seed, cfg.train.deterministic)
    model = build_model(cfg, dataset.num_train_ids).train()
    criterion = build_criterion(cfg)
    optimizer = build_optimizer(model, cfg.train)
    scheduler = build_scheduler(optimizer, cfg.train, 1)
    shards = []
    for rank in (0, 1):
        loader = build_train_loader(cfg, dataset.train, rank=rank, world_size=2)
        loader.batch_sampler.set_epoch(0)
        batch = next(iter(loader))
        shards.append((batch["image"], batch["modality"], batch["label"]))
    before = {k: v.detach().clone() for k, v in model.named_parameters()}

    def loss(out: dict, shard: tuple) -> dict:
        return criterion(out, shard[2], shard[1])

    def first_step(*inputs) -> dict:  # every process's first step: its candidate memory is still empty
        if model.sstn is not None and model.sstn.memory is not None:
            model.sstn.memory.clear()
        return model(*inputs)

    if cfg.model.sstn.global_batch:
        first = TwoShardGather(1)  # rank 1's rows, recorded with their graph
        model.batch_gather = first
        first_step(*shards[1])
        model.batch_gather = rank0 = TwoShardGather(0, first.own)
        terms = [loss(first_step(*shards[0]), shards[0])]
        model.batch_gather = TwoShardGather(1, rank0.own)
        terms.append(loss(first_step(*shards[1]), shards[1]))
        model.batch_gather = None
    else:
        terms = [loss(first_step(*shard), shard) for shard in shards]
    mean = {k: (terms[0][k] + terms[1][k]) / 2 for k in terms[0]}
    optimizer.zero_grad()
    mean["total"].backward()
    optimizer.step()
    scheduler.step()
    after = {k: v.detach().clone() for k, v in model.named_parameters()}
    return before, after, {k: float(v.detach()) for k, v in mean.items()}


def assert_same_first_step(run_dir, sysu_root, *extra) -> None:
    before, after, terms = reference_step(sysu_root, *extra)
    first = logged_steps(run_dir)[0]
    assert first["step"] == 1
    for name, value in terms.items():
        assert first[f"loss/{name}"] == pytest.approx(value, rel=1e-4, abs=1e-5), name
    trained = load_checkpoint(run_dir / "last.pth")["model"]  # after epoch 1 = after the first step
    moved = 0
    for name, start in before.items():
        expected, got = after[name] - start, trained[name] - start
        scale = float(expected.abs().max())
        assert torch.allclose(got, expected, rtol=1e-3, atol=1e-3 * scale + 1e-7), name
        moved += scale > 0
    assert moved > len(before) // 2  # the step did move the weights


@pytest.fixture(scope="module")
def ddp_run(module_scratch, sysu_root):
    run_dir = module_scratch / "run"
    torchrun(run_dir, sysu_root)
    return run_dir


def test_first_step_equals_the_gradient_averaged_step(ddp_run, sysu_root):
    assert_same_first_step(ddp_run, sysu_root)


def test_only_rank_0_writes(ddp_run):
    assert sorted(p.name for p in ddp_run.iterdir() if p.is_file()) == [
        "best.pth", "config.yaml", "last.pth", "log.txt", "metrics.jsonl"
    ]  # fmt: skip
    assert [r["step"] for r in logged_steps(ddp_run)] == [1]  # one record per step, not one per process
    assert (ddp_run / "log.txt").read_text().count("run directory") == 1
    state = load_checkpoint(ddp_run / "best.pth")
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in state["model"])


def test_resume_under_torchrun_continues_and_eval_py_reads_it(ddp_run, sysu_root, tmp_path):
    from cmssft.evaluation.cli import main as eval_main

    ddp_run = shutil.copytree(ddp_run, tmp_path / "resumed")
    torchrun(ddp_run, sysu_root, "--resume", "train.epochs=2")
    state = load_checkpoint(ddp_run / "last.pth")
    assert state["train_state"]["epoch"] == 2 and state["train_state"]["step"] == 2
    assert [r["step"] for r in logged_steps(ddp_run)] == [1, 2]
    assert (ddp_run / "log.txt").read_text().count("resumed from") == 1
    final = [json.loads(line) for line in (ddp_run / "metrics.jsonl").read_text().splitlines()]
    final = [r for r in final if "test/mAP" in r][-1]
    out = tmp_path / "eval.json"
    code = eval_main(["--config", str(ddp_run / "config.yaml"), "--checkpoint", str(ddp_run / "best.pth"),
                      "--json", str(out), f"data.root={sysu_root}"])  # fmt: skip
    assert code == 0
    assert json.loads(out.read_text())["mean"]["mAP"] == pytest.approx(final["test/mAP"], abs=1e-6)


def test_global_batch_sstn_is_one_graph_over_both_shards(tmp_path, sysu_root):
    run_dir = tmp_path / "global"
    torchrun(run_dir, sysu_root, "model.sstn.global_batch=true")
    assert_same_first_step(run_dir, sysu_root, "model.sstn.global_batch=true")


def test_fused_step_without_per_step_reads_under_torchrun(tmp_path, sysu_root):
    """train.fused_optimizer=on: the skip flag is all-reduced on the device and the numbers read back
    at the log step are still the means over processes."""
    run_dir = tmp_path / "fused"
    torchrun(run_dir, sysu_root, "train.fused_optimizer=on")
    assert_same_first_step(run_dir, sysu_root)


# ---------------------------------------------------------------------------- single-process parts


def test_context_from_env():
    assert context_from_env({}) == DistContext(0, 1, 0)
    assert context_from_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}) == DistContext(3, 4, 1)
    with pytest.raises(UserError, match="not a rank"):
        context_from_env({"RANK": "2", "WORLD_SIZE": "2"})
    with pytest.raises(UserError, match="integers"):
        context_from_env({"WORLD_SIZE": "two"})


def test_single_process_collectives_are_identities():
    ctx = DistContext()
    rows = torch.randn(3, 2)
    gathered, start = ctx.all_gather(rows)
    assert gathered is rows and start == 0
    assert ctx.is_main and not ctx.any(False) and ctx.any(True) and ctx.max(15) == 15
    assert ctx.mean({"a": 2.0}) == {"a": 2.0}
    assert ctx.from_main(lambda: "x") == "x" and ctx.main_first(lambda: 7) == 7
    assert ctx.device(torch.device("cuda")) == torch.device("cuda")


def test_channels_last_only_on_cuda():
    from cmssft.engine.trainer import uses_channels_last

    cfg = load_config(None, ["train.channels_last=true"])
    assert uses_channels_last(cfg, torch.device("cuda")) and not uses_channels_last(cfg, torch.device("cpu"))
    assert not uses_channels_last(load_config(None, ["train.channels_last=false"]), torch.device("cuda"))


def test_compile_wraps_the_training_module_only():
    """train.compile: the step runs the compiled module; checkpoints keep the plain module's keys."""
    from cmssft.engine.build import wrap_for_training

    if not any(os.access(os.path.join(p, "cc"), os.X_OK) for p in os.environ.get("PATH", "").split(os.pathsep)):
        pytest.skip("torch.compile on CPU needs a C compiler")
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU())
    cfg = load_config(None, ["train.compile=true", "train.device=cpu"])
    wrapped = wrap_for_training(model, cfg, torch.device("cpu"), DistContext())
    assert wrapped is not model and isinstance(wrapped, torch._dynamo.eval_frame.OptimizedModule)
    x = torch.randn(5, 4)
    try:
        wrapped(x).sum().backward()
        assert model[0].weight.grad is not None
        assert torch.allclose(wrapped(x), model(x))
    finally:
        # torch 2.5-2.6 link inductor's CPU kernels with -ffast-math, whose loader turns flush-to-zero on for the
        # whole process; later tests (hypothesis' float strategies) need IEEE subnormals back
        torch.set_flush_denormal(False)
    assert set(model.state_dict()) == {"0.weight", "0.bias"}
    plain = load_config(None, ["train.compile=false"])
    assert wrap_for_training(model, plain, torch.device("cpu"), DistContext()) is model


class _RememberingModel(nn.Module):
    """A layer and a candidate memory that stores each batch's inputs, as the SSTN stores its nodes."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 4)
        self.memory = CandidateMemory(size=8, dim=4, use_specific=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.memory.push(x, None, torch.zeros(len(x), dtype=torch.long), torch.zeros(len(x), dtype=torch.long))
        return self.linear(x)


def _remember_in_ddp(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    """One process of the memory test: three DDP steps on batches only this rank sees, then its memory saved."""
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        model = _RememberingModel()
        wrapped = wrap_for_training(model, load_config(None, []), torch.device("cpu"),
                                    DistContext(rank=rank, world_size=world_size, local_rank=rank))
        for step in range(3):
            wrapped(torch.full((2, 4), float(10 * rank + step))).sum().backward()
        shared, _, _, _ = model.memory.entries()
        torch.save(shared.clone(), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        torch.distributed.destroy_process_group()


def test_each_process_keeps_its_own_candidate_memory(tmp_path):
    """Two gloo processes: each memory ends holding exactly the batches its own process pushed, in order
    (DDP broadcasting rank 0's buffers before every forward would leave rank 1 with rank 0's)."""
    torch.multiprocessing.spawn(_remember_in_ddp, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    for rank in (0, 1):
        memory = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        expected = torch.tensor([10.0 * rank + step for step in range(3) for _ in range(2)])
        assert torch.equal(memory[:, 0], expected), (rank, memory[:, 0])
