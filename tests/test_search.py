"""search.py: rank one's own folders of images with a checkpoint, as the evaluator ranks the same features."""

from __future__ import annotations

import csv
import shutil
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch

from cmssft.data.loader import build_test_loader
from cmssft.data.records import Modality, Sample
from cmssft.engine.checkpoint import load_checkpoint, save_atomic
from cmssft.engine.entry import train_main
from cmssft.engine.inference import extract_features, model_from_checkpoint, scorer_score_fn
from cmssft.errors import run_cli
from cmssft.evaluation.evaluator import Evaluator
from cmssft.evaluation.features_io import read_feature_file
from cmssft.evaluation.metrics import ranked_top_k
from cmssft.evaluation.protocols import Protocol, Trial
from cmssft.scoring import DistanceBlocks
from cmssft.search import folder_modality, main

from .conftest import REPO_ROOT, TINY_CHECKPOINT_RUN

TINY_TRAIN = [*TINY_CHECKPOINT_RUN, "eval.trials=1"]
TOPK = 5


@pytest.fixture(scope="module")
def checkpoint(module_scratch, sysu_root):
    run_dir = module_scratch / "tiny"
    assert train_main(["--run-dir", str(run_dir), f"data.root={sysu_root}", *TINY_TRAIN]) == 0
    return run_dir / "best.pth"


def read_csv(path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def search(checkpoint, query, gallery, out, *extra) -> int:
    return run_cli(main, ["--checkpoint", str(checkpoint), "--query", str(query), "--gallery", str(gallery),
                          "--out", str(out), "--topk", str(TOPK), "--workers", "0", "--device", "cpu", *extra])


@pytest.fixture(scope="module")
def searched(checkpoint, sysu_root, module_scratch):
    """IR queries (camera 3) against an RGB gallery (camera 1), modalities left to the pixels."""
    out = module_scratch / "search"
    out.mkdir()
    assert search(checkpoint, sysu_root / "cam3", sysu_root / "cam1", out) == 0
    return out


def test_csv_order_is_the_evaluators_ranking_of_the_same_features(searched, sysu_root):
    query = read_feature_file(searched / "query_features.npz")
    gallery = read_feature_file(searched / "gallery_features.npz")
    n_q, n_g = len(query.paths), len(gallery.paths)
    assert n_q == len(list((sysu_root / "cam3").rglob("*.jpg")))
    assert n_g == len(list((sysu_root / "cam1").rglob("*.jpg")))
    assert (query.modality == 1).all() and (gallery.modality == 0).all()  # gray -> IR, colour -> RGB
    samples = [Sample(f"q/{p}", 0, 3, Modality.IR) for p in query.paths]
    samples += [Sample(f"g/{p}", 0, 1, Modality.RGB) for p in gallery.paths]
    protocol = Protocol("custom", "search", samples, [Trial(0, np.arange(n_q), n_q + np.arange(n_g))], "none", False)
    bank = {key: torch.from_numpy(np.concatenate([getattr(query, key), getattr(gallery, key)]))
            for key in ("specific", "modality")}
    bank["shared"] = torch.from_numpy(np.concatenate([query.features, gallery.features]))
    score = scorer_score_fn(query.scorer_config, query.scorer_state, "transductive", "cpu", "query_features.npz")
    dist = Evaluator(score).distances(protocol, protocol.trials[0], bank)
    order = torch.sort(dist, dim=1, stable=True).indices[:, :TOPK]
    rows = read_csv(searched / "results.csv")
    assert len(rows) == n_q * TOPK
    for qi, name in enumerate(query.paths):
        mine = [r for r in rows if r["query"] == name]
        assert [int(r["rank"]) for r in mine] == list(range(1, TOPK + 1))
        assert [r["gallery"] for r in mine] == [gallery.paths[i] for i in order[qi].tolist()], name
        assert np.allclose([float(r["distance"]) for r in mine], dist[qi, order[qi]].numpy(), atol=1e-6, rtol=1e-5)
        assert {r["query_modality"] for r in mine} == {"ir"} and {r["gallery_modality"] for r in mine} == {"rgb"}


def test_features_are_the_evaluation_pipelines(searched, checkpoint, sysu_root):
    """search.py reads and resizes images as evaluation does: the same features for the same files."""
    state = load_checkpoint(checkpoint)
    model, cfg = model_from_checkpoint(state, "tiny")
    saved = read_feature_file(searched / "gallery_features.npz")
    samples = [Sample(str(sysu_root / "cam1" / p), 0, 1, Modality.RGB) for p in saved.paths]
    bank = extract_features(model, build_test_loader(cfg, samples), torch.device("cpu"), flip=cfg.eval.flip,
                            progress=False)
    assert torch.allclose(bank["shared"], torch.from_numpy(saved.features), atol=1e-5)
    assert torch.allclose(bank["specific"], torch.from_numpy(saved.specific), atol=1e-5)


def test_pictures_and_image_list(searched, sysu_root):
    pictures = sorted((searched / "pictures").glob("*.png"))
    assert len(pictures) == len(list((sysu_root / "cam3").rglob("*.jpg")))
    image = cv2.imread(str(pictures[0]))
    assert image.shape[0] > 192 and image.shape[1] > (TOPK + 1) * 96  # title + tiles + captions
    caption = image[-20:]  # the last caption line: file names in dark text on white
    assert (caption < 100).any() and (caption > 250).mean() > 0.5
    listed = read_csv(searched / "images.csv")
    assert {(r["role"], r["modality"], r["modality_from"], r["status"]) for r in listed} == {
        ("query", "ir", "pixels (gray)", "ok"), ("gallery", "rgb", "pixels (colour)", "ok")}


def test_any_size_unreadable_images_skipped_and_folder_names(checkpoint, sysu_root, tmp_path, capsys):
    query = tmp_path / "night_ir"  # the folder name says IR
    query.mkdir()
    for i, path in enumerate(sorted((sysu_root / "cam3").rglob("*.jpg"))[:3]):
        big = cv2.resize(cv2.imread(str(path)), (77 + 40 * i, 201))  # any size, any aspect
        cv2.imwrite(str(query / f"person{i}.png"), big)
    (query / "empty.jpg").write_bytes(b"")
    (query / "cut.jpg").write_bytes((sysu_root / "cam3" / "0001" / "0001.jpg").read_bytes()[:200])
    gallery = tmp_path / "gallery"
    shutil.copytree(sysu_root / "cam1", gallery / "visible")
    out = tmp_path / "out"
    assert search(checkpoint, query, gallery, out, "--pictures", "1", "--mode", "off") == 0
    captured = capsys.readouterr()
    assert "warning: skipped 2 unreadable query image(s): cut.jpg (truncated JPEG (no end-of-image marker)), " \
           "empty.jpg (empty file (0 bytes))" in captured.err
    assert "3 IR (folder 'night_ir')" in captured.out and "RGB (folder 'visible')" in captured.out
    rows = read_csv(out / "results.csv")
    assert sorted({r["query"] for r in rows}) == ["person0.png", "person1.png", "person2.png"]
    assert {r["gallery"].split("/")[0] for r in rows} == {"visible"}
    skipped = {r["path"]: r["status"] for r in read_csv(out / "images.csv") if r["status"] != "ok"}
    assert set(skipped) == {"empty.jpg", "cut.jpg"} and all(s.startswith("skipped: ") for s in skipped.values())
    assert len(list((out / "pictures").glob("*.png"))) == 1


def test_csv_lists_and_forced_modality(checkpoint, sysu_root, tmp_path):
    listing = tmp_path / "query.csv"
    names = [p.relative_to(sysu_root).as_posix() for p in sorted((sysu_root / "cam3").rglob("*.jpg"))[:2]]
    listing.write_text("path,modality\n" + f"{sysu_root / names[0]},rgb\n" + f"{sysu_root / names[1]},\n")
    out = tmp_path / "out"
    assert search(checkpoint, listing, sysu_root / "cam1", out, "--gallery-modality", "ir", "--pictures", "0") == 0
    listed = {(r["role"], r["modality"], r["modality_from"]) for r in read_csv(out / "images.csv")}
    assert listed == {("query", "rgb", "list"), ("query", "ir", "pixels (gray)"),
                      ("gallery", "ir", "--gallery-modality")}


def test_bad_input_is_one_line_exit_2(checkpoint, sysu_root, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no images here")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "a.jpg").write_bytes(b"not a jpeg")
    resnet = tmp_path / "resnet.pth"  # weights of another network, with and without a cmssft envelope
    weights = {"conv1.weight": torch.zeros(64, 3, 7, 7), "fc.weight": torch.zeros(1000, 512)}
    save_atomic(weights, resnet)
    foreign = tmp_path / "foreign.pth"
    state = load_checkpoint(checkpoint)
    save_atomic({"model": weights, "config": state["config"], "num_classes": state["num_classes"]}, foreign)
    gallery = sysu_root / "cam1"
    cases = [
        (checkpoint, empty, gallery, "holds no images"),
        (checkpoint, tmp_path / "nowhere", gallery, "does not exist"),
        (checkpoint, broken, gallery, "none of its 1 images can be read"),
        (resnet, sysu_root / "cam3", gallery, "is not a cmssft checkpoint"),
        (foreign, sysu_root / "cam3", gallery, "does not match this model's architecture"),
    ]
    for ckpt, query, gal, message in cases:
        capsys.readouterr()
        assert search(ckpt, query, gal, tmp_path / "out") == 2, message
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("error: ") and message in err[-1], err
        assert all(not line.startswith("error") for line in err[:-1])
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "search.py"), "--checkpoint", str(checkpoint), "--query",
                           str(empty), "--gallery", str(gallery), "--out", str(tmp_path / "o")],
                          capture_output=True, text=True, cwd=REPO_ROOT)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0 and "holds no images" in proc.stderr


def test_folder_modality_words():
    assert folder_modality("Thermal") == folder_modality("test_nir") == folder_modality("IR") == Modality.IR
    assert folder_modality("Visible") == folder_modality("vis") == folder_modality("rgb_day") == Modality.RGB
    assert folder_modality("cam3") is folder_modality("irregular") is folder_modality("ir_and_rgb") is None


def test_ranked_top_k_orders_ties_by_gallery_index_blockwise():
    generator = torch.Generator().manual_seed(0)
    dist = torch.randint(0, 4, (37, 50), generator=generator).float()  # many ties, also across the k-th place
    expected = torch.sort(dist, dim=1, stable=True)
    blocks = DistanceBlocks(dist.shape, lambda a, b: dist[a:b], block_rows=8)
    for source in (dist, blocks):
        index, values = ranked_top_k(source, 7)
        assert torch.equal(index, expected.indices[:, :7]) and torch.equal(values, expected.values[:, :7])
    index, _ = ranked_top_k(dist[:, :3], 10)
    assert index.shape == (37, 3)
