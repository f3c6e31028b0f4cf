"""Export a checkpoint's feature extractor for inference runtimes.

``python -m cmssft.export --checkpoint best.pth --format onnx --out model.onnx`` writes one ONNX
graph (needs the ``onnx`` extra: ``pip install -e ".[onnx]"``):

==========  =======  ============  ==========================================================
name        dtype    shape         meaning
==========  =======  ============  ==========================================================
images      float32  [B, 3, H, W]  RGB order, scaled to [0, 1], normalised with ImageNet mean
                                   and std; H x W = the checkpoint's data.height x data.width;
                                   IR images as gray replicated to 3 channels
modality    int64    [B]           0 RGB, 1 IR per image (absent with ``--modality rgb|ir``)
shared      float32  [B, C]        output: the bank's shared part (BN-neck features; AGW: its "FC"
                                   feature, L2-normalised)
specific    float32  [B, C]        output: cm-SSFT's modality-specific part (models with that branch)
pool        float32  [B, C]        output: AGW's pooled ("POOL") feature, L2-normalised (AGW only)
==========  =======  ============  ==========================================================

B is dynamic. These are the features evaluation extracts (the image and its mirror averaged when
the checkpoint's ``eval.flip`` is on; ``--no-flip`` for one pass); their SSTN scoring or cosine
ranking stays in Python (``eval.py --features``). With ``--modality both`` (default) every image
goes through both modality-specific paths and keeps its own modality's result: a graph cannot send
rows to different layers without data-dependent shapes. ``--modality rgb`` or ``ir`` exports that
modality's path alone (less work per image) for batches of that modality. The input size, the
normalisation and the modality codes are also written in the file's ``metadata_props``.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from cmssft.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from cmssft.engine.checkpoint import load_checkpoint
from cmssft.engine.inference import model_from_checkpoint
from cmssft.errors import UserError, run_cli

MODALITIES = {"both": (0, 1), "rgb": (0,), "ir": (1,)}
OPSET = 18
EXPORTERS = ("torchscript", "dynamo")


class FeatureGraph(nn.Module):
    """(images [B, 3, H, W], modality [B]) -> the bank features the model names in ``bank_parts`` (cm-SSFT:
    shared, specific; AGW: shared, pool), each [B, C], with no data-dependent shapes; with one modality,
    images -> features of that modality."""

    def __init__(self, model: nn.Module, modalities: Sequence[int] = (0, 1), flip: bool = True) -> None:
        super().__init__()
        if not hasattr(model, "extract_modality") or not hasattr(model, "bank_parts"):
            raise UserError(f"{type(model).__name__} cannot be exported: it lacks extract_modality or bank_parts "
                            "(cm-SSFT and AGW have both)")
        self.model = model.eval()
        self.modalities = tuple(modalities)
        self.flip = flip
        self.eval()  # running statistics in every BatchNorm: what evaluation computes

    def features(self, images: torch.Tensor, modality: int) -> list[torch.Tensor]:
        bank = self.model.extract_modality(images, modality)
        if self.flip:
            mirrored = self.model.extract_modality(images.flip(-1), modality)
            bank = {k: (v + mirrored[k]) / 2 for k, v in bank.items()}
        return [bank[k] for k in self.model.bank_parts]

    def forward(self, images: torch.Tensor, modality: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        outputs = self.features(images, self.modalities[0])
        for m in self.modalities[1:]:
            keep = (modality == m).unsqueeze(1)
            outputs = [torch.where(keep, mine, other)
                       for other, mine in zip(outputs, self.features(images, m), strict=True)]
        return tuple(outputs)


def output_names(model: nn.Module) -> list[str]:
    return list(model.bank_parts)


def export_onnx(graph: FeatureGraph, height: int, width: int, path: Path, opset: int = OPSET,
                exporter: str = "torchscript") -> None:
    """Write ``graph`` as one ONNX file with a dynamic batch dimension.

    ``torchscript``: PyTorch's tracing exporter (``dynamo=False``; needs ``onnx``), several times
    faster here; ``dynamo``: the ``torch.export`` one (also needs ``onnxscript``). Both give the
    same features to float precision.
    """
    needed = ("onnx", "onnxscript") if exporter == "dynamo" else ("onnx",)
    for module in needed:
        try:
            __import__(module)
        except ImportError:
            raise UserError(f"ONNX export needs the onnx extra ({module} is missing): pip install -e \".[onnx]\"") \
                from None
    both = len(graph.modalities) > 1
    example = (torch.randn(2, 3, height, width),) + ((torch.tensor([0, 1]),) if both else ())
    inputs = ["images", "modality"] if both else ["images"]
    outputs = output_names(graph.model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the tracing exporter announces its successor
        warnings.filterwarnings("ignore", message=".*axis name.*")  # the dynamo exporter: images, modality share B
        if exporter == "dynamo":
            batch = torch.export.Dim("batch", min=1)
            program = torch.onnx.export(graph, example, dynamo=True, input_names=inputs, output_names=outputs,
                                        dynamic_shapes={name: {0: batch} for name in inputs}, opset_version=opset,
                                        external_data=False, verbose=False)
            program.save(str(path), external_data=False)
        else:
            torch.onnx.export(graph, example, str(path), dynamo=False, input_names=inputs, output_names=outputs,
                              dynamic_axes={name: {0: "batch"} for name in inputs + outputs}, opset_version=opset)


def write_metadata(path: Path, info: dict[str, object]) -> None:
    """Record how to feed the graph in its ``metadata_props`` (strings; lists and dicts as JSON)."""
    import onnx

    proto = onnx.load(str(path))
    for key, value in info.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value if isinstance(value, str) else json.dumps(value)
    onnx.save(proto, str(path))


def parity(graph: FeatureGraph, path: Path, height: int, width: int, batch: int = 3) -> tuple[float, float] | None:
    """Largest |ONNX Runtime - PyTorch| over the outputs for random images, and the largest |feature|
    (the scale it compares with); None without onnxruntime."""
    try:
        import onnxruntime
    except ImportError:
        return None
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, height, width, generator=generator)
    modality = torch.arange(batch) % 2 if len(graph.modalities) > 1 else None
    with torch.no_grad():
        expected = graph(images) if modality is None else graph(images, modality)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {"images": images.numpy()} | ({} if modality is None else {"modality": modality.numpy()})
    got = session.run(None, feeds)
    diff = max(float((torch.from_numpy(g) - e).abs().max()) for g, e in zip(got, expected, strict=True))
    return diff, max(float(e.abs().max()) for e in expected)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m cmssft.export",
                                description="Export a checkpoint's feature extractor for inference runtimes.")
    p.add_argument("--checkpoint", required=True, help="best.pth or last.pth of a run")
    p.add_argument("--format", choices=["onnx"], default="onnx")
    p.add_argument("--out", required=True, help="the file to write, e.g. model.onnx")
    p.add_argument("--modality", choices=list(MODALITIES), default="both",
                   help="both (inputs images and modality), or one modality's path alone (input images)")
    p.add_argument("--no-flip", action="store_true", help="one pass per image instead of the image and its mirror")
    p.add_argument("--opset", type=int, default=OPSET, help="ONNX opset version")
    p.add_argument("--exporter", choices=EXPORTERS, default="torchscript",
                   help="PyTorch's tracing exporter (dynamo=False, fast) or the torch.export one (needs onnxscript)")
    p.add_argument("--debug", action="store_true", help="show tracebacks of user errors")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out = Path(args.out)
    if not out.parent.is_dir():
        raise UserError(f"--out {out}: folder {out.parent} does not exist")
    state = load_checkpoint(args.checkpoint)
    model, cfg = model_from_checkpoint(state, str(args.checkpoint))
    flip = cfg.eval.flip and not args.no_flip
    graph = FeatureGraph(model, MODALITIES[args.modality], flip=flip)
    height, width = cfg.data.height, cfg.data.width
    export_onnx(graph, height, width, out, args.opset, args.exporter)
    write_metadata(out, {"height": str(height), "width": str(width), "mean": list(IMAGENET_MEAN),
                         "std": list(IMAGENET_STD), "modality_codes": {"rgb": 0, "ir": 1},
                         "modalities": args.modality, "flip": str(flip).lower(), "outputs": output_names(model)})
    compared = parity(graph, out, height, width)
    check = "onnxruntime not installed: not compared" if compared is None else \
        f"ONNX Runtime vs PyTorch on random images: max |difference| {compared[0]:.1e} (largest |feature| " \
        f"{compared[1]:.1e})"
    inputs = f"images [B,3,{height},{width}]" + (", modality [B]" if args.modality == "both" else "")
    print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB): {inputs} -> {', '.join(output_names(model))}; "
          f"flip {'on' if flip else 'off'}; {check}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
