"""Fixtures of the reliability tests: the retriever and a served UI of ``indexed_run`` (tests/conftest.py)."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from cdretrieval.retrieval import Retriever


@pytest.fixture(autouse=True, scope="module")
def _one_thread_per_module(one_thread: None) -> None:
    """Every reliability module runs with one intra-op thread (see ``one_thread`` in tests/conftest.py)."""


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
