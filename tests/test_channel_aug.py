"""CAJ's channel augmentation (data.channel_exchange_*, data.channel_erasing, data.channel_aug_joint) on the
loader path: each operation on hand-made images, its probabilities, which modality it touches, seeding,
the joint batch layout, and a short training with everything on. The device path's agreement with these
is in tests/test_batch_augment.py."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cmssft.config import load_config
from cmssft.data.records import Modality, Sample
from cmssft.data.sampler import CrossModalityIdentitySampler
from cmssft.data.transforms import (
    CAJ_ERASE_FILL,
    EvalTransform,
    TrainTransform,
    channel_erase,
    channel_exchange,
)
from cmssft.errors import ConfigError

FILL = torch.tensor(CAJ_ERASE_FILL).view(3, 1, 1)


def tiny() -> torch.Tensor:
    """[3, 4, 2] with channels that differ everywhere: R = 1, G = 2, B = 4 plus a per-pixel ramp."""
    ramp = torch.arange(8, dtype=torch.float32).view(4, 2) / 10
    return torch.stack([1 + ramp, 2 + ramp, 4 + ramp])


def outcome(out: torch.Tensor, source: torch.Tensor) -> str:
    """Which result of a channel exchange ``out`` is: 'R', 'G', 'B', 'gray' or 'kept'."""
    if torch.equal(out, source):
        return "kept"
    assert torch.equal(out[0], out[1]) and torch.equal(out[1], out[2]), "three equal channels"
    for name, channel in zip("RGB", source, strict=True):
        if torch.equal(out[0], channel):
            return name
    gray = 0.2989 * source[0] + 0.5870 * source[1] + 0.1140 * source[2]  # BT.601, CAJ's digits
    assert torch.allclose(out[0], gray, atol=1e-6)
    return "gray"


def outcomes(form: str, n: int = 1200) -> dict[str, float]:
    source = tiny()
    seen = [outcome(channel_exchange(source.clone(), form, torch.Generator().manual_seed(s)), source) for s in range(n)]
    return {name: seen.count(name) / n for name in ("R", "G", "B", "gray", "kept")}


def within(share: float, p: float, n: int) -> bool:
    """``share`` of ``n`` draws is within 4 binomial standard deviations of ``p``."""
    return abs(share - p) <= 4 * math.sqrt(p * (1 - p) / n) + 1e-12


@pytest.mark.parametrize(
    ("form", "expected"),
    [
        ("exchange", {"R": 1 / 3, "G": 1 / 3, "B": 1 / 3, "gray": 0.0, "kept": 0.0}),
        ("adap", {"R": 1 / 4, "G": 1 / 4, "B": 1 / 4, "gray": 0.0, "kept": 1 / 4}),
        ("adap_gray", {"R": 1 / 4, "G": 1 / 4, "B": 1 / 4, "gray": 1 / 8, "kept": 1 / 8}),
    ],
)
def test_channel_exchange_forms_give_their_outcomes_at_their_rates(form, expected):
    shares = outcomes(form)
    assert all(within(shares[name], p, 1200) for name, p in expected.items()), shares


def test_gray_uses_the_bt601_weights_on_the_given_values():
    source = tiny()
    seed = next(s for s in range(200) if outcome(channel_exchange(source, "adap_gray",
                                                                 torch.Generator().manual_seed(s)), source) == "gray")
    out = channel_exchange(source, "adap_gray", torch.Generator().manual_seed(seed))
    # pixel (0, 0): R = 1, G = 2, B = 4
    assert out[:, 0, 0].tolist() == pytest.approx([0.2989 * 1 + 0.5870 * 2 + 0.1140 * 4] * 3, abs=1e-6)


def test_channel_erase_fills_one_rectangle_with_the_channel_constants_and_nothing_else():
    height, width = 128, 64
    image = torch.full((3, height, width), 7.0)
    tall = 0
    for seed in range(300):
        out = channel_erase(image, torch.Generator().manual_seed(seed))
        filled = (out == FILL).all(0)
        assert torch.equal(out[:, ~filled], image[:, ~filled])  # untouched elsewhere
        rows, cols = filled.any(1).nonzero().flatten(), filled.any(0).nonzero().flatten()
        h, w = int(rows.max() - rows.min() + 1), int(cols.max() - cols.min() + 1)
        assert filled.sum() == h * w  # one filled rectangle
        # the sides are rounded from an area share in [0.02, 0.4] and an aspect h/w in [0.3, 1/0.3]
        assert (h - 0.5) * (w - 0.5) <= 0.4 * height * width and (h + 0.5) * (w + 0.5) >= 0.02 * height * width
        assert (h + 0.5) / (w - 0.5) >= 0.3 and (h - 0.5) / (w + 0.5) <= 1 / 0.3
        tall += h > w
    assert image.eq(7).all()  # the input is not modified in place
    # the aspect is uniform in [0.3, 3.33] (CAJ), not log-uniform: h > w for (3.33 - 1) / 3.03 = 77 % of boxes
    assert abs(tall / 300 - (1 / 0.3 - 1) / (1 / 0.3 - 0.3)) < 0.1


# --------------------------------------------------------------------------- in the training transform


def image(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (64, 32, 3), dtype=np.uint8)


OFF = {"pad": 0, "flip": 0.0, "channel_aug": 0.0, "random_erasing": 0.0}


def draws(settings: dict, modality: Modality, n: int = 400, view: int = 0, seed: int = 0) -> list[torch.Tensor]:
    transform = TrainTransform(64, 32, **settings)
    return [transform(image(seed), modality, torch.Generator().manual_seed(s), view=view) for s in range(n)]


def exchanged(out: torch.Tensor) -> bool:
    """Equal normalised channels: CAJ copies one channel after normalising."""
    return torch.equal(out[0], out[1]) and torch.equal(out[1], out[2])


def erased(out: torch.Tensor) -> bool:
    return bool((out == FILL).all(0).any())


def test_probabilities_of_erasing_and_exchange_are_respected():
    plain = EvalTransform(64, 32)(image(), Modality.RGB)
    outs = draws({**OFF, "channel_erasing": 0.3}, Modality.RGB)
    assert within(sum(map(erased, outs)) / 400, 0.3, 400)
    assert all(torch.equal(o, plain) for o in outs if not erased(o))
    outs = draws({**OFF, "channel_exchange_rgb": 0.4}, Modality.RGB)
    assert within(sum(map(exchanged, outs)) / 400, 0.4, 400)
    assert all(torch.equal(o, plain) for o in outs if not exchanged(o))


def test_rgb_only_settings_leave_ir_samples_alone_and_the_ir_exchange_reaches_them():
    plain = EvalTransform(64, 32)(image(), Modality.IR)
    rgb_only = {**OFF, "channel_exchange_rgb": 1.0, "channel_exchange_rgb_form": "adap_gray"}
    assert all(torch.equal(o, plain) for o in draws(rgb_only, Modality.IR, n=50))
    assert all(torch.equal(o, EvalTransform(64, 32)(image(), Modality.RGB))
               for o in draws({**OFF, "channel_exchange_ir": 1.0}, Modality.RGB, n=50))
    outs = draws({**OFF, "channel_exchange_ir": 1.0, "channel_exchange_ir_form": "exchange"}, Modality.IR, n=50)
    assert all(exchanged(o) and not torch.equal(o, plain) for o in outs)  # normalised IR channels differ


def test_erasing_reaches_both_modalities():
    for modality in Modality:
        assert sum(map(erased, draws({**OFF, "channel_erasing": 1.0}, modality, n=50))) == 50


def test_caj_draws_come_after_the_older_ones_and_are_seeded():
    settings = {"pad": 4, "flip": 0.5, "channel_aug": 0.0, "random_erasing": 0.5}
    older = draws(settings, Modality.RGB, n=60)
    caj = draws({**settings, "channel_erasing": 0.5}, Modality.RGB, n=60)
    for before, after in zip(older, caj, strict=True):
        kept = ~(after == FILL).all(0)
        assert torch.equal(after[:, kept], before[:, kept])  # crop, flip, erasing: the same draws
    assert sum(not torch.equal(a, b) for a, b in zip(older, caj, strict=True)) > 15
    again = draws({**settings, "channel_erasing": 0.5}, Modality.RGB, n=60)
    assert all(torch.equal(a, b) for a, b in zip(caj, again, strict=True))


def test_joint_views_first_copy_keeps_colour_second_is_exchanged():
    joint = {**OFF, "channel_exchange_rgb": 1.0, "channel_aug_joint": True}
    assert not any(map(exchanged, draws(joint, Modality.RGB, n=50, view=0)))
    assert all(map(exchanged, draws(joint, Modality.RGB, n=50, view=1)))


# --------------------------------------------------------------------------- joint batches and config


def samples(ids: int = 5) -> list[Sample]:
    out = []
    for label in range(ids):
        out += [Sample(f"r{label}_{i}", label, 1, Modality.RGB, label) for i in range(4)]
        out += [Sample(f"i{label}_{i}", label, 3, Modality.IR, label) for i in range(3)]
    return out


def test_joint_batches_repeat_the_rgb_block_as_view_1_with_their_own_seeds():
    p, k = 3, 2
    plain = CrossModalityIdentitySampler(samples(), p, k, num_batches=4, seed=5)
    joint = CrossModalityIdentitySampler(samples(), p, k, num_batches=4, seed=5, joint=True)
    for before, keys in zip(plain, joint.keyed_batches(), strict=True):
        indices, seeds, views = (list(column) for column in zip(*keys, strict=True))
        rgb, ir = before[: p * k], before[p * k :]
        assert indices == rgb + rgb + ir  # the same draw as without joint
        assert views == [0] * (p * k) + [1] * (p * k) + [0] * (p * k)
        assert len(set(seeds)) == len(seeds)  # the copies are augmented apart
    assert all(len(key) == 2 for batch in plain.keyed_batches() for key in batch)  # unchanged without joint


def test_a_joint_loader_batch_carries_views_and_exchanged_second_copies(sysu_root):
    from cmssft.data.datasets import build_dataset
    from cmssft.data.loader import build_train_loader

    from .conftest import TINY_DATA

    cfg = load_config(overrides=[f"data.root={sysu_root}", *TINY_DATA, "data.channel_exchange_rgb=1",
                                 "data.channel_aug_joint=true", "train.iters_per_epoch=1"])
    loader = build_train_loader(cfg, build_dataset(cfg.data).train)
    loader.batch_sampler.set_epoch(0)
    batch = next(iter(loader))
    assert batch["image"].shape == (12, 3, 64, 32)
    assert batch["view"].tolist() == [0] * 4 + [1] * 4 + [0] * 4
    assert batch["modality"].tolist() == [0] * 8 + [1] * 4
    assert torch.equal(batch["index"][:4], batch["index"][4:8]) and torch.equal(batch["label"][:4], batch["label"][4:8])
    assert all(map(exchanged, batch["image"][4:8])) and not any(map(exchanged, batch["image"][:4]))


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (["data.channel_erasing=1.5"], "data.channel_erasing: 1.5 is out of range"),
        (["data.channel_exchange_ir=-0.1"], "data.channel_exchange_ir: -0.1 is out of range"),
        (["data.channel_exchange_rgb_form=gray"], "data.channel_exchange_rgb_form: 'gray' is not one of"),
        (["data.channel_aug=0.5", "data.channel_exchange_rgb=0.5"], "both change RGB channels"),
        (["data.channel_aug_joint=true"], "needs data.channel_exchange_rgb > 0"),
    ],
)
def test_bad_caj_settings_are_one_line_errors(override, message):
    with pytest.raises(ConfigError, match=message) as info:
        load_config(overrides=override)
    assert "\n" not in str(info.value)


def test_the_caj_defaults_are_off_and_the_older_float_keeps_its_meaning():
    data = load_config(overrides=["data.channel_aug=0.5"]).data
    assert data.channel_aug == 0.5
    assert (data.channel_exchange_rgb, data.channel_exchange_ir, data.channel_erasing) == (0.0, 0.0, 0.0)
    assert (data.channel_exchange_rgb_form, data.channel_exchange_ir_form) == ("exchange", "adap_gray")
    assert data.channel_aug_joint is False


# --------------------------------------------------------------------------- a short training


@pytest.mark.parametrize("augment_on", ["cpu", "device"])
def test_a_short_training_with_every_caj_option_on(tmp_path, sysu_root, monkeypatch, augment_on):
    import json

    from cmssft.engine.entry import train_main
    from cmssft.engine.trainer import Trainer

    from .conftest import TINY_CHECKPOINT_RUN

    seen = []
    real = Trainer.to_device

    def recording(self, batch):
        out = real(self, batch)
        seen.append((out.images.detach().clone(), out.modality.tolist(), out.labels.tolist()))
        return out

    monkeypatch.setattr(Trainer, "to_device", recording)
    caj = ["data.channel_exchange_rgb=1", "data.channel_exchange_ir=1", "data.channel_erasing=0.5",
           "data.channel_aug_joint=true", "data.random_erasing=0", "loss.triplet=wrt", "loss.shared_triplet=all",
           "loss.label_smoothing=0", f"data.augment_on={augment_on}", "eval.trials=1"]
    assert train_main(["--run-dir", str(tmp_path / "run"), f"data.root={sysu_root}", *TINY_CHECKPOINT_RUN, *caj]) == 0
    assert len(seen) == 2
    for images, modality, labels in seen:
        assert images.shape[0] == 12 and modality == [0] * 8 + [1] * 4 and labels[:4] == labels[4:8]
        assert all(map(exchanged, images[4:8])) and not any(map(exchanged, images[:4]))
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [record["loss/triplet_shared"] for record in logged if "loss/triplet_shared" in record]
    assert losses and all(math.isfinite(value) for value in losses)


# --------------------------------------------------------------------------- the CAJ configs


@pytest.mark.parametrize("name", ["caj_sysu.yaml", "ablation/caj.yaml", "ablation/caj_triplet.yaml"])
def test_the_caj_configs_hold_the_public_recipe(name):
    from .conftest import REPO_ROOT

    cfg = load_config(REPO_ROOT / "configs" / name)
    model, data, loss = cfg.model, cfg.data, cfg.loss
    assert (model.name, model.pooling, model.gem_p, model.gem_learn_p) == ("agw", "gem", 3.0, False)
    assert model.non_local[0] == model.non_local[3] == 0
    assert (data.channel_exchange_rgb, data.channel_exchange_rgb_form) == (1.0, "exchange")
    assert (data.channel_exchange_ir, data.channel_exchange_ir_form) == (1.0, "adap_gray")
    assert (data.channel_erasing, data.channel_aug_joint, data.random_erasing, data.channel_aug) == (0.5, True, 0, 0)
    assert (loss.label_smoothing, loss.shared_triplet) == (0.0, "all")
    assert loss.triplet == ("hard" if name.endswith("triplet.yaml") else "wrt")
    if name == "caj_sysu.yaml":
        assert model.non_local == [0, 2, 3, 0] and model.backbone == "resnet50"
        assert (data.height, data.width, data.ids_per_batch, data.images_per_id, data.pad) == (288, 144, 8, 4, 10)
        train = cfg.train
        assert (train.optimizer, train.lr, train.backbone_lr_mult, train.weight_decay) == ("sgd", 0.1, 0.1, 5e-4)
        assert (train.epochs, train.warmup_epochs, train.milestones, train.gamma) == (100, 10, [20, 50], 0.1)
    else:  # a demo-scale ablation row: the demo's data and optimiser, AGW's non-local places on ResNet-18
        demo = load_config(REPO_ROOT / "configs" / "demo.yaml")
        assert cfg.train == demo.train and (data.height, data.width, data.root) == (64, 32, demo.data.root)
        assert model.non_local == [0, 1, 1, 0]


@pytest.mark.parametrize("name", ["caj_sysu.yaml", "ablation/caj.yaml"])
def test_the_caj_configs_train_and_evaluate_with_tiny_overrides(name, tmp_path, sysu_root):
    """The recipe at demo size (documented in docs/USAGE.md) and the ablation row, two steps each."""
    from cmssft.engine.entry import train_main

    from .conftest import REPO_ROOT, TINY_DATA

    run_dir = tmp_path / "run"
    assert train_main(["--config", str(REPO_ROOT / "configs" / name), "--run-dir", str(run_dir),
                       f"data.root={sysu_root}", *TINY_DATA, "model.non_local=[0,1,1,0]", "train.epochs=1",
                       "train.iters_per_epoch=2", "train.warmup_epochs=0", "train.eval_every=0", "train.amp=off",
                       "eval.trials=1", "eval.batch_size=32"]) == 0
    log = (run_dir / "log.txt").read_text()
    assert "test, cosine of AGW's FC features" in log and "+- std" in log
