"""Training augmentation of whole uint8 batches on the training device (``data.augment_on=device``).

The CPU path (:class:`~cmssft.data.transforms.TrainTransform`) augments one image at a time in the
loader workers. Here the workers only decode and resize
(:class:`~cmssft.data.transforms.ResizeTransform`), and :class:`BatchAugment` applies the same
augmentations, in the same order and with the same probabilities and parameters, to the whole batch
with batched tensor ops: zero-padded random crop, horizontal flip, channel augmentation (RGB
samples), ImageNet normalisation, random erasing, then CAJ's channel erasing and channel exchange.
Nothing is read back to the host, so a CUDA step is not synchronised by its augmentation.

Shapes at this boundary (B images)::

    images    uint8 [B, H, W, 3]   resized pixels, RGB order (IR gray replicated), as collated
    modality  long  [B]            0 RGB, 1 IR (channel augmentation touches RGB samples only)
    view      long  [B] or None    1: the second, channel-exchanged copy of a joint RGB pair
                                   (data.channel_aug_joint); None: all 0
    returns   float [B, 3, H, W]   normalised, channels-last strides

Every random choice comes from the ``torch.Generator`` passed in, one generator per batch instead
of one per image, so the two paths agree in distribution, not draw by draw
(tests/test_batch_augment.py checks both: exact images for given choices, and the statistics).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from cmssft.config import DataConfig
from cmssft.data.records import Modality
from cmssft.data.transforms import (
    CAJ_ERASE_AREA,
    CAJ_ERASE_ASPECT,
    CAJ_ERASE_ATTEMPTS,
    CAJ_ERASE_FILL,
    CAJ_GRAY_P,
    CAJ_GRAY_WEIGHTS,
    ERASE_AREA,
    ERASE_ATTEMPTS,
    ERASE_RATIO,
    EXCHANGE_CHOICES,
    GRAY_WEIGHTS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    augment_settings,
)

NO_CHANNEL_AUG = -1  # AugmentParams.channel of a sample kept in colour


@dataclass(frozen=True)
class AugmentParams:
    """Every random choice for a batch of B images; tensors ``[B]`` on the batch's device.

    ``top``/``left``: crop offset in the zero-padded image (0..2 pad); ``flip``: mirror after the
    crop; ``channel``: -1 none, 0..2 replicate that channel, 3 gray; ``erase``: zero the rectangle
    ``erase_box`` ``[B, 4]`` = (top, left, height, width) of the normalised image. CAJ's choices, None
    when off: ``channel_erase`` fill the rectangle ``channel_erase_box`` with ``CAJ_ERASE_FILL``;
    ``exchange`` as ``channel`` (3: CAJ's gray), on the normalised image after the erasing.
    """

    top: torch.Tensor
    left: torch.Tensor
    flip: torch.Tensor
    channel: torch.Tensor
    erase: torch.Tensor
    erase_box: torch.Tensor
    channel_erase: torch.Tensor | None = None
    channel_erase_box: torch.Tensor | None = None
    exchange: torch.Tensor | None = None


class BatchAugment:
    """The CPU training augmentation for a batch at once; see the module docstring."""

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
        self.height, self.width, self.pad, self.flip = height, width, max(pad, 0), flip
        self.channel_aug, self.random_erasing = channel_aug, random_erasing
        self.exchange_rgb = (channel_exchange_rgb, channel_exchange_rgb_form)
        self.exchange_ir = (channel_exchange_ir, channel_exchange_ir_form)
        self.channel_erasing, self.joint = channel_erasing, channel_aug_joint

    def __call__(
        self,
        images: torch.Tensor,
        modality: torch.Tensor,
        generator: torch.Generator,
        view: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """uint8 ``[B, H, W, 3]`` -> augmented, normalised float ``[B, 3, H, W]``."""
        return self.apply(images, self.sample(modality, generator, view))

    def sample(
        self, modality: torch.Tensor, generator: torch.Generator, view: torch.Tensor | None = None
    ) -> AugmentParams:
        """Draw the choices for ``modality.shape[0]`` images on ``modality``'s device (CAJ's after all
        others, and only when enabled, so that with them off the draws are exactly the older ones)."""
        n, device = modality.shape[0], modality.device

        def uniform(*shape: int) -> torch.Tensor:  # float32 in [0, 1), as the CPU path draws
            return torch.rand(shape, generator=generator, device=device)

        offsets = torch.randint(0, 2 * self.pad + 1, (2, n), generator=generator, device=device)
        flip = uniform(n) < self.flip
        channel_aug = (uniform(n) < self.channel_aug) & (modality == int(Modality.RGB))
        choice = torch.randint(0, 4, (n,), generator=generator, device=device)
        channel = torch.where(channel_aug, choice, NO_CHANNEL_AUG)
        erase, box = self._erase_boxes(uniform(n) < self.random_erasing, uniform, n)
        caj = {}
        if self.channel_erasing > 0:
            wanted = uniform(n) < self.channel_erasing
            caj["channel_erase"], caj["channel_erase_box"] = self._channel_erase_boxes(wanted, uniform, n)
        if self.exchange_rgb[0] > 0 or self.exchange_ir[0] > 0:
            caj["exchange"] = self._exchange_choices(modality, view, uniform)
        return AugmentParams(offsets[0], offsets[1], flip, channel, erase, box, **caj)

    def _erase_boxes(self, wanted: torch.Tensor, uniform, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The first of ``ERASE_ATTEMPTS`` (area, ratio) draws that fits, as the CPU loop takes it
        (in float64, as Python computes it); no draw fits: no erasing."""
        height, width = self.height, self.width
        area = height * width * (ERASE_AREA[0] + (ERASE_AREA[1] - ERASE_AREA[0]) * uniform(n, ERASE_ATTEMPTS).double())
        low, high = math.log(ERASE_RATIO[0]), math.log(ERASE_RATIO[1])
        ratio = torch.exp(low + (high - low) * uniform(n, ERASE_ATTEMPTS).double())
        h = torch.round(torch.sqrt(area * ratio))
        w = torch.round(torch.sqrt(area / ratio))
        fits = (h > 0) & (h < height) & (w > 0) & (w < width)
        first = fits.int().argmax(dim=1, keepdim=True)  # the first fitting attempt (0 when none fits)
        h, w = h.gather(1, first).squeeze(1).long(), w.gather(1, first).squeeze(1).long()
        # uniform integers in [0, side - size], drawn like torch.randint (float64 keeps them exact)
        top = (uniform(n).double() * (height - h + 1)).long().clamp_(min=0).minimum(height - h)
        left = (uniform(n).double() * (width - w + 1)).long().clamp_(min=0).minimum(width - w)
        return wanted & fits.any(dim=1), torch.stack([top, left, h, w], dim=1)

    def _channel_erase_boxes(self, wanted: torch.Tensor, uniform, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """CAJ's channel erasing boxes: the first of ``CAJ_ERASE_ATTEMPTS`` (area, aspect) draws, both
        uniform, that fits (in float64, as the CPU loop computes them); no draw fits: no erasing."""
        height, width = self.height, self.width
        low, high = CAJ_ERASE_AREA
        area = height * width * (low + (high - low) * uniform(n, CAJ_ERASE_ATTEMPTS).double())
        low, high = CAJ_ERASE_ASPECT
        aspect = low + (high - low) * uniform(n, CAJ_ERASE_ATTEMPTS).double()
        h = torch.round(torch.sqrt(area * aspect))
        w = torch.round(torch.sqrt(area / aspect))
        fits = (h < height) & (w < width)
        first = fits.int().argmax(dim=1, keepdim=True)
        h, w = h.gather(1, first).squeeze(1).long(), w.gather(1, first).squeeze(1).long()
        top = (uniform(n).double() * (height - h + 1)).long().clamp_(min=0).minimum(height - h)
        left = (uniform(n).double() * (width - w + 1)).long().clamp_(min=0).minimum(width - w)
        return wanted & fits.any(dim=1), torch.stack([top, left, h, w], dim=1)

    def _exchange_choices(self, modality: torch.Tensor, view: torch.Tensor | None, uniform) -> torch.Tensor:
        """long ``[B]``: -1 no exchange, 0..2 that channel copied to all three, 3 CAJ's gray; each sample
        drawn with its modality's probability and form (the first copy of a joint RGB pair: never)."""
        n = modality.shape[0]
        rgb = modality == int(Modality.RGB)
        p_rgb, form_rgb = self.exchange_rgb
        p_ir, form_ir = self.exchange_ir
        probability = torch.where(rgb, p_rgb, p_ir)
        if self.joint:  # the first copy of a joint pair keeps its colours
            first_copy = rgb if view is None else rgb & (view == 0)
            probability = torch.where(first_copy, 0.0, probability)
        apply = uniform(n) < probability
        choices = torch.where(rgb, EXCHANGE_CHOICES[form_rgb], EXCHANGE_CHOICES[form_ir])
        draw = (uniform(n) * choices).long().minimum(choices - 1)  # uniform over 0..choices-1
        gray_form = torch.where(rgb, form_rgb == "adap_gray", form_ir == "adap_gray")
        gray = gray_form & (uniform(n) < CAJ_GRAY_P)
        code = torch.where(draw < 3, draw, torch.where(gray, 3, -1))
        return torch.where(apply, code, -1)

    def apply(self, images: torch.Tensor, params: AugmentParams) -> torch.Tensor:
        """Apply given choices: crop + flip as one gather, then channels, normalisation, erasing, and
        CAJ's channel erasing and exchange."""
        x = self._crop_and_flip(images, params).permute(0, 3, 1, 2).float().div_(255.0)
        if self.channel_aug > 0:
            x = self._channel_augment(x, params.channel)
        mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
        x = (x - mean) / std
        if self.random_erasing > 0:
            x = x.masked_fill(self._erase_mask(params, x.shape[2], x.shape[3]), 0.0)
        if params.channel_erase is not None:
            mask = self._box_mask(params.channel_erase, params.channel_erase_box, x.shape[2], x.shape[3])
            x = torch.where(mask, torch.tensor(CAJ_ERASE_FILL, device=x.device).view(1, 3, 1, 1), x)
        if params.exchange is not None:
            x = self._channel_augment(x, params.exchange, CAJ_GRAY_WEIGHTS)
        return x

    def _crop_and_flip(self, images: torch.Tensor, params: AugmentParams) -> torch.Tensor:
        """uint8 ``[B, H, W, 3]`` -> the zero-padded crop at (top, left), mirrored where ``flip``."""
        n, height, width, _ = images.shape
        pad = self.pad
        padded = F.pad(images, (0, 0, pad, pad, pad, pad)) if pad else images
        rows = params.top.unsqueeze(1) + torch.arange(height, device=images.device)
        ahead = torch.arange(width, device=images.device)
        cols = params.left.unsqueeze(1) + torch.where(params.flip.unsqueeze(1), width - 1 - ahead, ahead)
        batch = torch.arange(n, device=images.device)
        return padded[batch[:, None, None], rows[:, :, None], cols[:, None, :]]

    @staticmethod
    def _channel_augment(
        x: torch.Tensor, channel: torch.Tensor, weights: tuple[float, float, float] = GRAY_WEIGHTS
    ) -> torch.Tensor:
        """Where ``channel >= 0``, all three channels become channel ``channel`` (3: the gray image of ``weights``)."""
        gray = weights[0] * x[:, 0] + weights[1] * x[:, 1] + weights[2] * x[:, 2]
        options = torch.stack([x[:, 0], x[:, 1], x[:, 2], gray], dim=1)  # [B, 4, H, W]
        index = channel.clamp(min=0).view(-1, 1, 1, 1).expand(-1, 1, *x.shape[2:])
        picked = options.gather(1, index).expand(-1, 3, -1, -1)
        return torch.where((channel >= 0).view(-1, 1, 1, 1), picked, x)

    @classmethod
    def _erase_mask(cls, params: AugmentParams, height: int, width: int) -> torch.Tensor:
        """bool ``[B, 1, H, W]``: the erased rectangle of each image that is erased."""
        return cls._box_mask(params.erase, params.erase_box, height, width)

    @staticmethod
    def _box_mask(wanted: torch.Tensor, box: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """bool ``[B, 1, H, W]``: rectangle ``box`` ``[B, 4]`` (top, left, height, width) where ``wanted``."""
        top, left, h, w = box.unbind(dim=1)
        rows = torch.arange(height, device=top.device)
        cols = torch.arange(width, device=top.device)
        in_rows = (rows >= top[:, None]) & (rows < (top + h)[:, None])
        in_cols = (cols >= left[:, None]) & (cols < (left + w)[:, None])
        mask = in_rows[:, :, None] & in_cols[:, None, :] & wanted[:, None, None]
        return mask.unsqueeze(1)


def build_batch_augment(cfg: DataConfig) -> BatchAugment:
    """The device augmentation with the training transform's settings (``data.pad``, ``data.flip``, ...)."""
    return BatchAugment(cfg.height, cfg.width, **augment_settings(cfg))
