"""Training data loading throughput (images/s) with and without the image cache, after the first epoch.

    python benchmarks/data_speed.py [--ids 24] [--image-height 128 --image-width 64] [--height 128 --width 64]
        [--workers 0] [--epochs 2] [--root PATH]

Generates a synthetic SYSU-MM01 tree (or reads ``--root``), builds the real training loader
(``build_train_loader``: sampler, augmentation, ``data.cache`` on or off) and iterates it for
``--epochs`` epochs; the first epoch (which also builds the cache) is reported apart, the rate
is over the later ones. Prints one JSON line per setting.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from cmssft.config import load_config
from cmssft.data.datasets import load_dataset
from cmssft.data.loader import build_train_loader


def run(args: argparse.Namespace, root: Path, cache_dir: Path, cache: bool) -> dict:
    cfg = load_config(overrides=[
        f"data.height={args.height}", f"data.width={args.width}", f"data.num_workers={args.workers}",
        "data.ids_per_batch=4", "data.images_per_id=4", f"data.cache={str(cache).lower()}",
        f"data.cache_dir={cache_dir}", "data.persistent_workers=true",
    ])
    dataset = load_dataset("sysu_mm01", root)
    start = time.perf_counter()
    loader = build_train_loader(cfg, dataset.train)
    epochs, images = [], 0
    for epoch in range(args.epochs):
        loader.batch_sampler.set_epoch(epoch)
        count = 0
        for batch in loader:
            count += len(batch["image"])
        epochs.append(time.perf_counter() - start)
        start = time.perf_counter()
        images = count
    later = sum(epochs[1:])
    return {
        "benchmark": "data_speed", "cache": cache, "workers": args.workers, "images_per_epoch": images,
        "stored_size": f"{args.image_height}x{args.image_width}", "size": f"{args.height}x{args.width}",
        "first_epoch_s": round(epochs[0], 3), "later_epochs": len(epochs) - 1,
        "images_per_s": round(images * (len(epochs) - 1) / later, 1) if later else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ids", type=int, default=24)
    parser.add_argument("--image-height", type=int, default=128)
    parser.add_argument("--image-width", type=int, default=64)
    parser.add_argument("--height", type=int, default=128)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--root", default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.root) if args.root else Path(tmp) / "SYSU-MM01"
        if not args.root:
            from cmssft.data.synthetic import generate_dataset

            generate_dataset("sysu", root, ids=args.ids, height=args.image_height, width=args.image_width,
                             progress=False)
        for cache in (False, True):
            print(json.dumps(run(args, root, Path(tmp) / "cache", cache)), flush=True)


if __name__ == "__main__":
    main()
