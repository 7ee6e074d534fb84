"""Serving the UI safely: localhost by default, only indexed data files reachable, bounded uploads and queue.

What a client of the server can reach:

* the page, its assets and the ``/search`` API (behind ``auth`` when set);
* uploads, which Gradio keeps in its own cache folder under random hash names;
* result thumbnails and other images the page generates (the query made of an example), written by the app
  as content-named PNG files in ``<folder>/generated/`` (:meth:`ServedFiles.subfolder`,
  :class:`app.ui.ImageFiles`: each written once, atomically, never rewritten) and copied by Gradio into its
  cache;
* exactly the *indexed image files* (:class:`ServedFiles`, the set computed by :func:`served_files`: each
  file itself, links resolved), each sent from a copy (a hard link where possible) that the server makes on
  first use in a private folder of its own — the only entry of Gradio's ``allowed_paths``, so that Gradio's
  check of a request costs one comparison, not one per indexed file (issue 14: with a few hundred per-file
  allowed paths, 4 concurrent clients timed out). Nothing else is reachable: not the original data paths
  themselves, another file beside an image (``photo/notes.txt``), the folder of an image added with
  ``index --add``, a link that leads out of the data root, nor the run folder (checkpoint, config, indexes;
  also in ``blocked_paths``).

Auth: ``auth=("user", "pass")`` or the environment variable ``CDRETRIEVAL_AUTH=user:pass``. ``share=True``
(a public gradio.live link) and a non-local ``host`` print a warning when no auth is set.

Start-up (:func:`launch_app`): the port is checked *before* anything is loaded (a busy port fails at once
with ``port 7860 is in use; pass --port N``), and each stage is printed as it starts (model, indexes, page,
server), then the URL.
"""

from __future__ import annotations

import atexit
import functools
import hashlib
import logging
import os
import shutil
import sys
import tempfile
import threading
import time
import uuid
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
SERVED_PREFIX = "cdretrieval-served-"  # the name of the private folder the served copies live in


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
    anything inside a ``protected`` path (the run folder). No cap on the count: the set is looked up in
    :meth:`ServedFiles.serve`, and Gradio only ever sees the one folder of the copies.
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
    return sorted(out)


def _remove_tree(folder: str) -> None:
    shutil.rmtree(folder, ignore_errors=True)


class ServedFiles:
    """The indexed image files the server may send, each sent from a copy in a private folder it owns.

    Gradio is given :attr:`folder` as its *only* allowed path (one comparison per request, whatever the
    index's size). :meth:`serve` puts an indexed file there on first use, as
    ``<folder>/<sha256(real path)[:16]>/<file name>`` (a hard link when the folder is on the data's
    filesystem, else a copy; both made under a temporary name and renamed into place, so a concurrent
    request never sees a half-written file); anything else gets None and is never put there. The folder is
    removed by :meth:`close`, or at exit.

    Args:
        files: the servable files (:func:`served_files`); resolved again here.
    """

    def __init__(self, files: Iterable[str | os.PathLike[str]]) -> None:
        self.files: frozenset[str] = frozenset(str(Path(f).resolve()) for f in files)
        self.folder = Path(tempfile.mkdtemp(prefix=SERVED_PREFIX)).resolve()  # 0700: this user only
        self._lock = threading.Lock()
        self._copies: dict[tuple[str, str], Path] = {}  # (real path, name) → its copy, once made
        # A partial object, not the bound method: atexit must not keep this object (and its set) alive, and
        # unregister() must drop this registration only.
        self._cleanup = functools.partial(_remove_tree, str(self.folder))
        atexit.register(self._cleanup)

    @classmethod
    def of(cls, retriever: Retriever, protected: Iterable[str | os.PathLike[str]] = ()) -> ServedFiles:
        """The indexed image files of ``retriever`` outside the ``protected`` paths (:func:`served_files`)."""
        return cls(served_files(retriever, protected=protected))

    def __len__(self) -> int:
        return len(self.files)

    def __contains__(self, path: object) -> bool:
        """Whether ``path`` (links followed) is a servable file."""
        if not isinstance(path, (str, os.PathLike)):
            return False
        try:
            return str(Path(path).resolve()) in self.files
        except (OSError, RuntimeError, ValueError):  # a link loop, a NUL byte
            return False

    def serve(self, path: str | os.PathLike[str]) -> Path | None:
        """The copy of ``path`` the server sends (inside :attr:`folder`; it keeps the file's name), or None
        when ``path`` is not a servable file — or the copy cannot be made (logged; the caller then shows the
        decoded pixels). Thread-safe; the copy is made once, and again if the original has changed since."""
        if path not in self:
            return None
        real = Path(path).resolve()
        name = Path(path).name if is_image_file(Path(path).name) else real.name  # the name the user knows
        key = (str(real), name)
        with self._lock:
            copy = self._copies.get(key)
        if copy is not None and _same_file(real, copy):
            return copy
        try:
            copy = self._materialise(real, name)
        except OSError as e:  # gone since start-up, disk full, the folder removed (closed)
            logger.warning("cannot serve %s: %s", real, e)
            return None
        with self._lock:
            self._copies[key] = copy
        return copy

    def _materialise(self, real: Path, name: str) -> Path:
        """Link (else copy) ``real`` to ``<folder>/<hash>/<name>`` atomically: staged, then renamed."""
        sub = self.folder / hashlib.sha256(str(real).encode()).hexdigest()[:16]
        sub.mkdir(exist_ok=True)
        final = sub / name
        staging = sub / f".{uuid.uuid4().hex}.part"  # unique: concurrent calls never share one
        try:
            try:
                os.link(real, staging)  # same filesystem, and allowed (fs.protected_hardlinks)
            except OSError:
                shutil.copy2(real, staging)  # keeps the modification time, which _same_file compares
            os.replace(staging, final)  # atomic: readers see the old complete file or the new one
        finally:
            staging.unlink(missing_ok=True)
        return final

    def subfolder(self, name: str) -> Path:
        """``<folder>/<name>``, made if missing: a place for files the app generates and the server sends (the
        result thumbnails: :class:`app.ui.ImageFiles`). ``name`` is a plain name that cannot be the hash
        folder of an indexed file's copy (16 hex digits). Everything put there is reachable by clients."""
        if not name or name in (".", "..") or "/" in name or os.sep in name or _is_copy_folder_name(name):
            raise ValueError(f"not a subfolder name for generated files: {name!r}")
        sub = self.folder / name
        sub.mkdir(exist_ok=True)
        return sub

    def close(self) -> None:
        """Remove the folder of copies (idempotent); :meth:`serve` then returns None."""
        self._cleanup()
        atexit.unregister(self._cleanup)
        with self._lock:
            self._copies.clear()

    def __repr__(self) -> str:
        return f"ServedFiles({len(self.files)} files, folder={str(self.folder)!r})"


def _is_copy_folder_name(name: str) -> bool:
    """Whether ``name`` has the form of :meth:`ServedFiles._materialise`'s folders (16 hex digits)."""
    return len(name) == 16 and all(c in "0123456789abcdef" for c in name)


def _same_file(original: Path, copy: Path) -> bool:
    """Whether ``copy`` still has the content of ``original``: the same inode (a hard link), or the same size
    and modification time (a copy made with ``copy2``). False when either is gone."""
    try:
        a, b = original.stat(), copy.stat()
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino) or (a.st_size, a.st_mtime_ns) == (b.st_size, b.st_mtime_ns)


def blocked_paths(run_dir: str | os.PathLike[str], extra: Iterable[str | os.PathLike[str]] = ()) -> list[str]:
    """What the server never sends (Gradio's ``blocked_paths``): the run folder and ``extra``, resolved."""
    return [str(Path(run_dir).resolve()), *(str(Path(p).resolve()) for p in extra)]


def launch_options(
    run_dir: str | os.PathLike[str],
    *,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    auth: tuple[str, str] | None = None,
    share: bool = False,
    max_upload_mb: int = 10,
    open_browser: bool = False,
    extra_blocked: Iterable[str | os.PathLike[str]] = (),
    served: ServedFiles | None = None,
) -> dict[str, Any]:
    """The keyword arguments of ``gr.Blocks.launch`` that make the server safe (see the module docstring).

    ``served``: the files sent as files (``ServedFiles.of(retriever, blocked_paths(run_dir, extra_blocked))``;
    give the same object to :func:`build_app`): its folder is the one allowed path. None: no file is served
    as it is (``allowed_paths`` is empty; the page then shows every image from its decoded pixels).
    """
    if not 0 <= int(port) <= 65535:
        raise ValueError(f"port must be in 0..65535, got {port}")
    if max_upload_mb < 1:
        raise ValueError(f"max_upload_mb must be ≥ 1, got {max_upload_mb}")
    blocked = blocked_paths(run_dir, extra_blocked)
    if served is not None and any(b == str(served.folder) or Path(b) in served.folder.parents for b in blocked):
        logger.warning("the folder of served files %s is inside a blocked path, so Gradio refuses to send "
                       "originals; set TMPDIR to a folder outside the run", served.folder)
    return {
        "server_name": host,
        "server_port": int(port),
        "auth": auth,
        "share": share,
        "inbrowser": open_browser,
        "allowed_paths": [str(served.folder)] if served is not None else [],
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


def _close_with(demo: gr.Blocks, served: ServedFiles) -> None:
    """Make ``demo.close()`` also remove ``served``'s folder (callers of ``launch_app`` close the demo).

    Wraps the instance's ``close``, as :func:`app.ui.tolerant_upload` wraps a ``preprocess``.
    """
    original = demo.close

    def close(verbose: bool = True) -> None:
        try:
            original(verbose)
        finally:
            served.close()

    demo.close = close  # type: ignore[method-assign]


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
    then the URL. Returns the running ``gr.Blocks`` (``.local_url``; ``.served_files``, its
    :class:`ServedFiles`; ``.close()`` stops it and removes the folder of served copies).
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
    served = ServedFiles.of(retriever, protected=blocked_paths(run_dir, extra))
    options = launch_options(
        run_dir, host=host, port=port, auth=auth, share=share,
        max_upload_mb=max_upload_mb, open_browser=open_browser, extra_blocked=extra, served=served,
    )
    try:
        _say("building the page")
        demo = build_app(retriever, max_upload_mb=max_upload_mb, examples_per_domain=examples_per_domain,
                         served=served)
        _close_with(demo, served)
        demo.served_files = served  # type: ignore[attr-defined]  # for tests and embedding code: what it sends
        demo.queue(default_concurrency_limit=CONCURRENCY, max_size=QUEUE_MAX)
        _say(f"starting the server on {host}:{port}")
        try:
            _, local_url, share_url = demo.launch(prevent_thread_lock=True, **options)
        except OSError as e:  # taken since the check (Gradio's own message names its environment variable)
            if "port" in str(e).lower() and not isinstance(e, PortInUseError):
                raise PortInUseError(port_in_use_message(int(port))) from e
            raise
    except BaseException:
        served.close()  # nothing will serve from its folder
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
