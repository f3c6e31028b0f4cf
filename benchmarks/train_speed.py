"""Training throughput (images/s) of the full cm-SSFT model and of the shared-only baseline.

    python benchmarks/train_speed.py [--device cpu|cuda] [--height 64 --width 32] [--backbone resnet18]
        [--ids-per-batch 4 --images-per-id 4] [--steps 4 --warmup 1] [--amp bf16|fp16] [--channels-last]
        [--compile] [--workers 0] [--root PATH] [--set key=value ...]

Builds the real Trainer (``build_trainer``: model, criterion, optimizer, loader) from
``configs/demo.yaml`` on a synthetic SYSU-MM01 tree (generated in a temporary folder, or ``--root``),
once as configured (full method) and once with the ``configs/ablation/baseline.yaml`` model settings,
and times ``Trainer.run_step`` over the loader's batches after ``--warmup`` steps (data loading and
the log-step read-backs included). Prints one JSON line per model. ``--set data.augment_on=device``
augments on the device; ``train.fused_optimizer`` defaults to fused kernels on CUDA. GPU example (the paper's size):

    python benchmarks/train_speed.py --device cuda --height 288 --width 144 --backbone resnet50 \\
        --ids-per-batch 8 --images-per-id 4 --steps 30 --warmup 5 --amp bf16 --channels-last --workers 4
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from cmssft.config import Config, load_config
from cmssft.engine.build import build_trainer, prepare_dataset
from cmssft.engine.trainer import Trainer
from cmssft.utils.runtime import resolve_device

REPO = Path(__file__).resolve().parents[1]
BASELINE = [
    "model.use_specific=false",
    "model.sstn.enabled=false",
    "model.modality_adaptation=false",
    "model.project_adversarial=false",
    "model.reconstruction=false",
]


def bench_config(args: argparse.Namespace, root: Path, extra: list[str], iters: int) -> Config:
    """``configs/demo.yaml`` with the benchmark's size, batch, backbone, device and speed switches.

    ``args`` needs: height, width, ids_per_batch, images_per_id, workers, backbone, device, amp,
    channels_last, compile, set (extra overrides for every model).
    """
    overrides = [
        f"data.root={root}", "data.synthetic.enabled=false", f"data.height={args.height}", f"data.width={args.width}",
        f"data.ids_per_batch={args.ids_per_batch}", f"data.images_per_id={args.images_per_id}",
        f"data.num_workers={args.workers}", f"model.backbone={args.backbone}", f"train.device={args.device}",
        f"train.iters_per_epoch={iters}", "train.eval_every=0", f"train.amp='{args.amp}'",
        f"train.channels_last={str(args.channels_last).lower()}", f"train.compile={str(args.compile).lower()}",
        "train.log_every=20", *args.set, *extra,
    ]
    return load_config(REPO / "configs" / "demo.yaml", overrides)


def build_bench_trainer(cfg: Config, run_dir: Path) -> Trainer:
    """The real Trainer (model, criterion, optimizer, loader) in training mode at epoch 0."""
    device = resolve_device(cfg.train.device)
    torch.manual_seed(0)
    trainer = build_trainer(cfg, prepare_dataset(cfg), device, run_dir)
    trainer.model.train()
    trainer.loader.batch_sampler.set_epoch(0)
    return trainer


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(args: argparse.Namespace, root: Path, run_dir: Path, extra: list[str]) -> dict:
    cfg = bench_config(args, root, extra, args.warmup + args.steps)
    trainer = build_bench_trainer(cfg, run_dir)
    device = trainer.device
    batches = iter(trainer.loader)
    for _ in range(args.warmup):
        trainer.run_step(next(batches))
    synchronize(device)
    start = time.perf_counter()
    images = 0
    for _ in range(args.steps):
        batch = next(batches)
        trainer.run_step(batch)  # with its read-backs at log steps (train.log_every=20)
        images += len(batch["image"])
    trainer.read_back()
    synchronize(device)
    seconds = time.perf_counter() - start
    record = {
        "benchmark": "train_speed", "model": "baseline" if extra else "full", "device": str(device),
        "backbone": cfg.model.backbone, "size": f"{cfg.data.height}x{cfg.data.width}",
        "batch": 2 * cfg.data.ids_per_batch * cfg.data.images_per_id, "steps": args.steps,
        "seconds": round(seconds, 3), "images_per_s": round(images / seconds, 1),
        "amp": cfg.train.amp if device.type == "cuda" else "off",
        "channels_last": trainer.channels_last, "compile": cfg.train.compile, "workers": cfg.data.num_workers,
        "augment_on": cfg.data.augment_on, "fused_optimizer": trainer.fused,
    }
    if device.type == "cuda":
        record["peak_memory_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 2)
        torch.cuda.reset_peak_memory_stats()
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--height", type=int, default=64)
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--ids-per-batch", type=int, default=4)
    parser.add_argument("--images-per-id", type=int, default=4)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--amp", default="off", choices=["off", "bf16", "fp16"])
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--root", default=None, help="an existing SYSU-MM01-layout tree (default: generate one)")
    parser.add_argument("--ids", type=int, default=12, help="identities of the generated tree")
    parser.add_argument("--set", nargs="*", default=[], help="extra config overrides for both models")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.root) if args.root else Path(tmp) / "SYSU-MM01"
        if not args.root:
            from cmssft.data.synthetic import generate_dataset

            generate_dataset("sysu", root, ids=args.ids, height=args.height, width=args.width, progress=False)
        for extra in ([], BASELINE):
            print(json.dumps(measure(args, root, Path(tmp) / "run", extra)), flush=True)


if __name__ == "__main__":
    main()
