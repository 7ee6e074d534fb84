"""Shared fixtures: the real data in ../shared/data (skipped with a reason when absent) and demo data."""

from __future__ import annotations

import os
from collections.abc import Iterator
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


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """One intra-op thread for a module (``pytestmark = pytest.mark.usefixtures("one_thread")``): with tiny
    tensors, or with 2 busy cores, OpenMP hand-offs between two threads cost more than the arithmetic."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Never write into the user's real cache from tests."""
    monkeypatch.setenv("CDRETRIEVAL_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real run folder: EfficientNet-Lite0 (real weights) + an untrained small head (1280 → 64 → 32), 64 px.

    Treat it as read-only; copy it (``shutil.copytree``) to change it.
    """
    from cdretrieval.config import RunConfig
    from cdretrieval.run import encoder_from_config, save_checkpoint

    cfg = RunConfig()
    cfg.data.image_size = 64
    cfg.data.num_workers = 0
    cfg.model.hidden_dim = 64
    cfg.model.dim = 32
    torch.manual_seed(0)
    encoder = encoder_from_config(cfg)
    run = tmp_path_factory.mktemp("tiny_run") / "run"
    save_checkpoint(run, {"model": encoder.state_dict()}, cfg)
    return run


@pytest.fixture(scope="session")
def indexed_run(tiny_run: Path, demo_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of ``tiny_run`` with plain flat indexes of the demo data (and its embedding chunks). Read-only.

    Plain (``rerank=None``): the stored vectors are the embeddings themselves, so an indexed image finds
    itself with score 1. Re-ranked indexes are built in tests/test_rerank.py (and by tests/app's run).
    """
    import shutil

    from cdretrieval.indexing import build_indexes

    run = tmp_path_factory.mktemp("indexed_run") / "run"
    shutil.copytree(tiny_run, run)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # Lite0's small convs: 1 thread is faster than 2 on the shared 2-core machines
    try:
        build_indexes(run, demo_root, num_workers=0, progress=False, device="cpu", rerank=None)
    finally:
        torch.set_num_threads(threads)
    return run
