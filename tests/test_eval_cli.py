"""eval.py end to end with a features file on tiny trees, plus the evaluator contract."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from cmssft.data.datasets import load_dataset
from cmssft.errors import UserError, run_cli
from cmssft.evaluation import Evaluator, summarize, sysu_community
from cmssft.evaluation.cli import main
from cmssft.evaluation.features_io import save_features
from cmssft.evaluation.report import COMPARABLE
from cmssft.evaluation.visualize import GREEN, RED, ranked_lists_image, save_png

REPO = Path(__file__).resolve().parents[1]
TEST_IDS = [4, 5, 6, 7, 8, 9]


def make_tree(root: Path) -> Path:
    """Empty-file SYSU-MM01 tree: ids 1-3 train/val, 4-9 test, 3 images per camera."""
    for pid in range(1, 10):
        for cam in range(1, 7):
            if pid == 6 and cam == 2:
                continue
            folder = root / f"cam{cam}" / f"{pid:04d}"
            folder.mkdir(parents=True, exist_ok=True)
            for j in range(1, 4):
                (folder / f"{j:04d}.jpg").touch()
    (root / "exp").mkdir()
    (root / "exp" / "train_id.txt").write_text("1,2\n")
    (root / "exp" / "val_id.txt").write_text("3\n")
    (root / "exp" / "test_id.txt").write_text(",".join(map(str, TEST_IDS)) + "\n")
    return root


def all_paths(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.glob("cam*/*/*.jpg"))


def identity_features(paths: list[str], dim: int = 16, noise: float = 0.0, seed: int = 0) -> np.ndarray:
    """One direction per identity (plus noise): noise 0 gives perfect retrieval."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(20, dim))
    pids = [int(p.split("/")[1]) for p in paths]
    return (centers[pids] + noise * rng.normal(size=(len(paths), dim))).astype(np.float32)


@pytest.fixture()
def setup(tmp_path):
    root = make_tree(tmp_path / "SYSU-MM01")
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"data:\n  name: sysu_mm01\n  root: {root}\n")
    paths = all_paths(root)
    feats = tmp_path / "feats.npz"
    save_features(feats, paths, identity_features(paths))
    return root, cfg, feats, paths


def test_features_end_to_end_json(setup, tmp_path, capsys):
    root, cfg, feats, _ = setup
    out = tmp_path / "res.json"
    assert run_cli(main, ["--config", str(cfg), "--features", str(feats), "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["protocol"] == "sysu"
    assert len(result["trials"]) == 10
    for trial in result["trials"]:
        assert len(trial["cmc"]) == 20 and all(0 <= v <= 1 for v in trial["cmc"])
        assert trial["num_query"] == len(TEST_IDS) * 2 * 3
        assert trial["num_gallery"] == len(TEST_IDS) * 4 - 1  # id 6 has no camera 2
        assert trial["mAP"] == pytest.approx(1.0) and trial["mINP"] == pytest.approx(1.0)
    assert set(result["mean"]) == set(result["std"]) == {"rank1", "rank5", "rank10", "rank20", "mAP", "mINP"}
    assert result["mean"]["rank1"] == pytest.approx(1.0) and result["std"]["mAP"] == pytest.approx(0.0)
    printed = capsys.readouterr().out
    assert "mean" in printed and "+- std" in printed and "100.00" in printed
    title = f"test, no transfer (cosine of the features) [{COMPARABLE['inductive']}]: SYSU-MM01"
    assert printed.startswith(title)  # titled as train.py titles
    assert "chance level (random ranking): rank-1 " in printed


def test_noisy_features_and_flags(setup, tmp_path):
    """``--mode``, ``--trials``, ``--vis`` and ``--rerank``: re-ranking gives exactly the re-ranked evaluator's
    numbers, which differ from the plain ones (so the flag cannot be silently dropped)."""
    root, cfg, _, paths = setup
    feats = tmp_path / "noisy.npz"
    save_features(feats, paths, identity_features(paths, noise=3.0, seed=1))
    argv = ["--config", str(cfg), "--features", str(feats), "--mode", "indoor", "--trials", "3",
            "--vis", str(tmp_path / "vis"), "eval.batch_size=8"]
    outputs = {}
    for name, extra in (("plain", []), ("reranked", ["--rerank"])):
        out = tmp_path / f"{name}.json"
        assert run_cli(main, [*argv, *extra, "--json", str(out)]) == 0
        outputs[name] = json.loads(out.read_text())
    result = outputs["reranked"]
    assert len(result["trials"]) == 3 and result["settings"]["mode"] == "indoor"
    assert result["trials"][0]["num_gallery"] == len(TEST_IDS) * 2 - 1
    assert (tmp_path / "vis" / "sysu_trial0.png").is_file()
    assert result["settings"]["rerank"] is True and outputs["plain"]["settings"]["rerank"] is False

    dataset = load_dataset("sysu_mm01", root)
    protocol = sysu_community(dataset, "indoor", trials=3)
    rows = {p: i for i, p in enumerate(paths)}
    saved = identity_features(paths, noise=3.0, seed=1)
    bank = torch.from_numpy(saved[[rows[Path(s.path).relative_to(root).as_posix()] for s in protocol.candidates]])
    for name, rerank in (("plain", False), ("reranked", True)):
        expected = summarize("sysu", Evaluator(rerank=rerank).evaluate(protocol, bank))
        got = outputs[name]
        assert got["mean"] == pytest.approx(expected["mean"], abs=1e-12), name
        for trial, want in zip(got["trials"], expected["trials"], strict=True):
            assert trial["cmc"] == pytest.approx(want["cmc"], abs=1e-12)
            assert trial["mAP"] == pytest.approx(want["mAP"], abs=1e-12)
    assert outputs["plain"]["mean"]["mAP"] != pytest.approx(result["mean"]["mAP"], abs=1e-4)


def test_missing_candidates_is_a_user_error(setup, tmp_path, capsys):
    root, cfg, _, paths = setup
    partial = tmp_path / "partial.npz"
    kept = [p for p in paths if not p.startswith("cam1/0005/")]
    save_features(partial, kept, identity_features(kept))
    assert run_cli(main, ["--config", str(cfg), "--features", str(partial)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "lacks 3 of" in err and "cam1/0005/0001.jpg" in err


def test_user_errors_exit_2(setup, tmp_path, capsys):
    root, cfg, feats, _ = setup
    assert run_cli(main, ["--config", str(cfg), "--features", str(tmp_path / "nope.npz")]) == 2
    assert run_cli(main, ["--config", str(cfg), "--features", str(feats), "--protocol", "regdb"]) == 2
    assert run_cli(main, ["--config", str(cfg), "--features", str(feats), "--shots", "10"]) == 2
    assert run_cli(main, ["--config", str(cfg), "--features", str(feats), "--protocol", "sysu-official"]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "rand_perm_cam.mat" in err


def test_eval_script_runs(setup, tmp_path):
    _, cfg, feats, _ = setup
    out = tmp_path / "script.json"
    proc = subprocess.run([sys.executable, str(REPO / "eval.py"), "--config", str(cfg), "--features", str(feats),
                           "--trials", "2", "--json", str(out)], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert len(json.loads(out.read_text())["trials"]) == 2


def test_evaluator_dict_bank_and_score_fn(setup):
    root, _, _, _ = setup
    dataset = load_dataset("sysu_mm01", root)
    protocol = sysu_community(dataset, trials=2)
    n = len(protocol.candidates)
    bank = {"shared": torch.randn(n, 8), "pid": torch.tensor([s.pid for s in protocol.candidates])}
    seen = []

    def score(q, g):  # an oracle that only looks at identities
        seen.append((len(q["pid"]), len(g["pid"])))
        return (q["pid"][:, None] != g["pid"][None, :]).float()

    results = Evaluator(score).evaluate(protocol, bank)
    assert [r.trial for r in results] == [0, 1]
    assert all(r.metrics.rank(1) == 1.0 for r in results)
    assert seen == [(len(protocol.trials[0].query_idx), len(protocol.trials[0].gallery_idx))] * 2
    with pytest.raises(TypeError, match="score_fn"):
        Evaluator().evaluate(protocol, bank)


def test_ranked_list_picture(setup, tmp_path):
    """Each row: the query, then its top-k in distance order with the exclusion applied, framed green for the
    query's identity and red for any other."""
    root, _, _, _ = setup
    protocol = sysu_community(load_dataset("sysu_mm01", root), trials=1)
    trial = protocol.trials[0]
    queries, gallery = protocol.query_samples(trial), protocol.gallery_samples(trial)
    chosen = [next(i for i, q in enumerate(queries) if q.camid == cam and q.pid == 5) for cam in (3, 6)]
    # camera-2 images nearest of all, the query's own identity next, the rest in a shuffled order
    order = torch.randperm(len(gallery), generator=torch.Generator().manual_seed(0)).double()
    dist = torch.stack([torch.tensor([0.0 if g.camid == 2 else 1.0 if g.pid == queries[qi].pid else 2.0 + order[j]
                                      for j, g in enumerate(gallery)]) for qi in range(len(queries))])
    k, height, width, border, gap = 8, 32, 16, 4, 12  # the picture's default frame and gap
    image = ranked_lists_image(dist, queries, gallery, chosen, k=k, exclusion="sysu", height=height, width=width)
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
    tile, row_height = width + 2 * border, height + 2 * border + 6
    assert image.shape[:2] == (len(chosen) * row_height, tile + gap + k * (tile + 2) - 2)  # k tiles a row
    for r, qi in enumerate(chosen):
        query = queries[qi]
        ranked = sorted(range(len(gallery)), key=lambda j: (float(dist[qi, j]), j))
        if query.camid == 3:  # SYSU-MM01: a camera-3 query never sees camera 2
            ranked = [j for j in ranked if gallery[j].camid != 2]
        expected = [gallery[j] for j in ranked[:k]]
        assert any(g.camid == 2 for g in expected) == (query.camid == 6)
        assert {g.pid == query.pid for g in expected} == {True, False}  # both frame colours occur
        top = r * row_height
        for n, g in enumerate(expected):
            left = tile + gap + n * (tile + 2)
            frame = tuple(image[top + 1, left + 1])
            assert frame == (GREEN if g.pid == query.pid else RED), (r, n)
            assert tuple(image[top + border + 2, left + border + 2]) == (128, 128, 128)  # the (unreadable) image
    path = save_png(image, tmp_path / "ranked.png")
    assert path.stat().st_size > 0


def make_regdb(root: Path, trials: int = 2) -> Path:
    """Tiny RegDB: 8 ids x 2 images per modality; trial t tests ids (t..t+3)."""
    (root / "idx").mkdir(parents=True)
    for t in range(1, trials + 1):
        test_ids, train_ids = list(range(t, t + 4)), [i for i in range(1, 9) if i not in range(t, t + 4)]
        for split, ids in (("train", train_ids), ("test", test_ids)):
            for modality, tag in (("visible", "Visible"), ("thermal", "Thermal")):
                lines = [f"{tag}/{pid}/{tag[0].lower()}_{j}_{pid}.bmp {k}" for k, pid in enumerate(ids) for j in (1, 2)]
                (root / "idx" / f"{split}_{modality}_{t}.txt").write_text("\n".join(lines) + "\n")
    for tag in ("Visible", "Thermal"):
        (root / tag).mkdir()
    return root


@pytest.mark.parametrize("direction", ["v2t", "t2v"])
def test_regdb_per_trial_features(tmp_path, direction):
    root = make_regdb(tmp_path / "RegDB")
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"data:\n  name: regdb\n  root: {root}\n")
    for t in (1, 2):
        paths = [f"{tag}/{pid}/{tag[0].lower()}_{j}_{pid}.bmp" for tag in ("Visible", "Thermal")
                 for pid in range(1, 9) for j in (1, 2)]
        feats = np.stack([np.eye(10)[int(p.split("/")[1])] for p in paths]).astype(np.float32)
        save_features(tmp_path / f"feats_{t}.npz", paths, feats)
    out = tmp_path / "res.json"
    argv = ["--config", str(cfg), "--features", str(tmp_path / "feats_{trial}.npz"), "--trials", "2",
            "--direction", direction, "--json", str(out)]
    assert run_cli(main, argv) == 0
    result = json.loads(out.read_text())
    assert result["protocol"] == "regdb" and [t["trial"] for t in result["trials"]] == [1, 2]
    assert all(t["num_query"] == 8 and t["num_gallery"] == 8 for t in result["trials"])
    assert result["mean"]["rank1"] == pytest.approx(1.0)
    arrow = "visible->thermal" if direction == "v2t" else "thermal->visible"
    assert result["settings"]["direction"] == direction
    assert result["settings"]["description"] == f"RegDB trials 1, 2, {arrow}"


@pytest.mark.parametrize("direction", ["ir2vis", "vis2ir"])
def test_regdb_rejects_llcm_directions(tmp_path, capsys, direction):
    root = make_regdb(tmp_path / "RegDB", trials=1)
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"data:\n  name: regdb\n  root: {root}\n")
    paths = [f"{tag}/{pid}/{tag[0].lower()}_{j}_{pid}.bmp" for tag in ("Visible", "Thermal")
             for pid in range(1, 9) for j in (1, 2)]
    save_features(tmp_path / "feats.npz", paths, np.ones((len(paths), 4), dtype=np.float32))
    argv = ["--config", str(cfg), "--features", str(tmp_path / "feats.npz"), "--direction", direction]
    assert run_cli(main, argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"RegDB direction must be v2t or t2v, got {direction!r}" in err


def test_eval_debug_flag_is_documented_and_keeps_the_traceback(setup, tmp_path):
    _, cfg, _, _ = setup
    help_text = subprocess.run([sys.executable, str(REPO / "eval.py"), "--help"], capture_output=True, text=True).stdout
    assert "--debug" in help_text
    missing = str(tmp_path / "missing.npz")
    with pytest.raises(UserError):
        run_cli(main, ["--config", str(cfg), "--features", missing, "--debug"])
    assert run_cli(main, ["--config", str(cfg), "--features", missing]) == 2
