"""Fixtures of the reliability tests: the retriever and a served UI of ``indexed_run`` (tests/conftest.py)."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from cdretrieval.retrieval import Retriever


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """Model-heavy modules: one intra-op thread (faster than two on the shared 2-core machines)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def retriever(indexed_run: Path) -> Retriever:
    return Retriever.from_run(indexed_run, device="cpu")


@pytest.fixture(scope="session")
def server_url(indexed_run: Path) -> Iterator[str]:
    """The UI of ``indexed_run`` served in this process on a free localhost port (ends with "/")."""
    from app.server import launch_app

    demo = launch_app(indexed_run, port=free_port(), prevent_thread_lock=True, device="cpu", examples_per_domain=0)
    url = str(demo.local_url)
    try:
        yield url if url.endswith("/") else url + "/"
    finally:
        demo.close()
