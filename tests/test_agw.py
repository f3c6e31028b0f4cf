"""AGW as a model of the toolbox, and the parts it shares with cm-SSFT (non-local blocks, fixed-p GeM, config)."""

from __future__ import annotations

import csv
import json
import logging
import sys

import pytest
import torch

from cmssft.config import config_to_dict, load_config
from cmssft.engine.checkpoint import load_checkpoint, save_atomic
from cmssft.engine.entry import train_main
from cmssft.engine.optim import build_optimizer
from cmssft.errors import ConfigError, run_cli
from cmssft.evaluation.cli import main as eval_main
from cmssft.evaluation.features_io import read_feature_file
from cmssft.evaluation.report import COMPARABLE
from cmssft.export import FeatureGraph, output_names
from cmssft.export import main as export_main
from cmssft.losses import build_criterion
from cmssft.models import AGW, CmSSFT, build_model
from cmssft.models.backbone import resnet_stages
from cmssft.models.neck import FixedGeM, GeM
from cmssft.models.non_local import NonLocalBlock, NonLocalStage
from cmssft.models.sstn import MODES
from cmssft.search import main as search_main

from .conftest import REPO_ROOT, TINY_DATA

sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
import ablation  # noqa: E402

NUM_CLASSES = 4
AGW_TINY = ["model.name=agw", "model.non_local=[0,1,1,0]", "model.pooling=gem", "model.gem_learn_p=false"]


def tiny_agw(*extra: str) -> tuple[AGW, object]:
    cfg = load_config(None, [*TINY_DATA, *AGW_TINY, *extra])
    torch.manual_seed(0)
    return build_model(cfg, NUM_CLASSES), cfg


def tiny_batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """2 identities x 2 images per modality, modalities interleaved."""
    images = torch.randn(8, 3, 64, 32, generator=torch.Generator().manual_seed(seed))
    return images, torch.tensor([0, 1, 1, 0, 0, 1, 1, 0]), torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])


def calibrated(model: torch.nn.Module) -> torch.nn.Module:
    """Running statistics from images (features of order 1), then eval mode."""
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.reset_running_stats()
            module.momentum = None
    model.train()
    with torch.no_grad():
        for seed in range(2):
            model(tiny_batch(seed)[0], tiny_batch(seed)[1])
    return model.eval()


# ----------------------------------------------------------------------- non-local block


def test_non_local_block_of_width_1_is_the_hand_computed_response():
    torch.manual_seed(0)
    block = NonLocalBlock(4, width=1).eval()
    with torch.no_grad():
        block.w_bn.weight.uniform_(0.5, 1.5)
        block.w_bn.bias.uniform_(-0.5, 0.5)
        block.w_bn.running_mean.uniform_(-0.2, 0.2)
        block.w_bn.running_var.uniform_(0.5, 1.5)
    x = torch.randn(2, 4, 3, 2)
    expected = torch.empty_like(x)
    for b in range(2):
        pos = x[b].reshape(4, 6)  # [C, N]: N = 3 * 2 positions
        theta = block.theta.weight.reshape(4) @ pos + block.theta.bias  # [N]
        phi = block.phi.weight.reshape(4) @ pos + block.phi.bias
        g = block.g.weight.reshape(4) @ pos + block.g.bias
        y = torch.stack([sum(theta[i] * phi[j] * g[j] for j in range(6)) / 6 for i in range(6)])  # / N, no softmax
        w_y = block.w_conv.weight.reshape(4, 1) * y + block.w_conv.bias.reshape(4, 1)  # [C, N]
        bn = block.w_bn
        w_y = (w_y - bn.running_mean[:, None]) / torch.sqrt(bn.running_var[:, None] + bn.eps) * bn.weight[:, None] \
            + bn.bias[:, None]
        expected[b] = x[b] + w_y.reshape(4, 3, 2)
    with torch.no_grad():
        assert torch.allclose(block(x), expected, atol=1e-5)


def test_a_new_non_local_block_is_the_identity():
    torch.manual_seed(0)
    block = NonLocalBlock(8, width=4)
    assert torch.equal(block.w_bn.weight, torch.zeros(8)) and torch.equal(block.w_bn.bias, torch.zeros(8))
    x = torch.randn(3, 8, 5, 4)
    for mode in (block.train, block.eval):
        mode()
        assert torch.equal(block(x), x)


def test_non_local_blocks_follow_the_last_blocks_of_their_stages():
    torch.manual_seed(0)
    stages = resnet_stages("resnet50", "none", non_local=(0, 2, 3, 0))
    assert not isinstance(stages["layer1"], NonLocalStage) and not isinstance(stages["layer4"], NonLocalStage)
    layer2, layer3 = stages["layer2"], stages["layer3"]
    assert (len(layer2.non_local), layer2.first, len(layer3.non_local), layer3.first) == (2, 2, 3, 3)
    assert layer3.non_local[0].w_conv.out_channels == 1024 and layer3.non_local[0].width == 1
    layer2.eval()
    for nl in layer2.non_local:
        torch.nn.init.uniform_(nl.w_bn.weight, 0.5, 1.0)  # blocks that act
    x = torch.randn(1, 256, 16, 8)
    with torch.no_grad():
        by_hand = x
        for i, block in enumerate(layer2.blocks):
            by_hand = block(by_hand)
            by_hand = layer2.non_local[i - 2](by_hand) if i >= 2 else by_hand
        assert torch.equal(layer2(x), by_hand)
    names = set(stages.state_dict())  # stages without blocks keep torchvision's names
    assert "layer1.0.conv1.weight" in names and "layer2.blocks.3.conv1.weight" in names
    assert "layer3.non_local.2.theta.weight" in names and "layer4.2.bn3.weight" in names


def test_non_local_counts_are_validated_in_one_line():
    assert load_config(None, ["model.backbone=resnet18", "model.non_local=[2,2,2,2]"]).model.non_local == [2] * 4
    for value, words in (("[0,3,0,0]", "more than the 2 blocks of resnet18 layer2"),
                         ("[0,1,1]", "must hold 4 counts"), ("[0,-1,0,0]", "out of range")):
        with pytest.raises(ConfigError) as err:
            load_config(None, ["model.backbone=resnet18", f"model.non_local={value}"])
        assert words in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="non_local_width"):
        load_config(None, ["model.non_local_width=0"])


def test_cmssft_built_on_agws_parts_carries_non_local_copies_in_its_specific_branch():
    cfg = load_config(None, [*TINY_DATA, "model.non_local=[0,1,1,0]", "model.pooling=gem", "model.gem_learn_p=false",
                             "model.sstn.topk=3"])
    torch.manual_seed(0)
    model = build_model(cfg, NUM_CLASSES)
    assert isinstance(model, CmSSFT) and isinstance(model.pool_sh, FixedGeM)
    shared_layer3, specific_layer3 = model.extractor.shared[1], model.extractor.specific[0][0]  # layer2 shared on
    assert isinstance(shared_layer3, NonLocalStage) and isinstance(specific_layer3, NonLocalStage)
    assert specific_layer3.non_local[0].theta.weight is not shared_layer3.non_local[0].theta.weight
    images, modality, labels = tiny_batch()
    terms = build_criterion(cfg)(model(images, modality, labels), labels, modality)
    terms["total"].backward()
    assert specific_layer3.non_local[0].w_bn.weight.grad.abs().sum() > 0  # the copies train


def test_fixed_gem_is_agws_formula_and_the_learned_one_is_unchanged():
    x = torch.rand(2, 3, 4, 2)
    assert torch.allclose(FixedGeM(3.0)(x), (x.flatten(2).pow(3).mean(-1) + 1e-12).pow(1 / 3))
    assert not list(FixedGeM(3.0).parameters())
    learned = GeM(3.0)
    assert [p.shape for p in learned.parameters()] == [torch.Size([])]
    assert torch.allclose(learned(x), x.clamp(min=1e-6).pow(3).mean((2, 3)).pow(1 / 3))


# ----------------------------------------------------------------------- the AGW model


@pytest.fixture(scope="module")
def agw():
    return tiny_agw()[0]


def test_training_outputs_are_what_the_criterion_reads(agw):
    cfg = load_config(None, AGW_TINY)
    agw.train()
    images, modality, labels = tiny_batch()
    out = agw(images, modality, labels)
    assert {k: tuple(v.shape) for k, v in out.items() if k != "stats"} == {"shared_feat": (8, 512),
                                                                          "shared_logits": (8, NUM_CLASSES)}
    assert out["stats"] == {}
    terms = build_criterion(cfg)(out, labels, modality)
    assert set(terms) == {"id_shared", "triplet_shared", "total"}
    terms["total"].backward()
    nl = agw.extractor.shared[1].non_local[0]
    assert nl.w_bn.weight.grad.abs().sum() > 0 and agw.extractor.stems[1][0][0].weight.grad.abs().sum() > 0
    agw.zero_grad()
    # the caller's order is kept: the features of image 1 (IR) do not depend on where it sits in the batch
    agw.eval()
    flipped = agw(images.flip(0), modality.flip(0))["shared_feat"].flip(0)
    assert torch.allclose(agw(images, modality)["shared_feat"], flipped, atol=1e-5)


def test_initialisation_and_parameter_groups_follow_the_public_code(agw):
    neck, classifier = agw.neck.bn, agw.classifier
    assert not neck.bias.requires_grad and torch.equal(neck.bias, torch.zeros(512))
    assert 0.005 < neck.weight.std() < 0.015 and abs(neck.weight.mean() - 1) < 0.005  # N(1, 0.01)
    assert classifier.bias is None and 0.0005 < classifier.weight.std() < 0.0015  # N(0, 0.001)
    cfg = load_config(None, ["train.lr=0.1", "train.backbone_lr_mult=0.1"])
    optimizer = build_optimizer(agw, cfg.train)
    backbone, heads = optimizer.param_groups
    assert (backbone["name"], heads["name"], heads["lr"]) == ("backbone", "heads", 0.1)
    assert backbone["lr"] == pytest.approx(0.01)
    assert optimizer.defaults["nesterov"] and optimizer.defaults["momentum"] == 0.9
    ids = {id(p) for p in backbone["params"]}
    assert all(id(p) in ids for p in agw.extractor.shared[2].non_local.parameters())  # non-local: backbone lr
    assert [id(p) for p in heads["params"]] == [id(neck.weight), id(classifier.weight)]


def test_bank_holds_both_public_test_features_and_scoring_uses_the_named_one(agw):
    agw.eval()
    images, modality, _ = tiny_batch(1)
    bank = agw.extract(images, modality)
    assert {k: tuple(v.shape) for k, v in bank.items()} == {"shared": (8, 512), "pool": (8, 512), "modality": (8,)}
    for key in ("shared", "pool"):
        assert torch.allclose(bank[key].norm(dim=1), torch.ones(8), atol=1e-5)
    assert torch.equal(bank["modality"], modality)
    ir = images[modality == 1]
    alone = agw.extract_modality(ir, 1)
    assert torch.allclose(alone["shared"], bank["shared"][modality == 1], atol=1e-5)
    query = {k: v[:3] for k, v in bank.items()}
    fc_distance = 1 - bank["shared"][:3] @ bank["shared"].T
    for mode in (None, *MODES):  # no transfer: every test mode is the cosine of the FC feature
        assert torch.allclose(agw.score(query, bank, mode), fc_distance, atol=1e-6)
    pool_model = calibrated(tiny_agw("model.agw.test_feature=pool")[0])  # running statistics: FC is centred
    pool_bank = pool_model.extract(images, modality)
    pool_distance = 1 - pool_bank["pool"][:3] @ pool_bank["pool"].T
    assert torch.allclose(pool_model.score({k: v[:3] for k, v in pool_bank.items()}, pool_bank), pool_distance,
                          atol=1e-6)
    assert not torch.allclose(pool_distance, 1 - pool_bank["shared"][:3] @ pool_bank["shared"].T, atol=1e-4)


def test_cmssft_only_settings_are_named_in_one_info_line(caplog):
    with caplog.at_level(logging.INFO, logger="cmssft"):
        tiny_agw()
    assert not [r for r in caplog.records if "ignores" in r.message]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="cmssft"):
        tiny_agw("model.specific_from=layer4", "model.sstn.topk=3", "model.reconstruction=false")
    lines = [r.message for r in caplog.records if "ignores" in r.message]
    assert lines == ["model.name=agw ignores cm-SSFT settings: model.specific_from=layer4, model.sstn.topk=3, "
                     "model.reconstruction=False"]


# ----------------------------------------------------------------------- checkpoints: eval.py, features, export


@pytest.fixture(scope="module")
def agw_checkpoint(module_scratch):
    """A tiny AGW with BatchNorm statistics from images, saved as train.py saves best.pth."""
    model, cfg = tiny_agw()
    calibrated(model)
    path = module_scratch / "agw_best.pth"
    save_atomic({"model": model.state_dict(), "config": config_to_dict(cfg), "num_classes": NUM_CLASSES}, path)
    return model, path


def test_saved_features_score_like_the_checkpoint_with_either_test_feature(agw_checkpoint, sysu_root, tmp_path,
                                                                           capsys):
    _, checkpoint = agw_checkpoint
    config = tmp_path / "cfg.yaml"
    config.write_text(f"data:\n  root: {sysu_root}\n  height: 64\n  width: 32\n  num_workers: 0\n"
                      "eval:\n  trials: 2\n  batch_size: 32\n")
    means, titles = {}, {}
    for feature in ("fc", "pool"):
        choice = f"model.agw.test_feature={feature}"
        feats = tmp_path / f"{feature}.npz"
        for name, source in (("checkpoint", ["--checkpoint", str(checkpoint), "--save-features", str(feats)]),
                             ("features", ["--features", str(feats)])):
            out = tmp_path / f"{feature}_{name}.json"
            assert run_cli(eval_main, ["--config", str(config), *source, "--json", str(out), choice]) == 0
            means[feature, name] = json.loads(out.read_text())["mean"]
            titles[feature, name] = capsys.readouterr().out.splitlines()[0]
        assert means[feature, "features"] == pytest.approx(means[feature, "checkpoint"], abs=1e-6)
        assert titles[feature, "features"] == titles[feature, "checkpoint"]
        assert titles[feature, "checkpoint"].startswith(
            f"test, cosine of AGW's {feature.upper()} features [{COMPARABLE['inductive']}]: ")
    assert means["fc", "checkpoint"] != means["pool", "checkpoint"]


def test_export_graph_returns_both_features(agw_checkpoint, tmp_path, capsys):
    model, checkpoint = agw_checkpoint
    images, modality = tiny_batch(3)[0][:5], torch.tensor([1, 0, 0, 1, 1])
    plain, mirrored = model.extract(images, modality), model.extract(images.flip(-1), modality)
    shared, pool = FeatureGraph(model, (0, 1), flip=True)(images, modality)
    assert output_names(model) == ["shared", "pool"]
    assert torch.allclose(shared, (plain["shared"] + mirrored["shared"]) / 2, atol=1e-5)
    assert torch.allclose(pool, (plain["pool"] + mirrored["pool"]) / 2, atol=1e-5)
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    out = tmp_path / "agw.onnx"
    assert run_cli(export_main, ["--checkpoint", str(checkpoint), "--out", str(out), "--no-flip"]) == 0
    assert [o.name for o in onnx.load(str(out)).graph.output] == ["shared", "pool"]
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    got = session.run(None, {"images": images.numpy(), "modality": modality.numpy()})
    for key, value in zip(("shared", "pool"), got, strict=True):
        assert (torch.from_numpy(value) - plain[key]).abs().max() < 1e-4


def test_search_ranks_by_the_test_feature_and_keeps_both_features(agw_checkpoint, sysu_root, tmp_path, capsys):
    _, checkpoint = agw_checkpoint
    out = tmp_path / "search"
    assert run_cli(search_main, ["--checkpoint", str(checkpoint), "--query", str(sysu_root / "cam3"), "--gallery",
                                 str(sysu_root / "cam1"), "--out", str(out), "--topk", "3", "--workers", "0",
                                 "--device", "cpu", "--pictures", "1"]) == 0
    assert "(cosine of AGW's FC features, 64x32 input)" in capsys.readouterr().out
    query, gallery = read_feature_file(out / "query_features.npz"), read_feature_file(out / "gallery_features.npz")
    assert query.pool is not None and query.pool.shape == query.features.shape
    unit = lambda a: torch.nn.functional.normalize(torch.from_numpy(a), dim=1)  # noqa: E731 - flip-averaged rows
    distance = 1 - unit(query.features[:1]) @ unit(gallery.features).T
    with open(out / "results.csv", newline="") as handle:
        first = [row for row in csv.DictReader(handle) if row["query"] == query.paths[0]]
    assert [row["gallery"] for row in first] == [gallery.paths[i] for i in distance[0].argsort()[:3].tolist()]


# ----------------------------------------------------------------------- training with the AGW configs


def test_agw_sysu_config_trains_and_evaluates_at_demo_size(module_scratch, sysu_root):
    config = REPO_ROOT / "configs" / "agw_sysu.yaml"
    run_dir = module_scratch / "agw_sysu"
    assert train_main(["--config", str(config), "--run-dir", str(run_dir), f"data.root={sysu_root}", *TINY_DATA,
                       "model.non_local=[0,1,1,0]", "train.epochs=1", "train.iters_per_epoch=2",
                       "train.warmup_epochs=0", "train.eval_every=0", "eval.trials=1", "eval.batch_size=32"]) == 0
    log = (run_dir / "log.txt").read_text()
    assert f"test, cosine of AGW's FC features [{COMPARABLE['inductive']}]: SYSU-MM01" in log and "+- std" in log
    assert "test, off" not in log  # nothing to compare: AGW has no transfer
    best = load_checkpoint(run_dir / "best.pth")
    assert best["config"]["model"]["name"] == "agw" and "extractor.shared.1.non_local.0.theta.weight" in best["model"]
    losses = {key for line in (run_dir / "metrics.jsonl").read_text().splitlines() for key in json.loads(line)}
    assert {"loss/id_shared", "loss/triplet_shared"} <= losses and "loss/id_fused" not in losses


@pytest.mark.parametrize("row", ["agw", "agw_triplet", "full_agw"])
def test_ablation_rows_on_agws_parts(row, module_scratch):
    cfg = load_config(REPO_ROOT / "configs" / "ablation" / f"{row}.yaml")
    demo = load_config(REPO_ROOT / "configs" / "demo.yaml")
    assert (cfg.model.non_local, cfg.model.pooling, cfg.model.gem_learn_p) == ([0, 1, 1, 0], "gem", False)
    assert (cfg.train, cfg.model.backbone, cfg.data.height, cfg.data.width) == \
        (demo.train, "resnet18", 64, 32)  # rows differ from the demo in model, loss and augmentation only
    if row == "full_agw":
        assert cfg.model.name == "cmssft" and cfg.loss.label_smoothing == demo.loss.label_smoothing
    else:
        assert cfg.model.name == "agw" and cfg.data.random_erasing == 0 and cfg.loss.label_smoothing == 0


@pytest.fixture(scope="module")
def agw_row_run(module_scratch, sysu_root):
    """configs/ablation/agw.yaml trained for 2 steps on the generated tree."""
    config = REPO_ROOT / "configs" / "ablation" / "agw.yaml"
    run_dir = module_scratch / "agw_row"
    assert train_main(["--config", str(config), "--run-dir", str(run_dir), f"data.root={sysu_root}",
                       "model.pretrained=none", "train.epochs=1", "train.iters_per_epoch=2", "train.device=cpu",
                       "data.ids_per_batch=2", "data.images_per_id=2", "eval.trials=1"]) == 0
    return run_dir


def test_agw_ablation_row_trains(agw_row_run):
    assert (agw_row_run / "best.pth").is_file()
    log = (agw_row_run / "log.txt").read_text()
    assert "test, cosine of AGW's FC features" in log
    assert "test, off" not in log  # the demo compares with the off mode; AGW has none
    assert log.count("model.name=agw ignores cm-SSFT settings: model.specific_from=layer4\n") == 1  # the demo's


def test_the_ablation_runner_scores_an_agw_row(agw_row_run):
    scores = ablation.score_modes(agw_row_run, ["transductive", "single_query", "off", "off+rerank"])
    assert set(scores) == {"off", "off+rerank"}  # no transfer: the SSTN modes are not scored
    pool = ablation.score_modes(agw_row_run, ["off"], ["model.agw.test_feature=pool"])
    assert pool["off"]["mAP"] != scores["off"]["mAP"]
    assert ablation.parse_args(["--score-set", "model.agw.test_feature=pool"]).score_overrides

