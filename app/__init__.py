"""Gradio web UI of cdretrieval: upload a photo or draw a sketch, get matches from other visual domains.

* :func:`app.ui.build_app` — the page for a :class:`~cdretrieval.retrieval.Retriever` (``gr.Blocks``);
  its module docstring documents the ``/search`` HTTP API for ``gradio_client``.
* :func:`app.server.launch_app` — load a run and serve it safely (localhost, allowed paths, limits).
* :func:`main` — ``python -m app --run RUN_DIR ...`` / ``cdretrieval serve``.

Heavy imports (gradio, torch) happen on first use of ``build_app`` / ``launch_app``, not on ``import app``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from app.cli import main

if TYPE_CHECKING:
    from app.server import launch_app
    from app.ui import build_app

__all__ = ["build_app", "launch_app", "main"]


def __getattr__(name: str) -> Any:
    if name == "build_app":
        from app.ui import build_app

        return build_app
    if name == "launch_app":
        from app.server import launch_app

        return launch_app
    raise AttributeError(f"module 'app' has no attribute {name!r}")
