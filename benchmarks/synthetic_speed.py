"""Synthetic generator throughput: render, encode and write N SYSU-MM01-layout images at 128x64.

    python benchmarks/synthetic_speed.py [--images 600] [--workers 1] [--dir /dev/shm]

Prints one JSON line. The image count is met by choosing the number of identities from the plan.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from cmssft.data.synthetic import generate_dataset, plan_dataset

HEIGHT, WIDTH = 128, 64


def ids_for(images: int) -> int:
    """The smallest identity count whose plan holds at least ``images`` images."""
    ids = 6
    while len(plan_dataset("sysu", ids=ids)) < images:
        ids += max(1, ids // 4)
    return ids


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=600)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--dir", default=None, help="where the temporary tree goes (default: system temp)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        report = generate_dataset(
            "sysu",
            Path(tmp) / "SYSU-MM01",
            ids=ids_for(args.images),
            height=HEIGHT,
            width=WIDTH,
            workers=args.workers,
            progress=False,
        )
    record = {
        "benchmark": "synthetic_speed",
        "images": report.num_images,
        "seconds": round(report.seconds, 3),
        "images_per_s": round(report.images_per_s, 1),
        "workers": args.workers,
        "size": f"{HEIGHT}x{WIDTH}",
    }
    print(json.dumps(record))


if __name__ == "__main__":
    main()
