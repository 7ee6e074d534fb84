"""Image transforms. They produce float tensors in [0, 1]; each backbone applies its own normalisation.

The train transform is the self-supervised augmentation used by instance discrimination (MoCo v2 /
SimCLR family: random resized crop, flip, colour jitter, greyscale, blur) with one ``strength`` knob that
scales the photometric parts; the eval transform is deterministic.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from PIL import Image
from torchvision import transforms as T

ImageTransform = Callable[[Image.Image], torch.Tensor]


def _check_size(size: int) -> None:
    if not isinstance(size, int) or size < 32 or size % 32:
        raise ValueError(f"image size must be a multiple of 32 and ≥ 32 (backbone strides), got {size!r}")


def train_transform(
    size: int = 128,
    strength: float = 1.0,
    min_scale: float = 0.35,
    hflip: float = 0.5,
    blur: float = 0.3,
) -> ImageTransform:
    """Random augmentation for self-supervised training.

    Args:
        size: output side in pixels (multiple of 32).
        strength: 0 disables the photometric augmentations, 1 is MoCo-v2-like
            (jitter 0.4/0.4/0.4/0.1 with p=0.8, greyscale p=0.2), values in between scale them.
        min_scale: smallest crop area fraction of :class:`~torchvision.transforms.RandomResizedCrop`.
        hflip: probability of a horizontal flip (0 for data where mirroring changes the class, e.g. digits).
        blur: probability of a Gaussian blur.
    """
    _check_size(size)
    if not 0.0 <= strength <= 2.0:
        raise ValueError(f"augmentation strength must be in [0, 2], got {strength}")
    if not 0.0 < min_scale <= 1.0:
        raise ValueError(f"min_scale must be in (0, 1], got {min_scale}")
    s = strength
    ops: list[Callable[..., object]] = [
        T.RandomResizedCrop(size, scale=(min_scale, 1.0), antialias=True),
        T.RandomHorizontalFlip(p=hflip),
    ]
    if s > 0:
        ops += [
            T.RandomApply([T.ColorJitter(0.4 * s, 0.4 * s, 0.4 * s, min(0.1 * s, 0.5))], p=min(0.8, 0.8 * s)),
            T.RandomGrayscale(p=min(0.2 * s, 1.0)),
        ]
    if blur > 0:
        kernel = 2 * (size // 20) + 1  # ~10 % of the side, odd
        ops.append(T.RandomApply([T.GaussianBlur(kernel, sigma=(0.1, 2.0))], p=blur))
    ops.append(T.ToTensor())
    return T.Compose(ops)


def eval_transform(size: int = 128) -> ImageTransform:
    """Deterministic: resize the shorter side to ``size``, centre-crop ``size``×``size``, to tensor."""
    _check_size(size)
    return T.Compose([T.Resize(size, antialias=True), T.CenterCrop(size), T.ToTensor()])
