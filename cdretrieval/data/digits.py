"""Paired digit domains stored as ``.npz`` (``images`` uint8, ``labels`` int): MNIST, MNIST-M, USPS.

They are materialised once into the ordinary folder layout ``<cache>/<name>/<domain>/<label>/<i>.png``
(image ``i`` of every file keeps the stem ``i``), so every command treats them like any other data set.
``pairs.json`` in that folder records which domains are instance-paired (MNIST image i is the stroke of
MNIST-M image i), which the evaluation uses for recall@k of the paired image.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
from PIL import Image

from cdretrieval.errors import DataError
from cdretrieval.io import atomic_write_json, read_json, replace_dir
from cdretrieval.paths import cache_dir

#: Instance-paired domain pairs among the known digit files (same index = same handwritten stroke).
PAIRED_DIGIT_DOMAINS: tuple[tuple[str, str], ...] = (("mnist", "mnistm"),)
PAIRS_FILE = "pairs.json"


def npz_files(root: str | os.PathLike[str]) -> list[Path]:
    """The ``.npz`` domain files directly under ``root`` (sorted)."""
    r = Path(root)
    return sorted(p for p in r.glob("*.npz") if p.is_file()) if r.is_dir() else []


def load_npz_domain(path: str | os.PathLike[str]) -> tuple[np.ndarray, np.ndarray]:
    """Load ``(images [N,H,W] or [N,H,W,3] uint8, labels [N] int64)`` from one ``.npz``, validated."""
    p = Path(path)
    try:
        with np.load(p, allow_pickle=False) as z:
            images, labels = np.asarray(z["images"]), np.asarray(z["labels"]).astype(np.int64)
    except KeyError as e:
        raise DataError(f"{p}: expected arrays 'images' and 'labels' ({e} missing)") from e
    except (OSError, ValueError) as e:
        raise DataError(f"{p}: not a readable .npz file ({e})") from e
    if images.ndim not in (3, 4) or (images.ndim == 4 and images.shape[-1] not in (1, 3)):
        raise DataError(f"{p}: images must be [N,H,W] or [N,H,W,3], got shape {images.shape}")
    if len(images) != len(labels) or len(images) == 0:
        raise DataError(f"{p}: {len(images)} images but {len(labels)} labels")
    if images.dtype != np.uint8:
        images = np.clip(images, 0, 255).astype(np.uint8)
    return images, labels


def _fingerprint(files: list[Path]) -> str:
    h = hashlib.sha256()
    for f in files:
        st = f.stat()
        h.update(f"{f.name}:{st.st_size}:{int(st.st_mtime)}".encode())
    return h.hexdigest()[:12]


def materialize_npz_root(
    root: str | os.PathLike[str], out_root: str | os.PathLike[str] | None = None
) -> Path:
    """Write every ``.npz`` under ``root`` as a folder domain, once; return the folder data set root.

    The write goes to a temporary folder that is renamed into place at the end, so an interrupted run
    leaves nothing half-written, and a second call returns at once.
    """
    files = npz_files(root)
    if not files:
        raise DataError(f"no .npz domain files in {root}")
    out = Path(out_root) if out_root else cache_dir() / "npz" / f"{Path(root).resolve().name}-{_fingerprint(files)}"
    if (out / PAIRS_FILE).is_file():
        return out

    def fill(tmp: Path) -> None:
        for f in files:
            images, labels = load_npz_domain(f)
            for i, (img, lab) in enumerate(zip(images, labels, strict=True)):
                target = tmp / f.stem / str(int(lab)) / f"{i:05d}.png"
                target.parent.mkdir(parents=True, exist_ok=True)
                arr = img[..., 0] if img.ndim == 3 and img.shape[-1] == 1 else img
                Image.fromarray(arr).save(target, optimize=False)
        stems = {f.stem for f in files}
        paired = [list(p) for p in PAIRED_DIGIT_DOMAINS if set(p) <= stems]
        atomic_write_json(tmp / PAIRS_FILE, {"paired_domains": paired, "source": str(Path(root).resolve())})

    return replace_dir(out, fill)


def paired_domains(root: str | os.PathLike[str]) -> list[tuple[str, str]]:
    """Instance-paired domain pairs declared in ``root/pairs.json`` (empty when there is none)."""
    p = Path(root) / PAIRS_FILE
    if not p.is_file():
        return []
    data = read_json(p)
    return [(str(a), str(b)) for a, b in data.get("paired_domains", [])]


def resolve_data_root(root: str | os.PathLike[str]) -> Path:
    """Return a folder-layout root for ``root``: itself, or its materialised ``.npz`` domains."""
    r = Path(root).expanduser()
    if not r.exists():
        raise DataError(f"data root {r} does not exist")
    if r.is_dir() and npz_files(r) and not any(c.is_dir() and not c.name.startswith(".") for c in r.iterdir()):
        return materialize_npz_root(r)
    return r
