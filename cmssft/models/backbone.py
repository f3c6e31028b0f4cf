"""torchvision ResNets cut into the five stages the two-stream extractor recombines.

Stage names, in order: ``conv1`` (conv1, bn1, relu, maxpool), ``layer1`` .. ``layer4``.
Weights come from nowhere (``none``), torchvision's ImageNet weights
(``imagenet``, from the torch hub cache or downloaded with a bounded wait) or a
state-dict file. Non-local blocks (``model.non_local``, :mod:`cmssft.models.non_local`) are
inserted here, after the weights are loaded, so every model built on these stages gets them
in every copy it makes of a stage.
"""

from __future__ import annotations

import os
import tempfile
import threading
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
import torchvision
from torch import nn

from cmssft.errors import UserError
from cmssft.models.non_local import add_non_local

STAGES: tuple[str, ...] = ("conv1", "layer1", "layer2", "layer3", "layer4")

_ARCHS: dict[str, tuple[Any, Any, int]] = {
    "resnet18": (torchvision.models.resnet18, torchvision.models.ResNet18_Weights.IMAGENET1K_V1, 512),
    "resnet50": (torchvision.models.resnet50, torchvision.models.ResNet50_Weights.IMAGENET1K_V1, 2048),
}


def feature_dim(arch: str) -> int:
    """Channels of the last stage, i.e. the width of pooled features."""
    return _arch(arch)[2]


def resnet_stages(
    arch: str,
    pretrained: str = "none",
    last_stride: int = 1,
    download_timeout: float = 10.0,
    non_local: Sequence[int] = (0, 0, 0, 0),
    non_local_width: int = 1,
) -> nn.ModuleDict:
    """Build ``arch`` with the requested weights and return its stages (no pooling, no fc), with
    ``non_local[s]`` non-local blocks of ``non_local_width`` channels after the last blocks of ``layer{s+1}``."""
    if last_stride not in (1, 2):
        raise UserError(f"model.last_stride must be 1 or 2, got {last_stride}")
    ctor, _, _ = _arch(arch)
    net = ctor(weights=None)
    if pretrained == "imagenet":
        _load_into(net, imagenet_state_dict(arch, download_timeout), f"ImageNet {arch} weights")
    elif pretrained not in ("none", ""):
        _load_into(net, _read_state_dict(Path(pretrained)), pretrained)
    _set_last_stride(net.layer4, last_stride)
    stages = nn.ModuleDict(
        {
            "conv1": nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool),
            "layer1": net.layer1,
            "layer2": net.layer2,
            "layer3": net.layer3,
            "layer4": net.layer4,
        }
    )
    return add_non_local(stages, non_local, non_local_width)


def imagenet_state_dict(arch: str, download_timeout: float = 10.0) -> dict[str, torch.Tensor]:
    """torchvision's ImageNet weights from the hub cache, downloading them there first if needed.

    Without network access this fails within ``download_timeout`` seconds with a
    :class:`UserError` that says where to put the file, instead of hanging.
    """
    weights = _arch(arch)[1]
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(weights.url).path).name
    if not cached.is_file():
        _download(weights.url, cached, download_timeout)
    try:
        return weights.get_state_dict(progress=False)
    except Exception as err:  # a truncated or foreign file in the cache
        raise UserError(f"cannot read the ImageNet weights at {cached}: {err}") from None


def _arch(arch: str) -> tuple[Any, Any, int]:
    if arch not in _ARCHS:
        raise UserError(f"unknown backbone {arch!r}; choose one of {', '.join(sorted(_ARCHS))}")
    return _ARCHS[arch]


def _open_url(url: str, timeout: float) -> Any:
    """urlopen with a per-operation socket timeout; a seam for tests."""
    return urllib.request.urlopen(url, timeout=timeout)  # noqa: S310 - fixed torchvision URL


def _download(url: str, dst: Path, timeout: float) -> None:
    """Fetch ``url`` into ``dst`` atomically; connecting (DNS included) may take at most ``timeout`` s."""
    hint = (
        f"cannot download ImageNet weights from {url} ({{why}}); put the file at {dst}, "
        "or set model.pretrained to a state-dict path or to none"
    )
    result: dict[str, Any] = {}

    def connect() -> None:
        try:
            result["response"] = _open_url(url, timeout)
        except Exception as err:  # reported below, on the caller's thread
            result["error"] = err

    worker = threading.Thread(target=connect, daemon=True)  # getaddrinfo ignores socket timeouts
    worker.start()
    worker.join(timeout)
    if "response" not in result:
        why = f"{type(result['error']).__name__}: {result['error']}" if "error" in result else "timed out"
        raise UserError(hint.format(why=why))
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dst.parent, suffix=".partial")
    try:
        with os.fdopen(fd, "wb") as out, result["response"] as response:
            while chunk := response.read(1 << 20):
                out.write(chunk)
        os.replace(tmp, dst)
    except OSError as err:
        raise UserError(hint.format(why=f"{type(err).__name__}: {err}")) from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise UserError(f"model.pretrained: {path} is not a file (use none, imagenet or a state-dict path)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise UserError(f"model.pretrained: cannot load {path}: {err}") from None
    for key in ("state_dict", "model"):  # common checkpoint wrappers
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise UserError(f"model.pretrained: {path} does not hold a state dict")
    return {k.removeprefix("module."): v for k, v in state.items()}


def _load_into(net: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load every backbone tensor; the classifier (``fc.*``) may be absent or of any size."""
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    try:
        missing, unexpected = net.load_state_dict(state, strict=False)
    except RuntimeError as err:  # shape mismatch: another architecture
        raise UserError(f"{source} does not fit the backbone: {str(err).splitlines()[0]}") from None
    missing = [k for k in missing if not k.startswith("fc.")]
    if missing or unexpected:
        raise UserError(
            f"{source} does not fit the backbone: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )


def _set_last_stride(layer4: nn.Sequential, stride: int) -> None:
    """Set the stride of the first block of ``layer4`` (its strided conv and its shortcut)."""
    block = layer4[0]
    conv = block.conv2 if hasattr(block, "conv3") else block.conv1  # Bottleneck strides conv2
    conv.stride = (stride, stride)
    if block.downsample is not None:
        block.downsample[0].stride = (stride, stride)
