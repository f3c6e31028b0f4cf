"""Use checkpoints trained elsewhere: ``python -m cmssft.convert --from agw sysu_agw_best.t --out agw.pth``.

``--from agw`` reads a checkpoint of AGW's public cross-modality code (mangye16/Cross-Modal-Re-ID-baseline,
``torch.save({'net': state_dict, 'cmc': array, 'mAP': float, 'mINP': float, 'epoch': int})``, or the
bare state dict) and writes a checkpoint in this toolbox's format (``best.pth``'s: weights, config,
number of classes) for the AGW model (``model.name=agw``: ResNet-50, non-local [0, 2, 3, 0] of width 1,
GeM p = 3 fixed, last stride 1, 288x144 input, no flip at test time), so ``eval.py``, ``search.py`` and
``python -m cmssft.export`` take it like a checkpoint of ``train.py``. The number of classes is read
from the classifier.

The public state dict (its ``resnet.py`` has torchvision's key names and no ``fc``) maps onto ours:

=========================================  ==================================================
public entries                             AGW model (:class:`~cmssft.models.agw.AGW`)
=========================================  ==================================================
visible_module.visible.{conv1,bn1}.*       extractor.stems.0 (RGB stem: conv1, bn1)
thermal_module.thermal.{conv1,bn1}.*       extractor.stems.1 (IR stem)
base_resnet.base.layer{s}.{i}.*            extractor.shared[s-1] block i (shared layer s)
NL_{s}.{j}.{theta,phi,g.0,W.0,W.1}.*       extractor.shared[s-1].non_local[j].{theta,phi,g,w_conv,w_bn}
bottleneck.*                               neck.bn (BN-neck)
classifier.weight [K, 2048]                classifier.weight (K classes)
=========================================  ==================================================

Dropped: what the public modules keep but never run, ``visible_module.visible.layer1..4``,
``thermal_module.thermal.layer1..4`` and ``base_resnet.base.{conv1,bn1}`` (each a whole ResNet
around the part used), and ``fc.*`` if a ResNet carries one. Every other key, a missing entry
(``num_batches_tracked`` aside, which older PyTorch did not save) or a tensor of the wrong shape is
refused in one line naming it. The file is read with ``torch.load(weights_only=True)``, allowing
only the NumPy array and scalar reconstruction its metrics need; nothing in it is executed.
"""

from __future__ import annotations

import argparse
import copy
import pickle
import sys
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from cmssft.config import Config, config_to_dict
from cmssft.engine.checkpoint import save_atomic, unpickling_reason
from cmssft.errors import UserError, run_cli
from cmssft.models import AGW, build_model
from cmssft.models.non_local import NonLocalStage

STEMS = ("visible_module.visible", "thermal_module.thermal")  # RGB, IR: the public stems' whole ResNets
TRUNK = "base_resnet.base"  # the public shared trunk's whole ResNet
NON_LOCAL_PARTS = {"theta": "theta", "phi": "phi", "g": "g.0", "w_conv": "W.0", "w_bn": "W.1"}  # ours -> public
OPTIONAL = "num_batches_tracked"  # BatchNorm counters, absent from checkpoints of PyTorch < 0.4.1
FEATURE_DIM = 2048
FORMATS = ("agw",)


def public_agw_config() -> Config:
    """The config of the public AGW model: what a converted checkpoint stores for the tools that read it."""
    cfg = Config()
    m = cfg.model
    m.name, m.backbone, m.pretrained, m.last_stride = "agw", "resnet50", "imagenet", 1
    m.pooling, m.gem_p, m.gem_learn_p, m.bnneck = "gem", 3.0, False, True
    m.non_local, m.non_local_width = [0, 2, 3, 0], 1
    m.agw.test_feature = "fc"
    cfg.data.height, cfg.data.width = 288, 144
    cfg.eval.flip = False  # the public test extracts each image once
    return cfg


# --------------------------------------------------------------------------- reading


def numpy_globals() -> list[Any]:
    """What unpickling the public checkpoint's NumPy metrics needs, and nothing more: arrays, dtypes and
    scalars, under the module names of NumPy 1.x (``numpy.core``) and 2.x (``numpy._core``): a file written
    with NumPy 1 names the first, which NumPy 2 keeps only as an alias (``(function, name)`` pairs: torch >= 2.6)."""
    try:
        from numpy._core import multiarray  # NumPy 2
    except ImportError:  # NumPy 1
        from numpy.core import multiarray
    allowed: list[Any] = [np.ndarray, np.dtype]
    allowed += sorted({type(np.dtype(code)) for code in "?bhilqBHILQefd"}, key=str)  # dtype classes (NumPy >= 1.25)
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed += [(fn, f"{module}.{fn.__name__}") for fn in (multiarray._reconstruct, multiarray.scalar)]
    return allowed


def load_foreign(path: Path) -> Any:
    """``torch.load(path, weights_only=True)`` with :func:`numpy_globals`; every failure is one line."""
    if not path.is_file():
        raise UserError(f"{path} does not exist")
    try:
        with warnings.catch_warnings(), torch.serialization.safe_globals(numpy_globals()):
            warnings.simplefilter("ignore", UserWarning)
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        reason = unpickling_reason(str(err))
        if "global" in reason.lower() or "build" in reason.lower():
            raise UserError(f"{path} was refused and nothing in it was run: it needs objects beyond tensors, "
                            f"plain values and NumPy arrays ({reason})") from None
        raise UserError(f"{path} cannot be read (not a file written by torch.save: {reason})") from None
    except Exception as err:  # noqa: BLE001 - a truncated or foreign file fails in many ways
        first = (str(err).splitlines() or [""])[0].split(". ")[0]
        raise UserError(f"{path} cannot be read ({type(err).__name__}: {first[:200]})") from None


def public_state_dict(loaded: Any, source: str) -> dict[str, Any]:
    """The state dict of a loaded public checkpoint (its ``net`` entry, or the file itself), without a
    ``module.`` prefix that ``nn.DataParallel`` adds to every key."""
    state = loaded.get("net", loaded) if isinstance(loaded, Mapping) else loaded
    if not isinstance(state, Mapping) or not state:
        raise UserError(f"{source} holds a {type(state).__name__}, not a state dict (or a dict with one under 'net')")
    keys = [str(k) for k in state]
    if all(k.startswith("module.") for k in keys):
        return {k.removeprefix("module."): v for k, v in zip(keys, state.values(), strict=True)}
    return dict(zip(keys, state.values(), strict=True))


# --------------------------------------------------------------------------- layout


def public_parts(model: AGW) -> list[tuple[str, nn.Module]]:
    """(public prefix, our module) for every module the public checkpoint fills."""
    extractor = model.extractor
    parts: list[tuple[str, nn.Module]] = []
    for public, stem in zip(STEMS, extractor.stems, strict=True):
        conv1, bn1 = stem[0][0], stem[0][1]  # stem: the conv1 stage (conv1, bn1, relu, maxpool)
        parts += [(f"{public}.conv1", conv1), (f"{public}.bn1", bn1)]
    for layer, stage in enumerate(extractor.shared, start=1):
        parts.append((f"{TRUNK}.layer{layer}", stage.blocks if isinstance(stage, NonLocalStage) else stage))
        for j, block in enumerate(getattr(stage, "non_local", [])):
            parts += [(f"NL_{layer}.{j}.{public}", getattr(block, ours)) for ours, public in NON_LOCAL_PARTS.items()]
    return parts + [("bottleneck", model.neck.bn), ("classifier", model.classifier)]


def public_layout(model: AGW) -> tuple[dict[str, str], dict[str, torch.Size]]:
    """Public key -> our key for the entries that are used, and public key -> shape for the dropped ones
    (the stems' unused layer1..4 and the trunk's unused conv1/bn1: the shapes of the used copies)."""
    names = {id(module): name for name, module in model.named_modules()}
    used: dict[str, str] = {}
    dropped: dict[str, torch.Size] = {}
    for prefix, module in public_parts(model):
        for key, tensor in module.state_dict().items():
            used[f"{prefix}.{key}"] = f"{names[id(module)]}.{key}"
            copies = [prefix.replace(TRUNK, stem) for stem in STEMS] if prefix.startswith(f"{TRUNK}.layer") else \
                [f"{TRUNK}{prefix[len(STEMS[0]):]}"] if prefix.startswith(STEMS[0]) else []
            dropped.update({f"{copy}.{key}": tensor.shape for copy in copies})
    return used, dropped


def _is_fc(key: str) -> bool:
    """An ``fc`` entry of one of the public whole ResNets (the public resnet.py has none; a torchvision one would)."""
    return any(key in (f"{prefix}.fc.weight", f"{prefix}.fc.bias") for prefix in (*STEMS, TRUNK))


def _num_classes(state: Mapping[str, Any], source: str) -> int:
    weight = state.get("classifier.weight")
    if not isinstance(weight, torch.Tensor):
        raise UserError(f"{source} lacks 'classifier.weight' (a tensor [classes, {FEATURE_DIM}]): not AGW's layout")
    if weight.ndim != 2 or weight.shape[0] < 1 or weight.shape[1] != FEATURE_DIM:
        raise UserError(f"{source}: 'classifier.weight' has shape {list(weight.shape)}, AGW's is "
                        f"[classes, {FEATURE_DIM}]")
    return int(weight.shape[0])


def _check_shape(key: str, value: Any, expected: tuple[int, ...] | None, source: str) -> None:
    if not isinstance(value, torch.Tensor):
        raise UserError(f"{source}: {key!r} holds a {type(value).__name__}, not a tensor")
    if expected is not None and tuple(value.shape) != tuple(expected):
        raise UserError(f"{source}: {key!r} has shape {list(value.shape)}, AGW's ResNet-50 has {list(expected)}")


@dataclass
class Converted:
    """A public checkpoint's weights under our AGW model's names, its config, classes, and how many
    public entries were dropped (the unused whole-ResNet parts)."""

    weights: dict[str, torch.Tensor]
    config: Config
    num_classes: int
    dropped: int


def convert_agw(state: Mapping[str, Any], source: str) -> Converted:
    """Our AGW model's state dict from the public one (:class:`Converted`).

    Checks, each refusing in one line: every key is a public key, every tensor has its shape, every
    used entry is present.
    """
    num_classes = _num_classes(state, source)
    cfg = public_agw_config()
    build = copy.deepcopy(cfg)
    build.model.pretrained = "none"
    model = build_model(build, num_classes)
    used, dropped = public_layout(model)
    own = model.state_dict()
    for key, value in state.items():
        if key in used:
            _check_shape(key, value, own[used[key]].shape, source)
        elif key in dropped:
            _check_shape(key, value, dropped[key], source)
        elif _is_fc(key):
            _check_shape(key, value, None, source)
        else:
            raise UserError(f"{source}: {key!r} is not an entry of AGW's public ResNet-50 model (the first key "
                            "that does not fit)")
    missing = [key for key in used if key not in state and not key.endswith(OPTIONAL)]
    if missing:
        more = f" (+{len(missing) - 1} more)" if len(missing) > 1 else ""
        raise UserError(f"{source} lacks {missing[0]!r}{more}: not a complete AGW ResNet-50 state dict")
    for public, ours in used.items():
        if public in state:
            own[ours] = state[public].detach().to(own[ours].dtype).clone()
    return Converted(own, cfg, num_classes, dropped=sum(1 for key in state if key not in used))


# --------------------------------------------------------------------------- command line


def _number(value: Any) -> float | None:
    """A metric the public checkpoint records (NumPy float, array's first entry) as a plain float."""
    try:
        array = np.asarray(value, dtype=np.float64).ravel()
    except (TypeError, ValueError):
        return None
    return float(array[0]) if array.size else None


def provenance(loaded: Any, path: Path) -> dict[str, Any]:
    """What the public file says about itself (epoch, its trial-0 test metrics), as plain values."""
    info: dict[str, Any] = {"format": "agw", "file": path.name}
    if isinstance(loaded, Mapping) and "net" in loaded:
        epoch = loaded.get("epoch")
        info["epoch"] = int(epoch) if isinstance(epoch, (int, np.integer)) else None
        info["rank1"] = _number(loaded.get("cmc"))
        info["mAP"] = _number(loaded.get("mAP"))
        info["mINP"] = _number(loaded.get("mINP"))
    return info


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m cmssft.convert",
                                description="Convert a checkpoint of another code base into this toolbox's format.")
    p.add_argument("--from", dest="format", choices=FORMATS, required=True,
                   help="agw: AGW's public cross-modality code (mangye16/Cross-Modal-Re-ID-baseline)")
    p.add_argument("source", help="the checkpoint to convert (e.g. sysu_agw_p4_n8_lr_0.1_seed_0_best.t)")
    p.add_argument("--out", required=True, help="the checkpoint to write, e.g. agw.pth")
    p.add_argument("--debug", action="store_true", help="show tracebacks of user errors")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    source, out = Path(args.source), Path(args.out)
    if not out.parent.is_dir():
        raise UserError(f"--out {out}: folder {out.parent} does not exist")
    loaded = load_foreign(source)
    state = public_state_dict(loaded, str(source))
    converted = convert_agw(state, str(source))
    info = provenance(loaded, source)
    cfg = converted.config
    save_atomic({"model": converted.weights, "config": config_to_dict(cfg), "num_classes": converted.num_classes,
                 "converted_from": info}, out)
    recorded = ""
    if info.get("rank1") is not None:
        recorded = f"; the file records epoch {info['epoch']}, rank-1 {100 * info['rank1']:.2f}%" + (
            f", mAP {100 * info['mAP']:.2f}%" if info.get("mAP") is not None else "")
    print(f"wrote {out}: AGW ResNet-50, {converted.num_classes} classes, non-local {cfg.model.non_local}, "
          f"GeM p={cfg.model.gem_p:g} (fixed), test feature {cfg.model.agw.test_feature.upper()}; "
          f"{len(state) - converted.dropped} entries used, {converted.dropped} unused ones dropped{recorded}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
