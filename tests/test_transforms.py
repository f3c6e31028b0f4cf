import numpy as np
import pytest
import torch

from cmssft.data.records import Modality
from cmssft.data.transforms import (
    EvalTransform,
    TrainTransform,
    channel_augment,
    normalize,
    pad_and_crop,
    random_erase,
    read_image,
    resize,
    to_tensor,
)


def test_train_transform_shape_and_determinism_under_seed():
    image = np.random.default_rng(0).integers(0, 255, (50, 20, 3), dtype=np.uint8)
    transform = TrainTransform(64, 32, pad=4, channel_aug=0.5, random_erasing=0.5)
    a = transform(image, Modality.RGB, torch.Generator().manual_seed(3))
    b = transform(image, Modality.RGB, torch.Generator().manual_seed(3))
    c = transform(image, Modality.RGB, torch.Generator().manual_seed(4))
    assert a.shape == (3, 64, 32) and a.dtype == torch.float32
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_test_transform_is_deterministic_and_normalised():
    image = np.full((64, 32, 3), 255, dtype=np.uint8)
    out = EvalTransform(64, 32)(image, Modality.IR)
    assert out.shape == (3, 64, 32)
    assert out[0, 0, 0].item() == pytest.approx((1 - 0.485) / 0.229)


def test_channel_augment_gives_equal_channels():
    generator = torch.Generator().manual_seed(0)
    for _ in range(8):
        out = channel_augment(torch.rand(3, 8, 4), generator)
        assert torch.equal(out[0], out[1]) and torch.equal(out[1], out[2])


def test_ir_images_become_three_equal_channels(tmp_path):
    import cv2

    path = tmp_path / "x.jpg"
    cv2.imwrite(str(path), np.random.default_rng(0).integers(0, 255, (16, 8, 3), dtype=np.uint8))
    ir = read_image(str(path), Modality.IR)
    assert ir.shape == (16, 8, 3) and (ir[..., 0] == ir[..., 2]).all()
    assert read_image(str(path), Modality.RGB).shape == (16, 8, 3)


def test_random_erase_zeroes_one_rectangle():
    out = random_erase(torch.ones(3, 32, 16), torch.Generator().manual_seed(0))
    zeros = (out == 0).all(0)
    rows, cols = zeros.any(1).nonzero(), zeros.any(0).nonzero()
    assert zeros.sum() > 0
    assert zeros.sum() == (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)


# --------------------------------------------------------------------------- what each probability and flag does


def asymmetric_image(seed: int = 0) -> np.ndarray:
    """An image that no flip or shift leaves unchanged."""
    return np.random.default_rng(seed).integers(0, 255, (50, 20, 3), dtype=np.uint8)


def resized(image: np.ndarray) -> torch.Tensor:
    """Resize and normalise alone: the train transform with every augmentation off."""
    return EvalTransform(64, 32)(image, Modality.RGB)


def draws(transform: TrainTransform, image: np.ndarray, modality: Modality = Modality.RGB, n: int = 400):
    return [transform(image, modality, torch.Generator().manual_seed(seed)) for seed in range(n)]


def test_train_transform_with_every_augmentation_off_or_on():
    image = asymmetric_image()
    off = TrainTransform(64, 32, pad=0, flip=0.0, channel_aug=0.0, random_erasing=0.0)
    assert all(torch.equal(out, resized(image)) for out in draws(off, image, n=5))
    always_flip = TrainTransform(64, 32, pad=0, flip=1.0, channel_aug=0.0, random_erasing=0.0)
    assert all(torch.equal(out, resized(image).flip(-1)) for out in draws(always_flip, image, n=5))
    crop_only = TrainTransform(64, 32, pad=4, flip=0.0, channel_aug=0.0, random_erasing=0.0)
    outs = draws(crop_only, image, n=20)
    for seed, out in enumerate(outs):  # the zero padding happens before normalising
        crop = pad_and_crop(to_tensor(resize(image, 64, 32)), 4, torch.Generator().manual_seed(seed))
        assert torch.equal(out, normalize(crop))
    assert not all(torch.equal(out, outs[0]) for out in outs)


@pytest.mark.parametrize("flip", [0.3, 0.5])
def test_flip_probability(flip):
    image = asymmetric_image()
    outs = draws(TrainTransform(64, 32, pad=0, flip=flip, channel_aug=0.0, random_erasing=0.0), image)
    flipped = [torch.equal(out, resized(image).flip(-1)) for out in outs]
    assert all(f or torch.equal(out, resized(image)) for f, out in zip(flipped, outs, strict=True))
    assert abs(sum(flipped) / len(outs) - flip) < 0.07  # 400 draws: 3 binomial standard deviations


def test_random_erasing_probability():
    image = asymmetric_image(1)
    outs = draws(TrainTransform(64, 32, pad=0, flip=0.0, channel_aug=0.0, random_erasing=0.4), image)
    erased = [not torch.equal(out, resized(image)) for out in outs]
    assert all(torch.equal(out[:, ~(out == 0).all(0)], resized(image)[:, ~(out == 0).all(0)])
               for out in outs)  # an erased image differs only where it is zero
    assert abs(sum(erased) / len(outs) - 0.4) < 0.075


def test_channel_augmentation_probability_on_rgb():
    image = asymmetric_image(2)
    outs = draws(TrainTransform(64, 32, pad=0, flip=0.0, channel_aug=0.25, random_erasing=0.0), image)
    mean, std = torch.tensor((0.485, 0.456, 0.406)), torch.tensor((0.229, 0.224, 0.225))
    gray = [torch.allclose(out[0] * std[0] + mean[0], out[2] * std[2] + mean[2], atol=1e-5) for out in outs]
    assert all(g or torch.equal(out, resized(image)) for g, out in zip(gray, outs, strict=True))
    assert abs(sum(gray) / len(outs) - 0.25) < 0.07


def test_pad_and_crop_takes_every_offset_and_keeps_the_size():
    pad = 3
    image = torch.arange(1, 3 * 16 * 8 + 1, dtype=torch.float32).reshape(3, 16, 8)  # every pixel unique, none 0
    padded = torch.nn.functional.pad(image, (pad, pad, pad, pad))
    crops = {(top, left): padded[:, top : top + 16, left : left + 8]
             for top in range(2 * pad + 1) for left in range(2 * pad + 1)}
    seen = set()
    for seed in range(400):
        out = pad_and_crop(image, pad, torch.Generator().manual_seed(seed))
        assert out.shape == image.shape
        (offset,) = [key for key, crop in crops.items() if torch.equal(out, crop)]
        seen.add(offset)
    assert {top for top, _ in seen} == set(range(2 * pad + 1)) == {left for _, left in seen}
    assert len(seen) > 40  # of the 49 offsets
    assert torch.equal(pad_and_crop(image, 0, torch.Generator().manual_seed(0)), image)


class ColumnFeatures(torch.nn.Module):
    """A model whose features see left from right: the mean of each image column."""

    def extract(self, images: torch.Tensor, modality: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"shared": images.mean(dim=(1, 2)), "modality": modality}


@pytest.mark.parametrize("flip", [True, False])
def test_test_time_flip_averages_each_image_with_its_mirror(flip):
    from cmssft.engine.inference import extract_features

    gen = torch.Generator().manual_seed(0)
    batches = [{"image": torch.rand(3, 3, 4, 5, generator=gen), "modality": torch.tensor([0, 1, 1])}
               for _ in range(2)]
    bank = extract_features(ColumnFeatures(), batches, torch.device("cpu"), flip=flip, progress=False)
    images = torch.cat([b["image"] for b in batches])
    plain, mirrored = images.mean(dim=(1, 2)), images.flip(-1).mean(dim=(1, 2))
    expected = (plain + mirrored) / 2 if flip else plain
    assert torch.allclose(bank["shared"], expected, atol=1e-6)
    assert not torch.allclose(plain, mirrored, atol=1e-3)  # so the two settings differ
    assert torch.equal(bank["modality"], torch.tensor([0, 1, 1, 0, 1, 1]))  # labels are not averaged
