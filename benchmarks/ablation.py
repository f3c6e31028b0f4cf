"""Seeded ablation: train each row at one scale over several seeds, score every test mode, report mean +- std.

    python benchmarks/ablation.py --scale configs/benchmarks/demo.yaml --rows baseline full --seeds 0 1 2
    python benchmarks/ablation.py --scale configs/benchmarks/gpu.yaml --rows baseline full --jobs 4
    python benchmarks/ablation.py --scale configs/benchmarks/demo.yaml --rows full --set model.sstn.cross_k=0
    python benchmarks/ablation.py --rows full --score-set model.sstn.test_intra_k=0
    python benchmarks/ablation.py --rows baseline agw caj full full_agw --seeds 0 1 2 3 4 5 6 7 --against agw

A *row* is a ``configs/ablation/<row>.yaml`` (or any config path); a *scale* is a YAML file of
overrides applied on top of it (data size, schedule, device); ``--set key=value`` adds more. Every
run is ``train.py`` with ``seed=S`` and ``train.deterministic=true`` into
``<out>/<label>/<row>/seed<S>`` (a finished run there is reused, so an interrupted ablation
continues). Its ``best.pth`` is then scored, from features extracted once, in each test mode:
``transductive`` and ``single_query`` SSTN, ``off`` (the same model without transfer) and
``off+rerank`` (off with k-reciprocal re-ranking, the standard transductive post-processing the
transductive SSTN must beat). Prints one JSON line per run and a Markdown table of mean +- sample
standard deviation over seeds, with the test graph's statistics; writes both to ``<out>/<label>/``.
``--against ROW[:MODE]`` adds every row and mode minus that reference, seed by seed (paired differences).
``--score-set`` scores the same trained runs again with test-time settings changed (no training).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

MODES = ("transductive", "single_query", "off", "off+rerank")
SCORE_KEYS = ("model.", "eval.")  # what --score-set may change: test-time model settings (checked as eval.py does)
GRAPH_KEYS = ("query_cross_edges", "cross_same_id_edges", "cross_same_id_weight", "query_same_id_candidates")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", default=str(ROOT / "configs/benchmarks/demo.yaml"), help="YAML of overrides")
    parser.add_argument("--rows", nargs="+", default=["baseline", "full"], help="configs/ablation names or paths")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--set", dest="overrides", nargs="*", default=[], metavar="KEY=VALUE",
                        help="overrides for every run, after the scale's")
    parser.add_argument("--out", default=str(ROOT / "runs/ablation"))
    parser.add_argument("--label", help="results folder under --out (default: the scale's name and the --set values)")
    parser.add_argument("--jobs", type=int, default=1, help="trainings at once (they share the CPU cores or GPU)")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--against", metavar="ROW[:MODE]",
                        help="also report every row and mode minus this reference (default mode off), seed by seed: "
                        "mean ± standard error of the paired differences and the seeds above it")
    parser.add_argument("--score-set", dest="score_overrides", nargs="*", default=[], metavar="KEY=VALUE",
                        help="test-time overrides (model.sstn.topk, ..., eval.*) applied to each trained run when "
                        "scoring only: the same checkpoints are scored again, into modes@<values>.json and "
                        "summary@<values>.md")
    args = parser.parse_args(argv)
    for item in args.score_overrides:
        if not item.startswith(SCORE_KEYS):
            parser.error(f"--score-set {item}: only test-time model keys and eval.* keys change scoring alone")
    return args


def scale_overrides(path: str) -> list[str]:
    """A scale file's nested keys as ``a.b=value`` overrides (values JSON-encoded, which YAML reads back)."""
    from cmssft.config import _read_with_base

    def flat(node: dict, prefix: str) -> list[str]:
        out = []
        for key, value in node.items():
            if isinstance(value, dict):
                out += flat(value, f"{prefix}{key}.")
            else:
                out.append(f"{prefix}{key}={json.dumps(value)}")
        return out

    return flat(_read_with_base(Path(path)), "")


def row_config(row: str) -> Path:
    path = Path(row)
    return path if path.suffix == ".yaml" else ROOT / "configs/ablation" / f"{row}.yaml"


def train_command(row: str, seed: int, run_dir: Path, overrides: list[str]) -> list[str]:
    # deterministic by default; the scale or --set may say otherwise (they come last)
    return [sys.executable, str(ROOT / "train.py"), "--config", str(row_config(row)), "--run-dir", str(run_dir),
            "train.deterministic=true", "eval.compare_modes=[]", *overrides, f"seed={seed}"]


def score_tag(score_overrides: list[str]) -> str:
    """File-name tag of a scoring with test-time overrides ('' without: modes.json, summary.md)."""
    return "" if not score_overrides else "@" + "-".join(o.replace("/", "_") for o in score_overrides)


def finished(run_dir: Path, tag: str = "") -> bool:
    """Trained, and scored into ``modes<tag>.json``."""
    return (run_dir / "best.pth").is_file() and (run_dir / f"modes{tag}.json").is_file()


def train_all(jobs: list[tuple[str, int, Path]], overrides: list[str], parallel: int) -> None:
    """Run the missing trainings, ``parallel`` at a time, each with its share of the CPU threads.

    If the runner stops early (an error, Ctrl-C, SIGTERM), the trainings it started are stopped too, so
    none keeps writing into a run folder that a restarted runner will use.
    """
    threads = str(max(1, (os.cpu_count() or 1) // max(1, parallel)))
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    pending = [job for job in jobs if not (job[2] / "best.pth").is_file()]
    running: list[tuple[subprocess.Popen, Path, float]] = []
    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm) if _main_thread() else None
    try:
        while pending or running:
            while pending and len(running) < parallel:
                row, seed, run_dir = pending.pop(0)
                run_dir.mkdir(parents=True, exist_ok=True)
                print(f"+ train {row} seed {seed} -> {run_dir}", file=sys.stderr, flush=True)
                with (run_dir / "train.out").open("w") as log:  # the child keeps its own copy of the handle
                    proc = subprocess.Popen(train_command(row, seed, run_dir, overrides), cwd=ROOT, stdout=log,
                                            stderr=subprocess.STDOUT, env=env)
                running.append((proc, run_dir, time.time()))
            for proc, run_dir, start in list(running):
                if proc.poll() is not None:
                    running.remove((proc, run_dir, start))
                    if proc.returncode != 0:
                        tail = (run_dir / "train.out").read_text()[-2000:]
                        raise SystemExit(f"training failed ({run_dir}, exit {proc.returncode}):\n{tail}")
                    (run_dir / "train_seconds.txt").write_text(f"{time.time() - start:.1f}\n")
            time.sleep(1.0)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        _stop(proc for proc, _, _ in running)


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()  # only it may set signal handlers


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(f"stopped by signal {signum}")


def _stop(procs: Iterable[subprocess.Popen]) -> None:
    """Terminate (then kill) trainings still running; each writes its last.pth on SIGTERM."""
    procs = [p for p in procs if p.poll() is None]
    for proc in procs:
        proc.terminate()
    for proc in procs:
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def score_modes(run_dir: Path, modes: list[str], score_overrides: list[str] | None = None) -> dict[str, dict]:
    """Mean metrics and test-graph statistics of ``best.pth`` in each mode, from one feature extraction;
    ``score_overrides`` change test-time settings as ``eval.py`` does (the same function applies them)."""
    from cmssft.config import load_config
    from cmssft.data.datasets import load_dataset
    from cmssft.data.loader import build_test_loader
    from cmssft.engine.inference import extract_features, load_trained_model, model_score_fn
    from cmssft.evaluation.build import build_protocol, resolve_protocol
    from cmssft.evaluation.evaluator import Evaluator
    from cmssft.evaluation.report import summarize
    from cmssft.utils.runtime import resolve_device

    cfg = load_config(run_dir / "config.yaml", score_overrides)
    model = load_trained_model(run_dir / "best.pth", score_overrides or [], test_time=cfg).model
    device = resolve_device(cfg.train.device)
    model.to(device)
    d = cfg.data
    dataset = load_dataset(d.name, d.root, train_ids=d.train_ids, trial=d.trial, manifest=d.manifest)
    protocol = build_protocol(cfg, dataset, resolve_protocol(cfg))
    loader = build_test_loader(cfg, protocol.candidates, device_is_cuda=device.type == "cuda")
    bank = extract_features(model, loader, device, flip=cfg.eval.flip, progress=False)
    out = {}
    for mode in modes:
        if getattr(model, "sstn", None) is None and mode in ("transductive", "single_query"):
            continue  # no transfer (cm-SSFT without SSTN, AGW): every mode is off
        base, rerank = mode.removesuffix("+rerank"), mode.endswith("+rerank")
        evaluator = Evaluator(model_score_fn(model, base, device), rerank=rerank)
        summary = summarize(protocol.name, evaluator.evaluate(protocol, bank))
        out[mode] = {**summary["mean"], **{f"graph/{k}": v for k, v in summary.get("graph", {}).items()}}
    return out


def mean_std(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if v == v]
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def aggregate(results: dict[str, dict[int, dict]], modes: list[str]) -> list[dict]:
    """One entry per (row, mode): mean and sample std over seeds of every metric."""
    table = []
    for row, per_seed in results.items():
        for mode in modes:
            runs = [r[mode] for r in per_seed.values() if mode in r]
            if not runs:
                continue
            entry = {"row": row, "mode": mode, "seeds": len(runs)}
            for key in runs[0]:
                entry[key] = mean_std([r.get(key, float("nan")) for r in runs])
            table.append(entry)
    return table


def paired(results: dict[str, dict[int, dict]], reference: str, modes: list[str]) -> list[dict]:
    """Every (row, mode) minus the reference ``row[:mode]`` on the seeds both have: mean ± standard error
    of the per-seed differences, and how many seeds are above / below (rank-1 and mAP)."""
    ref_row, _, ref_mode = reference.partition(":")
    ref_mode = ref_mode or "off"
    if ref_row not in results:
        raise SystemExit(f"--against {reference}: row {ref_row!r} is not among the rows {sorted(results)}")
    base = {seed: scores[ref_mode] for seed, scores in results[ref_row].items() if ref_mode in scores}
    out = []
    for row, per_seed in results.items():
        for mode in modes:
            seeds = sorted(seed for seed in per_seed if mode in per_seed[seed] and seed in base)
            if not seeds or (row, mode) == (ref_row, ref_mode):
                continue
            entry = {"row": row, "mode": mode, "against": f"{ref_row}:{ref_mode}", "seeds": len(seeds)}
            for key in ("rank1", "mAP"):
                diffs = [per_seed[s][mode][key] - base[s][key] for s in seeds]
                mean, std = mean_std(diffs)
                entry[key] = (mean, std / len(diffs) ** 0.5, sum(d > 0 for d in diffs), sum(d < 0 for d in diffs))
            out.append(entry)
    return out


def paired_markdown(rows: list[dict]) -> str:
    def cell(value: tuple[float, float, int, int]) -> str:
        mean, se, above, below = value
        return f"{100 * mean:+.2f} ± {100 * se:.2f} ({above} above, {below} below)"

    lines = ["| row | test mode | minus | seeds | rank-1 | mAP |", "|---|---|---|---|---|---|"]
    for e in rows:
        lines.append(f"| {e['row']} | {e['mode']} | {e['against']} | {e['seeds']} | {cell(e['rank1'])} | "
                     f"{cell(e['mAP'])} |")
    return "\n".join(lines)


def markdown(table: list[dict]) -> str:
    def pm(entry: dict, key: str) -> str:
        mean, std = entry.get(key, (float("nan"), float("nan")))
        return "-" if mean != mean else f"{100 * mean:.2f} ± {100 * std:.2f}"

    def pct(entry: dict, key: str) -> str:
        mean, _ = entry.get(f"graph/{key}", (float("nan"), 0.0))
        return "-" if mean != mean else f"{100 * mean:.1f}"

    lines = [
        "| row | test mode | seeds | rank-1 | mAP | mINP | query cross edges % | cross edges same id % | chance % |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for e in table:
        lines.append(
            f"| {e['row']} | {e['mode']} | {e['seeds']} | {pm(e, 'rank1')} | {pm(e, 'mAP')} | {pm(e, 'mINP')} | "
            f"{pct(e, 'query_cross_edges')} | {pct(e, 'cross_same_id_edges')} | {pct(e, 'query_same_id_candidates')} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    overrides = [*scale_overrides(args.scale), *args.overrides]
    label = args.label or "-".join([Path(args.scale).stem, *(o.replace("/", "_") for o in args.overrides)])
    out = Path(args.out) / label
    jobs = [(row, seed, out / Path(row).stem / f"seed{seed}") for row in args.rows for seed in args.seeds]
    train_all(jobs, overrides, args.jobs)
    results: dict[str, dict[int, dict]] = {}
    tag = score_tag(args.score_overrides)
    for row, seed, run_dir in jobs:
        scores = run_dir / f"modes{tag}.json"
        if not finished(run_dir, tag):
            scores.write_text(json.dumps(score_modes(run_dir, args.modes, args.score_overrides), indent=1) + "\n")
        scored = json.loads(scores.read_text())
        results.setdefault(Path(row).stem, {})[seed] = scored
        timing = run_dir / "train_seconds.txt"
        seconds = timing.read_text().strip() if timing.exists() else ""
        print(json.dumps({"row": Path(row).stem, "seed": seed, "train_seconds": seconds, **scored}), flush=True)
    table = aggregate(results, args.modes)
    text = markdown(table)
    scoring = f", scored with {args.score_overrides}" if args.score_overrides else ""
    print(f"\nscale {args.scale}, overrides {args.overrides or 'none'}{scoring}, seeds {args.seeds}; "
          "mean ± sample std, %\n")
    differences = paired(results, args.against, args.modes) if args.against else []
    if differences:
        text += ("\n\nPaired differences (seed by seed; mean ± standard error, points):\n\n"
                 + paired_markdown(differences))
    print(text)
    (out / f"summary{tag}.md").write_text(text + "\n")
    (out / f"summary{tag}.json").write_text(json.dumps({"scale": args.scale, "overrides": overrides,
                                                        "score_overrides": args.score_overrides, "seeds": args.seeds,
                                                        "table": table, "paired": differences}, indent=1) + "\n")


if __name__ == "__main__":
    main()
