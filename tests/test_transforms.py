import numpy as np
import pytest
import torch

from cmssft.data.records import Modality
from cmssft.data.transforms import EvalTransform, TrainTransform, channel_augment, random_erase, read_image


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
