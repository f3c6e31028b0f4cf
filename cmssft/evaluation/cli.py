"""The logic behind ``eval.py``: config -> protocol(s) -> bank(s) -> metrics -> table / JSON."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from cmssft.config import Config, load_config
from cmssft.data.records import CrossModalDataset, Sample
from cmssft.errors import UserError
from cmssft.evaluation import protocols as P
from cmssft.evaluation.build import build_protocol, resolve_protocol
from cmssft.evaluation.evaluator import Bank, Evaluator, ScoreFn, TrialResult
from cmssft.evaluation.features_io import (
    TRIAL_PLACEHOLDER,
    FeatureFile,
    bank_from_feature_file,
    candidate_key,
    read_feature_file,
    save_features,
    trial_path,
)
from cmssft.evaluation.report import chance_line, format_table, summarize, table_title, write_json

log = logging.getLogger("cmssft.eval")

REGDB_TRIALS = 10


class Scored(NamedTuple):
    """A unit's bank, its score function (None: cosine) and the SSTN mode it scores in (None: no transfer)."""

    bank: Bank
    score_fn: ScoreFn | None
    scoring: str | None


BankSource = Callable[[CrossModalDataset, P.Protocol, int], Scored]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="eval.py", description="Evaluate features or a checkpoint under a "
                                "SYSU-MM01 / RegDB / LLCM / custom protocol.")
    p.add_argument("--config", required=True, help="YAML config (the run's config.yaml works)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="model checkpoint; '{trial}' in the name picks RegDB's per-trial model")
    src.add_argument("--features", help="npz with 'paths' and 'features'; '{trial}' for RegDB per-trial files")
    p.add_argument("--save-features", metavar="FILE.npz",
                   help="with --checkpoint: also write the candidates' features (and what the SSTN needs) in the "
                        "format --features reads; '{trial}' for RegDB per-trial files")
    p.add_argument("--protocol", choices=["sysu", "sysu-official", "regdb", "llcm", "custom"])
    p.add_argument("--mode", choices=["all", "indoor"], help="SYSU-MM01 search mode")
    p.add_argument("--shots", type=int, choices=[1, 10], help="SYSU-MM01 gallery images per id and camera")
    p.add_argument(
        "--direction", choices=["v2t", "t2v", "ir2vis", "vis2ir"], help="RegDB: v2t | t2v; LLCM: ir2vis | vis2ir"
    )
    p.add_argument("--trials", type=int, help="number of trials (SYSU, LLCM 0..N-1, RegDB 1..N)")
    p.add_argument("--trial", type=int, help="RegDB: evaluate this one trial only")
    p.add_argument("--rerank", action="store_true", help="k-reciprocal re-ranking")
    p.add_argument("--rand-perm", help="official protocol: rand_perm_cam.mat (default <root>/exp/)")
    p.add_argument("--exclusion", choices=["same_camera", "none"], default="same_camera",
                   help="custom protocol: drop same-identity same-camera gallery images (default) or not")
    p.add_argument("--device", default=None, help="torch device for scoring and metrics (default cpu)")
    p.add_argument("--json", help="write the per-trial and mean/std results here")
    p.add_argument("--vis", help="folder for ranked-list PNGs of the first trial")
    p.add_argument("--vis-queries", type=int, default=8, help="queries drawn with --vis")
    p.add_argument("--debug", action="store_true", help="show tracebacks of user errors")
    p.add_argument("overrides", nargs="*", help="config overrides, e.g. data.root=/data/SYSU-MM01")
    return p


def flag_overrides(args: argparse.Namespace) -> list[str]:
    """Command-line flags as ``eval.*`` overrides, applied after the positional ones."""
    out = []
    for key in ("protocol", "mode", "shots", "direction", "trials"):
        value = getattr(args, key)
        if value is not None:
            out.append(f"eval.{key}={value}")
    if args.rerank:
        out.append("eval.rerank=true")
    return out


@dataclass
class Unit:
    """One dataset load and the protocol built on it (RegDB: one per trial)."""

    dataset: CrossModalDataset
    protocol: P.Protocol
    trial: int  # RegDB trial, else -1


def build_units(cfg: Config, name: str, args: argparse.Namespace) -> list[Unit]:
    from cmssft.data.datasets import load_dataset

    e, d = cfg.eval, cfg.data
    if e.trials < 1:
        raise UserError(f"eval.trials must be >= 1, got {e.trials}")
    if name == "regdb":
        trials = [args.trial] if args.trial else list(range(1, min(e.trials, REGDB_TRIALS) + 1))
        units = []
        for t in trials:
            dataset = load_dataset("regdb", d.root, trial=t)
            units.append(Unit(dataset, P.regdb(dataset, t, e.direction), t))
        return units
    dataset = load_dataset(d.name, d.root, train_ids=d.train_ids, trial=d.trial, manifest=d.manifest)
    protocol = build_protocol(cfg, dataset, name, perm_path=args.rand_perm, exclusion=args.exclusion)
    return [Unit(dataset, protocol, -1)]


def features_source(
    template: str, data_name: str, mode: str, device: str | None, test_time: Config | None = None
) -> BankSource:
    """Banks from a features file; files that hold the checkpoint's scorer are scored with it in ``mode``
    (and ``test_time``'s other test-time choices, e.g. AGW's test feature)."""
    cache: dict[Path, FeatureFile] = {}

    def source(dataset: CrossModalDataset, protocol: P.Protocol, trial: int) -> tuple[Bank, ScoreFn | None]:
        path = trial_path(template, trial) if trial >= 0 else Path(template)
        if trial < 0 and TRIAL_PLACEHOLDER in template:
            raise UserError(f"--features {template}: the '{{trial}}' placeholder is for RegDB only")
        if path not in cache:
            cache.clear()
            cache[path] = read_feature_file(path)
        data = cache[path]
        bank = bank_from_feature_file(protocol.candidates, dataset.root, data, dataset_name=data_name,
                                      source=f"features file {path}", protocol=protocol.name)
        if not data.has_scorer:
            return Scored(bank, None, None)
        from cmssft.engine.inference import scorer_score_fn

        score_fn = scorer_score_fn(data.scorer_config, data.scorer_state, mode, device or "cpu",
                                   f"features file {path}", test_time)
        return Scored(bank, score_fn, _mode_if_transfer(data.scorer_config, mode, test_time))

    return source


def checkpoint_source(cfg: Config, template: str, save_template: str | None = None) -> BankSource:
    """Banks extracted by a checkpoint; with ``save_template`` each is also written as a features file."""

    def source(dataset: CrossModalDataset, protocol: P.Protocol, trial: int) -> tuple[Bank, ScoreFn | None]:
        try:
            from cmssft.engine.inference import extract_checkpoint
        except ModuleNotFoundError as err:
            if err.name in ("cmssft.engine", "cmssft.engine.inference"):
                raise UserError("evaluating a checkpoint needs cmssft.engine.inference, which this "
                                "installation lacks; evaluate a --features file instead") from None
            raise
        path = trial_path(template, trial) if trial >= 0 else Path(template)
        if not path.is_file():
            raise UserError(f"checkpoint {path} does not exist")
        samples: list[Sample] = protocol.candidates
        extraction = extract_checkpoint(cfg, str(path), samples)
        if save_template:
            out = trial_path(save_template, trial) if trial >= 0 else Path(save_template)
            bank = extraction.bank
            save_features(out, [candidate_key(s, dataset.root) for s in samples], bank["shared"],
                          specific=bank.get("specific"), pool=bank.get("pool"), modality=bank["modality"],
                          scorer_config=extraction.scorer.config, scorer_state=extraction.scorer.tensors)
            log.info("features of %d images written to %s", len(samples), out)
        scoring = _mode_if_transfer(extraction.scorer.config, cfg.model.sstn.test_mode, cfg)
        return Scored(extraction.bank, extraction.score_fn, scoring)

    return source


def _mode_if_transfer(model_config: dict, mode: str, test_time: Config | None = None) -> str:
    """The SSTN test mode a model scores in; a model trained without SSTN always scores ``off``; a model
    without SSTN test modes (AGW) says how it ranks instead (with ``test_time``'s choices)."""
    from cmssft.config import config_from_dict
    from cmssft.models import apply_test_time, fixed_scoring

    trained = config_from_dict(dict(model_config))
    fixed = fixed_scoring(apply_test_time(trained, test_time) if test_time is not None else trained)
    if fixed is not None:
        return fixed
    return mode if model_config.get("model", {}).get("sstn", {}).get("enabled", True) else "off"


def check_save_features(args: argparse.Namespace, units: list[Unit]) -> None:
    """``--save-features`` needs a checkpoint, and one file name per RegDB trial."""
    template = args.save_features
    if not template:
        return
    if not args.checkpoint:
        raise UserError("--save-features writes the features a --checkpoint extracts; a --features file "
                        "already holds them")
    if not template.endswith(".npz"):
        raise UserError(f"--save-features {template}: the name must end in .npz (numpy.savez adds it otherwise)")
    if len(units) > 1 and TRIAL_PLACEHOLDER not in template:
        raise UserError(f"--save-features {template}: {len(units)} RegDB trials need one file each; put "
                        f"'{TRIAL_PLACEHOLDER}' in the name")
    if units[0].trial < 0 and TRIAL_PLACEHOLDER in template:
        raise UserError(f"--save-features {template}: the '{{trial}}' placeholder is for RegDB only")
    folder = Path(template).parent
    if not folder.is_dir():
        raise UserError(f"--save-features {template}: folder {folder} does not exist")


def run(cfg: Config, args: argparse.Namespace) -> tuple[dict, P.Protocol]:
    """Evaluate every unit; the summary :func:`summarize` builds, and the first unit's protocol."""
    name = resolve_protocol(cfg)
    units = build_units(cfg, name, args)
    check_save_features(args, units)
    source = (features_source(args.features, cfg.data.name, cfg.model.sstn.test_mode, args.device, cfg)
              if args.features else checkpoint_source(cfg, args.checkpoint, args.save_features))
    results: list[TrialResult] = []
    scoring = None
    for unit in units:
        bank, score_fn, scoring = source(unit.dataset, unit.protocol, unit.trial)
        evaluator = Evaluator(score_fn, rerank=cfg.eval.rerank, device=args.device)
        results.extend(evaluator.evaluate(unit.protocol, bank))
        if args.vis and unit is units[0]:
            _save_pictures(evaluator, unit.protocol, bank, Path(args.vis), args.vis_queries)
    settings = dict(units[0].protocol.settings, description=units[0].protocol.description,
                    rerank=cfg.eval.rerank, scoring=scoring)
    if name == "regdb":
        settings["description"] = f"RegDB trials {', '.join(str(u.trial) for u in units)}, " \
                                  f"{'thermal->visible' if cfg.eval.direction == 't2v' else 'visible->thermal'}"
    return summarize(name, results, settings), units[0].protocol


def _save_pictures(evaluator: Evaluator, protocol: P.Protocol, bank: Bank, folder: Path, count: int) -> None:
    from cmssft.evaluation.visualize import ranked_lists_image, save_png

    trial = protocol.trials[0]
    dist = evaluator.distances(protocol, trial, bank)
    queries, gallery = protocol.query_samples(trial), protocol.gallery_samples(trial)
    chosen = np.linspace(0, len(queries) - 1, num=min(count, len(queries))).astype(int).tolist()
    image = ranked_lists_image(dist, queries, gallery, chosen, exclusion=protocol.exclusion)
    path = save_png(image, folder / f"{protocol.name}_trial{trial.index}.png")
    log.info("ranked lists written to %s", path)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = build_parser().parse_intermixed_args(argv)
    cfg = load_config(args.config, list(args.overrides) + flag_overrides(args))
    summary, protocol = run(cfg, args)
    title = table_title("test", summary["settings"].get("scoring"), summary["settings"].get("description", ""))
    print(format_table(summary, title=title))
    print(chance_line(protocol))
    if args.json:
        write_json(summary, args.json)
        print(f"results written to {args.json}")
    return 0
