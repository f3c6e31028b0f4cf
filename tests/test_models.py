"""The cm-SSFT model on tiny inputs: shapes, routing, gradients, heads, test modes, pretrained weights."""

from __future__ import annotations

import time
import urllib.error

import pytest
import torch
import torchvision

from cmssft.config import Config
from cmssft.errors import UserError
from cmssft.losses import build_criterion
from cmssft.models import CmSSFT, build_model
from cmssft.models import backbone as backbone_module
from cmssft.models.backbone import resnet_stages
from cmssft.models.heads import ModalityDiscriminator, Projector, dann_ramp, grad_reverse, set_reversal_ramp
from cmssft.registry import MODELS

NUM_CLASSES = 4


def tiny_config(**model) -> Config:
    cfg = Config()
    cfg.model.backbone = "resnet18"
    cfg.model.pretrained = "none"
    cfg.model.sstn.topk = 3
    for key, value in model.items():
        setattr(cfg.model, key, value)
    return cfg


def baseline_config() -> Config:
    cfg = tiny_config(use_specific=False, modality_adaptation=False, project_adversarial=False)
    cfg.model.reconstruction = False
    cfg.model.sstn.enabled = False
    return cfg


def tiny_batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """2 identities x 2 images per modality, modalities interleaved (not grouped)."""
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(8, 3, 64, 32, generator=gen)
    modality = torch.tensor([0, 1, 1, 0, 0, 1, 1, 0])
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    return images, modality, labels


@pytest.fixture(scope="module")
def full_model() -> CmSSFT:
    torch.manual_seed(0)
    return build_model(tiny_config(pooling="gem"), NUM_CLASSES)


def test_build_model_is_registered_and_typed(full_model):
    assert "cmssft" in MODELS
    assert isinstance(full_model, CmSSFT)


def test_training_outputs(full_model):
    full_model.train()
    images, modality, labels = tiny_batch()
    out = full_model(images, modality, labels)
    shapes = {k: tuple(v.shape) for k, v in out.items() if k != "stats"}
    assert shapes == {
        "shared_feat": (8, 512),
        "shared_logits": (8, NUM_CLASSES),
        "specific_feat": (8, 512),
        "specific_logits": (8, NUM_CLASSES),
        "fused_feat": (8, 3 * 512),
        "fused_logits": (8, NUM_CLASSES),
        "modality_logits": (8, 2),
        "project_pred": (8, 512),
        "project_target": (8, 512),
        "recon": (8, 3, 8, 4),
        "recon_target": (8, 3, 8, 4),
    }
    stats = out["stats"]
    assert {"sstn/cross_edges", "sstn/same_id_edges", "heads/modality_accuracy"} <= set(stats)
    assert all(v.dim() == 0 and not v.requires_grad for v in stats.values())
    # the reconstruction target is each image's own (caller-order) downsampled input
    assert torch.allclose(out["recon_target"], torch.nn.functional.adaptive_avg_pool2d(images, (8, 4)))


def test_extract_bank(full_model):
    full_model.eval()
    images, modality, _ = tiny_batch()
    bank = full_model.extract(images, modality)
    assert set(bank) == {"shared", "specific", "modality"}
    assert bank["shared"].shape == bank["specific"].shape == (8, 512)
    assert bank["shared"].dtype == torch.float32
    assert torch.equal(bank["modality"], modality)


def test_routing_keeps_each_image_with_its_own_branch(full_model):
    """Eval features do not depend on batch composition or order: each image sees only its branch."""
    full_model.eval()
    images, modality, _ = tiny_batch()
    bank = full_model.extract(images, modality)
    perm = torch.tensor([5, 2, 7, 0, 1, 6, 3, 4])
    shuffled = full_model.extract(images[perm], modality[perm])
    for key in ("shared", "specific"):
        assert torch.allclose(shuffled[key], bank[key][perm], atol=1e-5)
    single = full_model.extract(images[1:2], modality[1:2])  # an IR-only batch (empty RGB branch)
    assert torch.allclose(single["specific"], bank["specific"][1:2], atol=1e-5)
    swapped = full_model.extract(images[1:2], 1 - modality[1:2])  # other branch, other features
    assert not torch.allclose(swapped["specific"], bank["specific"][1:2], atol=1e-3)


@pytest.mark.parametrize("mode", ["transductive", "single_query", "off"])
def test_score_modes(full_model, mode):
    """Each mode gives its own distances: the SSTN's (checked against the dense reference) or the plain cosine."""
    from cmssft.models.sstn_reference import dense_distance

    full_model.eval()
    images, modality, _ = tiny_batch()
    bank = full_model.extract(images, modality)
    query = {k: v[modality == 1] for k, v in bank.items()}
    gallery = {k: v[modality == 0] for k, v in bank.items()}
    dist = full_model.score(query, gallery, mode)
    assert dist.shape == (4, 4)
    assert torch.isfinite(dist).all()
    if mode == "off":  # shared features, cosine distance
        q = torch.nn.functional.normalize(query["shared"], dim=1)
        g = torch.nn.functional.normalize(gallery["shared"], dim=1)
        assert torch.allclose(dist, 1 - q @ g.T, atol=1e-6)
    else:
        def triple(part):
            return part["shared"], part["specific"], part["modality"]

        assert torch.allclose(dist, dense_distance(full_model.sstn, triple(query), triple(gallery), mode), atol=1e-5)
    for other in {"transductive", "single_query", "off"} - {mode}:
        assert not torch.allclose(dist, full_model.score(query, gallery, other), atol=1e-4), other
    assert torch.equal(full_model.score(query, gallery), full_model.score(query, gallery, full_model.test_mode))


def test_single_query_on_the_model_equals_separate_transductive_calls(full_model):
    full_model.eval()
    images, modality, _ = tiny_batch()
    bank = full_model.extract(images, modality)
    query = {k: v[modality == 1] for k, v in bank.items()}
    gallery = {k: v[modality == 0] for k, v in bank.items()}
    single = full_model.score(query, gallery, "single_query")
    rows = [
        full_model.score({k: v[i : i + 1] for k, v in query.items()}, gallery, "transductive")
        for i in range(4)
    ]
    assert torch.allclose(single, torch.cat(rows), atol=1e-5)


def test_one_backward_reaches_every_branch_and_head():
    torch.manual_seed(0)
    cfg = tiny_config(pooling="gem")
    cfg.model.sstn.fusion = "concat"
    cfg.model.sstn.affinity_dim = 16
    model = build_model(cfg, NUM_CLASSES).train()
    images, modality, labels = tiny_batch()
    terms = build_criterion(cfg)(model(images, modality, labels), labels, modality)
    terms["total"].backward()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    missing = [n for n, p in trainable if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []
    prefixes = {n.split(".")[0] for n, _ in trainable}
    assert {"extractor", "sstn", "modality_head", "projectors", "decoders", "cls_fused"} <= prefixes
    for branch in ("stems.0", "stems.1", "shared", "specific.0", "specific.1"):
        assert any(n.startswith(f"extractor.{branch}.") for n, _ in trainable)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {"neck_sh.bn.bias", "necks_sp.0.bn.bias", "necks_sp.1.bn.bias", "sstn.neck.bn.bias"}


def test_gradient_reversal_sign_and_scale():
    x = torch.randn(5, 3, requires_grad=True)
    weight = torch.randn(5, 3)
    (grad_reverse(x, 0.7) * weight).sum().backward()
    assert torch.allclose(x.grad, -0.7 * weight)


def test_the_reversal_ramp_scales_only_what_reaches_the_extractor():
    def grads(ramp):
        torch.manual_seed(0)
        head = ModalityDiscriminator(6, hidden=8, grl_scale=0.5)
        set_reversal_ramp(head, ramp)
        h = torch.randn(4, 6, requires_grad=True)
        torch.nn.functional.cross_entropy(head(h), torch.tensor([0, 1, 0, 1])).backward()
        return h.grad, head.net[0].weight.grad

    (full, head_full), (quarter, head_quarter) = grads(1.0), grads(0.25)
    assert torch.allclose(quarter, 0.25 * full) and full.abs().sum() > 0
    assert torch.equal(head_quarter, head_full)  # the head itself always learns at full strength
    assert torch.equal(grads(0.0)[0], torch.zeros_like(full))


def test_the_dann_ramp_rises_from_0_to_1():
    values = [dann_ramp(p / 12) for p in range(13)]
    assert values[0] == 0.0 and values[-1] > 0.9999 and values == sorted(values)
    assert dann_ramp(1 / 6) == pytest.approx(0.682, abs=1e-3) and dann_ramp(0.5) == pytest.approx(0.987, abs=1e-3)
    assert dann_ramp(-1.0) == 0.0 and dann_ramp(2.0) == dann_ramp(1.0)  # clamped to [0, 1]


def test_modality_discriminator_reverses_only_the_extractor_side():
    torch.manual_seed(0)
    head = ModalityDiscriminator(6, hidden=8, grl_scale=0.5)
    modality = torch.tensor([0, 1, 0, 1])
    h = torch.randn(4, 6, requires_grad=True)
    torch.nn.functional.cross_entropy(head(h), modality).backward()
    reversed_grad, head_grad = h.grad.clone(), head.net[0].weight.grad.clone()
    h.grad, head.net[0].weight.grad = None, None
    torch.nn.functional.cross_entropy(head.net(h), modality).backward()  # the same without reversal
    assert torch.allclose(reversed_grad, -0.5 * h.grad, atol=1e-7)
    assert torch.allclose(head_grad, head.net[0].weight.grad)  # the discriminator itself is not reversed


def test_projector_reverses_both_extractor_inputs():
    torch.manual_seed(0)
    head = Projector(6, hidden=8, grl_scale=2.0)
    sh = torch.randn(4, 6, requires_grad=True)
    sp = torch.randn(4, 6, requires_grad=True)

    def loss(pred, target):
        return (torch.nn.functional.normalize(pred) - torch.nn.functional.normalize(target)).pow(2).sum()

    loss(*head(sh, sp)).backward()
    g_sh, g_sp = sh.grad.clone(), sp.grad.clone()
    sh.grad = sp.grad = None
    loss(head.net(sh), sp).backward()
    assert torch.allclose(g_sh, -2.0 * sh.grad, atol=1e-6)
    assert torch.allclose(g_sp, -2.0 * sp.grad, atol=1e-6)


@pytest.mark.parametrize("space", ["pooled", "neck"])
def test_project_space_picks_what_the_projectors_see(space):
    torch.manual_seed(0)
    model = build_model(tiny_config(project_space=space), NUM_CLASSES).train()
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    hooks = [p.register_forward_pre_hook(lambda _m, args: seen.append(args)) for p in model.projectors]
    images, modality, labels = tiny_batch()
    out = model(images, modality, labels)
    for h in hooks:
        h.remove()
    grouped = torch.argsort(modality, stable=True)  # projectors see each modality's rows, RGB first
    shared, specific = out["shared_feat"][grouped], out["specific_feat"][grouped]
    sh_in = torch.cat([a for a, _ in seen])
    sp_in = torch.cat([b for _, b in seen])
    if space == "pooled":
        assert torch.equal(sh_in, shared) and torch.equal(sp_in, specific)
    else:  # BN-neck outputs in training mode: each modality's specific rows centred channel by channel
        assert torch.allclose(sh_in, model.neck_sh(shared), atol=1e-5)
        for _, sp in seen:
            assert sp.mean(dim=0).abs().max() < 1e-4
        assert torch.allclose(out["project_target"][grouped], sp_in)
    assert (sp_in >= 0).all() == (space == "pooled")  # pooled post-ReLU features share one mean direction


def test_project_space_is_validated():
    with pytest.raises(UserError, match="project_space"):
        build_model(tiny_config(project_space="raw"), NUM_CLASSES)


def test_shared_only_baseline_gives_only_shared_terms():
    cfg = baseline_config()
    model = build_model(cfg, NUM_CLASSES).train()
    images, modality, labels = tiny_batch()
    out = model(images, modality, labels)
    assert set(out) == {"shared_feat", "shared_logits", "stats"}
    terms = build_criterion(cfg)(out, labels, modality)
    assert set(terms) == {"id_shared", "triplet_shared", "total"}
    model.eval()
    bank = model.extract(images, modality)
    assert set(bank) == {"shared", "modality"}
    assert model.score(bank, bank, "transductive").shape == (8, 8)  # no SSTN: every mode is "off"


def test_shared_only_with_specific_heads_is_a_user_error():
    cfg = tiny_config(use_specific=False)
    with pytest.raises(UserError, match="project_adversarial"):
        build_model(cfg, NUM_CLASSES)


@pytest.mark.parametrize(("shared_from", "specific_from"), [("conv1", "layer4"), ("layer3", "layer2")])
def test_configurable_split(shared_from, specific_from):
    model = build_model(tiny_config(shared_from=shared_from, specific_from=specific_from), NUM_CLASSES)
    images, modality, labels = tiny_batch()
    out = model(images, modality, labels)
    assert out["specific_feat"].shape == (8, 512)
    assert len(model.extractor.stems[0]) == ["conv1", "layer1", "layer2", "layer3"].index(shared_from)


def test_last_stride():
    images = torch.randn(1, 3, 64, 32)
    for stride, size in ((1, (4, 2)), (2, (2, 1))):
        stages = resnet_stages("resnet18", "none", last_stride=stride)
        x = images
        for stage in stages.values():
            x = stage(x)
        assert tuple(x.shape[2:]) == size


def test_param_groups_cover_every_trainable_parameter_once(full_model):
    groups = full_model.param_groups(0.1, 0.1)
    assert [g["name"] for g in groups] == ["backbone", "heads"]
    assert groups[0]["lr"] == pytest.approx(0.01) and groups[1]["lr"] == pytest.approx(0.1)
    ids = [id(p) for g in groups for p in g["params"]]
    trainable = [id(p) for p in full_model.parameters() if p.requires_grad]
    assert sorted(ids) == sorted(trainable) and len(ids) == len(set(ids))


def test_autocast_and_channels_last():
    torch.manual_seed(0)
    cfg = tiny_config()
    model = build_model(cfg, NUM_CLASSES).to(memory_format=torch.channels_last).train()
    images, modality, labels = tiny_batch()
    # 64x32, not smaller: torch's CPU bf16 convolution returns non-finite values at random on 4x2 maps (a
    # stride-2 layer3 conv at 32x16 input; seen with torch 2.14.1), a path no CPU run takes (AMP is CUDA-only).
    images = images.contiguous(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(images, modality, labels)
        terms = build_criterion(cfg)(out, labels, modality)
    terms["total"].backward()
    assert torch.isfinite(terms["total"])
    model.eval()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bank = model.extract(images, modality)
    assert bank["shared"].dtype == torch.float32


def test_pretrained_state_dict_path(tmp_path):
    torch.manual_seed(3)
    reference = torchvision.models.resnet18()
    path = tmp_path / "r18.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in reference.state_dict().items()}}, path)
    stages = resnet_stages("resnet18", str(path))
    assert torch.equal(stages["conv1"][0].weight, reference.conv1.weight)
    assert torch.equal(stages["layer4"][1].conv2.weight, reference.layer4[1].conv2.weight)
    model = build_model(tiny_config(pretrained=str(path)), NUM_CLASSES)
    for stem in model.extractor.stems:  # both modality stems start from the same weights
        assert torch.equal(stem[0][0].weight, reference.conv1.weight)


def test_pretrained_errors(tmp_path):
    with pytest.raises(UserError, match="is not a file"):
        resnet_stages("resnet18", str(tmp_path / "missing.pth"))
    wrong = tmp_path / "r50.pth"
    torch.save(torchvision.models.resnet50().state_dict(), wrong)
    with pytest.raises(UserError, match="does not fit"):
        resnet_stages("resnet18", str(wrong))


def test_missing_imagenet_cache_fails_fast(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))

    def offline(url, timeout):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(backbone_module, "_open_url", offline)
    start = time.perf_counter()
    with pytest.raises(UserError, match="cannot download ImageNet weights"):
        resnet_stages("resnet18", "imagenet")
    assert time.perf_counter() - start < 5


def test_unreachable_weights_server_times_out(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    monkeypatch.setattr(backbone_module, "_open_url", lambda url, timeout: time.sleep(30))
    start = time.perf_counter()
    with pytest.raises(UserError, match="timed out"):
        resnet_stages("resnet18", "imagenet", download_timeout=0.5)
    assert time.perf_counter() - start < 5


def test_imagenet_weights_from_the_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    torch.manual_seed(4)
    reference = torchvision.models.resnet18()
    url = torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url
    (tmp_path / "checkpoints").mkdir()
    torch.save(reference.state_dict(), tmp_path / "checkpoints" / url.rsplit("/", 1)[-1])
    monkeypatch.setattr(
        backbone_module, "_open_url", lambda url, timeout: pytest.fail("no download expected")
    )
    stages = resnet_stages("resnet18", "imagenet")
    assert torch.equal(stages["conv1"][0].weight, reference.conv1.weight)
