"""Train every ablation config and score it transductively and single-query.

    python benchmarks/ablation.py [--configs configs/ablation/*.yaml] [--out runs/ablation]

For each config: ``train.py`` into ``<out>/<name>``, then ``eval.py`` on its
``best.pth`` with ``model.sstn.test_mode`` = transductive and single_query.
Prints one JSON line per (config, mode) and a Markdown table for docs/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODES = ("transductive", "single_query")


def run(cmd: list[str]) -> None:
    print("+", " ".join(cmd), file=sys.stderr, flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)


def evaluate(run_dir: Path, mode: str) -> dict:
    out = run_dir / f"eval_{mode}.json"
    run(
        [
            sys.executable,
            "eval.py",
            "--config",
            str(run_dir / "config.yaml"),
            "--checkpoint",
            str(run_dir / "best.pth"),
            "--json",
            str(out),
            f"model.sstn.test_mode={mode}",
        ]
    )
    return json.loads(out.read_text())["mean"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--configs", nargs="*", default=sorted(str(p) for p in (ROOT / "configs/ablation").glob("*.yaml"))
    )
    parser.add_argument("--out", default="runs/ablation")
    args = parser.parse_args()
    rows = []
    for config in args.configs:
        name = Path(config).stem
        run_dir = ROOT / args.out / name
        start = time.time()
        if not (run_dir / "best.pth").is_file():
            run([sys.executable, "train.py", "--config", config, "--run-dir", str(run_dir)])
        seconds = time.time() - start
        for mode in MODES:
            mean = evaluate(run_dir, mode)
            row = {"config": name, "mode": mode, "train_seconds": round(seconds, 1), **mean}
            print(json.dumps(row), flush=True)
            rows.append(row)
    print("\n| config | test mode | rank-1 | mAP | mINP |\n|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['config']} | {r['mode']} | {100 * r['rank1']:.2f} | {100 * r['mAP']:.2f} | {100 * r['mINP']:.2f} |"
        )


if __name__ == "__main__":
    main()
