"""python -m cmssft.convert --from agw: a checkpoint of AGW's public code becomes our AGW model, exactly.

The public code is not in this tree: its state dict is generated here from torchvision's ResNet-50 key names
(which the public resnet.py shares; it has no fc) plus its non-local, BN-neck and classifier entries, with
random values, and its eval-mode forward is recomputed here from that state dict with torchvision's blocks.
"""

from __future__ import annotations

import json
import os
import pickle
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision

from cmssft.convert import load_foreign, main
from cmssft.engine.checkpoint import load_checkpoint
from cmssft.engine.inference import model_from_checkpoint
from cmssft.errors import run_cli
from cmssft.evaluation.cli import main as eval_main
from cmssft.evaluation.report import COMPARABLE
from cmssft.models.non_local import NonLocalStage

from .conftest import REPO_ROOT

NUM_CLASSES = 7
STEMS = ("visible_module.visible", "thermal_module.thermal")
TRUNK = "base_resnet.base"
NON_LOCAL = {2: (2, 512), 3: (3, 1024)}  # layer: (blocks, channels); AGW's [0, 2, 3, 0] on ResNet-50


def resnet50_shapes() -> dict[str, torch.Size]:
    """torchvision's ResNet-50 entries without fc: the public resnet.py's names and shapes."""
    with torch.device("meta"):
        net = torchvision.models.resnet50(weights=None)
    return {k: v.shape for k, v in net.state_dict().items() if not k.startswith("fc.")}


def public_shapes(num_classes: int = NUM_CLASSES) -> dict[str, tuple[int, ...]]:
    """Every entry of the public AGW model's state dict: three whole ResNet-50s (both stems and the trunk
    keep one each), the non-local blocks, the BN-neck ('bottleneck') and the classifier."""
    shapes: dict[str, tuple[int, ...]] = {}
    for prefix in (*STEMS, TRUNK):
        shapes.update({f"{prefix}.{k}": tuple(v) for k, v in resnet50_shapes().items()})
    bn = ("weight", "bias", "running_mean", "running_var")
    for layer, (count, c) in NON_LOCAL.items():
        for j in range(count):
            p = f"NL_{layer}.{j}"
            for conv in ("g.0", "theta", "phi"):
                shapes.update({f"{p}.{conv}.weight": (1, c, 1, 1), f"{p}.{conv}.bias": (1,)})
            shapes.update({f"{p}.W.0.weight": (c, 1, 1, 1), f"{p}.W.0.bias": (c,)})
            shapes.update({f"{p}.W.1.{k}": (c,) for k in bn} | {f"{p}.W.1.num_batches_tracked": ()})
    shapes.update({f"bottleneck.{k}": (2048,) for k in bn} | {"bottleneck.num_batches_tracked": ()})
    shapes["classifier.weight"] = (num_classes, 2048)
    return shapes


def random_value(key: str, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """Values of a plausible scale (features stay finite through 50 layers), all different."""
    if key.endswith("num_batches_tracked"):
        return torch.randint(0, 1000, (), generator=gen)
    if key.startswith("NL_") and key.endswith("W.1.weight"):  # (theta phi / N) g grows as x^3: keep W(y) small
        return 0.01 + 0.01 * torch.rand(shape, generator=gen)
    if key.endswith("running_var"):
        return 0.5 + torch.rand(shape, generator=gen)
    if key.endswith("running_mean") or key.endswith("bias"):
        return 0.1 * torch.randn(shape, generator=gen)
    if len(shape) == 4:  # convolutions: He scale
        return torch.randn(shape, generator=gen) * (2.0 / (shape[1] * shape[2] * shape[3])) ** 0.5
    if key == "classifier.weight":
        return 0.01 * torch.randn(shape, generator=gen)
    return 0.5 + 0.5 * torch.rand(shape, generator=gen)  # BatchNorm weights (W.1 too: the blocks act)


def public_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {k: random_value(k, s, gen) for k, s in public_shapes().items()}


def is_dropped(key: str) -> bool:
    """What the public modules hold but never run: the stems' layer1..4, the trunk's conv1/bn1."""
    return bool(re.match(rf"({'|'.join(map(re.escape, STEMS))})\.layer\d\.", key)) or \
        key.startswith((f"{TRUNK}.conv1.", f"{TRUNK}.bn1."))


def public_checkpoint(state: dict, path) -> None:
    """The file the public train.py writes: plain torch.save of the state dict and NumPy metrics."""
    cmc = np.linspace(0.475, 1.0, 50)
    torch.save({"net": state, "cmc": cmc, "mAP": np.float64(0.4765), "mINP": np.float64(0.353), "epoch": 26}, path)


# ----------------------------------------------------------------------- the public forward, recomputed


def non_local_reference(state: dict, prefix: str, x: torch.Tensor) -> torch.Tensor:
    """The public block: width-1 theta/phi/g, affinity theta^T phi divided by N (no softmax), W + BN, residual."""
    b, _, h, w = x.shape

    def conv(name: str, inp: torch.Tensor) -> torch.Tensor:
        return F.conv2d(inp, state[f"{prefix}.{name}.weight"], state[f"{prefix}.{name}.bias"])

    theta = conv("theta", x).reshape(b, 1, h * w).transpose(1, 2)  # [B, N, 1]
    phi = conv("phi", x).reshape(b, 1, h * w)  # [B, 1, N]
    g = conv("g.0", x).reshape(b, 1, h * w).transpose(1, 2)  # [B, N, 1]
    affinity = torch.bmm(theta, phi) / (h * w)  # [B, N, N]
    y = torch.bmm(affinity, g).transpose(1, 2).reshape(b, 1, h, w)
    bn = {k: state[f"{prefix}.W.1.{k}"] for k in ("running_mean", "running_var", "weight", "bias")}
    out = F.batch_norm(conv("W.0", y), bn["running_mean"], bn["running_var"], bn["weight"], bn["bias"], False)
    return x + out


def public_features(state: dict, images: torch.Tensor, modality: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(POOL, FC) as the public model returns them in eval mode, for images all of ``modality``."""
    with torch.device("meta"):  # no time spent on initial weights: every used one is assigned
        net = torchvision.models.resnet50(weights=None)
    trunk = {k[len(TRUNK) + 1:]: v for k, v in state.items() if k.startswith(f"{TRUNK}.layer")}
    stem = {k[len(STEMS[modality]) + 1:]: v for k, v in state.items()
            if k.startswith((f"{STEMS[modality]}.conv1.", f"{STEMS[modality]}.bn1."))}
    missing, unexpected = net.load_state_dict({**trunk, **stem}, strict=False, assign=True)
    assert not unexpected and all(k.startswith("fc.") for k in missing)
    net.layer4[0].conv2.stride = net.layer4[0].downsample[0].stride = (1, 1)  # last stride 1
    net.eval()
    with torch.no_grad():
        x = net.maxpool(net.relu(net.bn1(net.conv1(images))))
        for layer_index, layer in enumerate((net.layer1, net.layer2, net.layer3, net.layer4), start=1):
            count = NON_LOCAL.get(layer_index, (0, 0))[0]
            for i, block in enumerate(layer):
                x = block(x)
                if i >= len(layer) - count:
                    x = non_local_reference(state, f"NL_{layer_index}.{i - (len(layer) - count)}", x)
        pool = (x.flatten(2).pow(3.0).mean(-1) + 1e-12).pow(1.0 / 3.0)
        bn = {k: state[f"bottleneck.{k}"] for k in ("running_mean", "running_var", "weight", "bias")}
        fc = F.batch_norm(pool, bn["running_mean"], bn["running_var"], bn["weight"], bn["bias"], False)
    unit = lambda t: t / t.pow(2).sum(1, keepdim=True).sqrt()  # noqa: E731 - the public Normalize(2)
    return unit(pool), unit(fc)


# ----------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def converted(module_scratch):
    """The public state dict, its checkpoint file, and the converted checkpoint with its model (ResNet-50)."""
    state = public_state_dict()
    source, out = module_scratch / "sysu_agw_p4_n8_lr_0.1_seed_0_best.t", module_scratch / "agw.pth"
    public_checkpoint(state, source)
    assert run_cli(main, ["--from", "agw", str(source), "--out", str(out)]) == 0
    checkpoint = load_checkpoint(out)
    model, cfg = model_from_checkpoint(checkpoint, str(out))
    source.unlink()  # 280 MB: the tests below need the tensors, not the file
    return state, out, checkpoint, model.eval(), cfg


def test_parameter_count_is_resnet50_plus_a_stem_five_non_local_blocks_neck_and_classifier(converted):
    _, _, _, model, _ = converted
    with torch.device("meta"):
        resnet = torchvision.models.resnet50(weights=None)
    trunk = sum(p.numel() for name, p in resnet.named_parameters() if not name.startswith("fc."))
    stem = resnet.conv1.weight.numel() + resnet.bn1.weight.numel() + resnet.bn1.bias.numel()
    width = 1
    non_local = sum(3 * (c * width + width) + (width * c + c) + 2 * c
                    for count, c in NON_LOCAL.values() for _ in range(count))
    neck, classifier = 2 * 2048, NUM_CLASSES * 2048
    assert sum(p.numel() for p in model.parameters()) == trunk + stem + non_local + neck + classifier


def test_every_tensor_lands_where_the_public_model_uses_it(converted):
    state, _, checkpoint, model, _ = converted
    ex = model.extractor
    for m, stem in enumerate(STEMS):
        assert torch.equal(ex.stems[m][0][0].weight, state[f"{stem}.conv1.weight"])
        assert torch.equal(ex.stems[m][0][1].running_var, state[f"{stem}.bn1.running_var"])
    assert torch.equal(ex.shared[0][1].conv2.weight, state[f"{TRUNK}.layer1.1.conv2.weight"])
    assert isinstance(ex.shared[2], NonLocalStage) and not isinstance(ex.shared[3], NonLocalStage)
    assert torch.equal(ex.shared[2].blocks[2].conv1.weight, state[f"{TRUNK}.layer3.2.conv1.weight"])
    assert torch.equal(ex.shared[1].blocks[0].downsample[1].running_mean,
                       state[f"{TRUNK}.layer2.0.downsample.1.running_mean"])
    assert torch.equal(ex.shared[3][2].bn3.weight, state[f"{TRUNK}.layer4.2.bn3.weight"])
    nl = ex.shared[2].non_local[1]
    for ours, public in ((nl.g.weight, "g.0.weight"), (nl.theta.bias, "theta.bias"), (nl.w_conv.weight, "W.0.weight"),
                         (nl.w_bn.weight, "W.1.weight"), (nl.w_bn.running_mean, "W.1.running_mean")):
        assert torch.equal(ours, state[f"NL_3.1.{public}"])
    assert torch.equal(ex.shared[1].non_local[0].phi.weight, state["NL_2.0.phi.weight"])
    assert torch.equal(model.neck.bn.running_var, state["bottleneck.running_var"])
    assert torch.equal(model.classifier.weight, state["classifier.weight"])
    # and nothing else: the converted weights are the used public entries, element for element
    used = [v for k, v in state.items() if not is_dropped(k)]
    weights = checkpoint["model"].values()
    assert sum(v.numel() for v in weights) == sum(v.numel() for v in used)
    assert sum(float(v.double().sum()) for v in weights) == pytest.approx(sum(float(v.double().sum()) for v in used))


def test_eval_features_are_the_public_pool_and_fc_features(converted):
    state, _, _, model, _ = converted
    images = torch.randn(3, 3, 64, 32, generator=torch.Generator().manual_seed(5))
    for modality in (0, 1):
        bank = model.extract(images, torch.full((3,), modality))
        pool, fc = public_features(state, images, modality)
        for ours, theirs in ((bank["pool"], pool), (bank["shared"], fc)):
            assert ours.shape == theirs.shape == (3, 2048)
            assert torch.allclose(ours.norm(dim=1), torch.ones(3), atol=1e-5)
            assert (ours - theirs).abs().max() < 1e-4
    other = model.extract(images, torch.zeros(3, dtype=torch.long))["shared"]
    assert not torch.allclose(other, model.extract(images, torch.ones(3, dtype=torch.long))["shared"], atol=1e-3)


def test_converted_checkpoint_describes_the_agw_model_of_the_config(converted):
    _, _, checkpoint, _, cfg = converted
    assert checkpoint["num_classes"] == NUM_CLASSES
    m = cfg.model
    assert (m.name, m.backbone, m.non_local, m.non_local_width, m.pooling, m.gem_p, m.gem_learn_p, m.last_stride) == \
        ("agw", "resnet50", [0, 2, 3, 0], 1, "gem", 3.0, False, 1)
    assert (cfg.data.height, cfg.data.width, cfg.eval.flip, m.agw.test_feature) == (288, 144, False, "fc")
    import yaml

    recipe = yaml.safe_load((REPO_ROOT / "configs" / "agw_sysu.yaml").read_text())
    stored = checkpoint["config"]
    assert {k: stored["model"][k] for k in recipe["model"]} == recipe["model"]  # one description of the model
    assert checkpoint["converted_from"] == {"format": "agw", "file": "sysu_agw_p4_n8_lr_0.1_seed_0_best.t",
                                           "epoch": 26, "rank1": 0.475, "mAP": 0.4765, "mINP": 0.353}


def test_eval_py_scores_the_converted_checkpoint(converted, sysu_root, tmp_path, capsys):
    _, out, _, _, _ = converted
    config = REPO_ROOT / "configs" / "agw_sysu.yaml"
    capsys.readouterr()
    result = tmp_path / "result.json"
    assert run_cli(eval_main, ["--config", str(config), "--checkpoint", str(out), "--json", str(result),
                               f"data.root={sysu_root}", "data.height=64", "data.width=32", "data.num_workers=0",
                               "eval.trials=1", "eval.batch_size=32", "train.device=cpu"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"test, cosine of AGW's FC features [{COMPARABLE['inductive']}]: SYSU-MM01")
    assert any(line.split()[:1] == ["mean"] for line in lines)
    summary = json.loads(result.read_text())
    assert 0.0 <= summary["mean"]["mAP"] <= 1.0 and len(summary["trials"]) == 1


def test_the_convert_command_says_what_it_wrote(module_scratch, capsys):
    source = module_scratch / "bare.t"
    state = public_state_dict(seed=1)
    used = {k: v for k, v in state.items() if not is_dropped(k)}
    fc = {"visible_module.visible.fc.weight": torch.zeros(1000, 2048),  # a torchvision-built stem would have one
          "visible_module.visible.fc.bias": torch.zeros(1000)}
    torch.save({f"module.{k}": v for k, v in {**used, **fc}.items()}, source)  # bare, DataParallel keys, with an fc
    assert run_cli(main, ["--from", "agw", str(source), "--out", str(module_scratch / "bare.pth")]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"wrote {module_scratch / 'bare.pth'}: AGW ResNet-50, {NUM_CLASSES} classes")
    assert f"{len(used)} entries used, 2 unused ones dropped" in line
    assert load_checkpoint(module_scratch / "bare.pth")["converted_from"] == {"format": "agw", "file": "bare.t"}


# ----------------------------------------------------------------------- refusals


def refused(path, tmp_path, capsys) -> str:
    """Convert ``path``; it must fail with exit code 2 and one line, which is returned."""
    assert run_cli(main, ["--from", "agw", str(path), "--out", str(tmp_path / "out.pth")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")
    assert not (tmp_path / "out.pth").exists()
    return err[0]


def test_an_unexpected_key_is_refused_by_name(tmp_path, capsys):
    path = tmp_path / "extra.t"
    classifier = torch.zeros(NUM_CLASSES, 2048)
    torch.save({"net": {"classifier.weight": classifier, "visible_module.visible.layer5.0.conv1.weight": classifier},
                "epoch": 3}, path)
    assert "'visible_module.visible.layer5.0.conv1.weight' is not an entry" in refused(path, tmp_path, capsys)


def test_a_wrong_shape_and_a_missing_entry_are_refused_by_name(tmp_path, capsys):
    path = tmp_path / "shape.t"
    wide = torch.zeros(1024, 2, 1, 1)
    torch.save({"net": {"classifier.weight": torch.zeros(NUM_CLASSES, 2048), "NL_3.2.W.0.weight": wide}}, path)
    assert "'NL_3.2.W.0.weight' has shape [1024, 2, 1, 1], AGW's ResNet-50 has [1024, 1, 1, 1]" in \
        refused(path, tmp_path, capsys)
    torch.save({"net": {"classifier.weight": torch.zeros(NUM_CLASSES, 512)}}, path)
    assert "'classifier.weight' has shape [7, 512]" in refused(path, tmp_path, capsys)
    torch.save({"net": {"classifier.weight": torch.zeros(NUM_CLASSES, 2048)}}, path)
    assert "lacks 'visible_module.visible.conv1.weight' (+" in refused(path, tmp_path, capsys)


class _Payload:
    """Unpickling this runs os.mkdir: what a crafted checkpoint would do instead."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def test_a_file_that_needs_full_unpickling_is_refused_before_anything_runs(tmp_path, capsys):
    marker = tmp_path / "ran"
    path = tmp_path / "crafted.t"
    torch.save({"net": {"classifier.weight": torch.zeros(2, 2048)}, "epoch": _Payload(str(marker))}, path)
    message = refused(path, tmp_path, capsys)
    assert "refused and nothing in it was run" in message
    assert not marker.exists()
    with open(path, "rb") as handle:  # the file really does run code when fully unpickled
        torch.load(handle, weights_only=False)
    assert marker.is_dir()


def test_not_a_state_dict_is_refused(tmp_path, capsys):
    path = tmp_path / "list.t"
    torch.save([torch.zeros(2)], path)
    assert "holds a list, not a state dict" in refused(path, tmp_path, capsys)
    path.write_bytes(b"not a checkpoint")
    assert "cannot be read" in refused(path, tmp_path, capsys)


def test_numpy_metrics_of_numpy_1_and_2_are_read(tmp_path):
    """The public metrics pickle as numpy.core.multiarray (NumPy 1) or numpy._core.multiarray (NumPy 2)."""
    path = tmp_path / "metrics.t"
    torch.save({"cmc": np.arange(3, dtype=np.float64), "mAP": np.float64(0.5), "mINP": np.float32(0.25)}, path,
               _use_new_zipfile_serialization=False)  # one plain pickle stream, so its module names can be edited
    data = path.read_bytes()
    assert b"numpy._core.multiarray" in data or b"numpy.core.multiarray" in data
    for module in (b"numpy.core.multiarray", b"numpy._core.multiarray"):
        edited = data.replace(b"numpy._core.multiarray", module).replace(b"numpy.core.multiarray", module)
        path.write_bytes(edited)
        loaded = load_foreign(path)
        assert loaded["cmc"].tolist() == [0.0, 1.0, 2.0] and loaded["mAP"] == 0.5 and loaded["mINP"] == np.float32(0.25)
    with pytest.raises(pickle.UnpicklingError):  # what the allow-list adds is needed: plain weights_only refuses
        torch.load(path, weights_only=True)
