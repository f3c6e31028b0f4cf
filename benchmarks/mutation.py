"""Mutation check: does the test suite fail when a behaviour it names breaks?

    python benchmarks/mutation.py [--only NAME ...] [--tests NODE ...] [--suite] [--jobs N] [--timeout S]
        [--markdown PATH] [--json PATH] [--list] [--check] [--no-baseline] [--keep]

Each *mutant* below is one deliberate bug a reviewer would call a bug: an exact snippet of a module
and its replacement, the tests that should catch it, and what the bug means. The runner copies the
checkout (tracked files and untracked ones git does not ignore, so work in progress is included) to
a temporary folder, which has nothing beside it (no split files, no datasets), checks that the
clean copy passes every test the selected mutants name (``--no-baseline`` skips this), then, one
mutant at a time, applies it, runs its tests there with ``python -m pytest -x`` (``--tests``: these
instead, e.g. to see whether one new test alone kills a mutant; ``--suite``: the whole suite) and
puts the file back. A mutant is

- ``killed`` when its tests fail (a collection error counts: the suite fails too);
- ``survived`` when they pass: either an unwanted gap in the tests, or, where the mutant says why
  (``accepted``), a change that no test can or should see;
- ``stale`` when its snippet no longer occurs exactly once (the module changed: update the mutant);
- ``error`` when pytest itself failed to run (exit 3-5: wrong test names, internal error).

It prints a table (and writes it with ``--markdown`` / ``--json``) and exits 1 when a mutant
survived without an ``accepted`` reason, went stale or errored. This runs on demand, not in CI: a
full run takes about half an hour on two CPU cores. The latest result is in docs/TESTING.md.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mutant:
    """One deliberate bug: replace ``before`` (which must occur exactly once in ``path``) by ``after``."""

    name: str
    path: str
    before: str
    after: str
    tests: tuple[str, ...]
    bug: str
    accepted: str = ""  # why surviving is fine (an equivalent change); empty: the tests must kill it


@dataclass
class Outcome:
    """What one mutant's tests did; ``caught_by`` names the first failing test."""

    name: str
    path: str
    bug: str
    status: str  # killed | survived | stale | error
    seconds: float = 0.0
    caught_by: str = ""
    accepted: str = ""
    tail: str = field(default="", repr=False)


ENTRY, EVALUATE, TRAINER = "cmssft/engine/entry.py", "cmssft/engine/evaluate.py", "cmssft/engine/trainer.py"
CHECKPOINT, INFERENCE = "cmssft/engine/checkpoint.py", "cmssft/engine/inference.py"
METRICS, REPORT = "cmssft/evaluation/metrics.py", "cmssft/evaluation/report.py"
PROTOCOLS, CLI = "cmssft/evaluation/protocols.py", "cmssft/evaluation/cli.py"
EVALUATOR, VISUALIZE = "cmssft/evaluation/evaluator.py", "cmssft/evaluation/visualize.py"
SSTN, MODEL = "cmssft/models/sstn.py", "cmssft/models/cmssft_model.py"
SINGLE_QUERY = "cmssft/models/sstn_single_query.py"
TRANSFORMS = "cmssft/data/transforms.py"
BATCH_AUGMENT = "cmssft/data/batch_augment.py"
TRIPLET, CRITERION = "cmssft/losses/triplet.py", "cmssft/losses/criterion.py"

T_METRICS = "tests/test_metrics.py"
T_REPORT = "tests/test_report.py"
T_PROTOCOLS = "tests/test_protocols.py"
T_SSTN = "tests/test_sstn.py"
T_TRANSFORMS = "tests/test_transforms.py"
T_WRT, T_CHANNEL_AUG, T_BATCH_AUGMENT = "tests/test_wrt.py", "tests/test_channel_aug.py", "tests/test_batch_augment.py"
T_RESUME = "tests/test_training.py::test_resume_continues_to_the_same_weights"
T_SELECT = "tests/test_training.py::test_the_validation_split_and_never_the_test_split_selects_best_pth"
T_FINISHED = "tests/test_training.py::test_resume_of_a_finished_run_from_its_own_config_says_so"
T_RERANK = "tests/test_eval_cli.py::test_noisy_features_and_flags"
T_EVAL_CHECKPOINT = "tests/test_eval_checkpoint.py"
T_PICTURE = "tests/test_eval_cli.py::test_ranked_list_picture"

MUTANTS: tuple[Mutant, ...] = (
    # ------------------------------------------------------------------ the four bugs that once went unseen
    Mutant(
        "resume-not-restored", ENTRY,
        "trainer.restore(load_checkpoint(run_dir / LAST, map_location=device, need=RESUME_KEYS))",
        "load_checkpoint(run_dir / LAST, map_location=device, need=RESUME_KEYS)",
        (T_RESUME,),
        "--resume reads last.pth but never restores it: the run silently retrains from scratch",
    ),
    Mutant(
        "best-on-test-split", EVALUATE,
        'select_on = "val" if val is not None else None',
        'select_on = "test" if val is not None else None',
        (T_SELECT,),
        "best.pth selected on the test split although a validation split exists",
    ),
    Mutant(
        "regdb-directions-swapped", PROTOCOLS,
        'q, g = (visible, thermal) if direction == "v2t" else (thermal, visible)',
        'q, g = (thermal, visible) if direction == "v2t" else (visible, thermal)',
        (T_PROTOCOLS,),
        "RegDB v2t and t2v swapped",
    ),
    Mutant(
        "rerank-ignored", CLI,
        "evaluator = Evaluator(score_fn, rerank=cfg.eval.rerank, device=args.device)",
        "evaluator = Evaluator(score_fn, device=args.device)",
        (T_RERANK,),
        "eval.py --rerank silently ignored",
    ),
    # ------------------------------------------------------------------ metrics: CMC, AP, INP, dedup, exclusion
    Mutant(
        "cmc-strict-rank", METRICS,
        "cmc = (first_rank[valid, None] <= ranks[None, :]).double().mean(0)",
        "cmc = (first_rank[valid, None] < ranks[None, :]).double().mean(0)",
        (T_METRICS,),
        "CMC at rank k counts first matches before rank k only (off by one)",
    ),
    Mutant(
        "cmc-counts-invalid-queries", METRICS,
        "cmc = (first_rank[valid, None] <= ranks[None, :]).double().mean(0)",
        "cmc = (first_rank[:, None] <= ranks[None, :]).double().mean(0)",
        (T_METRICS,),
        "queries without a true match are averaged into the CMC",
    ),
    Mutant(
        "ap-precision-off-by-one", METRICS,
        "ap = torch.where(ranked <= num_g, hits / ranked.double(), 0.0).sum(1) / rel.clamp_min(1)",
        "ap = torch.where(ranked <= num_g, hits / (ranked.double() + 1), 0.0).sum(1) / rel.clamp_min(1)",
        (T_METRICS,),
        "AP uses the precision one rank too low",
    ),
    Mutant(
        "ap-divides-by-gallery", METRICS,
        "ap = torch.where(ranked <= num_g, hits / ranked.double(), 0.0).sum(1) / rel.clamp_min(1)",
        "ap = torch.where(ranked <= num_g, hits / ranked.double(), 0.0).sum(1) / num_g",
        (T_METRICS,),
        "AP averaged over the gallery size instead of the true matches",
    ),
    Mutant(
        "inp-first-match", METRICS,
        "inp = rel / ranked.gather(1, (num_rel.long() - 1).clamp_min(0)[:, None]).squeeze(1).double()",
        "inp = rel / ranked[:, 0].double()",
        (T_METRICS,),
        "INP divides by the easiest match's rank instead of the hardest's",
    ),
    Mutant(
        "dedup-ignored", METRICS,
        "ids.g_index if dedup else None",
        "None",
        (T_METRICS,),
        "SYSU-MM01's identity-deduplicated CMC computed on the full list",
    ),
    Mutant(
        "dedup-counts-own-identity", METRICS,
        "    seen.scatter_(1, torch.where(q_index >= 0, q_index, num_pids)[:, None], 0)\n",
        "",
        (T_METRICS,),
        "the deduplicated rank counts the query's own (removed) images ahead of its best match",
    ),
    Mutant(
        "ties-to-later-gallery-item", METRICS,
        "return _count(d3 < m3, 2) + _count((d3 == m3) & (columns[None, None, :] < idx[:, :, None]), 2)",
        "return _count(d3 < m3, 2) + _count((d3 == m3) & (columns[None, None, :] > idx[:, :, None]), 2)",
        (T_METRICS,),
        "tied distances ordered against gallery order (results no longer those of a stable sort)",
    ),
    Mutant(
        "sysu-rule-own-identity-only", METRICS,
        "return (q_cams == 3) & (g_cams == 2)",
        "return (q_cams == 3) & (g_cams == 2) & (q_pids == g_pids)",
        (f"{T_METRICS}::test_sysu_rule_drops_camera2_for_camera3_queries",),
        "the SYSU-MM01 camera rule drops only the query's own camera-2 images",
    ),
    Mutant(
        "sysu-rule-wrong-camera", METRICS,
        "return (q_cams == 3) & (g_cams == 2)",
        "return (q_cams == 6) & (g_cams == 2)",
        (f"{T_METRICS}::test_sysu_rule_drops_camera2_for_camera3_queries",),
        "the SYSU-MM01 camera rule applied to camera-6 queries",
    ),
    Mutant(
        "same-camera-rule-any-identity", METRICS,
        "return (q_pids == g_pids) & (q_cams == g_cams)",
        "return q_cams == g_cams",
        (T_METRICS,),
        "the same-camera rule drops other identities' images too",
    ),
    # ------------------------------------------------------------------ report: mean and std over trials
    Mutant(
        "report-sample-std", REPORT,
        '"std": dict(zip(SUMMARY_KEYS, map(float, table.std(0)), strict=True)),',
        '"std": dict(zip(SUMMARY_KEYS, map(float, table.std(0, ddof=1)), strict=True)),',
        (T_REPORT,),
        "std over trials is the sample std, not the documented population std",
    ),
    Mutant(
        "report-median", REPORT,
        '"mean": dict(zip(SUMMARY_KEYS, map(float, table.mean(0)), strict=True)),',
        '"mean": dict(zip(SUMMARY_KEYS, map(float, np.median(table, 0)), strict=True)),',
        (T_REPORT,),
        "the reported mean is the median over trials",
    ),
    Mutant(
        "report-rank5-column", REPORT,
        '"rank5": m.rank(5)',
        '"rank5": m.rank(4)',
        (T_REPORT,),
        "rank-5 reports the CMC at rank 4",
    ),
    Mutant(
        "report-trial-map-field", REPORT,
        '"mAP": m.mAP,\n            "mINP": m.mINP,',
        '"mAP": m.mINP,\n            "mINP": m.mINP,',
        (T_REPORT,),
        "each trial's mAP field holds its mINP",
    ),
    Mutant(
        "table-std-line-shows-mean", REPORT,
        '"".join(f"{100 * std[k]:>9.2f}" for k in SUMMARY_KEYS))',
        '"".join(f"{100 * mean[k]:>9.2f}" for k in SUMMARY_KEYS))',
        (T_REPORT,),
        "the table's +- std line prints the means",
    ),
    Mutant(
        "table-rank5-column", REPORT,
        'values = [cmc[0], cmc[4], cmc[9], cmc[19], t["mAP"], t["mINP"]]',
        'values = [cmc[0], cmc[5], cmc[9], cmc[19], t["mAP"], t["mINP"]]',
        (T_REPORT,),
        "the table's per-trial rank-5 column shows rank 6",
    ),
    Mutant(
        "report-trial-number", REPORT,
        '"trial": r.trial,',
        '"trial": len(trials),',
        (T_REPORT,),
        "the summary numbers trials 0.. instead of the protocol's own trial numbers (RegDB 1..10)",
    ),
    Mutant(
        "graph-line-weight-shows-edges", REPORT,
        "f\"({pct('same_id_weight')} of weight)",
        "f\"({pct('same_id_edges')} of weight)",
        (T_REPORT,),
        "the test-graph line prints the same-identity edge share as its weight share",
    ),
    Mutant(
        "graph-mean-counts-nan", REPORT,
        "finite = [v for v in values if v == v]",
        "finite = values",
        (T_REPORT,),
        "one trial that counted no edge turns the mean graph statistic into nan",
    ),
    Mutant(
        "chance-level-not-random", REPORT,
        "return torch.rand(len(query), len(gallery), generator=generator)",
        "return torch.zeros(len(query), len(gallery))",
        (T_REPORT,),
        "the chance line ranks every gallery in file order instead of at random",
    ),
    # ------------------------------------------------------------------ protocols
    Mutant(
        "community-seed", PROTOCOLS,
        "rng = random.Random(t)\n        out.append(Trial(t, query_idx,",
        "rng = random.Random(t + 1)\n        out.append(Trial(t, query_idx,",
        (T_PROTOCOLS,),
        "SYSU-MM01 community gallery of trial t drawn with seed t + 1",
    ),
    Mutant(
        "community-file-order", PROTOCOLS,
        "groups[key] = sorted(members, key=lambda j: candidates[j - offset].path)",
        "groups[key] = sorted(members, key=lambda j: candidates[j - offset].path, reverse=True)",
        (T_PROTOCOLS,),
        "gallery draws index the files in reverse order instead of sorted order",
    ),
    Mutant(
        "query-camera-3-only", PROTOCOLS,
        "SYSU_QUERY_CAMERAS = (3, 6)",
        "SYSU_QUERY_CAMERAS = (3,)",
        (T_PROTOCOLS,),
        "SYSU-MM01 queries lose camera 6",
    ),
    Mutant(
        "official-trial-row", PROTOCOLS,
        "chosen.extend(files[j - 1] for j in _perm_row(perm, cam, pid)[t, :shots])",
        "chosen.extend(files[j - 1] for j in _perm_row(perm, cam, pid)[0, :shots])",
        (T_PROTOCOLS,),
        "every official trial uses permutation row 0",
    ),
    Mutant(
        "official-index-base", PROTOCOLS,
        "chosen.extend(files[j - 1] for j in _perm_row(perm, cam, pid)[t, :shots])",
        "chosen.extend(files[j % len(files)] for j in _perm_row(perm, cam, pid)[t, :shots])",
        (T_PROTOCOLS,),
        "rand_perm_cam.mat's 1-based indices read as 0-based",
    ),
    Mutant(
        "regdb-auto-direction", PROTOCOLS,
        'direction = "v2t" if direction == "auto" else direction\n    if direction not in ("v2t", "t2v")',
        'direction = "t2v" if direction == "auto" else direction\n    if direction not in ("v2t", "t2v")',
        (T_PROTOCOLS,),
        "RegDB's default direction is thermal->visible",
    ),
    # ------------------------------------------------------------------ SSTN single-query scoring
    Mutant(
        "sq-tie-rule", SINGLE_QUERY,
        "enters = s_qg >= p.kth.unsqueeze(0)",
        "enters = s_qg > p.kth.unsqueeze(0)",
        (T_SSTN,),
        "a query that ties a gallery row's k-th neighbour does not enter it (the one-query graph says it does)",
    ),
    Mutant(
        "sq-alpha-softmax", SINGLE_QUERY,
        "return torch.sigmoid(mass - s_new / sstn.temperature)",
        "return torch.sigmoid(s_new / sstn.temperature - mass)",
        (T_SSTN,),
        "softmax weight share left to the kept neighbours inverted",
    ),
    Mutant(
        "sq-alpha-sum", SINGLE_QUERY,
        "return mass / (mass + w_new)",
        "return w_new / (mass + w_new)",
        (T_SSTN,),
        "sum-normalised weight share left to the kept neighbours inverted",
    ),
    Mutant(
        "sq-mass-temperature", SINGLE_QUERY,
        "return torch.logsumexp(value / sstn.temperature, dim=1)",
        "return torch.logsumexp(value, dim=1)",
        (T_SSTN,),
        "the kept neighbours' softmax mass ignores the temperature",
    ),
    Mutant(
        "sq-share-dropped", SINGLE_QUERY,
        "dot = alpha * fu + beta * (fc + share * (f_q * m).sum(1)[qi])",
        "dot = alpha * fu + beta * (fc + (f_q * m).sum(1)[qi])",
        (T_SSTN,),
        "the query's message ignores its block's share of the row (block normalisation)",
    ),
    Mutant(
        "sq-norm-cross-term", SINGLE_QUERY,
        "+ 2 * alpha * beta * (p.uc[gj] + share * mu)",
        "+ 2 * alpha * beta * p.uc[gj]",
        (T_SSTN,),
        "the entered row's norm misses a cross term",
    ),
    Mutant(
        "sq-evicts-the-best", SINGLE_QUERY,
        "kept[:, last] = False  # the block's width-th, which the query evicts",
        "kept[:, block.start] = False",
        (T_SSTN,),
        "the entering query evicts the block's best neighbour instead of its k-th",
    ),
    Mutant(
        "sq-intra-block-any-modality", SINGLE_QUERY,
        'if p.block.kind == "intra":\n            enters &= same',
        'if p.block.kind == "intra":\n            pass',
        (T_SSTN,),
        "a query enters intra-modality blocks of the other modality's rows",
    ),
    Mutant(
        "sq-gathered-pair-products", SINGLE_QUERY,
        "((fq_i, u_j), (fq_i, c_j), (m_i, u_j), (m_i, c_j))",
        "((fq_i, u_j), (fq_i, c_j), (m_i, c_j), (m_i, u_j))",
        (T_SSTN,),
        "few entered pairs: the message's products with u and c swapped",
    ),
    Mutant(
        "sq-blockwise-pair-products", SINGLE_QUERY,
        "pairs = ((f_q, p.u), (f_q, p.c), (m, p.u), (m, p.c))",
        "pairs = ((f_q, p.u), (f_q, p.c), (m, p.c), (m, p.u))",
        (T_SSTN,),
        "many entered pairs: the message's products with u and c swapped",
    ),
    Mutant(
        "sq-other-blocks-never-empty", SINGLE_QUERY,
        "nonempty = valid[:, cols].any(dim=1) if block is not entered else torch.ones_like(valid[:, 0])",
        "nonempty = torch.ones_like(valid[:, 0])",
        (T_SSTN,),
        "block shares are not renormalised over a row's non-empty blocks",
    ),
    Mutant(
        "sq-message-keeps-bias", SINGLE_QUERY,
        "m = (sstn.descriptor(zero, rows.x) - sstn.descriptor(zero, zero)).float()",
        "m = sstn.descriptor(zero, rows.x).float()",
        (T_SSTN,),
        "the query's message term keeps the descriptor's bias (counted twice)",
    ),
    Mutant(
        "sq-cross-block-same-modality", SINGLE_QUERY,
        'elif p.block.kind == "cross":\n            enters &= ~same',
        'elif p.block.kind == "cross":\n            enters &= same',
        (T_SSTN,),
        "a query enters the cross block of rows of its own modality",
    ),
    Mutant(
        "sq-self-loop-is-cross", SINGLE_QUERY,
        "F.pad(same, (1, 0), value=True)",
        "F.pad(same, (1, 0), value=False)",
        (T_SSTN,),
        "with self loops the query counts as its own cross-modality neighbour",
    ),
    Mutant(
        "sq-gallery-not-unit", SINGLE_QUERY,
        "return cls(graph, f0 / f0.norm(dim=1, keepdim=True).clamp_min(1e-12))",
        "return cls(graph, f0)",
        (T_SSTN,),
        "rows no query enters are compared with unnormalised descriptors",
    ),
    Mutant(
        "sq-edges-not-offset", SINGLE_QUERY,
        "KeptEdges(torch.where(graph.index < 0, own, graph.index + num_q)",
        "KeptEdges(torch.where(graph.index < 0, own, graph.index)",
        (T_SSTN,),
        "single-query test-graph edges point at query nodes instead of the gallery",
    ),
    Mutant(
        "sq-query-similarity-shared-only", SINGLE_QUERY,
        "if rows.sp is None or set(g.modality.unique().tolist()).isdisjoint(rows.modality.unique().tolist()):",
        "if True:",
        (T_SSTN,),
        "same-modality query-gallery pairs compared on shared features alone",
    ),
    Mutant(
        "sq-self-loop-takes-a-gallery-feature", SINGLE_QUERY,
        "nb = torch.where((index < 0).unsqueeze(-1), rows.x.unsqueeze(1), nb)",
        "nb = nb",
        (T_SSTN,),
        "with self loops the query's own edge carries gallery node 0's feature",
    ),
    Mutant(
        "sq-self-loop-edge-block", SINGLE_QUERY,
        "own = torch.arange(start, stop, device=graph.index.device).unsqueeze(1)",
        "own = torch.arange(0, stop - start, device=graph.index.device).unsqueeze(1)",
        (T_SSTN,),
        "self-loop test-graph edges of later query blocks name the first block's queries",
    ),
    Mutant(
        "centring-batch-means-at-test", SSTN,
        "if not self.training:\n            return self.modality_mean.to(emb.dtype)",
        "if False:\n            return self.modality_mean.to(emb.dtype)",
        (T_SSTN,),
        "test-time centring uses the batch's means, so a node's features depend on the rest of its batch",
    ),
    Mutant(
        "centring-momentum", SSTN,
        "self.modality_mean[m].lerp_(mean.detach().float(), self.center_momentum)",
        "self.modality_mean[m].lerp_(mean.detach().float(), 1 - self.center_momentum)",
        (T_SSTN,),
        "the running modality means move by 1 - momentum",
    ),
    Mutant(
        "score-mode-ignored", MODEL,
        ".distance_blocks(triple(query_bank), triple(gallery_bank), mode)",
        '.distance_blocks(triple(query_bank), triple(gallery_bank), "transductive")',
        ("tests/test_models.py::test_score_modes",),
        "the model scores every SSTN mode transductively",
    ),
    # ------------------------------------------------------------------ checkpoint and resume
    Mutant(
        "restore-skips-optimizer", TRAINER,
        'self.optimizer.load_state_dict(state["optimizer"])',
        "pass",
        (T_RESUME,),
        "--resume restarts the optimizer's moments",
    ),
    Mutant(
        "restore-skips-scheduler", TRAINER,
        'self.scheduler.load_state_dict(state["scheduler"])',
        "pass",
        (T_RESUME,),
        "--resume restarts the learning-rate schedule",
    ),
    Mutant(
        "restore-skips-train-state", TRAINER,
        'self.state = TrainState(**state["train_state"])',
        "pass",
        (T_RESUME,),
        "--resume loads the weights but starts counting epochs and steps from 0",
    ),
    Mutant(
        "restore-skips-rng", TRAINER,
        'set_rng_state(state["rng"])',
        "pass",
        (T_RESUME, "tests/test_kill_resume.py::test_sigint_then_sigterm_mid_epoch_then_resume_matches"),
        "--resume does not restore the random generators",
        accepted="nothing in a training step draws from the global generators (every augmentation and batch "
                 "comes from a generator seeded by seed, epoch and draw), so restoring them changes no number",
    ),
    Mutant(
        "resume-redoes-done-batches", TRAINER,
        "self.loader.batch_sampler.set_epoch(self.state.epoch, skip=self.state.batch)",
        "self.loader.batch_sampler.set_epoch(self.state.epoch, skip=0)",
        ("tests/test_kill_resume.py::test_sigint_then_sigterm_mid_epoch_then_resume_matches",),
        "a mid-epoch resume feeds the epoch's first batches again",
    ),
    Mutant(
        "finished-run-trains-again", TRAINER,
        "return self.state.epoch >= self.cfg.train.epochs",
        "return self.state.epoch > self.cfg.train.epochs",
        (T_FINISHED,),
        "--resume of a finished run is not recognised as finished",
    ),
    Mutant(
        "checkpoint-written-in-place", CHECKPOINT,
        'tmp = path.parent / f".{path.name}.{uuid.uuid4().hex[:12]}.tmp"',
        "tmp = path",
        ("tests/test_engine_parts.py::test_failed_save_keeps_the_old_checkpoint",),
        "a failed checkpoint write destroys the previous last.pth",
    ),
    # ------------------------------------------------------------------ model selection
    Mutant(
        "trainer-selects-on-test", TRAINER,
        'improved = self.select_on in results and results[self.select_on]["mAP"] > self.state.best_value',
        'improved = "test" in results and results["test"]["mAP"] > self.state.best_value',
        (T_SELECT,),
        "the trainer compares test mAP although the validation split is named to select",
    ),
    Mutant(
        "no-validation-selects-on-test", EVALUATE,
        'select_on = "val" if val is not None else None',
        'select_on = "val" if val is not None else "test"',
        (T_SELECT,),
        "without a validation split the test split selects best.pth",
    ),
    Mutant(
        "validation-view-is-the-test-split", EVALUATE,
        "return dataclasses.replace(dataset, query=dataset.val_query, gallery=dataset.val_gallery)",
        "return dataclasses.replace(dataset)",
        (T_SELECT,),
        "the 'validation' evaluation that selects best.pth runs on the test identities",
    ),
    # ------------------------------------------------------------------ evaluation entry points and pictures
    Mutant(
        "evaluator-never-reranks", EVALUATOR,
        "if self.rerank:\n            q_q",
        "if False:\n            q_q",
        (T_RERANK,),
        "Evaluator(rerank=True) does not re-rank",
    ),
    Mutant(
        "picture-frames-all-green", VISUALIZE,
        "color = GREEN if s.pid == query.pid else RED",
        "color = GREEN",
        (T_PICTURE,),
        "ranked-list pictures frame wrong matches green",
    ),
    Mutant(
        "picture-ignores-exclusion", VISUALIZE,
        "order = order[~removed[order]][:k]",
        "order = order[:k]",
        (T_PICTURE,),
        "ranked-list pictures show images the protocol excludes",
    ),
    # ------------------------------------------------------------------ augmentation and test-time flip
    Mutant(
        "flip-probability-inverted", TRANSFORMS,
        "if _uniform(generator) < self.flip:",
        "if _uniform(generator) >= self.flip:",
        (T_TRANSFORMS,),
        "data.flip=0 flips every image",
    ),
    Mutant(
        "crop-misses-last-offset", TRANSFORMS,
        "top, left = torch.randint(0, 2 * pad + 1, (2,), generator=generator).tolist()",
        "top, left = torch.randint(0, 2 * pad, (2,), generator=generator).tolist()",
        (T_TRANSFORMS,),
        "the random crop never takes the bottom/right-most offset",
    ),
    Mutant(
        "erasing-always", TRANSFORMS,
        "if _uniform(generator) < self.random_erasing:",
        "if _uniform(generator) < 1.0:",
        (T_TRANSFORMS,),
        "data.random_erasing ignored: every image erased",
    ),
    Mutant(
        "channel-aug-probability", TRANSFORMS,
        "if modality == Modality.RGB and _uniform(generator) < self.channel_aug:",
        "if modality == Modality.RGB and _uniform(generator) < 2 * self.channel_aug:",
        (T_TRANSFORMS,),
        "channel augmentation applied twice as often as data.channel_aug says",
    ),
    Mutant(
        "test-flip-not-averaged", INFERENCE,
        "bank = {k: (v + mirrored[k]) / 2 if v.is_floating_point() else v for k, v in bank.items()}",
        "bank = {k: mirrored[k] if v.is_floating_point() else v for k, v in bank.items()}",
        (T_TRANSFORMS,),
        "test-time flip uses the mirror alone instead of averaging it with the image",
    ),
    # ------------------------------------------------------------------ a real run's numbers are the right numbers
    Mutant(
        "regdb-trial-from-the-config", CLI,
        "    return [trained]\n",
        "    return [cfg.data.trial]\n",
        (T_EVAL_CHECKPOINT,),
        "eval.py scores a RegDB checkpoint on the config's trial, not the one it was trained on",
    ),
    Mutant(
        "regdb-template-one-trial", CLI,
        "return [explicit] if explicit else list(range(1, (count or REGDB_TRIALS) + 1))",
        "return [explicit] if explicit else list(range(1, (count or cfg.eval.trials) + 1))",
        (T_EVAL_CHECKPOINT,),
        "a RegDB {trial} template scores eval.trials of the config (configs/regdb.yaml once said 1), not all ten",
    ),
    Mutant(
        "regdb-template-file-unchecked", CLI,
        "        if trained is not None and trained != trial:",
        "        if False:",
        (T_EVAL_CHECKPOINT,),
        "a {trial} file holding another trial's model is scored on this trial's split",
    ),
    Mutant(
        "test-time-override-ignored", INFERENCE,
        'trained_cfg = test_time_config(state["config"], overrides, source)',
        'trained_cfg = test_time_config(state["config"], (), source)',
        (T_EVAL_CHECKPOINT,),
        "eval.py model.sstn.topk=N prints the checkpoint's own table, silently",
    ),
    Mutant(
        "training-override-accepted", "cmssft/config.py",
        "if key not in TEST_TIME_MODEL_KEYS and get_dotted(cfg, key) != get_dotted(base, key):",
        "if False:",
        (T_EVAL_CHECKPOINT,),
        "eval.py accepts an override the trained weights cannot take (or that only acts in training)",
    ),
    Mutant(
        "rerank-mixes-graphs", EVALUATOR,
        "q_q, g_g = q_g.within()",
        "q_q, g_g = self.score_fn(q_bank, q_bank), self.score_fn(g_bank, g_bank)",
        (T_EVAL_CHECKPOINT,),
        "re-ranking a transductive SSTN takes query-query and gallery-gallery distances from one-modality graphs",
    ),
    Mutant(
        "repeated-feature-paths-accepted", "cmssft/evaluation/features_io.py",
        "    _refuse_repeated_paths(path, names)\n",
        "",
        ("tests/test_bad_data.py::test_features_file_problems_are_named",),
        "a features file naming an image twice is read (which row counts is undefined)",
    ),
    Mutant(
        "ddp-broadcasts-memory", "cmssft/engine/build.py",
        "broadcast_buffers=False,",
        "broadcast_buffers=True,",
        ("tests/test_distributed.py::test_each_process_keeps_its_own_candidate_memory",),
        "under DDP every forward overwrites each process's candidate memory with rank 0's",
    ),
    Mutant(
        "signal-all-reduce-every-step", TRAINER,
        "return not self.dist.enabled or self.state.step % self.cfg.train.log_every == 0",
        "return True",
        ("tests/test_step_sync.py::test_a_launch_looks_for_stop_signals_only_at_log_steps",),
        "under torchrun the stop-signal all-reduce reads back to the host after every step",
    ),
    # ------------------------------------------------------------------ weighted regularised triplet (loss.triplet=wrt)
    Mutant(
        "wrt-shift-over-masked-entries", TRIPLET,
        "shift = masked.amax(dim=1, keepdim=True)",
        "shift = (logits * mask).amax(dim=1, keepdim=True)",
        (T_WRT,),
        "the softmax shift is the maximum over masked entries too (as the public code takes it): far negatives' "
        "weights underflow to 0",
    ),
    Mutant(
        "wrt-far-negatives-weigh-more", TRIPLET,
        "d_n = (masked_softmax(-dist, neg) * dist).sum(dim=1)",
        "d_n = (masked_softmax(dist, neg) * dist).sum(dim=1)",
        (T_WRT,),
        "WRT weighs negatives like positives: the farther, the heavier",
    ),
    Mutant(
        "wrt-averages-invalid-anchors", TRIPLET,
        "per_anchor = F.softplus(d_p - d_n) * valid.float()",
        "per_anchor = F.softplus(d_p - d_n)",
        (T_WRT,),
        "anchors without a positive or negative of the allowed kind add softplus(-d_n) or softplus(d_p)",
    ),
    Mutant(
        "shared-triplet-always-cross", CRITERION,
        "self.triplet_shared = build_triplet(triplet, shared_triplet, **options)",
        'self.triplet_shared = build_triplet(triplet, "cross", **options)',
        (T_WRT,),
        "loss.shared_triplet=all ignored: the shared triplet mines cross-modality pairs only",
    ),
    # ------------------------------------------------------------------ CAJ channel augmentation
    Mutant(
        "caj-joint-exchanges-the-first-copy", TRANSFORMS,
        "if self.joint and modality == Modality.RGB and view == 0:",
        "if self.joint and modality == Modality.RGB and view == 1:",
        (T_CHANNEL_AUG,),
        "data.channel_aug_joint exchanges the first RGB copy and keeps the second in colour",
    ),
    Mutant(
        "caj-erase-aspect-log-uniform", TRANSFORMS,
        "aspect = CAJ_ERASE_ASPECT[0] + (CAJ_ERASE_ASPECT[1] - CAJ_ERASE_ASPECT[0]) * _uniform(generator)",
        "aspect = CAJ_ERASE_ASPECT[0] * (CAJ_ERASE_ASPECT[1] / CAJ_ERASE_ASPECT[0]) ** _uniform(generator)",
        (T_CHANNEL_AUG,),
        "channel random erasing draws its aspect log-uniformly (as data.random_erasing) instead of uniformly",
    ),
    Mutant(
        "caj-device-gray-weights", BATCH_AUGMENT,
        "x = self._channel_augment(x, params.exchange, CAJ_GRAY_WEIGHTS)",
        "x = self._channel_augment(x, params.exchange)",
        (T_BATCH_AUGMENT,),
        "the device path's CAJ gray uses the legacy weights 0.299/0.587/0.114 instead of CAJ's",
    ),
    Mutant(
        "caj-device-ignores-joint", BATCH_AUGMENT,
        "probability = torch.where(first_copy, 0.0, probability)",
        "probability = torch.where(first_copy & ~rgb, 0.0, probability)",
        (T_BATCH_AUGMENT,),
        "the device path exchanges both copies of a joint RGB pair",
    ),
)


# ---------------------------------------------------------------------------------------------- running


def checkout_files(root: Path) -> list[Path]:
    """Tracked files and untracked ones git does not ignore (relative paths that exist)."""
    out = subprocess.run(["git", "-C", str(root), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                         check=True, capture_output=True).stdout.decode()
    return [Path(p) for p in sorted(set(out.split("\0"))) if p and (root / p).is_file()]


def copy_checkout(root: Path, target: Path) -> Path:
    for rel in checkout_files(root):
        (target / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / rel, target / rel)
    return target


def child_env(copy: Path) -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(copy), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, "PYTHONDONTWRITEBYTECODE": "1", "OMP_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1"}


def pytest_command(tests: tuple[str, ...] | list[str]) -> list[str]:
    return [sys.executable, "-m", "pytest", "-q", "-x", "-rf", "-p", "no:cacheprovider", "-o", "addopts=", *tests]


def run_pytest(copy: Path, tests: tuple[str, ...] | list[str], timeout: float) -> tuple[int | None, str, float]:
    """Exit code (None: timed out), output and seconds of one pytest run in ``copy``."""
    start = time.monotonic()
    try:
        proc = subprocess.run(pytest_command(tests), cwd=copy, env=child_env(copy), capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired as err:
        out = err.stdout.decode() if isinstance(err.stdout, bytes) else (err.stdout or "")
        return None, out, time.monotonic() - start
    return proc.returncode, proc.stdout + proc.stderr, time.monotonic() - start


def first_failure(output: str) -> str:
    for line in output.splitlines():
        if line.startswith(("FAILED ", "ERROR ")):
            return line.split(" ", 1)[1].split(" - ")[0]
    return ""


def check_copy_imports_itself(copy: Path) -> None:
    """The copy's tests must import the copy's package, not an installed checkout."""
    found = subprocess.run([sys.executable, "-c", "import cmssft; print(cmssft.__file__)"], cwd=copy,
                           env=child_env(copy), capture_output=True, text=True, check=True).stdout.strip()
    if not Path(found).resolve().is_relative_to(copy.resolve()):
        raise SystemExit(f"the copy imports cmssft from {found}, not from {copy}")


def snippet_count(root: Path, mutant: Mutant) -> int:
    path = root / mutant.path
    return path.read_text().count(mutant.before) if path.is_file() else 0


def run_mutant(copy: Path, mutant: Mutant, tests: list[str], timeout: float) -> Outcome:
    outcome = Outcome(mutant.name, mutant.path, mutant.bug, "stale", accepted=mutant.accepted)
    path = copy / mutant.path
    if snippet_count(copy, mutant) != 1:
        return outcome
    original = path.read_text()
    path.write_text(original.replace(mutant.before, mutant.after))
    try:
        code, output, outcome.seconds = run_pytest(copy, tests or list(mutant.tests), timeout)
    finally:
        path.write_text(original)
    outcome.tail = output[-3000:]
    if code is None:
        outcome.status, outcome.caught_by = "killed", f"timeout after {timeout:.0f} s"
    elif code == 0:
        outcome.status = "survived"
    elif code in (1, 2):  # 2: collection error or interrupted by -x after an error
        outcome.status, outcome.caught_by = "killed", first_failure(output) or f"pytest exit {code}"
    else:
        outcome.status, outcome.caught_by = "error", f"pytest exit {code}"
    return outcome


def run_all(mutants: list[Mutant], args: argparse.Namespace, workdir: Path) -> list[Outcome]:
    """Mutants on ``args.jobs`` copies of the checkout, in list order per copy."""
    copies = [copy_checkout(REPO_ROOT, workdir / f"copy{i}" / "checkout") for i in range(args.jobs)]
    check_copy_imports_itself(copies[0])
    if not args.no_baseline:
        tests = [] if args.suite else args.tests or sorted({t for m in mutants for t in m.tests})
        print(f"baseline: {'the whole suite' if args.suite else f'{len(tests)} test selections'} on the clean copy",
              flush=True)
        code, output, seconds = run_pytest(copies[0], tests, args.timeout * 4)
        if code != 0:
            print(output[-4000:])
            raise SystemExit(f"the clean copy fails its tests (exit {code}); fix that first or pass --no-baseline")
        print(f"baseline passed in {seconds:.0f} s", flush=True)
    todo: queue.Queue[tuple[int, Mutant]] = queue.Queue()
    for item in enumerate(mutants):
        todo.put(item)
    results: dict[int, Outcome] = {}
    lock = threading.Lock()

    def worker(copy: Path) -> None:
        while True:
            try:
                index, mutant = todo.get_nowait()
            except queue.Empty:
                return
            outcome = run_mutant(copy, mutant, ["tests"] if args.suite else args.tests or [], args.timeout)
            with lock:
                results[index] = outcome
                print(f"[{len(results)}/{len(mutants)}] {outcome.name}: {outcome.status} "
                      f"({outcome.seconds:.0f} s) {outcome.caught_by}", flush=True)

    if len(copies) == 1:  # in this thread, so that Ctrl-C stops pytest and the copies are removed
        worker(copies[0])
    else:
        threads = [threading.Thread(target=worker, args=(copy,), daemon=True) for copy in copies]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    return [results[i] for i in range(len(mutants))]


def markdown(outcomes: list[Outcome]) -> str:
    lines = ["| mutant | module | deliberate bug | result | caught by / why acceptable |", "|---|---|---|---|---|"]
    for o in outcomes:
        note = o.caught_by if o.status == "killed" else o.accepted if o.status == "survived" else ""
        note = note.replace("|", "\\|")
        lines.append(f"| `{o.name}` | `{o.path}` | {o.bug} | {o.status} | {note} |")
    return "\n".join(lines)


def totals(outcomes: list[Outcome]) -> dict[str, int]:
    count = {s: sum(o.status == s for o in outcomes) for s in ("killed", "survived", "stale", "error")}
    count["tried"] = count["killed"] + count["survived"] + count["error"]
    count["survived_accepted"] = sum(o.status == "survived" and bool(o.accepted) for o in outcomes)
    return count


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", metavar="NAME", help="mutant names or globs (default: all)")
    parser.add_argument("--tests", nargs="+", metavar="NODE", help="run these tests instead of each mutant's own")
    parser.add_argument("--suite", action="store_true", help="run the whole suite per mutant (slow)")
    parser.add_argument("--jobs", type=int, default=1, help="mutants run at once, each in its own copy")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per mutant before it counts as killed")
    parser.add_argument("--markdown", help="write the result table here")
    parser.add_argument("--json", help="write the outcomes here")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    parser.add_argument("--check", action="store_true", help="check every snippet occurs once here and exit")
    parser.add_argument("--no-baseline", action="store_true", help="skip the clean copy's test run")
    parser.add_argument("--keep", action="store_true", help="keep the temporary copies")
    args = parser.parse_args()
    if args.jobs < 1:
        raise SystemExit("--jobs must be at least 1")
    names = [m.name for m in MUTANTS]
    if len(set(names)) != len(names):
        raise SystemExit("mutant names must be unique")
    chosen = [m for m in MUTANTS if not args.only or any(fnmatch.fnmatch(m.name, p) for p in args.only)]
    if not chosen:
        raise SystemExit(f"no mutant matches {args.only}; --list shows them")
    if args.list:
        for m in chosen:
            print(f"{m.name:32} {m.path:34} {m.bug}")
        return
    stale = [m.name for m in chosen if snippet_count(REPO_ROOT, m) != 1]
    if args.check:
        print("\n".join(f"stale: {n}" for n in stale) or f"all {len(chosen)} snippets occur exactly once")
        raise SystemExit(1 if stale else 0)
    workdir = Path(tempfile.mkdtemp(prefix="cmssft-mutation-"))
    signal.signal(signal.SIGTERM, _interrupt)  # a terminated run removes its copies too
    try:
        outcomes = run_all(chosen, args, workdir)
    finally:
        if args.keep:
            print(f"copies kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    table = markdown(outcomes)
    count = totals(outcomes)
    summary = (f"tried {count['tried']}, killed {count['killed']}, survived {count['survived']} "
               f"({count['survived_accepted']} accepted), stale {count['stale']}, errors {count['error']}")
    print(f"\n{table}\n\n{summary}")
    for o in outcomes:
        if o.status in ("survived", "error") and not o.accepted:
            print(f"\n--- {o.name} ({o.status}): last output\n{o.tail[-1500:]}")
    if args.markdown:
        Path(args.markdown).write_text(table + "\n\n" + summary + "\n")
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(o) for o in outcomes], indent=2) + "\n")
    bad = count["stale"] + count["error"] + count["survived"] - count["survived_accepted"]
    raise SystemExit(1 if bad else 0)


if __name__ == "__main__":
    main()
