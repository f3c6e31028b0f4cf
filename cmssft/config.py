"""The single source of truth for every setting.

Configs are YAML files validated against the dataclasses below. A file may name
one ``_base_`` (a path relative to itself) whose values it overrides; command
lines add dotted overrides such as ``train.lr=3e-4``. Unknown keys and values of
the wrong type are rejected with a one-line :class:`ConfigError` naming the key
and, for typos, the closest valid one.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import re
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from cmssft.errors import ConfigError

# --------------------------------------------------------------------------- schema


@dataclass
class SyntheticConfig:
    """Built-in synthetic data, written at ``data.root`` when that folder is missing."""

    enabled: bool = False
    ids: int = 32
    height: int = 128
    width: int = 64
    seed: int = 0
    difficulty: float = 0.5


@dataclass
class DataConfig:
    name: str = "sysu_mm01"
    root: str = "datasets/SYSU-MM01"
    train_ids: Literal["train+val", "train"] = "train+val"  # SYSU-MM01: hold val out with "train"
    trial: int = 1  # RegDB trial (1..10) whose split is used
    manifest: str = ""  # custom dataset: CSV manifest path (relative paths resolve against root)
    height: int = 288
    width: int = 144
    ids_per_batch: int = 8  # P identities per batch
    images_per_id: int = 4  # K images per identity *per modality*
    num_workers: int = 4
    pin_memory: bool = True
    persistent_workers: bool = True
    flip: float = 0.5
    pad: int = 10
    random_erasing: float = 0.5
    # probability per RGB sample of replacing the image, before normalisation, by one of its channels or its gray
    # (each 1/4); predates the CAJ options below and keeps its meaning
    channel_aug: float = 0.0
    # CAJ (channel augmented joint learning, ICCV 2021) channel augmentation, applied as the public code applies it:
    # after normalisation, channel erasing first (docs/METHOD.md). Forms of the channel exchange: "exchange" one
    # of R, G, B copied to all three channels (1/3 each); "adap" the same or the image unchanged (1/4 each);
    # "adap_gray" as "adap", the unchanged case turned gray (BT.601) half of the time
    channel_exchange_rgb: float = 0.0  # probability per RGB sample of the exchange below (CAJ: 1 on the joint copy)
    channel_exchange_rgb_form: Literal["exchange", "adap", "adap_gray"] = "exchange"  # CAJ's RGB form
    channel_exchange_ir: float = 0.0  # probability per IR sample of the exchange below (CAJ: 1)
    channel_exchange_ir_form: Literal["exchange", "adap", "adap_gray"] = "adap_gray"  # CAJ's IR form
    # probability per sample, both modalities, of channel random erasing: a rectangle (area 0.02-0.4, aspect
    # 0.3-3.33, 100 tries) set to (0.4914, 0.4822, 0.4465) in the normalised image (CAJ: 0.5); data.random_erasing
    # (zero fill) is separate
    channel_erasing: float = 0.0
    # CAJ's joint learning: every RGB image of a batch also comes a second time, augmented on its own draws and
    # channel-exchanged with data.channel_exchange_rgb (the first copy never is): batches of 3 x P x K
    channel_aug_joint: bool = False
    # where the augmentation above runs: "cpu" in the loader workers (float images), or "device": the workers
    # only decode and resize (uint8 batches, 4x fewer bytes to copy) and the training device augments the batch
    augment_on: Literal["cpu", "device"] = "cpu"
    prefetch_factor: int = 2  # batches each worker loads ahead (num_workers > 0 only)
    cache: bool = False  # keep decoded, resized uint8 images in a memory-mapped file (no JPEG decode after epoch 1)
    cache_dir: str = ""  # where the cache files live; empty: <output_dir>/cache
    bad_images: Literal["stop", "skip"] = "stop"  # unreadable training image: stop, or skip it with a warning
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)


@dataclass
class SSTNConfig:
    """Shared-Specific Transfer Network; every (?) choice is explained in docs/METHOD.md."""

    enabled: bool = True  # false: no transfer, no fused features, no fused losses
    topk: int = 6  # (?) k of the top-k sparsification T_k (edges kept per row)
    # of the topk, how many come from the other modality: -1 all of them, 0 one top-k over the whole row
    # whatever the modality, 1..topk-1 that many (the rest from the row's own modality)
    cross_k: int = -1
    block_norm: bool = False  # cross_k > 0: weights normalised within the intra and the cross block apart
    center: bool = False  # subtract each modality's mean shared embedding before the affinity (running mean at test)
    normalize: Literal["softmax", "sum"] = "softmax"  # (?) edge weights: softmax(S/T), or (1+S)/2 / row sum
    temperature: float = 0.1  # softmax temperature T (normalize=softmax only)
    self_loops: bool = False  # (?) may a node pick itself as a neighbour; false: the diagonal is excluded
    affinity_dim: int = 0  # learned linear transforms before the cosine affinity (0: cosine of the features)
    fusion: Literal["residual", "concat"] = "residual"  # (?) fused = x + Ax, or Linear([x, Ax])
    fused_dim: int = 0  # output width of the concat fusion (0: the backbone's feature width)
    test_mode: Literal["transductive", "single_query", "off"] = "transductive"  # default score() mode
    off_features: Literal["shared", "concat"] = "shared"  # test_mode=off: shared only, or [shared, specific]
    chunk: int = 512  # rows (test nodes or queries) per block when scoring; bounds memory only
    global_batch: bool = False  # distributed training: one graph over every process's batch (all-gather)
    # training only: that many samples of earlier batches join each batch graph as extra candidates, so
    # that few of a node's candidates are its identity, as in a test graph (0: the batch alone;
    # 256 chosen by the seeded ablation, docs/RESULTS.md)
    memory: int = 256
    # test graphs only: each row also keeps its that-many most similar nodes of its own modality, the
    # own-modality and the cross block then weighted apart (block_norm); ignored with cross_k=0. 0: test
    # graphs laid out as training graphs (6 was level on held-out seeds, docs/RESULTS.md)
    test_intra_k: int = 0


# Blocks per stage (layer1..layer4) of each backbone: the bound of model.non_local.
RESNET_BLOCKS: dict[str, tuple[int, int, int, int]] = {"resnet18": (2, 2, 2, 2), "resnet50": (3, 4, 6, 3)}


@dataclass
class AGWConfig:
    """Settings of AGW alone (``model.name=agw``); the parts it shares with cm-SSFT are ``model.*`` keys."""

    # test-time feature: "fc" the BN-necked one (what the AGW paper reports, docs/METHOD.md), "pool" the pooled one
    test_feature: Literal["fc", "pool"] = "fc"


@dataclass
class ModelConfig:
    # Keys up to non_local_width serve every model; shared_from .. recon_downsample and sstn are cm-SSFT's
    # (kept here for the configs and checkpoints that have them); a newer model's own keys live in its
    # sub-section (model.agw), so adding a model does not widen cm-SSFT's settings.
    name: str = "cmssft"  # builder registered in cmssft.registry.MODELS: cmssft | agw
    backbone: Literal["resnet50", "resnet18"] = "resnet50"
    pretrained: str = "imagenet"  # none | imagenet | /path/to/state_dict.pth
    download_timeout: float = 10.0  # seconds allowed to reach the ImageNet weights server before UserError
    last_stride: int = 1  # stride of layer4 (1 keeps a 2x larger final map)
    pooling: Literal["avg", "gem"] = "avg"  # global pooling of the last feature map
    gem_p: float = 3.0  # GeM exponent (its initial value when learned)
    # true: GeM learns p (clamp(x, 1e-6)^p); false: p stays fixed, AGW's form (mean(x^p) + 1e-12)^(1/p)
    gem_learn_p: bool = True
    bnneck: bool = True  # BatchNorm1d (bias frozen) between pooled features and the classifiers
    # non-local blocks after the last n blocks of layer1..layer4, in every copy of the stage (AGW: [0, 2, 3, 0])
    non_local: list[int] = field(default_factory=lambda: [0, 0, 0, 0])
    # intermediate channels of each non-local block: 1 is AGW's public code (reduc_ratio // reduc_ratio);
    # the non-local paper uses C/2
    non_local_width: int = 1
    # (?) where the streams split; stages before shared_from are per-modality (conv1: none are)
    shared_from: Literal["conv1", "layer1", "layer2", "layer3", "layer4"] = "layer2"  # first shared stage
    specific_from: Literal["layer2", "layer3", "layer4"] = "layer3"  # first per-modality stage of h_sp
    use_specific: bool = True  # false: no h_sp (baseline); project_adversarial/reconstruction need it
    sstn: SSTNConfig = field(default_factory=SSTNConfig)
    modality_adaptation: bool = True  # modality discriminator on h_sh through gradient reversal
    project_adversarial: bool = True  # projector h_sh -> h_sp, trained adversarially (one per modality)
    reconstruction: bool = True  # decoder rebuilds the downsampled input from [h_sh, h_sp] (one per modality)
    grl_modality: float = 1.0  # gradient-reversal scale for the modality discriminator
    grl_project: float = 1.0  # gradient-reversal scale for the projector
    # which features the projector predicts from and compares: "pooled" h_sh -> h_sp, or their BN-neck
    # outputs ("neck", centred, the features SSTN transfers); post-ReLU pooled vectors share one mean
    # direction, so a pooled target is predictable from anything (cosine ~0.997 on the demo)
    project_space: Literal["pooled", "neck"] = "pooled"
    head_hidden: int = 512  # hidden width of the discriminator and projector MLPs
    recon_downsample: int = 8  # reconstruction target: the input average-pooled by this factor
    agw: AGWConfig = field(default_factory=AGWConfig)  # AGW's own keys (model.name=agw)


@dataclass
class LossWeights:
    id_shared: float = 1.0  # identity cross-entropy on h_sh
    id_specific: float = 1.0  # identity cross-entropy on h_sp
    triplet_shared: float = 1.0  # cross-modality triplet on h_sh
    triplet_specific: float = 1.0  # single-modality triplet on h_sp
    id_fused: float = 1.0  # identity cross-entropy on SSTN-fused features
    triplet_fused: float = 1.0  # triplet on SSTN-fused features (form: loss.fused_triplet)
    modality: float = 0.1  # modality discriminator cross-entropy (reversed for the extractor)
    project: float = 0.1  # projector error (reversed for the extractor)
    reconstruction: float = 0.1  # decoder mean squared error


@dataclass
class LossConfig:
    label_smoothing: float = 0.1  # of every identity cross-entropy (0 disables)
    # form of every triplet term (shared, specific, fused; each keeps its pairs): "hard", the batch-hard /
    # kNN-margin triplet, or "wrt", the weighted regularised triplet of AGW (softmax-weighted positives and
    # negatives, soft margin, no margin parameter; docs/METHOD.md)
    triplet: Literal["hard", "wrt"] = "hard"
    triplet_margin: float = 0.3  # margin of every "hard" triplet term
    hard_negatives: int = 1  # k of the kNN-margin triplet; 1 is batch-hard ("hard" only)
    # which pairs the shared-feature triplet mines: "cross" the other modality (cm-SSFT), "all" any pair of the
    # batch, both modalities (AGW's and CAJ's public training)
    shared_triplet: Literal["cross", "all"] = "cross"
    fused_triplet: Literal["all", "cross", "single"] = "all"  # which pairs the fused triplet mines
    normalize_fused: bool = True  # fused triplet on L2-normalised fused features (the test-time cosine)
    weights: LossWeights = field(default_factory=LossWeights)  # 0 drops a term


@dataclass
class TrainConfig:
    epochs: int = 60
    iters_per_epoch: int = 0  # 0: one pass over the RGB training images
    optimizer: Literal["sgd", "adam"] = "sgd"
    lr: float = 0.1
    backbone_lr_mult: float = 0.1
    weight_decay: float = 5e-4
    momentum: float = 0.9
    warmup_epochs: int = 10
    schedule: Literal["step", "cosine"] = "step"
    milestones: list[int] = field(default_factory=lambda: [20, 50])
    gamma: float = 0.1
    amp: Literal["off", "bf16", "fp16"] = "off"
    grad_clip: float = 0.0  # 0 disables clipping
    # strength of the reversed gradients (model.grl_*) over training: "constant", or "dann", which ramps
    # it from 0 to 1 as 2/(1+exp(-10 p)) - 1 of the training progress p (0.68 at p=1/6, 0.99 by p=1/2)
    grl_schedule: Literal["constant", "dann"] = "constant"
    eval_every: int = 10  # epochs; 0 evaluates only at the end
    device: Literal["auto", "cpu", "cuda"] = "auto"
    deterministic: bool = False
    channels_last: bool = True  # CUDA only: NHWC activations for faster convolutions
    compile: bool = False  # wrap the model in torch.compile
    # fused optimizer kernels (torch's fused=True): "auto" uses them on CUDA only. A fused optimizer also skips a
    # non-finite step on the device, so losses are read back only every log_every steps (no per-step sync)
    fused_optimizer: Literal["auto", "on", "off"] = "auto"
    log_every: int = 20  # iterations between scalar logs (TensorBoard, metrics.jsonl, log.txt)
    # last.pth (weights, optimizer, RNG: everything --resume needs) is written at the end, on SIGINT/SIGTERM,
    # and when either rule below is due; 0 turns a rule off
    checkpoint_minutes: float = 10.0  # wall-clock minutes since the previous last.pth
    checkpoint_steps: int = 0  # optimizer steps since the previous last.pth


@dataclass
class EvalConfig:
    protocol: Literal["auto", "sysu", "sysu-official", "regdb", "llcm", "custom"] = "auto"
    mode: Literal["all", "indoor"] = "all"
    shots: int = 1
    # auto: v2t for RegDB, ir2vis for LLCM. RegDB: v2t | t2v. LLCM: ir2vis | vis2ir (docs/EVALUATION.md)
    direction: Literal["auto", "v2t", "t2v", "ir2vis", "vis2ir"] = "auto"
    trials: int = 10
    batch_size: int = 128
    rerank: bool = False
    flip: bool = True  # average features of the image and its mirror
    # after training, the test split is also scored in these SSTN test modes (same features, seconds),
    # printed beside the configured model.sstn.test_mode: what the transfer adds
    compare_modes: list[Literal["transductive", "single_query", "off"]] = field(default_factory=lambda: ["off"])


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    seed: int = 0
    output_dir: str = "runs"
    run_name: str = ""  # empty: <config name>-<time>


# --------------------------------------------------------------------------- loading

BASE_KEY = "_base_"


class _Loader(yaml.SafeLoader):
    """YAML with the booleans of YAML 1.2: only ``true``/``false``.

    YAML 1.1 (PyYAML's default) also reads ``off``/``on``/``no``/``yes`` as booleans, so
    ``model.sstn.test_mode=off`` would arrive as ``False``. Here those words stay strings; a
    boolean key still accepts them (see :func:`_coerce_scalar`).
    """


_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)
# Words a person types for a boolean; YAML 1.2 reads all but true/false as strings.
BOOL_WORDS = {"true": True, "yes": True, "on": True, "false": False, "no": False, "off": False}


def parse_yaml(text: str) -> Any:
    """``text`` as YAML with YAML 1.2 booleans (``off`` is the string 'off')."""
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - _Loader is a SafeLoader


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read ``path`` (with its ``_base_``), apply ``key=value`` overrides, validate."""
    raw: dict[str, Any] = {}
    if path is not None:
        raw = _read_with_base(Path(path))
    for item in overrides or []:
        key, value = parse_override(item)
        _set_dotted(raw, key, value)
    return config_from_dict(raw)


def config_from_dict(raw: dict[str, Any]) -> Config:
    """Validate a nested dict against :class:`Config` (keys, types, then value ranges)."""
    cfg = _build(Config, raw, prefix="")
    _check_combinations(cfg)
    return cfg


def config_to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config, loadable again with :func:`load_config`."""
    Path(path).write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))


def parse_override(item: str) -> tuple[str, Any]:
    """Split ``a.b=value``; the value is read as YAML (``[1, 2]``, ``true``, ``3``)."""
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {item!r} is not of the form key.sub=value")
    try:
        value = parse_yaml(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text
    return key, value


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = parse_yaml(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}{where}: not valid YAML ({getattr(err, 'problem', err)})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections, got {type(data).__name__}")
    return data


def _read_with_base(path: Path) -> dict[str, Any]:
    data = _read_yaml(path)
    base_name = data.pop(BASE_KEY, None)
    if base_name is None:
        return data
    if not isinstance(base_name, str):
        raise ConfigError(f"{path}: {BASE_KEY} must be a file path")
    base_path = (path.parent / base_name).resolve()
    base = _read_yaml(base_path)
    if BASE_KEY in base:
        raise ConfigError(f"{base_path}: only one level of {BASE_KEY} is supported")
    return _merge(base, data)


def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[parts[-1]] = value


# --------------------------------------------------------------------------- validation


def _build(cls: type, raw: Any, prefix: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in raw:
        if key not in names:
            raise ConfigError(_unknown_key_message(cls, prefix, str(key)))
    values = {}
    for name in names:
        if name in raw:
            values[name] = _coerce(raw[name], hints[name], prefix + name)
    return cls(**values)


def _all_keys(cls: type, prefix: str = "") -> list[str]:
    keys = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        keys.append(prefix + f.name)
        if dataclasses.is_dataclass(hints[f.name]):
            keys.extend(_all_keys(hints[f.name], prefix + f.name + "."))
    return keys


def _unknown_key_message(cls: type, prefix: str, key: str) -> str:
    full = prefix + key
    candidates = _all_keys(Config)
    match = difflib.get_close_matches(full, candidates, n=1, cutoff=0.6)
    if not match:  # the leaf may be right but the section wrong, or the reverse
        leaves = [k for k in candidates if k.rsplit(".", 1)[-1] == key]
        match = leaves[:1] or difflib.get_close_matches(key, [f.name for f in dataclasses.fields(cls)], n=1)
        if match and "." not in match[0]:
            match = [prefix + match[0]]
    hint = f" (did you mean '{match[0]}'?)" if match else ""
    return f"unknown config key {full!r}{hint}"  # repr: a key with a newline still prints on one line


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(v) for v in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value if value is not None else {}, key + ".")
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            close = difflib.get_close_matches(str(value), [str(a) for a in allowed], n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{key}: {value!r} is not {_type_name(tp)}{hint}")
        return value
    if origin in (list, tuple):
        (item_tp,) = typing.get_args(tp)[:1]
        if isinstance(value, (int, float, str)) and not isinstance(value, bool) and item_tp is not str:
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return None if value is None else _coerce(value, args[0], key)
    return _check_range(_coerce_scalar(value, tp, key), key)


def _coerce_scalar(value: Any, tp: Any, key: str) -> Any:
    bad = ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in BOOL_WORDS:
            return BOOL_WORDS[value.lower()]
        raise bad
    if tp is int:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                raise bad from None
        raise bad
    if tp is float:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, (int, float)):
            try:
                return float(value)
            except OverflowError:  # an int beyond float range
                raise bad from None
        if isinstance(value, str):  # YAML reads 3e-4 as a string
            try:
                return float(value)
            except ValueError:
                raise bad from None
        raise bad
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise bad
    raise bad


# --------------------------------------------------------------------------- value ranges


@dataclass(frozen=True)
class Range:
    """Allowed numeric values: ``low``..``high``, either end excluded on request; infinity is never allowed."""

    low: float = -math.inf
    high: float = math.inf
    open_low: bool = False
    open_high: bool = False

    def __contains__(self, value: float) -> bool:
        try:
            if not math.isfinite(value):
                return False
        except OverflowError:  # an int beyond float range
            return False
        above = value > self.low if self.open_low else value >= self.low
        below = value < self.high if self.open_high else value <= self.high
        return above and below

    def __str__(self) -> str:
        low, high = _number(self.low), _number(self.high)
        if self.high == math.inf:
            return f"{'>' if self.open_low else '>='} {low}"
        return f"{'(' if self.open_low else '['}{low}, {high}{')' if self.open_high else ']'}"


def _number(x: float) -> str:
    return str(int(x)) if math.isfinite(x) and float(x).is_integer() else f"{x:g}"


AT_LEAST_0, AT_LEAST_1, POSITIVE = Range(0), Range(1), Range(0, open_low=True)
PROBABILITY, IMAGE_SIDE = Range(0, 1), Range(16)
# Keys (list items share their list's key; "a.*" covers every key of section a) and what they allow.
RANGES: dict[str, Range] = {
    "seed": Range(0, 2**32 - 1),  # NumPy's legacy seeding takes 32 bits
    "data.trial": AT_LEAST_1,
    "data.height": IMAGE_SIDE,
    "data.width": IMAGE_SIDE,
    "data.ids_per_batch": AT_LEAST_1,
    "data.images_per_id": AT_LEAST_1,
    "data.num_workers": AT_LEAST_0,
    "data.flip": PROBABILITY,
    "data.pad": AT_LEAST_0,
    "data.random_erasing": PROBABILITY,
    "data.channel_aug": PROBABILITY,
    "data.channel_exchange_rgb": PROBABILITY,
    "data.channel_exchange_ir": PROBABILITY,
    "data.channel_erasing": PROBABILITY,
    "data.prefetch_factor": AT_LEAST_1,
    "data.synthetic.height": IMAGE_SIDE,
    "data.synthetic.width": IMAGE_SIDE,
    "data.synthetic.seed": AT_LEAST_0,
    "data.synthetic.difficulty": PROBABILITY,
    "model.download_timeout": POSITIVE,
    "model.last_stride": Range(1, 2),
    "model.gem_p": POSITIVE,
    "model.non_local": AT_LEAST_0,
    "model.non_local_width": AT_LEAST_1,
    "model.grl_modality": AT_LEAST_0,
    "model.grl_project": AT_LEAST_0,
    "model.head_hidden": AT_LEAST_1,
    "model.recon_downsample": AT_LEAST_1,
    "model.sstn.topk": AT_LEAST_1,
    "model.sstn.cross_k": Range(-1),
    "model.sstn.temperature": POSITIVE,
    "model.sstn.affinity_dim": AT_LEAST_0,
    "model.sstn.fused_dim": AT_LEAST_0,
    "model.sstn.chunk": AT_LEAST_1,
    "model.sstn.memory": AT_LEAST_0,
    "model.sstn.test_intra_k": AT_LEAST_0,
    "loss.label_smoothing": Range(0, 1, open_high=True),
    "loss.triplet_margin": AT_LEAST_0,
    "loss.hard_negatives": AT_LEAST_1,
    "loss.weights.*": AT_LEAST_0,
    "train.epochs": AT_LEAST_1,
    "train.iters_per_epoch": AT_LEAST_0,
    "train.lr": POSITIVE,
    "train.backbone_lr_mult": AT_LEAST_0,
    "train.weight_decay": AT_LEAST_0,
    "train.momentum": Range(0, 1, open_high=True),
    "train.warmup_epochs": AT_LEAST_0,
    "train.milestones": AT_LEAST_0,
    "train.gamma": POSITIVE,
    "train.grad_clip": AT_LEAST_0,
    "train.eval_every": AT_LEAST_0,
    "train.log_every": AT_LEAST_1,
    "train.checkpoint_minutes": AT_LEAST_0,
    "train.checkpoint_steps": AT_LEAST_0,
    "eval.shots": AT_LEAST_1,
    "eval.trials": AT_LEAST_1,
    "eval.batch_size": AT_LEAST_1,
}


# Model keys that change how a trained model scores, never its weights: eval.py (and the ablation runner's
# --score-set) apply them on top of a checkpoint's own config. Every other model key is the checkpoint's.
TEST_TIME_MODEL_KEYS: tuple[str, ...] = (
    "model.sstn.topk",
    "model.sstn.cross_k",
    "model.sstn.block_norm",
    "model.sstn.normalize",
    "model.sstn.temperature",
    "model.sstn.self_loops",
    "model.sstn.test_mode",
    "model.sstn.off_features",
    "model.sstn.chunk",
    "model.sstn.test_intra_k",
    "model.agw.test_feature",
)
# Model keys a checkpoint makes moot: it brings every weight itself.
CHECKPOINT_MOOT_KEYS: tuple[str, ...] = ("model.pretrained", "model.download_timeout")


def get_dotted(cfg: Config, key: str) -> Any:
    """The value of ``a.b.c`` in a config (``AttributeError`` for a key the schema lacks)."""
    node: Any = cfg
    for part in key.split("."):
        node = getattr(node, part)
    return node


def model_overrides(overrides: Sequence[str]) -> list[str]:
    """The ``model.*`` items of ``key=value`` overrides: the ones that concern a trained model."""
    return [item for item in overrides if parse_override(item)[0].split(".", 1)[0] == "model"]


def test_time_config(trained: Mapping, overrides: Sequence[str], source: str) -> Config:
    """The config a checkpoint was trained with, with the test-time ``model.*`` overrides applied.

    Other items (``data.*``, ``eval.*``, ...) are the caller's business and are skipped here. A model key
    that is not a test-time one (:data:`~cmssft.config.TEST_TIME_MODEL_KEYS`) and differs from the
    checkpoint's is a one-line :class:`ConfigError` naming it: it shapes the weights or acts only in
    training, so applying it would silently score something other than what was asked.
    """
    raw = copy.deepcopy(dict(trained))
    base = config_from_dict(copy.deepcopy(raw))
    items = [parse_override(item) for item in model_overrides(overrides)]
    if not items:
        return base
    for key, value in items:
        if key not in CHECKPOINT_MOOT_KEYS:
            _set_dotted(raw, key, value)
    cfg = config_from_dict(raw)
    for key in _model_leaves():
        if key not in TEST_TIME_MODEL_KEYS and get_dotted(cfg, key) != get_dotted(base, key):
            raise ConfigError(
                f"{key}={get_dotted(cfg, key)!r}: {source} was trained with {key}={get_dotted(base, key)!r}, and "
                f"this setting shapes its weights or acts only in training; a trained model takes test-time "
                f"settings only ({', '.join(TEST_TIME_MODEL_KEYS)})"
            )
    return cfg


def _model_leaves() -> list[str]:
    keys = _all_keys(Config)
    return [k for k in keys if k.startswith("model.") and not any(other.startswith(k + ".") for other in keys)]


def _check_range(value: Any, key: str) -> Any:
    """``value`` if ``key`` allows it; a one-line :class:`ConfigError` naming the key and the range otherwise."""
    name = key.split("[", 1)[0]
    allowed = RANGES.get(name) or RANGES.get(name.rsplit(".", 1)[0] + ".*")
    if allowed is not None and not isinstance(value, (bool, str)) and value not in allowed:
        raise ConfigError(f"{key}: {value!r} is out of range; allowed: {allowed}")
    return value


def _check_combinations(cfg: Config) -> None:
    """Rules that involve more than one key."""
    sstn = cfg.model.sstn
    if sstn.cross_k > sstn.topk:
        raise ConfigError(f"model.sstn.cross_k: {sstn.cross_k} is more than model.sstn.topk={sstn.topk}; allowed: "
                          f"[-1, {sstn.topk}] (-1: all {sstn.topk} from the other modality)")
    _check_non_local(cfg.model)
    data = cfg.data
    if data.channel_aug > 0 and data.channel_exchange_rgb > 0:
        raise ConfigError(f"data.channel_aug: {data.channel_aug} and data.channel_exchange_rgb: "
                          f"{data.channel_exchange_rgb} both change RGB channels; set one of them to 0")
    if data.channel_aug_joint and data.channel_exchange_rgb <= 0:
        raise ConfigError("data.channel_aug_joint: true needs data.channel_exchange_rgb > 0 (the second copy's "
                          "channel exchange; CAJ: 1)")
    if cfg.loss.triplet == "wrt" and cfg.loss.hard_negatives != 1:
        raise ConfigError(f"loss.hard_negatives: {cfg.loss.hard_negatives} applies to loss.triplet=hard only; "
                          "the wrt triplet weighs every negative (allowed with wrt: 1)")
    if cfg.train.optimizer == "sgd" and cfg.train.momentum <= 0:
        raise ConfigError("train.momentum: 0 is out of range for train.optimizer=sgd (Nesterov momentum); "
                          "allowed: (0, 1)")


def _check_non_local(model: ModelConfig) -> None:
    """``model.non_local``: one count per stage, none larger than that stage's blocks."""
    blocks = RESNET_BLOCKS[model.backbone]
    counts = model.non_local
    if len(counts) != len(blocks):
        raise ConfigError(f"model.non_local: {counts} must hold {len(blocks)} counts, one per stage layer1..layer4")
    for stage, (count, limit) in enumerate(zip(counts, blocks, strict=True), start=1):
        if count > limit:
            raise ConfigError(f"model.non_local[{stage - 1}]: {count} is more than the {limit} blocks of "
                              f"{model.backbone} layer{stage}; allowed: [0, {limit}] per stage ({list(blocks)})")
