"""Where the project keeps generated data: ``$CDRETRIEVAL_CACHE`` or ``~/.cache/cdretrieval``."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """The cache root (created on demand by the writers, not here)."""
    env = os.environ.get("CDRETRIEVAL_CACHE")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "cdretrieval"
