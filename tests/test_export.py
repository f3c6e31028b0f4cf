"""python -m cmssft.export: the feature extractor as one ONNX graph, equal to PyTorch's features."""

from __future__ import annotations

import sys

import pytest
import torch

from cmssft.config import config_to_dict, load_config
from cmssft.data.transforms import normalize
from cmssft.engine.checkpoint import save_atomic
from cmssft.errors import run_cli
from cmssft.export import FeatureGraph, export_onnx, main
from cmssft.models import build_model

from .conftest import TINY_DATA

NUM_CLASSES = 4
HEIGHT, WIDTH = 64, 32


def random_images(batch: int, seed: int) -> torch.Tensor:
    """Random pixels in [0, 1], normalised as the test transform does: [B, 3, H, W]."""
    pixels = torch.rand(batch, 3, HEIGHT, WIDTH, generator=torch.Generator().manual_seed(seed))
    return torch.stack([normalize(p) for p in pixels])


@pytest.fixture(scope="module")
def model_and_checkpoint(module_scratch):
    """A small two-stream model whose BatchNorm statistics come from images (features of order 1), saved as
    train.py saves best.pth."""
    cfg = load_config(None, [*TINY_DATA, "model.specific_from=layer4"])
    torch.manual_seed(0)
    model = build_model(cfg, NUM_CLASSES)
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.reset_running_stats()
            module.momentum = None  # cumulative averages over the calibration batches
    model.train()
    with torch.no_grad():
        for seed in range(2):
            model(random_images(8, seed), torch.arange(8) % 2)
    model.eval()
    path = module_scratch / "best.pth"
    save_atomic({"model": model.state_dict(), "config": config_to_dict(cfg), "num_classes": NUM_CLASSES}, path)
    return model, path


def evaluation_features(model, images, modality) -> dict[str, torch.Tensor]:
    """What extract_features computes: the image and its mirror averaged."""
    plain, mirrored = model.extract(images, modality), model.extract(images.flip(-1), modality)
    return {k: (plain[k] + mirrored[k]) / 2 for k in ("shared", "specific")}


def test_graph_computes_the_evaluation_features_without_grouping(model_and_checkpoint):
    model, _ = model_and_checkpoint
    images, modality = random_images(5, 7), torch.tensor([1, 0, 0, 1, 1])
    expected = evaluation_features(model, images, modality)
    shared, specific = FeatureGraph(model, (0, 1), flip=True)(images, modality)
    assert torch.allclose(shared, expected["shared"], atol=1e-5)
    assert torch.allclose(specific, expected["specific"], atol=1e-5)
    ir = FeatureGraph(model, (1,), flip=True)(images)
    only_ir = evaluation_features(model, images, torch.ones(5, dtype=torch.long))
    assert torch.allclose(ir[0], only_ir["shared"], atol=1e-5) and torch.allclose(ir[1], only_ir["specific"], atol=1e-5)
    assert not torch.allclose(ir[1], specific, atol=1e-3)  # the modality input matters


def onnx_features(path, images, modality=None) -> list[torch.Tensor]:
    ort = pytest.importorskip("onnxruntime")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {"images": images.numpy()} | ({} if modality is None else {"modality": modality.numpy()})
    return [torch.from_numpy(out) for out in session.run(None, feeds)]


def test_onnx_runtime_features_equal_pytorchs(model_and_checkpoint, tmp_path, capsys):
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    model, checkpoint = model_and_checkpoint
    out = tmp_path / "model.onnx"
    assert run_cli(main, ["--checkpoint", str(checkpoint), "--format", "onnx", "--out", str(out)]) == 0
    assert "ONNX Runtime vs PyTorch on random images" in capsys.readouterr().out
    for batch, seed in ((1, 1), (6, 2)):  # one graph, any batch size
        images, modality = random_images(batch, seed), torch.arange(batch) % 2
        expected = evaluation_features(model, images, modality)
        shared, specific = onnx_features(out, images, modality)
        assert 0.1 < expected["shared"].abs().max() < 100  # features of order 1: 1e-4 is a real bound
        assert (shared - expected["shared"]).abs().max() < 1e-4
        assert (specific - expected["specific"]).abs().max() < 1e-4
    proto = onnx.load(str(out), load_external_data=False)
    assert [i.name for i in proto.graph.input] == ["images", "modality"]
    assert [o.name for o in proto.graph.output] == ["shared", "specific"]
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # a named, dynamic batch dimension
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["height"] == str(HEIGHT) and meta["width"] == str(WIDTH) and meta["flip"] == "true"


def test_dynamo_exporter_one_modality(model_and_checkpoint, tmp_path):
    """The torch.export-based exporter gives the same graph (called directly: it alone takes ~10 s here)."""
    pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    pytest.importorskip("onnxruntime")
    model, _ = model_and_checkpoint
    out = tmp_path / "ir.onnx"
    export_onnx(FeatureGraph(model, (1,), flip=False), HEIGHT, WIDTH, out, exporter="dynamo")
    images = random_images(3, 3)
    expected = model.extract(images, torch.ones(3, dtype=torch.long))
    shared, specific = onnx_features(out, images)
    assert (shared - expected["shared"]).abs().max() < 1e-4
    assert (specific - expected["specific"]).abs().max() < 1e-4


def test_bad_input_is_one_line_exit_2(model_and_checkpoint, tmp_path, capsys, monkeypatch):
    _, checkpoint = model_and_checkpoint
    other = tmp_path / "other.pth"
    save_atomic({"conv1.weight": torch.zeros(64, 3, 7, 7)}, other)
    assert run_cli(main, ["--checkpoint", str(other), "--out", str(tmp_path / "m.onnx")]) == 2
    assert run_cli(main, ["--checkpoint", str(checkpoint), "--out", str(tmp_path / "no" / "m.onnx")]) == 2
    monkeypatch.setitem(sys.modules, "onnx", None)  # as if the onnx extra were not installed
    assert run_cli(main, ["--checkpoint", str(checkpoint), "--out", str(tmp_path / "m.onnx")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith("error: ") for line in err)
    assert "is not a cmssft checkpoint" in err[0] and "does not exist" in err[1]
    assert 'pip install -e ".[onnx]"' in err[2]
