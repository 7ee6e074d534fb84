"""Domain folder data sets: ``ROOT/<domain>/<class>/<image>`` or ``ROOT/<domain>/<image>``.

Domains are chosen by name. Names match case-insensitively and ignoring spaces, ``_`` and ``-``, and
Office-Home's variants of its real-image domain ("Real", "Real_World", "Real World", "RealWorld") all
name the same folder. DomainNet's ``<domain>_<split>.txt`` split files (lines ``relpath label``) and
PACS's ``<domain>_<split>_kfold.txt`` lists are read when a split is asked for. Class folders are used
only for evaluation; training never sees them.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cdretrieval.data.images import is_image_file
from cdretrieval.errors import DataError

_REAL_ALIASES = frozenset({"real", "realworld", "realimages", "realimage"})


@dataclass(frozen=True)
class Sample:
    """One image of a domain. ``label`` is the class folder name, or None in the unlabeled layout."""

    path: str
    domain: str
    label: str | None


def _norm(name: str) -> str:
    """Normalise a domain name for matching: lower case, no spaces/underscores/hyphens."""
    key = re.sub(r"[\s_\-]+", "", name.lower())
    return "real" if key in _REAL_ALIASES else key


def list_domains(root: str | os.PathLike[str]) -> list[str]:
    """The domain folders under ``root`` (sorted), i.e. sub-folders that contain at least one image."""
    r = _check_root(root)
    out = []
    for child in sorted(r.iterdir()):
        if child.is_dir() and not child.name.startswith(".") and _has_images(child):
            out.append(child.name)
    return out


def _has_images(folder: Path) -> bool:
    for _dirpath, _dirs, files in os.walk(folder):
        if any(is_image_file(f) for f in files):
            return True
    return False


def escapes_root(path: str | os.PathLike[str], root: str | os.PathLike[str]) -> bool:
    """True when ``path`` (listed under ``root``) resolves, through a link, to a place outside ``root``.

    A domain folder that is itself a link (``root/photo → /data/photos``: a deliberate choice of the whole
    domain, as the quality benchmark's views make) is followed: the files must then stay inside that
    folder's real location. What is refused is a link *within* a domain that leads elsewhere. A path not
    listed under ``root`` at all is judged by whether it is a link to elsewhere than its own folder's real
    location.
    """
    listed = os.path.abspath(path)
    abs_root = os.path.abspath(root)
    if os.path.commonpath([abs_root, listed]) != abs_root:
        bases = [os.path.dirname(listed)]
    else:
        parts = os.path.relpath(listed, abs_root).split(os.sep)
        bases = [abs_root] + ([os.path.join(abs_root, parts[0])] if len(parts) > 1 else [])
    real = os.path.realpath(path)
    for base in bases:
        real_base = os.path.realpath(base)
        if os.path.commonpath([real_base, real]) == real_base:
            return False
    return True


def _drop_escaping_links(samples: list[Sample], root: Path, domain: str) -> list[Sample]:
    """``samples`` without the links that lead out of the data ``root``; a warning names those skipped."""
    kept = [s for s in samples if not escapes_root(s.path, root)]
    if len(kept) < len(samples):
        dropped = [s.path for s in samples if escapes_root(s.path, root)]
        warnings.warn(
            f"domain {domain}: skipped {len(dropped)} link(s) pointing outside the data root {root} "
            f"(e.g. {dropped[0]}); copy the file(s) into the data root to index them",
            UserWarning,
            stacklevel=3,
        )
    return kept


def _walk_error(error: OSError) -> None:
    """os.walk's ``onerror``: an unreadable folder (e.g. chmod 000) is skipped with a warning, not silently."""
    warnings.warn(f"skipped unreadable folder {error.filename}: {error.strerror}", UserWarning, stacklevel=2)


def _check_root(root: str | os.PathLike[str]) -> Path:
    r = Path(root).expanduser()
    if not r.exists():
        raise DataError(f"data root {r} does not exist")
    if not r.is_dir():
        raise DataError(f"data root {r} is not a folder")
    return r


def resolve_domain(root: str | os.PathLike[str], name: str) -> Path:
    """Find the folder of domain ``name`` under ``root`` (aliases and case accepted)."""
    r = _check_root(root)
    if not name or not name.strip():
        raise DataError("empty domain name")
    exact = r / name
    if exact.is_dir():
        return exact
    wanted = _norm(name)
    matches = [c for c in sorted(r.iterdir()) if c.is_dir() and _norm(c.name) == wanted]
    if len(matches) == 1:
        return matches[0]
    available = [c.name for c in sorted(r.iterdir()) if c.is_dir() and not c.name.startswith(".")]
    if not matches:
        raise DataError(f"domain {name!r} not found under {r}; available: {', '.join(available) or 'none'}")
    raise DataError(f"domain {name!r} is ambiguous under {r}: {', '.join(m.name for m in matches)}")


def _split_file(root: Path, folder: Path, name: str, split: str) -> Path | None:
    for stem in {folder.name, name, folder.name.lower(), name.lower()}:
        for candidate in (root / f"{stem}_{split}.txt", root / f"{stem}_{split}_kfold.txt"):
            if candidate.is_file():
                return candidate
    return None


def _read_split_file(root: Path, folder: Path, domain: str, split_file: Path) -> list[Sample]:
    """Read ``relpath [label]`` lines. Paths are relative to ``root`` (DomainNet) or start at the
    domain folder name (PACS lists); the class is the path's parent folder name."""
    samples: list[Sample] = []
    for lineno, raw in enumerate(split_file.read_text(encoding="utf-8").splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        rel = line.split()[0]
        candidates = [root / rel, folder.parent / rel, folder / rel]
        path = next((c for c in candidates if c.is_file()), None)
        if path is None:
            raise DataError(f"{split_file}:{lineno}: listed image {rel!r} not found under {root}")
        label = path.parent.name if path.parent != folder else None
        samples.append(Sample(str(path), domain, label))
    return samples


def scan_domain(root: str | os.PathLike[str], domain: str, split: str | None = None) -> list[Sample]:
    """List the images of one domain, in a deterministic (sorted) order.

    Args:
        root: the data set root.
        domain: domain name (aliases accepted, see module docstring); samples carry the folder's name.
        split: ``None`` for every image in the folder, or a split name (``train``, ``test``, ...) read
            from ``<domain>_<split>.txt`` / ``<domain>_<split>_kfold.txt`` in ``root``.

    Raises:
        DataError: unknown domain, missing split file, or a domain with no images.
    """
    r = _check_root(root)
    folder = resolve_domain(r, domain)
    if split is not None:
        split_file = _split_file(r, folder, domain, split)
        if split_file is None:
            raise DataError(f"no split file {folder.name}_{split}.txt for domain {domain!r} in {r}")
        samples = _read_split_file(r, folder, folder.name, split_file)
    else:
        samples = []
        for dirpath, dirs, files in os.walk(folder, onerror=_walk_error):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            here = Path(dirpath)
            label = None if here == folder else here.relative_to(folder).parts[0]
            samples.extend(Sample(str(here / f), folder.name, label) for f in sorted(files) if is_image_file(f))
    samples = _drop_escaping_links(samples, r, folder.name)
    if not samples:
        raise DataError(f"domain {domain!r} ({folder}) has no images" + (f" in split {split!r}" if split else ""))
    samples.sort(key=lambda s: s.path)
    return samples


def scan_domains(
    root: str | os.PathLike[str], domains: Sequence[str] | None = None, split: str | None = None
) -> dict[str, list[Sample]]:
    """Scan several domains (all of ``root``'s when ``domains`` is None); keys are the folder names."""
    names = list(domains) if domains else list_domains(root)
    if not names:
        raise DataError(f"no domain folders with images under {root}")
    out: dict[str, list[Sample]] = {}
    for name in names:
        samples = scan_domain(root, name, split)
        key = samples[0].domain
        if key in out:
            raise DataError(f"domain {name!r} given twice (as {key!r})")
        out[key] = samples
    return out


def parse_domains(text: str | Sequence[str] | None) -> list[str] | None:
    """Parse ``"A,B,C"`` (CLI form) into a list; None or empty means all domains."""
    if text is None:
        return None
    items = text.split(",") if isinstance(text, str) else list(text)
    names = [t.strip() for t in items if t.strip()]
    return names or None


PathsOrFolder = str | os.PathLike[str] | Sequence[str | os.PathLike[str]]


def collect_images(paths_or_folder: PathsOrFolder, domain: str) -> list[Sample]:
    """Samples for image files and folders (walked recursively; a sub-folder name becomes the label).

    Raises:
        DataError: a path does not exist, or no image file is found.
    """
    entries = [paths_or_folder] if isinstance(paths_or_folder, (str, os.PathLike)) else list(paths_or_folder)
    if not entries:
        raise DataError("no image paths given")
    out: list[Sample] = []
    for entry in entries:
        p = Path(entry).expanduser().resolve()
        if p.is_dir():
            for dirpath, dirs, files in os.walk(p):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                here = Path(dirpath)
                label = None if here == p else here.relative_to(p).parts[0]
                out.extend(Sample(str(here / f), domain, label) for f in sorted(files) if is_image_file(f))
        elif p.is_file():
            out.append(Sample(str(p), domain, None))
        else:
            raise DataError(f"{entry}: no such file or folder")
    if not out:
        raise DataError(f"no image files found in {[str(e) for e in entries]}")
    return out
