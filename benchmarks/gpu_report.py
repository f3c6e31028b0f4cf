"""The GPU throughput table in one command: our two models, each against its own ceiling.

    python benchmarks/gpu_report.py [--out report.md] [--json rows.jsonl] [--workers 8]
        [--steps 30 --warmup 8] [--compile both|off|on] [--augment-on device|cpu]
        [--budget-s 450] [--set key=value ...]
    python benchmarks/gpu_report.py --device cpu --tiny      # smoke run: 64x32, resnet18, seconds

On one GPU, for the full cm-SSFT model and the shared-only baseline (benchmarks/train_speed.py: its
``configs/demo.yaml``-based config at the given size, batch and backbone, and its BASELINE overrides),
in fp32 and in bf16 + channels-last, without and with ``torch.compile``, it measures:

- images/s of the real training loop (``Trainer.run_step``: loader, copy, augmentation, step,
  log-step read-backs) on a synthetic SYSU-MM01 tree generated at the training size;
- the same model's ceiling in the same process: its training step repeated on one batch that
  is already on the GPU and already augmented (no loader, no copy, no augmentation);
- a bare ResNet-50 (last stride 1; pooled features, a 395-way classifier, cross-entropy, fused
  SGD) on GPU-resident tensors: the ceiling a well-fed shared-only baseline approaches;
- peak GPU memory of each row (``torch.cuda.max_memory_allocated``).

Prints a markdown table headed by the card's name (``torch.cuda.get_device_name``) ready for
docs/BENCHMARKS.md. Rows run uncompiled first; a row that would start after ``--budget-s`` is
listed as skipped, a row that fails is listed with its error, and the others still run. Without
CUDA it refuses with one line and exit code 2, unless ``--device cpu`` (the smoke mode for tests).
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import time
from datetime import date
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn
from train_speed import BASELINE, bench_config, build_bench_trainer, synchronize

from cmssft.models.backbone import feature_dim, resnet_stages

PRECISIONS = {"fp32": ("off", False), "bf16+CL": ("bf16", True)}  # (train.amp, channels-last)
MODELS = {"full": "full cm-SSFT", "baseline": "shared-only baseline"}
BARE_CLASSES = 395  # SYSU-MM01 train+val identities
COMPILE_ESTIMATE_S = 120.0  # before any compiled row has run: what one is assumed to take


def model_row(args: argparse.Namespace, root: Path, run_dir: Path, model: str, precision: str, compiled: bool) -> dict:
    """Images/s with data loading, and the same model's step on one GPU-resident augmented batch."""
    amp, channels_last = PRECISIONS[precision]
    settings = SimpleNamespace(
        **{k: getattr(args, k) for k in ("height", "width", "backbone", "ids_per_batch", "images_per_id", "device")},
        workers=args.workers,
        amp=amp,
        channels_last=channels_last,
        compile=compiled,
        set=[f"data.augment_on={args.augment_on}", *args.set],
    )
    cfg = bench_config(settings, root, BASELINE if model == "baseline" else [], args.warmup + 2 * args.steps + 4)
    reset_peak(args.device)
    trainer = build_bench_trainer(cfg, run_dir)
    batches = iter(trainer.loader)
    for _ in range(args.warmup):
        trainer.run_step(next(batches))
    loaded = timed(trainer.device, args.steps, lambda: trainer.run_step(next(batches)), trainer.read_back)
    ready = trainer.to_device(next(batches))
    ceiling = timed(trainer.device, args.steps, lambda: trainer.run_step(ready), trainer.read_back)
    batch = len(ready.images)
    return {
        "loaded": batch / loaded,
        "ceiling": batch / ceiling,
        "peak_gb": peak_gb(args.device),
        "fused_optimizer": trainer.fused,
    }


def bare_row(args: argparse.Namespace, precision: str, compiled: bool) -> dict:
    """A plain ResNet (last stride 1) training step on GPU-resident random tensors."""
    amp, channels_last = PRECISIONS[precision]
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    reset_peak(args.device)
    stages = resnet_stages(args.backbone, "none", last_stride=1)
    head = [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(feature_dim(args.backbone), BARE_CLASSES)]
    net = nn.Sequential(*stages.values(), *head).to(device)
    memory_format = torch.channels_last if channels_last and cuda else torch.contiguous_format
    net = net.to(memory_format=memory_format)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, **({"fused": True} if cuda else {}))
    step_net = torch.compile(net) if compiled else net
    batch = 2 * args.ids_per_batch * args.images_per_id
    images = torch.randn(batch, 3, args.height, args.width, device=device).contiguous(memory_format=memory_format)
    labels = torch.randint(0, BARE_CLASSES, (batch,), device=device)
    use_amp = amp == "bf16" and cuda

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
            loss = F.cross_entropy(step_net(images), labels)
        loss.backward()
        optimizer.step()

    for _ in range(args.warmup):
        step()
    seconds = timed(device, args.steps, step)
    return {"loaded": None, "ceiling": batch / seconds, "peak_gb": peak_gb(args.device)}


def timed(device: torch.device, steps: int, step, finish=lambda: None) -> float:
    """Seconds per step of ``steps`` calls, the device drained before and after."""
    synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    finish()
    synchronize(device)
    return (time.perf_counter() - start) / steps


def reset_peak(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats()


def peak_gb(device: str) -> float | None:
    return torch.cuda.max_memory_allocated() / 1e9 if torch.device(device).type == "cuda" else None


def release(device: str) -> None:
    """Free one row's memory and compiled graphs before the next row."""
    gc.collect()
    torch._dynamo.reset()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def plan(args: argparse.Namespace) -> list[tuple[str, str, bool]]:
    """(model, precision, compiled) rows, every uncompiled row first; model "bare" is the plain ResNet."""
    compiles = {"both": [False, True], "off": [False], "on": [True]}[args.compile]
    return [
        (model, precision, compiled)
        for compiled in compiles
        for model in (*MODELS, "bare")
        for precision in args.precisions
    ]


def run_rows(args: argparse.Namespace, root: Path, run_dir: Path) -> list[dict]:
    """Every planned row that fits in ``--budget-s`` (estimated by the slowest row of its kind so far)."""
    rows, start = [], time.perf_counter()
    took: dict[bool, list[float]] = {False: [], True: []}
    for model, precision, compiled in plan(args):
        row = {"model": model, "precision": precision, "compile": compiled}
        estimate = max(took[compiled], default=COMPILE_ESTIMATE_S if compiled else 0.0)
        if time.perf_counter() - start + estimate > args.budget_s:
            rows.append({**row, "status": f"skipped (time budget {args.budget_s:.0f} s)"})
            continue
        began = time.perf_counter()
        try:
            if model == "bare":
                result = bare_row(args, precision, compiled)
            else:
                result = model_row(args, root, run_dir / f"{model}-{precision}-{compiled}", model, precision, compiled)
            row.update(result, status="ok")
        except Exception as err:  # noqa: BLE001 - one failed row must not lose the others
            message = str(err).splitlines()[0][:160] if str(err) else ""
            row["status"] = f"failed: {type(err).__name__}: {message}"
        finally:
            release(args.device)  # the row's trainer, loader workers and compiled graphs are gone by now
        took[compiled].append(time.perf_counter() - began)
        row["seconds"] = round(took[compiled][-1], 1)
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    return rows


def markdown(args: argparse.Namespace, rows: list[dict], total_s: float) -> str:
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (smoke run)"
    cuda_version = f", CUDA {torch.version.cuda}" if device.type == "cuda" else ""
    batch = 2 * args.ids_per_batch * args.images_per_id
    lines = [
        f"GPU throughput on **{name}** ({date.today().isoformat()}, torch {torch.__version__}{cuda_version}; "
        f"`python benchmarks/gpu_report.py`, {total_s / 60:.1f} min):",
        f"{args.height}x{args.width}, {batch} images per step ({args.ids_per_batch} ids x {args.images_per_id} "
        f"images per modality), {args.backbone} last stride 1, `data.augment_on={args.augment_on}`, "
        f"{args.workers} loader workers, {args.steps} timed steps after {args.warmup} warm-up steps. "
        "Ceiling: the same model's step repeated on one GPU-resident, already augmented batch.",
        "",
        "| model | precision | compile | images/s, data loading included | own ceiling, images/s | "
        "of the ceiling | peak memory (GB) |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        label = MODELS.get(row["model"], f"bare {args.backbone}")
        cells = [label, row["precision"], "yes" if row["compile"] else "no"]
        if row["status"] != "ok":
            cells += [row["status"], "", "", ""]
        else:
            loaded, ceiling = row["loaded"], row["ceiling"]
            cells += [
                f"{loaded:,.0f}" if loaded is not None else "-",
                f"{ceiling:,.0f}",
                f"{loaded / ceiling:.0%}" if loaded is not None else "-",
                f"{row['peak_gb']:.1f}" if row["peak_gb"] is not None else "-",
            ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="smoke run: 64x32, resnet18, 2 x 2 ids/images, fp32")
    parser.add_argument("--height", type=int, default=288)
    parser.add_argument("--width", type=int, default=144)
    parser.add_argument("--backbone", default="resnet50")
    parser.add_argument("--ids-per-batch", type=int, default=8)
    parser.add_argument("--images-per-id", type=int, default=4)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=8)
    parser.add_argument("--precisions", nargs="+", default=list(PRECISIONS), choices=list(PRECISIONS))
    parser.add_argument("--compile", default="both", choices=["both", "off", "on"])
    parser.add_argument("--augment-on", default="device", choices=["device", "cpu"])
    parser.add_argument("--budget-s", type=float, default=450.0, help="start no row after this many seconds")
    parser.add_argument("--ids", type=int, default=24, help="identities of the generated tree")
    parser.add_argument("--root", default=None, help="an existing SYSU-MM01-layout tree (default: generate one)")
    parser.add_argument("--out", default=None, help="also write the markdown table here")
    parser.add_argument("--json", default=None, help="also write one JSON line per row here")
    parser.add_argument("--set", nargs="*", default=[], help="extra config overrides for both models")
    args = parser.parse_args(argv)
    if args.tiny:
        tiny = {
            "height": 64,
            "width": 32,
            "backbone": "resnet18",
            "ids_per_batch": 2,
            "images_per_id": 2,
            "workers": 0,
            "steps": 2,
            "warmup": 1,
            "ids": 12,
        }
        vars(args).update(tiny)
        if "--precisions" not in (argv if argv is not None else sys.argv):
            args.precisions = ["fp32"]
        if "--compile" not in (argv if argv is not None else sys.argv):
            args.compile = "off"
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        print(
            "gpu_report: no CUDA device here; nothing measured (--device cpu --tiny runs the smoke version)",
            file=sys.stderr,
        )
        return 2
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.root) if args.root else Path(tmp) / "SYSU-MM01"
        if not args.root:
            from cmssft.data.synthetic import generate_dataset

            generate_dataset(
                "sysu",
                root,
                ids=args.ids,
                height=args.height,
                width=args.width,
                progress=False,
                workers=max(1, min(8, args.workers)),
            )
        rows = run_rows(args, root, Path(tmp) / "runs")
    table = markdown(args, rows, time.perf_counter() - start)
    print(table, end="")
    if args.out:
        Path(args.out).write_text(table)
    if args.json:
        Path(args.json).write_text("".join(json.dumps(row) + "\n" for row in rows))
    return 1 if any(row["status"].startswith("failed") for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
