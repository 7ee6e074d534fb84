"""Resumable on-disk embeddings: fixed-size chunks of one domain's samples, each written atomically.

Folder layout (one per domain, feature and split; see :func:`cdretrieval.pipeline.embed_domains`)::

    progress.json        format_version, key (model hash, feature, image size, sample-list fingerprint,
                         chunk size, sample count), chunks_done, complete, dim, updated
    chunk_000000.npz     samples [0, chunk_size): embeddings [m, D] float32, indices [m] int64 (sample
                         index of each row), sizes [m, 2] int64 (width, height), bad_indices [b] int64,
                         bad_reasons [b] str — with m + b = chunk length
    chunk_000001.npz     samples [chunk_size, 2·chunk_size) ...

A chunk file is written (atomically) before ``progress.json`` counts it, so a job killed at any moment
leaves every counted chunk complete; a rerun continues with chunk ``chunks_done``. A different key (another
model, feature, image size or sample list) discards the old chunks. A counted chunk that cannot be read
back is recomputed together with every chunk after it.

Several processes (``torchrun``, :func:`cdretrieval.domain_embeddings.embed_samples`) share one store: rank 0
:meth:`ChunkStore.claim` s it (discarding another key's chunks, writing ``progress.json`` with this key
before any chunk), then each rank writes its own chunks with :meth:`ChunkStore.write_chunk` — any order, one
writer per chunk — and rank 0 counts them all at the end. While such a job runs, ``chunks_done`` counts only
the leading chunks known complete when it started; a chunk file present in a folder whose ``progress.json``
has this key is this key's (chunk files are only written after the key is recorded or everything cleared),
so a rerun keeps every chunk that reads back consistently (:meth:`ChunkStore.read_chunk`).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from cdretrieval.data.folders import Sample
from cdretrieval.io import atomic_write_bytes, atomic_write_json, read_json

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
PROGRESS_FILE = "progress.json"
DEFAULT_CHUNK_SIZE = 1024


@dataclass
class Chunk:
    """Embeddings of samples ``[start, stop)`` of a domain (unreadable ones listed in ``bad``)."""

    start: int
    stop: int
    embeddings: np.ndarray  # [m, D] float32
    indices: np.ndarray  # [m] int64, absolute sample indices in [start, stop)
    sizes: np.ndarray  # [m, 2] int64, (width, height)
    bad: list[tuple[int, str]] = field(default_factory=list)  # (absolute sample index, reason)

    def __post_init__(self) -> None:
        m = len(self.indices)
        assert self.embeddings.ndim == 2 and self.embeddings.shape[0] == m, "embeddings/indices out of sync"
        assert self.sizes.shape == (m, 2), "sizes/indices out of sync"
        assert m + len(self.bad) == self.stop - self.start, "chunk does not account for every sample"


def samples_fingerprint(samples: Sequence[Sample]) -> str:
    """SHA-256 over the ordered sample paths with each file's size and modification time.

    Any added, removed, reordered or rewritten image changes it (a missing file hashes as size -1, so it
    is still counted — and reported as unreadable when embedded).
    """
    h = hashlib.sha256()
    for s in samples:
        try:
            st = os.stat(s.path)
            size, mtime = st.st_size, st.st_mtime_ns
        except OSError:
            size, mtime = -1, -1
        h.update(f"{s.path}\t{size}\t{mtime}\n".encode())
    return h.hexdigest()


def _chunk_name(i: int) -> str:
    return f"chunk_{i:06d}.npz"


def _encode_chunk(chunk: Chunk) -> bytes:
    buf = io.BytesIO()
    np.savez(
        buf,
        embeddings=np.ascontiguousarray(chunk.embeddings, dtype=np.float32),
        indices=chunk.indices.astype(np.int64),
        sizes=chunk.sizes.astype(np.int64),
        bad_indices=np.array([i for i, _ in chunk.bad], dtype=np.int64),
        bad_reasons=np.array([r for _, r in chunk.bad], dtype=str),  # unicode array: no pickle needed
    )
    return buf.getvalue()


class ChunkStore:
    """The chunks of one domain's embeddings in ``folder``, valid only for ``key``.

    Args:
        folder: where the chunks live (created on the first write).
        key: what the embeddings depend on (JSON-serialisable); any difference discards stored chunks.
        n_samples: samples in the domain; chunk ``i`` covers ``[i·chunk_size, min((i+1)·chunk_size, n))``.
        chunk_size: samples per chunk.
        dim: embedding dimension every chunk must have.
    """

    def __init__(self, folder: str | Path, key: Mapping[str, Any], n_samples: int, chunk_size: int, dim: int):
        if chunk_size < 1 or n_samples < 0 or dim < 1:
            raise ValueError(f"need chunk_size ≥ 1, n_samples ≥ 0, dim ≥ 1; got {chunk_size}, {n_samples}, {dim}")
        self.folder = Path(folder)
        self.key = {**key, "n_samples": n_samples, "chunk_size": chunk_size, "dim": dim}
        self.n_samples = n_samples
        self.chunk_size = chunk_size
        self.dim = dim

    @property
    def n_chunks(self) -> int:
        return -(-self.n_samples // self.chunk_size)  # ceil

    def bounds(self, i: int) -> tuple[int, int]:
        """Sample range ``[start, stop)`` of chunk ``i``."""
        start = i * self.chunk_size
        return start, min(start + self.chunk_size, self.n_samples)

    # -- reading --------------------------------------------------------------------------------------
    def completed(self) -> list[Chunk]:
        """The leading run of complete, readable chunks for this key (possibly empty).

        Stored chunks for another key are deleted here, so they can never be mixed with new ones.
        """
        return list(self._leading_chunks())

    def completed_count(self) -> int:
        """How many chunks :meth:`completed` would return, each read and checked but none kept (the same
        side effects: another key's chunks are deleted)."""
        return sum(1 for _ in self._leading_chunks())

    def _leading_chunks(self) -> Iterator[Chunk]:
        """The leading complete, readable chunks for this key, read one at a time (see :meth:`completed`)."""
        progress = self._read_progress()
        if progress is None:
            self.clear()  # chunk files without a progress file (a job killed before it wrote one) are no key's
            return
        if progress.get("key") != self.key:
            logger.info("embeddings in %s are for another model or sample list; recomputing", self.folder)
            self.clear()
            return
        done = int(progress.get("chunks_done", 0))
        for i in range(min(done, self.n_chunks)):
            chunk = self.read_chunk(i)
            if chunk is None:
                logger.warning("%s unreadable; recomputing from chunk %d", self.folder / _chunk_name(i), i)
                return
            yield chunk

    def _read_progress(self) -> dict[str, Any] | None:
        path = self.folder / PROGRESS_FILE
        if not path.is_file():
            return None
        try:
            data = read_json(path)
        except (OSError, ValueError) as e:
            logger.warning("ignoring unreadable %s (%s)", path, e)
            return None
        if not isinstance(data, dict) or data.get("format_version") != FORMAT_VERSION:
            return None
        return data

    def read_chunk(self, i: int) -> Chunk | None:
        """Chunk ``i`` if its file exists and is consistent with this store (bounds, dim, finite), else None."""
        start, stop = self.bounds(i)
        try:
            with np.load(self.folder / _chunk_name(i), allow_pickle=False) as z:
                emb = np.asarray(z["embeddings"], dtype=np.float32)
                idx = np.asarray(z["indices"], dtype=np.int64)
                sizes = np.asarray(z["sizes"], dtype=np.int64)
                bad = list(zip(z["bad_indices"].tolist(), z["bad_reasons"].tolist(), strict=True))
        except (OSError, ValueError, KeyError) as e:
            logger.debug("chunk %d: %s", i, e)
            return None
        ok = (
            emb.ndim == 2
            and emb.shape == (len(idx), self.dim)
            and sizes.shape == (len(idx), 2)
            and len(idx) + len(bad) == stop - start
            and bool(np.all((idx >= start) & (idx < stop)))
            and bool(np.isfinite(emb).all())
        )
        return Chunk(start, stop, emb, idx, sizes, [(int(j), str(r)) for j, r in bad]) if ok else None

    def read_outline(self, i: int) -> tuple[np.ndarray, list[tuple[int, str]]] | None:
        """Chunk ``i``'s row sample indices [m] and its unreadable samples, without its embeddings (only
        those members of the file are read); None when the file is missing or they are inconsistent."""
        start, stop = self.bounds(i)
        try:
            with np.load(self.folder / _chunk_name(i), allow_pickle=False) as z:
                idx = np.asarray(z["indices"], dtype=np.int64)
                bad = [(int(j), str(r)) for j, r in zip(z["bad_indices"].tolist(), z["bad_reasons"].tolist(),
                                                        strict=True)]
        except (OSError, ValueError, KeyError) as e:
            logger.debug("chunk %d: %s", i, e)
            return None
        ok = idx.ndim == 1 and len(idx) + len(bad) == stop - start and bool(np.all((idx >= start) & (idx < stop)))
        return (idx, bad) if ok else None

    # -- writing --------------------------------------------------------------------------------------
    def write(self, i: int, chunk: Chunk) -> None:
        """Persist chunk ``i`` then record ``i + 1`` chunks as done (the caller writes them in order)."""
        self.write_chunk(i, chunk)
        self.write_progress(i + 1)

    def write_chunk(self, i: int, chunk: Chunk) -> None:
        """Persist chunk ``i`` atomically, without touching ``progress.json`` (one writer per chunk)."""
        assert (chunk.start, chunk.stop) == self.bounds(i), f"chunk {i} has bounds {chunk.start, chunk.stop}"
        assert chunk.embeddings.shape[1] == self.dim or len(chunk.indices) == 0
        atomic_write_bytes(self.folder / _chunk_name(i), _encode_chunk(chunk))

    def write_progress(self, chunks_done: int) -> None:
        """Record this key and that chunks ``[0, chunks_done)`` are complete (atomically)."""
        atomic_write_json(
            self.folder / PROGRESS_FILE,
            {
                "format_version": FORMAT_VERSION,
                "key": self.key,
                "chunks_done": chunks_done,
                "complete": chunks_done == self.n_chunks,
                "updated": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            },
        )

    def claim(self, resume: bool) -> None:
        """Make the folder this key's before several writers share it (rank 0 only, before the others start).

        Chunks of another key, chunk files without a progress file, and with ``resume`` False every chunk,
        are deleted; then ``progress.json`` records this key (keeping its count when the key was already
        there), so every chunk file written afterwards is known to be this key's.
        """
        progress = self._read_progress()
        if resume and progress is not None and progress.get("key") == self.key:
            return
        self.clear()
        self.write_progress(0)

    def pending(self, chunk_ids: Sequence[int]) -> list[int]:
        """Those of ``chunk_ids`` with no consistent chunk file (call after :meth:`claim`)."""
        return [i for i in chunk_ids if self.read_chunk(i) is None]

    def clear(self) -> None:
        """Delete the progress file (first: the folder stops claiming anything) and every chunk file."""
        (self.folder / PROGRESS_FILE).unlink(missing_ok=True)
        if self.folder.is_dir():
            for f in self.folder.glob("chunk_*.npz"):
                with contextlib.suppress(FileNotFoundError):
                    f.unlink()
