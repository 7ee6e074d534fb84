"""Argument checks for the public entry points: one place for what "an integer ≥ 1" means.

Entry points (``embed_domains``, ``build_indexes``, ``Retriever.search``, config loading, ...) check their
arguments once, before any work; per-step code (losses, training steps) trusts what they checked, so that
no check runs, or syncs a device, on every step.
"""

from __future__ import annotations

from typing import Any

import numpy as np


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
