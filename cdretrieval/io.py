"""Atomic, crash-safe writes: a temporary file in the same folder, fsync, then rename.

A reader (or a rerun after ``kill -9``) sees either the previous complete file or the new complete file,
never a half-written one.
"""

from __future__ import annotations

import contextlib
import glob
import io
import json
import logging
import os
import secrets
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import torch

logger = logging.getLogger(__name__)


def _fsync_dir(folder: Path) -> None:
    """Persist the rename itself (the directory entry); a no-op where directories can't be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike[str], mode: str = "wb") -> Iterator[IO[Any]]:
    """Open a temporary sibling of ``path`` for writing; on success fsync and rename it onto ``path``.

    On an exception the temporary file is removed and ``path`` is untouched.
    """
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_open supports modes 'wb' and 'w', not {mode!r}")
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    tmp = Path(tmp_name)
    umask = os.umask(0)
    os.umask(umask)
    os.fchmod(fd, 0o666 & ~umask)  # mkstemp makes 0600; give the file ordinary permissions
    try:
        with os.fdopen(fd, mode, encoding=None if "b" in mode else "utf-8") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
        _fsync_dir(target.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_open(path, "wb") as fh:
        fh.write(data)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def _stale_siblings(target: Path, kind: str) -> list[Path]:
    """Temporaries ``.<name>.<kind>-<pid>-<random>`` that :func:`replace_dir` leaves beside ``target``, newest first."""
    pattern = str(target.parent / f".{glob.escape(target.name)}.{kind}-*")
    found = [Path(p) for p in glob.glob(pattern)]

    def mtime(p: Path) -> float:
        try:
            return p.lstat().st_mtime
        except OSError:
            return 0.0

    return sorted(found, key=mtime, reverse=True)


def _writer_alive(path: Path) -> bool:
    """Whether the process that made the temporary ``path`` (pid in its name) still runs (not this one)."""
    try:
        pid = int(path.name.rsplit(".", 1)[-1].split("-")[1])
    except (IndexError, ValueError):
        return False
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def recover_dir(target: str | os.PathLike[str]) -> None:
    """Undo what a save by :func:`replace_dir` killed half-way left behind ``target``.

    When ``target`` is missing but a previous version was moved aside (the kill fell between the two
    renames of the swap), that version is moved back; then stale temporaries of dead writers are removed.
    Best effort: a read-only parent leaves everything as it is.
    """
    target = Path(target)
    if not target.parent.is_dir():
        return
    olds = _stale_siblings(target, "old")
    with contextlib.suppress(OSError):
        if olds and not os.path.lexists(target):
            os.rename(olds[0], target)
            logger.warning("restored %s from %s (a save was interrupted)", target, olds[0])
            olds = olds[1:]
        for stale in [*olds, *_stale_siblings(target, "tmp")]:
            if not _writer_alive(stale):
                shutil.rmtree(stale, ignore_errors=True)


def replace_dir(target: str | os.PathLike[str], fill: Callable[[Path], None]) -> Path:
    """Build a complete new folder with ``fill(tmp)`` beside ``target``, then swap it in by renaming.

    A reader sees the whole old folder or the whole new one: the old one stays untouched until the new
    one is complete and fsynced; then old -> ``.<name>.old-*``, new -> ``target``, old removed. A crash
    between the two renames is undone by :func:`recover_dir` (called here first and by the loaders).
    On an exception the old folder is left (or put back) in place and the temporary is removed.
    """
    target = Path(target)
    parent = target.parent
    parent.mkdir(parents=True, exist_ok=True)
    recover_dir(target)
    if os.path.lexists(target) and not target.is_dir():
        raise NotADirectoryError(f"{target} exists and is not a folder")
    tag = f"{os.getpid()}-{secrets.token_hex(4)}"
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-{tag}-", dir=parent))
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700; give the folder ordinary permissions
        fill(tmp)
        _fsync_dir(tmp)
        if os.path.lexists(target):
            old = parent / f".{target.name}.old-{tag}"
            os.rename(target, old)
            try:
                os.rename(tmp, target)
            except BaseException:
                os.rename(old, target)
                raise
            _fsync_dir(parent)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, target)
            _fsync_dir(parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def read_json(path: str | os.PathLike[str]) -> Any:
    """Read a JSON file, raising ``ValueError`` that names the file when it is not valid JSON."""
    p = Path(path)
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{p}: not valid JSON ({e})") from e


def atomic_torch_save(obj: Any, path: str | os.PathLike[str]) -> None:
    """``torch.save`` to ``path`` atomically (serialised in memory first, then written and renamed)."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def torch_load(path: str | os.PathLike[str], map_location: str | torch.device = "cpu") -> Any:
    """``torch.load`` with ``weights_only=True`` (no arbitrary code from pickles), always."""
    return torch.load(Path(path), map_location=map_location, weights_only=True)
