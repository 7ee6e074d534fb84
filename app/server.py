"""Serving the UI safely: localhost by default, only indexed data files reachable, bounded uploads and queue.

What a client of the server can reach:

* the page, its assets and the ``/search`` API (behind ``auth`` when set);
* result thumbnails and uploads, which Gradio keeps in its own cache folder under random hash names;
* exactly the *indexed image files* (``allowed_paths``, :func:`served_files`: each file itself, links
  resolved, never a folder) and nothing else: another file beside them (``photo/notes.txt``), the folder
  of an image added with ``index --add``, a link that leads out of the data root, and the run folder
  (checkpoint, config, indexes; also in ``blocked_paths``) are never served.

Auth: ``auth=("user", "pass")`` or the environment variable ``CDRETRIEVAL_AUTH=user:pass``. ``share=True``
(a public gradio.live link) and a non-local ``host`` print a warning when no auth is set.

Start-up (:func:`launch_app`): the port is checked *before* anything is loaded (a busy port fails at once
with ``port 7860 is in use; pass --port N``), and each stage is printed as it starts (model, indexes, page,
server), then the URL.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import gradio as gr

from app.ports import PortInUseError, check_port_free, port_in_use_message
from app.ui import CSS, build_app
from cdretrieval.data.images import is_image_file
from cdretrieval.retrieval import Retriever

logger = logging.getLogger(__name__)

AUTH_ENV = "CDRETRIEVAL_AUTH"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7860
CONCURRENCY = 4  # searches running at once; more wait in the queue
QUEUE_MAX = 64  # waiting requests beyond this are refused ("queue full") instead of piling up
LOCAL_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})
MAX_SERVED_FILES = 50_000  # beyond this, no file is served as it is: Gradio checks each request against each
# allowed path (slow: with 360 files, 4 concurrent clients time out — issue 14, tests/reliability/test_load.py)


def _say(message: str) -> None:
    """A start-up stage, printed as it begins."""
    print(f"[serve] {message}", flush=True)


def parse_auth(text: str | None) -> tuple[str, str] | None:
    """``"user:pass"`` → ``("user", "pass")`` (the password may contain ':'); empty/None → None."""
    if text is None or text.strip() == "":
        return None
    user, sep, password = text.partition(":")
    if not sep or not user or not password:
        raise ValueError("auth must look like USER:PASSWORD (both non-empty)")
    return user, password


def resolve_auth(auth: tuple[str, str] | None) -> tuple[str, str] | None:
    """The explicit ``auth`` argument, else ``$CDRETRIEVAL_AUTH``, else None."""
    if auth is not None:
        if len(auth) != 2 or not all(isinstance(x, str) and x for x in auth):
            raise ValueError("auth must be a (user, password) pair of non-empty strings")
        return auth[0], auth[1]
    return parse_auth(os.environ.get(AUTH_ENV))


def _item_paths(retriever: Retriever) -> dict[str, list[str]]:
    """Every indexed image path, per domain."""
    return {d: [it.path for it in retriever.indexes[d].items] for d in retriever.domains}


def _too_broad(folder: Path, protected: Iterable[Path]) -> bool:
    """True for ``/``, the home folder, and any folder containing (or equal to) a protected path."""
    if folder == Path(folder.anchor) or folder == Path.home().resolve():
        return True
    return any(p == folder or folder in p.parents for p in protected)


def indexed_folders(retriever: Retriever, protected: Iterable[str | os.PathLike[str]] = ()) -> list[str]:
    """One folder per indexed domain (the common folder of its images), minus over-broad ones.

    Informational (what the indexes cover); the server serves :func:`served_files`, never a folder.
    """
    prot = [Path(p).resolve() for p in protected]
    folders: list[str] = []
    for domain, paths in _item_paths(retriever).items():
        parents = {os.path.dirname(os.path.abspath(p)) for p in paths}
        if not parents:
            continue
        folder = Path(os.path.commonpath(sorted(parents))).resolve()
        if _too_broad(folder, prot):
            logger.warning("folder %s (domain %r) is too broad to describe as served", folder, domain)
            continue
        if str(folder) not in folders:
            folders.append(str(folder))
    return folders


def served_files(retriever: Retriever, protected: Iterable[str | os.PathLike[str]] = ()) -> list[str]:
    """Exactly what the server may send as files: the indexed image files, resolved (links followed).

    Left out: an item that is not an image file by name, a link that leads out of the data root its domain
    was indexed from (:meth:`Retriever.resolve_item_path`), anything that is not a regular file, and
    anything inside a ``protected`` path (the run folder). More than :data:`MAX_SERVED_FILES` files:
    none (Gradio checks a request against each allowed path); every image is then shown from its pixels.
    """
    prot = [Path(p).resolve() for p in protected]
    out: set[str] = set()
    for paths in _item_paths(retriever).values():
        for path in paths:
            if retriever.resolve_item_path(path) is None or not is_image_file(path):
                continue
            real = Path(path).resolve()
            if not real.is_file() or not is_image_file(real.name) or any(p == real or p in real.parents for p in prot):
                continue
            out.add(str(real))
    if len(out) > MAX_SERVED_FILES:
        logger.warning("%d indexed files: too many to serve as files; results are shown from their pixels", len(out))
        return []
    return sorted(out)


def launch_options(
    retriever: Retriever,
    run_dir: str | os.PathLike[str],
    *,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    auth: tuple[str, str] | None = None,
    share: bool = False,
    max_upload_mb: int = 10,
    open_browser: bool = False,
    extra_blocked: Iterable[str | os.PathLike[str]] = (),
) -> dict[str, Any]:
    """The keyword arguments of ``gr.Blocks.launch`` that make the server safe (see the module docstring)."""
    if not 0 <= int(port) <= 65535:
        raise ValueError(f"port must be in 0..65535, got {port}")
    if max_upload_mb < 1:
        raise ValueError(f"max_upload_mb must be ≥ 1, got {max_upload_mb}")
    blocked = [str(Path(run_dir).resolve()), *(str(Path(p).resolve()) for p in extra_blocked)]
    return {
        "server_name": host,
        "server_port": int(port),
        "auth": auth,
        "share": share,
        "inbrowser": open_browser,
        "allowed_paths": served_files(retriever, protected=blocked),
        "blocked_paths": blocked,
        "max_file_size": f"{int(max_upload_mb)}mb",
        "show_error": False,  # only our own gr.Error messages reach the page, never tracebacks
        "quiet": True,
        "enable_monitoring": False,
        "mcp_server": False,
        "pwa": False,
        "ssr_mode": False,
        "run_history": False,
        "footer_links": ["api"],
        "strict_cors": True,
        "css": CSS,
    }


def launch_app(
    run_dir: str | os.PathLike[str],
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    auth: tuple[str, str] | None = None,
    share: bool = False,
    max_upload_mb: int = 10,
    open_browser: bool = False,
    *,
    index_dir: str | os.PathLike[str] | None = None,
    device: str = "auto",
    examples_per_domain: int = 3,
    prevent_thread_lock: bool = False,
) -> gr.Blocks:
    """Load the run's retriever and serve the UI (blocks until stopped unless ``prevent_thread_lock``).

    Checks the port first (:class:`PortInUseError`, before any loading), prints each start-up stage and
    then the URL. Returns the running ``gr.Blocks`` (``.local_url``; ``.close()`` stops it).
    """
    auth = resolve_auth(auth)
    check_port_free(host, port)
    if not auth and (share or host not in LOCAL_HOSTS):
        where = "a public share link" if share else f"host {host}"
        print(
            f"warning: serving on {where} without authentication; set {AUTH_ENV}=user:pass or --auth",
            file=sys.stderr,
        )
    t0 = time.perf_counter()
    retriever = Retriever.from_run(run_dir, device=device, index_dir=index_dir, on_stage=_say)
    n_images = sum(len(retriever.indexes[d]) for d in retriever.domains)
    detection = "on" if retriever.detector is not None else "off (index built without a detector)"
    _say(f"loaded {retriever.model.backbone} ({retriever.model.feature}, {retriever.model.image_size} px) and "
         f"{len(retriever.domains)} domain indexes ({n_images:,} images; domain detection {detection}) "
         f"in {time.perf_counter() - t0:.1f} s")
    extra = [index_dir] if index_dir is not None else []
    options = launch_options(
        retriever, run_dir, host=host, port=port, auth=auth, share=share,
        max_upload_mb=max_upload_mb, open_browser=open_browser, extra_blocked=extra,
    )
    _say("building the page")
    demo = build_app(retriever, max_upload_mb=max_upload_mb, examples_per_domain=examples_per_domain,
                     servable_folders=options["allowed_paths"])
    demo.queue(default_concurrency_limit=CONCURRENCY, max_size=QUEUE_MAX)
    _say(f"starting the server on {host}:{port}")
    try:
        _, local_url, share_url = demo.launch(prevent_thread_lock=True, **options)
    except OSError as e:  # taken since the check (Gradio's own message names its environment variable)
        if "port" in str(e).lower() and not isinstance(e, PortInUseError):
            raise PortInUseError(port_in_use_message(int(port))) from e
        raise
    print(f"cdretrieval UI running at {local_url}" + (f" (public: {share_url})" if share_url else ""), flush=True)
    if auth:
        print(f"login required (user {auth[0]!r})", flush=True)
    if not prevent_thread_lock:
        try:
            demo.block_thread()
        finally:
            demo.close()
    return demo
