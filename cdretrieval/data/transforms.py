"""Image transforms. They produce float tensors in [0, 1]; each backbone applies its own normalisation.

The train transform is the self-supervised augmentation used by instance discrimination (MoCo v2 /
SimCLR family: random resized crop, flip, colour jitter, greyscale, blur) with one ``strength`` knob that
scales the photometric parts; the eval transform is deterministic.

The eval transform is written in plain PIL + torch and equals torchvision's
``Compose([Resize(size, antialias=True), CenterCrop(size), ToTensor()])`` exactly, bit for bit
(``tests/data/test_transforms.py`` compares them on real images of every shape), so serving never imports
torchvision: on the shared 2-core machine ``import torchvision`` took 1.4–3 s of a cold ``search``
(it pulls in ``torch._dynamo``). The train transform imports torchvision when it is built.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from PIL import Image

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
    from torchvision import transforms as T  # seconds to import: only training builds this transform

    _check_size(size)
    if not 0.0 <= strength <= 2.0:
        raise ValueError(f"augmentation strength must be in [0, 2], got {strength}")
    if not 0.0 < min_scale <= 1.0:
        raise ValueError(f"min_scale must be in (0, 1], got {min_scale}")
    s = strength
    ops: list[Callable[..., Any]] = [
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


def resized_side_lengths(width: int, height: int, size: int) -> tuple[int, int]:
    """``(width, height)`` with the shorter side scaled to ``size`` and the longer one truncated, as
    torchvision's ``Resize(size)`` computes it (``int(size * long / short)``)."""
    if width <= height:
        return size, int(size * height / width)
    return int(size * width / height), size


class EvalTransform:
    """Resize the shorter side to ``size`` (PIL bilinear, antialiased), centre-crop ``size``×``size``, and
    return a float32 ``[C, size, size]`` tensor in [0, 1] — torchvision's ``Resize`` + ``CenterCrop`` +
    ``ToTensor`` on PIL images, computed the same way (same PIL calls, same crop offsets, ``x / 255``).

    Takes PIL images with 8-bit bands (``RGB``, ``L``, ``RGBA``, ``P``, ``1``, …; the package hands it RGB);
    32-bit and 16-bit modes (``I``, ``F``, ``I;16``), which ``ToTensor`` does not scale to [0, 1], are refused.
    """

    def __init__(self, size: int) -> None:
        _check_size(size)
        self.size = size

    def __call__(self, img: Image.Image) -> torch.Tensor:
        if not isinstance(img, Image.Image):
            raise TypeError(f"eval transform takes a PIL image, got {type(img).__name__}")
        if img.mode in ("I", "F") or img.mode.startswith("I;"):
            raise ValueError(f"eval transform takes 8-bit images, got PIL mode {img.mode!r}; convert to RGB first")
        s = self.size
        w, h = resized_side_lengths(img.width, img.height, s)
        if (w, h) != img.size:
            img = img.resize((w, h), Image.Resampling.BILINEAR)
        top, left = round((h - s) / 2.0), round((w - s) / 2.0)  # as torchvision: round half to even
        img = img.crop((left, top, left + s, top + s))
        if img.mode == "1":
            img = img.convert("L")  # 0 / 255, as ToTensor scales a bilevel image
        a = np.asarray(img, dtype=np.uint8)  # [S, S] or [S, S, C]
        if a.ndim == 2:
            a = a[:, :, None]
        return torch.from_numpy(a.transpose(2, 0, 1).copy()).float().div(255)

    def __repr__(self) -> str:
        return f"EvalTransform(size={self.size})"


def eval_transform(size: int = 128) -> ImageTransform:
    """Deterministic: resize the shorter side to ``size``, centre-crop ``size``×``size``, to tensor
    (:class:`EvalTransform`, equal to torchvision's ``Resize``/``CenterCrop``/``ToTensor``)."""
    return EvalTransform(size)
