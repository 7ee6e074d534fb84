"""Shared fixtures: the real data in ../shared/data (skipped with a reason when absent) and demo data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("CDRETRIEVAL_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def pacs_root() -> Path:
    root = SHARED_DATA / "pacs"
    if not (root / "photo").is_dir():
        pytest.skip(f"PACS not found at {root} (set CDRETRIEVAL_SHARED_DATA to the folder holding pacs/)")
    return root


@pytest.fixture(scope="session")
def digits_root() -> Path:
    root = SHARED_DATA / "digits"
    if not (root / "mnist.npz").is_file():
        pytest.skip(f"paired digits not found at {root} (set CDRETRIEVAL_SHARED_DATA)")
    return root


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The embedded demo data set, generated once per test session (~5 s), capped for speed."""
    from cdretrieval.data.demo import generate_demo_data

    return generate_demo_data(tmp_path_factory.mktemp("demo") / "digits", per_domain=120)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Never write into the user's real cache from tests."""
    monkeypatch.setenv("CDRETRIEVAL_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
