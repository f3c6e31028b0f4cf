"""Evaluation during training: the dataset's protocol on the model's features.

The test split is evaluated for reporting; when the dataset holds identities
out for validation (SYSU-MM01 with ``data.train_ids=train``, or ``val_*`` rows of
a manifest), the validation split is evaluated too and selects ``best.pth``.
Model selection never looks at the test split.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import torch
from torch import nn

from cmssft.config import Config
from cmssft.data.loader import build_test_loader
from cmssft.data.records import CrossModalDataset
from cmssft.engine.inference import extract_features, model_score_fn
from cmssft.engine.metrics_log import MetricsLogger
from cmssft.engine.trainer import EvaluateFn
from cmssft.evaluation import protocols as P
from cmssft.evaluation.build import build_protocol, resolve_protocol
from cmssft.evaluation.evaluator import Evaluator
from cmssft.evaluation.report import format_table, summarize, table_title, test_time_settings
from cmssft.evaluation.visualize import ranked_lists_image, save_png
from cmssft.models import fixed_scoring

LOG = logging.getLogger("cmssft")
PICTURE_QUERIES = 6


def validation_view(dataset: CrossModalDataset) -> CrossModalDataset | None:
    """The held-out identities as a dataset whose test side is the validation split."""
    if not dataset.val_query or not dataset.val_gallery:
        return None
    return dataclasses.replace(dataset, query=dataset.val_query, gallery=dataset.val_gallery)


class ProtocolEvaluation:
    """Extract once per call, score every trial with the model's own test-time scoring."""

    def __init__(
        self,
        cfg: Config,
        protocol: P.Protocol,
        split: str,
        device: torch.device,
        metrics: MetricsLogger | None = None,
        run_dir: Path | None = None,
    ) -> None:
        self.cfg, self.protocol, self.split, self.device = cfg, protocol, split, device
        self.metrics, self.run_dir = metrics, run_dir
        self.loader = build_test_loader(cfg, protocol.candidates, device_is_cuda=device.type == "cuda")
        self.last_summary: dict | None = None
        self.last_bank: dict | None = None  # the latest extracted features, for scoring other modes

    def __call__(self, model: nn.Module, epoch: int) -> dict[str, float]:
        self.last_bank = extract_features(model, self.loader, self.device, flip=self.cfg.eval.flip)
        evaluator = self.evaluator(model, self.cfg.model.sstn.test_mode, self.cfg.eval.rerank)
        self.last_summary = self.summarize(evaluator.evaluate(self.protocol, self.last_bank))
        self.picture(evaluator, self.last_bank, epoch)
        return flat_metrics(self.last_summary)

    def evaluator(self, model: nn.Module, mode: str, rerank: bool) -> Evaluator:
        return Evaluator(model_score_fn(model, mode, self.device), rerank=rerank)

    def summarize(self, results: list) -> dict:
        return summarize(self.protocol.name, results, dict(self.protocol.settings, split=self.split))

    def score_mode(self, model: nn.Module, mode: str, rerank: bool = False) -> dict:
        """The summary of the latest features scored in another test mode (no new extraction)."""
        if self.last_bank is None:
            raise RuntimeError("score_mode needs a previous evaluation's features")
        return self.summarize(self.evaluator(model, mode, rerank).evaluate(self.protocol, self.last_bank))

    def compare(self, model: nn.Module, modes: list[str]) -> dict[str, dict]:
        """``eval.compare_modes`` scored on the latest features, except the configured mode itself."""
        configured = self.cfg.model.sstn.test_mode
        if getattr(model, "sstn", None) is None:
            return {}  # without a transfer every mode is off
        return {mode: self.score_mode(model, mode) for mode in modes if mode != configured}

    def picture(self, evaluator: Evaluator, bank: dict, epoch: int) -> None:
        if self.metrics is None and self.run_dir is None:
            return
        trial = self.protocol.trials[0]
        dist = evaluator.distances(self.protocol, trial, bank)
        queries = self.protocol.query_samples(trial)
        chosen = torch.linspace(0, len(queries) - 1, min(PICTURE_QUERIES, len(queries))).long().tolist()
        image = ranked_lists_image(
            dist,
            queries,
            self.protocol.gallery_samples(trial),
            chosen,
            exclusion=self.protocol.exclusion,
            height=self.cfg.data.height,
            width=self.cfg.data.width,
        )
        if self.metrics is not None:
            self.metrics.image(f"{self.split}/ranked_lists", image, epoch)
        if self.run_dir is not None:
            save_png(image, self.run_dir / "ranked_lists" / f"{self.split}_epoch{epoch:03d}.png")

    def table(self, summary: dict | None = None, mode: str | None = None) -> str:
        """The latest summary (or ``summary``, scored in ``mode``) as a titled table."""
        summary = summary or self.last_summary
        if summary is None:
            return ""
        if mode is None:  # the configured scoring: AGW's test feature, cm-SSFT's test mode (none without SSTN)
            sstn = self.cfg.model.sstn
            mode = fixed_scoring(self.cfg) or (sstn.test_mode if sstn.enabled else None)
        settings = test_time_settings(self.cfg, self.cfg.eval, flip=self.cfg.eval.flip)
        return format_table(summary, title=table_title(self.split, mode, self.protocol.description, settings))


def flat_metrics(summary: dict) -> dict[str, float]:
    """A summary's mean metrics and (``graph/...``) test-graph statistics, for logging."""
    graph = {f"graph/{k}": v for k, v in summary.get("graph", {}).items() if v == v}
    return {**summary["mean"], **graph}


def build_evaluators(
    cfg: Config, dataset: CrossModalDataset, device: torch.device, metrics: MetricsLogger | None, run_dir: Path
) -> tuple[dict[str, EvaluateFn], str | None]:
    """``{"val": ..., "test": ...}`` evaluations and the split that selects best.pth (None: last epoch)."""
    name = resolve_protocol(cfg)
    evaluators: dict[str, EvaluateFn] = {}
    val = validation_view(dataset)
    if val is not None:
        evaluators["val"] = ProtocolEvaluation(cfg, build_protocol(cfg, val, name), "val", device, metrics, run_dir)
    if dataset.query and dataset.gallery:
        test = build_protocol(cfg, dataset, name)
        evaluators["test"] = ProtocolEvaluation(cfg, test, "test", device, metrics, run_dir)
    select_on = "val" if val is not None else None
    if select_on is None:
        LOG.info("no validation split: best.pth is the last epoch (the test split never selects models)")
    return evaluators, select_on
