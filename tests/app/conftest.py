"""A real run for the UI tests: EfficientNet-Lite0 (real weights) + a small head, indexes on the demo data.

The server is launched once per session in-process on a free localhost port, through the same
``launch_app`` path as ``python -m app`` (so its safety settings are the ones tested).
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import torch

from cdretrieval.data.demo import DEMO_DOMAINS

if TYPE_CHECKING:  # app.server imports gradio: only when a test needs the server
    from app.server import ServedFiles


@pytest.fixture(scope="session")
def app_run(demo_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """RUN_DIR with checkpoint.pt (untrained head, pretrained backbone) and re-ranked indexes of the 3 demo
    domains."""
    from cdretrieval.config import RunConfig
    from cdretrieval.indexing import build_indexes
    from cdretrieval.rerank import DEFAULT_RERANK
    from cdretrieval.run import encoder_from_config, save_checkpoint

    cfg = RunConfig()
    cfg.data.root = str(demo_root)
    cfg.data.domains = list(DEMO_DOMAINS)
    cfg.data.image_size = 64
    cfg.data.num_workers = 0
    cfg.model.backbone = "efficientnet_lite0"
    cfg.model.hidden_dim = 64
    cfg.model.dim = 32
    torch.manual_seed(0)
    encoder = encoder_from_config(cfg)
    run = tmp_path_factory.mktemp("app-run")
    save_checkpoint(run, {"model": encoder.state_dict()}, cfg)
    build_indexes(run, demo_root, list(DEMO_DOMAINS), rerank=DEFAULT_RERANK)  # the UI serves re-ranked indexes too
    return run


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    return _free_port()


@dataclass
class Served:
    url: str  # ends with "/"
    run: Path
    data_root: Path
    files: ServedFiles  # what the server sends as files: its folder is the one allowed path


@pytest.fixture(scope="session")
def served(app_run: Path, demo_root: Path) -> Iterator[Served]:
    """The UI of ``app_run`` running in this process (closed at the end of the session)."""
    from app.server import launch_app

    demo = launch_app(app_run, port=_free_port(), prevent_thread_lock=True, device="cpu")
    url = str(demo.local_url)
    try:
        yield Served(url if url.endswith("/") else url + "/", app_run, demo_root, demo.served_files)
    finally:
        demo.close()
