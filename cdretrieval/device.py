"""Device choice and mixed precision: bf16 autocast + channels_last on CPU, fp16 AMP on CUDA."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` → CUDA when available, else CPU; otherwise the named device (validated)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available")
    return dev


def amp_dtype(device: torch.device, precision: str = "auto", backbone: str = "") -> torch.dtype | None:
    """The autocast dtype for ``precision`` (``auto`` | ``fp32`` | ``bf16`` | ``fp16``) on ``device``.

    ``auto`` on CUDA is bf16 where the GPU supports it natively, else fp16 AMP. On CPU it is bf16 for
    ResNets (2.2× for resnet18 on these 2-core machines) but fp32 for EfficientNet-Lite0, whose
    depthwise convolutions ran 5× *slower* under bf16 autocast here (64 → 12 img/s at 128 px).
    """
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16":
        return torch.float16
    if precision != "auto":
        raise ValueError(f"precision must be auto, fp32, bf16 or fp16, got {precision!r}")
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if backbone.startswith("resnet") else None


def use_channels_last(device: torch.device, backbone: str) -> bool:
    """channels_last helps ResNets on CPU and everything on CUDA; it slowed Lite0 on CPU here (64 → 45 img/s)."""
    return device.type == "cuda" or backbone.startswith("resnet")


@contextlib.contextmanager
def autocast(device: torch.device, dtype: torch.dtype | None) -> Iterator[None]:
    """``torch.autocast`` for ``device`` when ``dtype`` is set, a no-op otherwise."""
    if dtype is None:
        yield
        return
    with torch.autocast(device_type=device.type, dtype=dtype):
        yield


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the block with ``n`` torch intra-op threads, then restore the previous count (process-wide).

    For small tensors on busy CPUs: with 2 OpenMP threads on the shared 2-core machines each small op can
    wait milliseconds for a descheduled thread (a 64 px Gaussian blur: 40 ms with 2 threads, 2.6 ms with 1).
    """
    before = torch.get_num_threads()
    if n == before:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
