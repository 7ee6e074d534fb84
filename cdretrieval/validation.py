"""Argument checks for the public entry points: one place for what "an integer ≥ 1" means.

Entry points (``embed_domains``, ``build_indexes``, ``Retriever.search``, config loading, ...) check their
arguments once, before any work; per-step code (losses, training steps) trusts what they checked, so that
no check runs, or syncs a device, on every step.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import Tensor


def is_int(value: Any) -> bool:
    """A Python or NumPy integer, and not a bool (``True`` is an ``int`` to Python, never a count to us)."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def check_int(value: Any, name: str, low: int = 1, error: type[Exception] = ValueError) -> int:
    """``value`` as an ``int`` when it is an integer ≥ ``low``.

    Raises:
        ``error`` (default ValueError): ``"<name> must be an integer ≥ <low>, got <value!r>"``.
    """
    if not is_int(value) or value < low:
        raise error(f"{name} must be an integer ≥ {low}, got {value!r}")
    return int(value)


def check_positive(value: Any, name: str) -> float:
    """``value`` as a ``float`` when it is a finite number > 0 (a temperature, a floor).

    Raises:
        ValueError: ``"<name> must be a finite number > 0, got <value!r>"``.
    """
    if isinstance(value, bool) or not isinstance(value, int | float) or not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def check_rows(x: Tensor, name: str, shape: str = "[N, D]") -> None:
    """``x`` is a non-empty 2-D tensor (``shape`` names its dimensions in the message).

    Raises:
        ValueError: ``"<name> must be a non-empty 2-D <shape> tensor, got shape (...)"``.
    """
    if x.dim() != 2 or x.shape[0] == 0:
        raise ValueError(f"{name} must be a non-empty 2-D {shape} tensor, got shape {tuple(x.shape)}")


def check_positions(positions: Tensor, name: str, length: int, high: int) -> None:
    """``positions`` is an int64 ``[length]`` tensor with values in ``[0, high)`` (bank rows, clusters).

    The range check reads the values back, which waits for a GPU: call this at entry points, not per step.

    Raises:
        ValueError: naming the expected shape and dtype, or the range with the values' min and max.
    """
    if positions.shape != (length,) or positions.dtype != torch.long:
        raise ValueError(
            f"{name} must be an int64 tensor of shape ({length},), got shape {tuple(positions.shape)} "
            f"and dtype {positions.dtype}"
        )
    if positions.numel() and (bool((positions < 0).any()) or bool((positions >= high).any())):
        raise ValueError(
            f"{name} must lie in [0, {high}), got min {int(positions.min())}, max {int(positions.max())}"
        )


def check_features_against(features: Tensor, rows: Tensor, name: str) -> None:
    """``features [B, D]`` and ``rows [N, D]`` (a bank, prototypes) are non-empty and share D."""
    check_rows(features, "features", "[B, D]")
    check_rows(rows, name)
    if rows.shape[1] != features.shape[1]:
        raise ValueError(
            f"feature dimension mismatch: features have D={features.shape[1]}, {name} has D={rows.shape[1]}"
        )
