"""Image loading and augmentation.

Images are read with OpenCV, resized once, and augmented as tensors. IR images
become 3-channel (gray replicated) so both modalities share one input format.
Output of the train and eval transforms: float Tensor [3, H, W], normalised with
ImageNet statistics. With ``data.augment_on=device`` the loader uses
:class:`ResizeTransform` instead (uint8 [H, W, 3]) and the training device
augments whole batches (:mod:`cmssft.data.batch_augment`, same parameters).

The CAJ channel augmentation (:func:`channel_erase`, :func:`channel_exchange`; Ye et al.,
ICCV 2021) acts on the *normalised* image, after the other augmentations, as the public CAJ
code applies it; the older ``data.channel_aug`` (:func:`channel_augment`) acts before normalising.
"""

from __future__ import annotations

import math
import os

import cv2
import numpy as np
import torch

from cmssft.config import DataConfig
from cmssft.data.bad_images import bytes_problem
from cmssft.data.records import Modality
from cmssft.errors import DatasetError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
GRAY_WEIGHTS = (0.299, 0.587, 0.114)  # ITU-R BT.601 luma, the gray of channel augmentation
ERASE_AREA = (0.02, 0.33)  # random erasing: share of the image area, drawn uniformly
ERASE_RATIO = (0.3, 3.3)  # random erasing: height/width aspect ratio, drawn log-uniformly
ERASE_ATTEMPTS = 10  # draws of (area, ratio) until the rectangle fits; none fits: no erasing
# CAJ channel augmentation, the public code's constants (docs/METHOD.md)
# the forms of data.channel_exchange_*_form and their draws 0..n-1: 0-2 a channel, 3 no channel
EXCHANGE_CHOICES = {"exchange": 3, "adap": 4, "adap_gray": 4}
CAJ_GRAY_WEIGHTS = (0.2989, 0.5870, 0.1140)  # BT.601 luma to four digits, as CAJ's gray computes it
CAJ_GRAY_P = 0.5  # adap_gray: how often the "no channel" draw becomes the gray image
CAJ_ERASE_FILL = (0.4914, 0.4822, 0.4465)  # channel random erasing: per-channel value in the normalised image
CAJ_ERASE_AREA = (0.02, 0.4)  # share of the image area, drawn uniformly
CAJ_ERASE_ASPECT = (0.3, 1 / 0.3)  # height/width, drawn uniformly (not log-uniformly)
CAJ_ERASE_ATTEMPTS = 100  # draws of (area, aspect) until the rectangle fits; none fits: no erasing


def read_image(path: str, modality: Modality) -> np.ndarray:
    """uint8 [H, W, 3] in RGB order; IR as gray replicated to 3 channels.

    Missing, empty, truncated and undecodable files raise a :class:`DatasetError` naming the file
    (OpenCV alone would decode a truncated JPEG into partly gray pixels; see :mod:`cmssft.data.bad_images`).
    """
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except (OSError, ValueError) as err:  # ValueError: a NUL character in the path
        raise DatasetError(f"cannot read image {path} ({getattr(err, 'strerror', None) or err})") from None
    problem = bytes_problem(data, os.path.basename(path))
    if problem is not None:
        raise DatasetError(f"cannot read image {path} ({problem})")
    flag = cv2.IMREAD_GRAYSCALE if modality == Modality.IR else cv2.IMREAD_COLOR
    image = cv2.imdecode(np.frombuffer(data, np.uint8), flag)
    if image is None:
        raise DatasetError(f"cannot read image {path} (corrupt: the decoder rejects it)")
    if modality == Modality.IR:
        return np.repeat(image[:, :, None], 3, axis=2)
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
    if image.shape[:2] == (height, width):
        return image
    return cv2.resize(image, (width, height), interpolation=cv2.INTER_LINEAR)


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """uint8 [H, W, 3] -> float [3, H, W] in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float().div_(255.0)


def normalize(tensor: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (tensor - mean) / std


def _uniform(generator: torch.Generator) -> float:
    return float(torch.rand((), generator=generator))


def pad_and_crop(tensor: torch.Tensor, pad: int, generator: torch.Generator) -> torch.Tensor:
    """Zero-pad by ``pad`` pixels and crop back to the original size at a random offset."""
    if pad <= 0:
        return tensor
    _, height, width = tensor.shape
    padded = torch.nn.functional.pad(tensor, (pad, pad, pad, pad))
    top, left = torch.randint(0, 2 * pad + 1, (2,), generator=generator).tolist()
    return padded[:, top : top + height, left : left + width]


def channel_augment(tensor: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Replace the image by one of its channels or its gray version (channel augmentation).

    This makes colour an unreliable cue, pushing RGB features towards what IR can see.
    """
    choice = int(torch.randint(0, 4, (1,), generator=generator))
    if choice < 3:
        return tensor[choice : choice + 1].expand(3, -1, -1).clone()
    gray = GRAY_WEIGHTS[0] * tensor[0] + GRAY_WEIGHTS[1] * tensor[1] + GRAY_WEIGHTS[2] * tensor[2]
    return gray.unsqueeze(0).expand(3, -1, -1).clone()


def random_erase(
    tensor: torch.Tensor,
    generator: torch.Generator,
    area: tuple[float, float] = ERASE_AREA,
    ratio: tuple[float, float] = ERASE_RATIO,
) -> torch.Tensor:
    """Zero a random rectangle (random erasing), simulating occlusion."""
    _, height, width = tensor.shape
    for _ in range(ERASE_ATTEMPTS):
        target = height * width * (area[0] + (area[1] - area[0]) * _uniform(generator))
        log_r = math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * _uniform(generator)
        h = int(round(math.sqrt(target * math.exp(log_r))))
        w = int(round(math.sqrt(target / math.exp(log_r))))
        if 0 < h < height and 0 < w < width:
            top = int(torch.randint(0, height - h + 1, (1,), generator=generator))
            left = int(torch.randint(0, width - w + 1, (1,), generator=generator))
            tensor = tensor.clone()
            tensor[:, top : top + h, left : left + w] = 0
            return tensor
    return tensor


def channel_exchange(tensor: torch.Tensor, form: str, generator: torch.Generator) -> torch.Tensor:
    """CAJ's random channel exchange of a normalised ``[3, H, W]`` image: one channel, drawn uniformly,
    copied to all three; ``form`` (``EXCHANGE_CHOICES``) says what a fourth draw does: ``exchange`` has
    none, ``adap`` keeps the image, ``adap_gray`` makes it gray (``CAJ_GRAY_WEIGHTS``) with probability
    ``CAJ_GRAY_P`` and keeps it otherwise. Colour stops being a cue, as it is none across modalities.
    """
    choice = int(torch.randint(0, EXCHANGE_CHOICES[form], (1,), generator=generator))
    if choice < 3:
        return tensor[choice : choice + 1].expand(3, -1, -1).clone()
    if form == "adap_gray" and _uniform(generator) < CAJ_GRAY_P:
        w = CAJ_GRAY_WEIGHTS
        return (w[0] * tensor[0] + w[1] * tensor[1] + w[2] * tensor[2]).unsqueeze(0).expand(3, -1, -1).clone()
    return tensor


def channel_erase(tensor: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """CAJ's channel random erasing of a normalised ``[3, H, W]`` image: a random rectangle
    (``CAJ_ERASE_AREA``, ``CAJ_ERASE_ASPECT``) set to the per-channel constants ``CAJ_ERASE_FILL``."""
    _, height, width = tensor.shape
    for _ in range(CAJ_ERASE_ATTEMPTS):
        target = height * width * (CAJ_ERASE_AREA[0] + (CAJ_ERASE_AREA[1] - CAJ_ERASE_AREA[0]) * _uniform(generator))
        aspect = CAJ_ERASE_ASPECT[0] + (CAJ_ERASE_ASPECT[1] - CAJ_ERASE_ASPECT[0]) * _uniform(generator)
        h = int(round(math.sqrt(target * aspect)))
        w = int(round(math.sqrt(target / aspect)))
        if h < height and w < width:
            top = int(torch.randint(0, height - h + 1, (1,), generator=generator))
            left = int(torch.randint(0, width - w + 1, (1,), generator=generator))
            tensor = tensor.clone()
            tensor[:, top : top + h, left : left + w] = torch.tensor(CAJ_ERASE_FILL).view(3, 1, 1)
            return tensor
    return tensor


class TrainTransform:
    """Resize, pad + random crop, horizontal flip, channel augmentation (RGB), normalise, erase, then the
    CAJ channel erasing and channel exchange (:meth:`caj`).

    Every random choice comes from the ``generator`` passed in, so an image's
    augmentation depends only on its draw seed, not on workers or history.
    """

    def __init__(
        self,
        height: int,
        width: int,
        *,
        pad: int = 10,
        flip: float = 0.5,
        channel_aug: float = 0.0,
        random_erasing: float = 0.5,
        channel_exchange_rgb: float = 0.0,
        channel_exchange_rgb_form: str = "exchange",
        channel_exchange_ir: float = 0.0,
        channel_exchange_ir_form: str = "adap_gray",
        channel_erasing: float = 0.0,
        channel_aug_joint: bool = False,
    ) -> None:
        self.height, self.width, self.pad, self.flip = height, width, pad, flip
        self.channel_aug, self.random_erasing = channel_aug, random_erasing
        self.exchange = {Modality.RGB: (channel_exchange_rgb, channel_exchange_rgb_form),
                         Modality.IR: (channel_exchange_ir, channel_exchange_ir_form)}
        self.channel_erasing, self.joint = channel_erasing, channel_aug_joint

    def __call__(
        self, image: np.ndarray, modality: Modality, generator: torch.Generator, view: int = 0
    ) -> torch.Tensor:
        """``view``: 1 for the second, channel-exchanged copy of an RGB image (``data.channel_aug_joint``)."""
        tensor = pad_and_crop(to_tensor(resize(image, self.height, self.width)), self.pad, generator)
        if _uniform(generator) < self.flip:
            tensor = tensor.flip(-1)
        if modality == Modality.RGB and _uniform(generator) < self.channel_aug:
            tensor = channel_augment(tensor, generator)
        tensor = normalize(tensor)
        if _uniform(generator) < self.random_erasing:
            tensor = random_erase(tensor, generator)
        return self.caj(tensor, modality, view, generator)

    def caj(self, tensor: torch.Tensor, modality: Modality, view: int, generator: torch.Generator) -> torch.Tensor:
        """CAJ's channel erasing, then channel exchange, of a normalised image (each drawn only when enabled,
        so that with both off the image's draws are exactly those of the older pipeline)."""
        if self.channel_erasing > 0 and _uniform(generator) < self.channel_erasing:
            tensor = channel_erase(tensor, generator)
        probability, form = self.exchange_for(modality, view)
        if probability > 0 and _uniform(generator) < probability:
            tensor = channel_exchange(tensor, form, generator)
        return tensor

    def exchange_for(self, modality: Modality, view: int) -> tuple[float, str]:
        """(probability, form) of the channel exchange of this sample: its modality's, except the first
        copy of a joint RGB pair, which is never exchanged."""
        probability, form = self.exchange[Modality(modality)]
        if self.joint and modality == Modality.RGB and view == 0:
            return 0.0, form
        return probability, form


class EvalTransform:
    """Resize and normalise; deterministic."""

    def __init__(self, height: int, width: int) -> None:
        self.height, self.width = height, width

    def __call__(
        self, image: np.ndarray, modality: Modality, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        return normalize(to_tensor(resize(image, self.height, self.width)))


class ResizeTransform:
    """Resize only, pixels kept uint8: what a loader worker does when the device augments
    (``data.augment_on=device``); 4x fewer bytes per image to pin and copy than float."""

    def __init__(self, height: int, width: int) -> None:
        self.height, self.width = height, width

    def __call__(
        self, image: np.ndarray, modality: Modality, generator: torch.Generator | None = None, view: int = 0
    ) -> torch.Tensor:
        """uint8 [H, W, 3] -> uint8 Tensor [height, width, 3] (RGB order, IR gray replicated); ``view`` is
        the device's to use (it comes with the batch)."""
        return torch.from_numpy(np.ascontiguousarray(resize(image, self.height, self.width)))


def build_train_transform(cfg: DataConfig) -> TrainTransform | ResizeTransform:
    """The loader's training transform: the whole augmentation (``data.augment_on=cpu``) or,
    when the device augments the batch, the resize alone."""
    if cfg.augment_on == "device":
        return ResizeTransform(cfg.height, cfg.width)
    return TrainTransform(cfg.height, cfg.width, **augment_settings(cfg))


def augment_settings(cfg: DataConfig) -> dict[str, float | str | bool]:
    """The training augmentation's settings, one source for the CPU transform and the device batch path."""
    return {
        "pad": cfg.pad,
        "flip": cfg.flip,
        "channel_aug": cfg.channel_aug,
        "random_erasing": cfg.random_erasing,
        "channel_exchange_rgb": cfg.channel_exchange_rgb,
        "channel_exchange_rgb_form": cfg.channel_exchange_rgb_form,
        "channel_exchange_ir": cfg.channel_exchange_ir,
        "channel_exchange_ir_form": cfg.channel_exchange_ir_form,
        "channel_erasing": cfg.channel_erasing,
        "channel_aug_joint": cfg.channel_aug_joint,
    }


def build_eval_transform(cfg: DataConfig) -> EvalTransform:
    return EvalTransform(cfg.height, cfg.width)
