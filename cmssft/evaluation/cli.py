"""The logic behind ``eval.py``: config -> protocol(s) -> bank(s) -> metrics -> table / JSON."""

from __future__ import annotations

import argparse
import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from cmssft.config import Config, config_to_dict, load_config, model_overrides, parse_override, test_time_config
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
from cmssft.evaluation.report import (
    chance_line,
    format_table,
    summarize,
    table_title,
    test_time_settings,
    write_json,
)

if TYPE_CHECKING:
    from cmssft.engine.inference import LoadedCheckpoint

log = logging.getLogger("cmssft.eval")

REGDB_TRIALS = 10


class Scored(NamedTuple):
    """A unit's bank, its score function (None: cosine) and the SSTN mode it scores in (None: no transfer)."""

    bank: Bank
    score_fn: ScoreFn | None
    scoring: str | None


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


def build_units(cfg: Config, name: str, args: argparse.Namespace, source: ModelSource) -> list[Unit]:
    from cmssft.data.datasets import load_dataset

    e, d = cfg.eval, cfg.data
    if e.trials < 1:
        raise UserError(f"eval.trials must be >= 1, got {e.trials}")
    if name == "regdb":
        units = []
        for t in regdb_trials(cfg, args, source):
            dataset = load_dataset("regdb", d.root, trial=t)
            units.append(Unit(dataset, P.regdb(dataset, t, e.direction), t))
        return units
    if args.trial is not None:
        raise UserError(f"--trial {args.trial} picks a RegDB trial; {name} draws its galleries with eval.trials")
    dataset = load_dataset(d.name, d.root, train_ids=d.train_ids, trial=d.trial, manifest=d.manifest)
    protocol = build_protocol(cfg, dataset, name, perm_path=args.rand_perm, exclusion=args.exclusion)
    return [Unit(dataset, protocol, -1)]


def regdb_trials(cfg: Config, args: argparse.Namespace, source: ModelSource) -> list[int]:
    """The RegDB trials to score, each with its own model: a ``{trial}`` template scores all ten (the
    mean the papers report) or ``--trial N``; one checkpoint (or features file written from one)
    scores the trial it was trained on, and asking for another is refused."""
    explicit, count = _explicit_trial(args), _explicit_trial_count(args)
    if TRIAL_PLACEHOLDER in source.template:
        return [explicit] if explicit else list(range(1, (count or REGDB_TRIALS) + 1))
    if count is not None and count > 1:
        raise UserError(f"--trials {count}: {source.what} {source.template} is one RegDB trial's; put "
                        f"'{TRIAL_PLACEHOLDER}' in its name to score several trials, one file each")
    trained = source.trained_trial(Path(source.template))
    if trained is None:
        return [explicit or cfg.data.trial]
    if explicit and explicit != trained:
        raise UserError(f"{source.what} {source.template} was trained on RegDB trial {trained}, so it is scored "
                        f"on trial {trained}'s test split, not on trial {explicit}'s (whose test identities it may "
                        f"have trained on); drop --trial/data.trial or pass that trial's model")
    return [trained]


def _explicit_trial(args: argparse.Namespace) -> int | None:
    """The RegDB trial asked for on the command line (``--trial N`` or ``data.trial=N``), if any."""
    named = {key: value for key, value in map(parse_override, args.overrides) if key == "data.trial"}
    given = [args.trial] if args.trial is not None else []
    given += [int(value) for value in named.values()]
    if len(set(given)) > 1:
        raise UserError(f"--trial {args.trial} and data.trial={named['data.trial']} disagree")
    trial = given[0] if given else None
    if trial is not None and not 1 <= trial <= REGDB_TRIALS:
        raise UserError(f"RegDB trials are 1..{REGDB_TRIALS}, got {trial}")
    return trial


def _explicit_trial_count(args: argparse.Namespace) -> int | None:
    """``--trials N`` (or ``eval.trials=N``) when given on the command line; RegDB ignores the config's."""
    if args.trials is not None:
        return min(args.trials, REGDB_TRIALS)
    named = [value for key, value in map(parse_override, args.overrides) if key == "eval.trials"]
    return min(int(named[-1]), REGDB_TRIALS) if named else None


class ModelSource(ABC):
    """Where a unit's bank and scoring come from: a checkpoint or a features file, per RegDB trial when
    the name holds ``{trial}``. Files are read once and kept until another one is needed."""

    what = "file"

    def __init__(self, template: str) -> None:
        self.template = template
        self.test_time: dict[str, Any] = {}  # the settings that decided the scoring, for the table and JSON

    def path(self, trial: int) -> Path:
        if trial < 0 and TRIAL_PLACEHOLDER in self.template:
            raise UserError(f"--{self.flag} {self.template}: the '{TRIAL_PLACEHOLDER}' placeholder is for RegDB only")
        return trial_path(self.template, trial) if trial >= 0 else Path(self.template)

    @property
    def flag(self) -> str:
        return "checkpoint" if self.what == "checkpoint" else "features"

    @abstractmethod
    def trained_config(self, path: Path) -> dict | None:
        """The config of the model behind ``path`` (None: unknown)."""

    def trained_trial(self, path: Path) -> int | None:
        """The RegDB trial the model behind ``path`` was trained on (None: not a RegDB model, or unknown)."""
        data = (self.trained_config(path) or {}).get("data", {})
        return int(data.get("trial", 1)) if data.get("name") == "regdb" else None

    def check_trial(self, path: Path, trial: int) -> None:
        """A ``{trial}`` file must hold that trial's model: one trained on another split would be scored on
        test identities it may have trained on."""
        trained = self.trained_trial(path) if trial >= 0 else None
        if trained is not None and trained != trial:
            raise UserError(f"{self.what} {path} was trained on RegDB trial {trained}, but it stands for trial "
                            f"{trial} here; each trial's model must score its own test split")

    @abstractmethod
    def __call__(self, dataset: CrossModalDataset, protocol: P.Protocol, trial: int) -> Scored:
        """The unit's bank, score function and scoring mode."""


class FeaturesSource(ModelSource):
    """Banks from features files; files that hold a checkpoint's scorer are scored with it in ``mode``,
    with the command line's test-time ``overrides``."""

    what = "features file"

    def __init__(self, template: str, cfg: Config, overrides: list[str], device: str | None) -> None:
        super().__init__(template)
        self.cfg, self.overrides, self.device = cfg, overrides, device
        self._cache: dict[Path, FeatureFile] = {}

    def read(self, path: Path) -> FeatureFile:
        if path not in self._cache:
            self._cache.clear()
            self._cache[path] = read_feature_file(path)
        return self._cache[path]

    def trained_config(self, path: Path) -> dict | None:
        return self.read(path).scorer_config

    def __call__(self, dataset: CrossModalDataset, protocol: P.Protocol, trial: int) -> Scored:
        path = self.path(trial)
        data = self.read(path)
        self.check_trial(path, trial)
        bank = bank_from_feature_file(protocol.candidates, dataset.root, data, dataset_name=self.cfg.data.name,
                                      source=f"features file {path}", protocol=protocol.name)
        if not data.has_scorer:
            if model_overrides(self.overrides):
                raise UserError(f"{' '.join(model_overrides(self.overrides))}: features file {path} holds no "
                                f"model settings to change (write it with eval.py --save-features)")
            self.test_time = test_time_settings(None, self.cfg.eval)
            return Scored(bank, None, None)
        from cmssft.engine.inference import scorer_score_fn
        from cmssft.models import apply_test_time

        source = f"features file {path}"
        mode = self.cfg.model.sstn.test_mode
        model_cfg = apply_test_time(test_time_config(data.scorer_config, self.overrides, source), self.cfg)
        scoring = _scoring(model_cfg, mode)
        _check_rerank(self.cfg, scoring)
        self.test_time = test_time_settings(model_cfg, self.cfg.eval, flip=None)
        score_fn = scorer_score_fn(data.scorer_config, data.scorer_state, mode, self.device or "cpu", source,
                                   self.overrides, test_time=self.cfg)
        return Scored(bank, score_fn, scoring)


class CheckpointSource(ModelSource):
    """Banks extracted by a checkpoint (test-time ``overrides`` applied); with ``save_template`` each is
    also written as a features file."""

    what = "checkpoint"

    def __init__(self, template: str, cfg: Config, overrides: list[str], save_template: str | None) -> None:
        super().__init__(template)
        self.cfg, self.overrides, self.save_template = cfg, overrides, save_template
        self._cache: dict[Path, LoadedCheckpoint] = {}

    def load(self, path: Path) -> LoadedCheckpoint:
        try:
            from cmssft.engine.inference import load_trained_model
        except ModuleNotFoundError as err:
            if err.name in ("cmssft.engine", "cmssft.engine.inference"):
                raise UserError("evaluating a checkpoint needs cmssft.engine.inference, which this "
                                "installation lacks; evaluate a --features file instead") from None
            raise
        if path not in self._cache:
            self._cache.clear()
            self._cache[path] = load_trained_model(path, self.overrides, test_time=self.cfg)
        return self._cache[path]

    def trained_config(self, path: Path) -> dict | None:
        return config_to_dict(self.load(path).config)

    def __call__(self, dataset: CrossModalDataset, protocol: P.Protocol, trial: int) -> Scored:
        from cmssft.engine.inference import extract_checkpoint

        path = self.path(trial)
        loaded = self.load(path)
        self.check_trial(path, trial)
        scoring = _scoring(loaded.config, self.cfg.model.sstn.test_mode)
        _check_rerank(self.cfg, scoring)
        samples: list[Sample] = protocol.candidates
        extraction = extract_checkpoint(self.cfg, loaded, samples)
        if self.save_template:
            out = trial_path(self.save_template, trial) if trial >= 0 else Path(self.save_template)
            bank = extraction.bank
            save_features(out, [candidate_key(s, dataset.root) for s in samples], bank["shared"],
                          specific=bank.get("specific"), pool=bank.get("pool"), modality=bank["modality"],
                          scorer_config=extraction.scorer.config, scorer_state=extraction.scorer.tensors)
            log.info("features of %d images written to %s", len(samples), out)
        self.test_time = test_time_settings(loaded.config, self.cfg.eval, flip=self.cfg.eval.flip)
        return Scored(extraction.bank, extraction.score_fn, scoring)


def _check_rerank(cfg: Config, scoring: str | None) -> None:
    """Refuse re-ranking single-query scores before any work: the evaluator would (see its docstring)."""
    if cfg.eval.rerank and scoring == "single_query":
        raise UserError("--rerank needs query-query and gallery-gallery distances from the same test graph as the "
                        "query-gallery ones, and the single-query SSTN scores each query in a graph of its own; "
                        "re-rank in model.sstn.test_mode=transductive or off")


def _scoring(model_cfg: Config, mode: str) -> str:
    """How a trained model (its config as it scores) ranks: the SSTN test ``mode``; ``off`` for a model trained
    without SSTN; a model without SSTN test modes (AGW) says how it ranks instead."""
    from cmssft.models import fixed_scoring

    return fixed_scoring(model_cfg) or (mode if model_cfg.model.sstn.enabled else "off")


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
    source: ModelSource = (
        FeaturesSource(args.features, cfg, args.overrides, args.device) if args.features
        else CheckpointSource(args.checkpoint, cfg, args.overrides, args.save_features)
    )
    units = build_units(cfg, name, args, source)
    check_save_features(args, units)
    results: list[TrialResult] = []
    scoring = None
    for unit in units:
        bank, score_fn, scoring = source(unit.dataset, unit.protocol, unit.trial)
        evaluator = Evaluator(score_fn, rerank=cfg.eval.rerank, device=args.device)
        results.extend(evaluator.evaluate(unit.protocol, bank))
        if args.vis and unit is units[0]:
            _save_pictures(evaluator, unit.protocol, bank, Path(args.vis), args.vis_queries)
    settings = dict(units[0].protocol.settings, description=units[0].protocol.description,
                    rerank=cfg.eval.rerank, scoring=scoring, test_time=source.test_time)
    if len(units) > 1:  # RegDB, one model per trial
        arrow = "thermal->visible" if units[0].protocol.settings["direction"] == "t2v" else "visible->thermal"
        settings["description"] = f"RegDB trials {', '.join(str(u.trial) for u in units)}, {arrow}"
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
    settings = summary["settings"]
    title = table_title("test", settings.get("scoring"), settings.get("description", ""), settings.get("test_time"))
    print(format_table(summary, title=title))
    print(chance_line(protocol))
    if args.json:
        write_json(summary, args.json)
        print(f"results written to {args.json}")
    return 0
