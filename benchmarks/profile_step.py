"""Where one training step's time goes: data wait, host-to-device copy, augmentation, forward,
backward, optimizer, read-back, and how often the host waits for the device.

    python benchmarks/profile_step.py [--device cpu|cuda] [--model full|baseline] [--tiny]
        [--height 288 --width 144 --backbone resnet50 --ids-per-batch 8 --images-per-id 4]
        [--amp bf16] [--channels-last] [--compile] [--workers 8] [--warmup 5] [--steps 5]
        [--trace trace.json] [--root PATH] [--set key=value ...]

Builds the real Trainer on a generated synthetic SYSU-MM01 tree (as benchmarks/train_speed.py),
takes ``--warmup`` steps, then profiles ``--steps`` steps of ``Trainer.run_step`` twice:

1. under ``torch.profiler`` with nothing added: per phase (the trainer's profiler ranges, plus
   ``data_wait`` around the loader) the host time, the device kernel time of the whole step,
   the Python-level reads of tensor values on the step's device per phase (``.item()``,
   ``float(t)``, ...; ``cmssft.utils.host_reads``) and, on CUDA, every synchronising call
   (``torch.cuda.set_sync_debug_mode``, which also sees torch's internal ones such as
   ``nonzero``), attributed to its phase. On the CPU every tensor is on the step's device, so the
   reads also count tensors that a CUDA run keeps on the host (the unfused optimizers' step
   counters): there they say what would wait if it lived on the device;
2. with a device synchronisation at the end of every phase: each phase's wall time including
   its device work (this serialises host and device, so the sum exceeds a free-running step).

Prints a table and one JSON line; ``--trace`` writes the profiler's Chrome trace. ``--tiny``:
64x32, resnet18, 2 ids x 2 images, 2 + 2 steps (a smoke run on the CPU in seconds).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import warnings
from collections import Counter, defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from train_speed import BASELINE, bench_config, build_bench_trainer, synchronize

from cmssft.engine.trainer import Trainer
from cmssft.utils.host_reads import count_host_reads

PHASES = ("data_wait", "h2d", "augment", "forward", "finite_check", "backward", "optimizer", "read_back")
TINY = {
    "height": 64,
    "width": 32,
    "backbone": "resnet18",
    "ids_per_batch": 2,
    "images_per_id": 2,
    "warmup": 2,
    "steps": 2,
    "workers": 0,
}


def profiled_pass(trainer: Trainer, batches: Iterator, steps: int, trace: str | None) -> dict:
    """Free-running steps under the profiler; host reads and (CUDA) synchronisations by phase."""
    cuda = trainer.device.type == "cuda"
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    syncs: Counter = Counter()
    where = lambda: trainer.current_phase  # noqa: E731
    with warnings.catch_warnings(), count_host_reads(where, trainer.device.type) as reads:
        warnings.simplefilter("always")
        shown = warnings.showwarning
        warnings.showwarning = lambda message, *a, **k: (
            syncs.update([where() or "other"]) if "synchroniz" in str(message) else shown(message, *a, **k)
        )
        if cuda:
            torch.cuda.set_sync_debug_mode("warn")
        synchronize(trainer.device)
        start = time.perf_counter()
        try:
            with torch.profiler.profile(activities=activities) as prof:
                for _ in range(steps):
                    with trainer.phase("data_wait"):
                        batch = next(batches)
                    trainer.run_step(batch)
                synchronize(trainer.device)
        finally:
            if cuda:
                torch.cuda.set_sync_debug_mode("default")
        wall = time.perf_counter() - start
    if trace:
        prof.export_chrome_trace(trace)
    host_us: dict[str, float] = defaultdict(float)
    span_us: dict[str, float] = defaultdict(float)  # a range's extent on the GPU timeline (CUDA)
    kernel_us = 0.0
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CPU:
            if event.name in PHASES:
                host_us[event.name] += event.cpu_time_total
        elif getattr(event, "is_user_annotation", False) or event.name in PHASES:
            span_us[event.name] += event.device_time_total
        else:  # kernels, copies, memsets
            kernel_us += event.device_time_total
    return {
        "step_ms": 1e3 * wall / steps,
        "host_ms": {k: v / 1e3 / steps for k, v in host_us.items()},
        "device_span_ms": {k: v / 1e3 / steps for k, v in span_us.items()} if cuda else None,
        "kernel_ms": kernel_us / 1e3 / steps if cuda else None,
        "host_reads": {k: v / steps for k, v in reads.items()},
        "cuda_syncs": {k: v / steps for k, v in syncs.items()} if cuda else None,
    }


def synchronised_pass(trainer: Trainer, batches: Iterator, steps: int) -> dict:
    """Each phase's wall time with a device synchronisation at its end."""
    wall: dict[str, float] = defaultdict(float)
    plain_phase = trainer.phase

    @contextmanager
    def timed_phase(name: str) -> Iterator[None]:
        start = time.perf_counter()
        with plain_phase(name):
            yield
        synchronize(trainer.device)
        wall[name] += time.perf_counter() - start

    trainer.phase = timed_phase  # the instance attribute shadows the method for these steps only
    try:
        synchronize(trainer.device)
        start = time.perf_counter()
        for _ in range(steps):
            with trainer.phase("data_wait"):
                batch = next(batches)
            trainer.run_step(batch)
        total = time.perf_counter() - start
    finally:
        del trainer.phase
    return {"step_ms": 1e3 * total / steps, "wall_ms": {k: 1e3 * v / steps for k, v in wall.items()}}


def report(args: argparse.Namespace, root: Path, run_dir: Path) -> dict:
    extra = BASELINE if args.model == "baseline" else []
    iters = args.warmup + 2 * args.steps + 2
    cfg = bench_config(args, root, extra, iters)
    trainer = build_bench_trainer(cfg, run_dir)
    batches = iter(trainer.loader)
    for _ in range(args.warmup):
        trainer.run_step(next(batches))
    trainer.read_back()
    profiled = profiled_pass(trainer, batches, args.steps, args.trace)
    synced = synchronised_pass(trainer, batches, args.steps)
    result = {
        "benchmark": "profile_step",
        "model": args.model,
        "device": str(trainer.device),
        "backbone": cfg.model.backbone,
        "size": f"{cfg.data.height}x{cfg.data.width}",
        "batch": 2 * cfg.data.ids_per_batch * cfg.data.images_per_id,
        "steps": args.steps,
        "amp": str(trainer.amp_dtype).removeprefix("torch.") if trainer.amp_dtype else "off",
        "channels_last": trainer.channels_last,
        "compile": cfg.train.compile,
        "augment_on": cfg.data.augment_on,
        "fused_optimizer": trainer.fused,
        "reads_back_every_step": not trainer.defer_sync,
        "workers": cfg.data.num_workers,
        "profiled": profiled,
        "synchronised": synced,
    }
    if trainer.device.type == "cuda":
        result["device_name"] = torch.cuda.get_device_name(trainer.device)
        result["peak_memory_gb"] = round(torch.cuda.max_memory_allocated(trainer.device) / 1e9, 2)
    return result


def print_table(result: dict) -> None:
    profiled, synced = result["profiled"], result["synchronised"]
    cuda = profiled["cuda_syncs"] is not None
    head = f"{'phase':<13}{'host ms':>10}{'synced ms':>11}{'host reads':>12}" + (f"{'cuda syncs':>12}" if cuda else "")
    print(
        f"{result['model']} on {result.get('device_name', result['device'])}: {result['size']}, "
        f"{result['batch']} images/step, amp {result['amp']}, channels-last {result['channels_last']}, "
        f"compile {result['compile']}, augment on {result['augment_on']}, fused {result['fused_optimizer']}, "
        f"per step (mean of {result['steps']})"
    )
    print(head)
    for name in PHASES:
        row = f"{name:<13}{profiled['host_ms'].get(name, 0.0):>10.2f}{synced['wall_ms'].get(name, 0.0):>11.2f}"
        row += f"{profiled['host_reads'].get(name, 0.0):>12.1f}"
        if cuda:
            row += f"{profiled['cuda_syncs'].get(name, 0.0):>12.1f}"
        print(row)
    other_reads = profiled["host_reads"].get("other", 0.0)
    print(
        f"{'step':<13}{profiled['step_ms']:>10.2f}{synced['step_ms']:>11.2f}"
        f"{sum(profiled['host_reads'].values()):>12.1f}"
        + (f"{sum(profiled['cuda_syncs'].values()):>12.1f}" if cuda else "")
    )
    if other_reads:
        print(f"(host reads outside the phases: {other_reads:.1f} per step)")
    if cuda:
        busy = profiled["kernel_ms"] / profiled["step_ms"]
        print(f"device kernel time {profiled['kernel_ms']:.2f} ms per step ({busy:.0%} of the free-running step)")
        spans = ", ".join(f"{k} {v:.2f}" for k, v in profiled["device_span_ms"].items())
        print(f"phase extents on the GPU timeline, ms per step: {spans or 'none reported'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", default="full", choices=["full", "baseline"])
    parser.add_argument("--tiny", action="store_true", help="64x32, resnet18, 2 x 2 ids/images, 2 + 2 steps")
    parser.add_argument("--height", type=int, default=288)
    parser.add_argument("--width", type=int, default=144)
    parser.add_argument("--backbone", default="resnet50")
    parser.add_argument("--ids-per-batch", type=int, default=8)
    parser.add_argument("--images-per-id", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--amp", default="off", choices=["off", "bf16", "fp16"])
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--trace", default=None, help="write the profiler's Chrome trace here")
    parser.add_argument("--root", default=None, help="an existing SYSU-MM01-layout tree (default: generate one)")
    parser.add_argument("--ids", type=int, default=12, help="identities of the generated tree")
    parser.add_argument("--set", nargs="*", default=[], help="extra config overrides, e.g. data.augment_on=device")
    args = parser.parse_args()
    if args.tiny:
        vars(args).update(TINY)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.root) if args.root else Path(tmp) / "SYSU-MM01"
        if not args.root:
            from cmssft.data.synthetic import generate_dataset

            generate_dataset("sysu", root, ids=args.ids, height=args.height, width=args.width, progress=False)
        result = report(args, root, Path(tmp) / "run")
    print_table(result)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
