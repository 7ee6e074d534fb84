"""Embedding whole domains: every image of a data set → an L2-normalised vector, saved resumably.

A batch job (``cdretrieval embed``, and the first step of indexing and evaluation); serving never imports it.

* :func:`embed_domains` — the images of each domain of a data root, embedded with a run's encoder or a
  baseline backbone, ``chunk_size`` images at a time; each finished chunk is saved atomically
  (:mod:`cdretrieval.embedding_chunks`), so a killed job resumes after its last complete chunk.
* :func:`embed_all` / :func:`embed_samples` — the same for samples at hand and a :class:`LoadedModel`.
* :func:`store_all` / :func:`store_samples` — the same, leaving the embeddings on disk: a lazy
  :class:`StoredDomain` per domain, read shard by shard (``ivf-ondisk`` indexes of domains larger than memory).

Embedding folder layout::

    RUN_DIR/embeddings/<safe domain>/<feature>[-<safe split>]/progress.json, chunk_000000.npz, ...
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from cdretrieval.data.datasets import warn_skipped
from cdretrieval.data.digits import resolve_data_root
from cdretrieval.data.folders import Sample, parse_domains, scan_domains
from cdretrieval.data.transforms import eval_transform
from cdretrieval.device import resolve_device
from cdretrieval.distributed import barrier, gather_objects, init_distributed, local_device, rank, world_size
from cdretrieval.embed import iter_extract
from cdretrieval.embedding_chunks import DEFAULT_CHUNK_SIZE, Chunk, ChunkStore, samples_fingerprint
from cdretrieval.errors import DataError
from cdretrieval.index import Item, safe_domain_name
from cdretrieval.loading import LoadedModel, load_model
from cdretrieval.ondisk import Shard
from cdretrieval.run import EMBEDDINGS_DIR
from cdretrieval.validation import check_int

logger = logging.getLogger(__name__)

#: ``on_chunk(domain, chunk_index, samples_done, samples_total)``, called after each newly computed chunk.
ChunkCallback = Callable[[str, int, int, int], None]


@dataclass
class EmbeddedDomain:
    """One domain's embeddings: row ``j`` of ``embeddings`` is ``items[j]`` (unreadable files are left out)."""

    domain: str
    embeddings: np.ndarray  # [N_ok, D] float32, L2-normalised
    items: list[Item]  # path, domain, label, width, height per row
    sample_indices: np.ndarray  # [N_ok] int64, index of each row in the domain's sorted sample list
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason) of unreadable files
    feature: str = "head"
    model_hash: str = ""

    @property
    def labels(self) -> list[str | None]:
        """Class label (class folder name) per row; None in the unlabeled layout."""
        return [it.label for it in self.items]

    def __len__(self) -> int:
        return len(self.items)



@dataclass
class StoredDomain:
    """One domain's embeddings left in its complete chunk store, read one chunk at a time when asked:
    :meth:`shards` for an ``ivf-ondisk`` build, :meth:`sample` for a seeded subset. Its rows, items and
    skipped images are those of :class:`EmbeddedDomain` (chunk order, unreadable images left out); only the
    chunks' row indices and skipped lists are read to open it. Made by :func:`store_samples`.
    """

    domain: str
    store: ChunkStore
    samples: Sequence[Sample]
    rows: list[int]  # readable rows per chunk
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason) of unreadable files
    feature: str = "head"
    model_hash: str = ""

    @classmethod
    def open(
        cls, store: ChunkStore, domain: str, samples: Sequence[Sample], *, feature: str, model_hash: str
    ) -> StoredDomain:
        """The domain of the complete ``store`` of ``samples`` (``feature`` vectors of model ``model_hash``).

        Raises:
            DataError: a chunk is missing or inconsistent.
        """
        rows: list[int] = []
        bad: list[tuple[int, str]] = []
        for i in range(store.n_chunks):
            outline = store.read_outline(i)
            if outline is None:
                raise DataError(f"{store.folder}: chunk {i} is missing or unreadable; embed the domain again")
            rows.append(len(outline[0]))
            bad += outline[1]
        warn_skipped(bad, f"domain {domain}")
        return cls(domain, store, samples, rows, [(samples[j].path, r) for j, r in bad], feature, model_hash)

    def __len__(self) -> int:
        return sum(self.rows)

    @property
    def dim(self) -> int:
        return self.store.dim

    def read(self, i: int) -> tuple[np.ndarray, list[Item]]:
        """Chunk ``i``'s embeddings [m, D] and the :class:`Item` of each row.

        Raises:
            DataError: the chunk file is gone, unreadable or no longer has the rows it had when opened.
        """
        chunk = self.store.read_chunk(i)
        if chunk is None or len(chunk.indices) != self.rows[i]:
            raise DataError(f"{self.store.folder}: chunk {i} is missing, unreadable or changed since it was "
                            "embedded; embed the domain again")
        return chunk.embeddings, _items_of(self.domain, self.samples, chunk.indices, chunk.sizes)

    def shards(self, shard_rows: int) -> list[Shard]:
        """The domain as :data:`~cdretrieval.ondisk.Shard` s: runs of consecutive chunks of about
        ``shard_rows`` samples (at least one chunk each), each reading its chunk files one at a time
        whenever it is called (nothing is held between calls)."""
        check_int(shard_rows, "shard_rows", 1)
        per = max(1, shard_rows // self.store.chunk_size)
        n = self.store.n_chunks
        return [self._shard(range(a, min(a + per, n))) for a in range(0, n, per)]

    def _shard(self, chunk_ids: range) -> Shard:
        def read() -> Iterator[tuple[np.ndarray, list[Item]]]:
            return (self.read(i) for i in chunk_ids if self.rows[i])

        return read

    def sample(self, k: int, seed: int = 0) -> np.ndarray:
        """A seeded sample of ``min(k, len(self))`` rows [k', D], in row order, read chunk by chunk."""
        n = len(self)
        picked = np.sort(np.random.default_rng(seed).choice(n, size=min(k, n), replace=False))
        out, first = [], 0
        for i, m in enumerate(self.rows):
            lo, hi = np.searchsorted(picked, [first, first + m])
            if hi > lo:
                out.append(self.read(i)[0][picked[lo:hi] - first])
            first += m
        return np.concatenate(out) if out else np.zeros((0, self.dim), np.float32)


@dataclass(frozen=True)
class EmbedSettings:
    """How a batch job embeds, the same for every domain: loader, chunking, progress bars, resumption.

    Checked on construction, so a public entry point fails on a bad value before any model work
    (``ValueError`` naming the setting).
    """

    batch_size: int = 64  # images per forward pass
    num_workers: int = 2  # decoding workers ahead of the model
    chunk_size: int = DEFAULT_CHUNK_SIZE  # images per saved chunk
    progress: bool = True  # a progress bar per domain
    resume: bool = True  # reuse complete chunks on disk (False recomputes everything)

    def __post_init__(self) -> None:
        for name, low in (("batch_size", 1), ("num_workers", 0), ("chunk_size", 1)):
            check_int(getattr(self, name), name, low)


def default_store(model: LoadedModel, embeddings_dir: str | os.PathLike[str] | None) -> Path | None:
    """Where a job keeps its chunks: ``embeddings_dir`` when given, else ``RUN_DIR/embeddings``; a baseline
    without ``embeddings_dir`` keeps nothing (None)."""
    if embeddings_dir is not None:
        return Path(embeddings_dir)
    return model.run_dir / EMBEDDINGS_DIR if model.run_dir is not None else None


def scan_data(
    data_root: str | os.PathLike[str], domains: str | Sequence[str] | None, split: str | None
) -> tuple[Path, dict[str, list[Sample]]]:
    """Absolute folder-layout root (``.npz`` digits materialised) and its domains' samples."""
    root = resolve_data_root(data_root).resolve()  # absolute: item paths must work from any cwd
    return root, scan_domains(root, parse_domains(domains), split)


def embeddings_folder(base: Path, domain: str, feature: str, split: str | None) -> Path:
    """``base/<safe domain>/<feature>[-<safe split>]``: one chunk store per domain, feature and split."""
    sub = feature if split is None else f"{feature}-{safe_domain_name(split)}"
    return base / safe_domain_name(domain) / sub


def embed_samples(
    model: LoadedModel,
    domain: str,
    samples: Sequence[Sample],
    folder: Path | None,
    settings: EmbedSettings,
    on_chunk: ChunkCallback | None = None,
) -> EmbeddedDomain:
    """Embed one domain's ``samples`` chunk by chunk, reusing (``resume``) and writing chunks in ``folder``
    when given (None: nothing is read or written).

    Under ``torchrun`` (world size > 1, process group joined) the chunks are shared among the ranks
    (:func:`_embed_shared`); ``folder`` is then required and must be on a filesystem every rank sees.
    """
    if world_size() > 1:
        if folder is None:
            raise ValueError("embedding with several processes needs an embeddings folder shared by every rank")
        return _embed_shared(model, domain, samples, folder, settings, on_chunk)
    n, dim, chunk_size = len(samples), model.dim, settings.chunk_size
    store: ChunkStore | None = None
    chunks: list[Chunk] = []
    if folder is not None:
        store = ChunkStore(folder, _store_key(model, samples), n, chunk_size, dim)
        if settings.resume:
            chunks = store.completed()
        else:
            store.clear()
    chunks.extend(c for _, c in _compute_into(model, domain, samples, len(chunks), store, settings, on_chunk))
    n_chunks = -(-n // chunk_size)
    assert len(chunks) == n_chunks, f"{domain}: embedded {len(chunks)} of {n_chunks} chunks"
    return _assemble(model, domain, samples, chunks)


def _compute_into(
    model: LoadedModel,
    domain: str,
    samples: Sequence[Sample],
    first: int,
    store: ChunkStore | None,
    settings: EmbedSettings,
    on_chunk: ChunkCallback | None,
) -> Iterator[tuple[int, Chunk]]:
    """One process: the chunks ``first, first + 1, ...`` of ``samples`` computed in order (under a progress
    bar), each written to ``store`` with its progress (when given) and reported, then yielded."""
    n, chunk_size = len(samples), settings.chunk_size
    start = min(first * chunk_size, n)
    if first:
        logger.info("%s: resuming at image %d of %d (%d chunks on disk)", domain, start, n, first)
    bar = tqdm(total=n, initial=start, desc=f"embedding {domain}", unit="img",
               disable=not settings.progress or start >= n, leave=False)
    try:
        for i, chunk in _compute_chunks(model, samples, range(first, -(-n // chunk_size)), settings, bar):
            if store is not None:
                store.write(i, chunk)
            if on_chunk is not None:
                on_chunk(domain, i, chunk.stop, n)
            yield i, chunk
    finally:
        bar.close()


def _store_key(model: LoadedModel, samples: Sequence[Sample]) -> dict[str, Any]:
    """What a domain's stored chunks depend on besides their count and size (see :class:`ChunkStore`)."""
    return {
        "model_hash": model.cache_key_hash,
        "feature": model.feature,
        "image_size": model.image_size,
        "samples": samples_fingerprint(samples),
    }


def _compute_chunks(
    model: LoadedModel, samples: Sequence[Sample], chunk_ids: Sequence[int], settings: EmbedSettings, bar: tqdm
) -> Iterator[tuple[int, Chunk]]:
    """Embed the chunks ``chunk_ids`` (ascending) of ``samples``; yield ``(chunk index, Chunk)`` as each completes.

    One loader runs over the chunks' samples back to back (its workers keep decoding across chunk
    boundaries); with no chunk to do no model or loader starts. Chunk ``i`` covers samples
    ``[i·chunk_size, min((i+1)·chunk_size, n))``.
    """
    n, dim, size = len(samples), model.dim, settings.chunk_size
    bounds = [(i * size, min((i + 1) * size, n)) for i in chunk_ids]
    if not bounds:
        return
    # ``where[j]``: sample index of the j-th sample handed to the loader (loader indices count from 0).
    where = torch.from_numpy(np.concatenate([np.arange(a, b, dtype=np.int64) for a, b in bounds]))
    ends = np.cumsum([b - a for a, b in bounds])  # loader position at which each chunk is complete
    amp, channels_last = model.input_settings()  # the backbone's runtime decides (ONNX Runtime: fp32 NCHW)
    first = bounds[0][0]  # the trailing chunks (one process resuming): a slice, as the loader always got
    todo = samples[first:] if len(where) == n - first else [samples[j] for j in where.tolist()]
    feats: list[torch.Tensor] = []  # buffered rows not yet in a chunk
    idx: list[torch.Tensor] = []
    sizes: list[torch.Tensor] = []
    bad: list[tuple[int, str]] = []
    seen, done = 0, 0
    for batch in iter_extract(model.embed, todo, eval_transform(model.image_size), device=model.device, amp=amp,
                              channels_last=channels_last, batch_size=settings.batch_size,
                              num_workers=settings.num_workers):
        if len(batch.indices):
            feats.append(batch.features)
            idx.append(where[batch.indices])
            sizes.append(batch.sizes)
        bad.extend((int(where[i]), reason) for i, reason in batch.bad)
        seen += batch.count
        bar.update(batch.count)
        # Batches come in order: every chunk that ends at or before ``seen`` is complete.
        while done < len(bounds) and seen >= ends[done]:
            yield chunk_ids[done], _cut_chunk(*bounds[done], dim, feats, idx, sizes, bad)
            done += 1
    assert done == len(bounds) and seen == len(where), f"embedded {seen} of {len(where)} images"


def _embed_shared(
    model: LoadedModel,
    domain: str,
    samples: Sequence[Sample],
    folder: Path,
    settings: EmbedSettings,
    on_chunk: ChunkCallback | None,
) -> EmbeddedDomain:
    """:func:`embed_samples` with every rank of the process group: each embeds its share of the chunks
    (:func:`_fill_shared`), then every rank reads the whole domain back in chunk order. Every rank returns the
    whole domain, identical to a single process's result (exactly, when ``chunk_size`` is a multiple of
    ``batch_size``: the model then sees the same batches).
    """
    store = _fill_shared(model, domain, samples, folder, settings, on_chunk)
    read = [store.read_chunk(i) for i in range(store.n_chunks)]  # every rank: the whole domain, in order
    _finish_shared(store, [i for i, c in enumerate(read) if c is None])
    return _assemble(model, domain, samples, [c for c in read if c is not None])


def _fill_shared(
    model: LoadedModel,
    domain: str,
    samples: Sequence[Sample],
    folder: Path,
    settings: EmbedSettings,
    on_chunk: ChunkCallback | None,
) -> ChunkStore:
    """Every rank of the process group embeds its share of the domain's missing chunks into ``folder``.

    Rank 0 claims the store (:meth:`ChunkStore.claim`: another key's chunks, or all with ``resume`` False,
    are discarded); each rank checks the chunks ``r, r+W, ...`` on disk; the chunks still missing, in
    order, are dealt out round-robin (pending chunk ``j`` goes to rank ``j mod W``), so a rerun after a
    killed rank redoes only the chunks that never reached the disk, spread over every rank. Each rank
    writes its chunks atomically; returns after a barrier (every chunk written); the caller checks them and
    records the store complete (:func:`_finish_shared`).

    Raises:
        DataError: the ranks see different sample lists (no shared filesystem, or files changing).
    """
    me, ranks = rank(), world_size()
    n, chunk_size = len(samples), settings.chunk_size
    store = ChunkStore(folder, _store_key(model, samples), n, chunk_size, model.dim)
    if len(set(json.dumps(k, sort_keys=True) for k in gather_objects(store.key))) > 1:
        raise DataError(f"the ranks see different images (or models) for domain {domain!r}; every rank must read "
                        "the same files, e.g. from a shared filesystem")
    if me == 0:
        store.claim(settings.resume)
    barrier()
    pending = sorted(i for part in gather_objects(store.pending(range(me, store.n_chunks, ranks))) for i in part)
    mine = pending[me::ranks]
    if me == 0 and pending != list(range(store.n_chunks)):
        logger.info("%s: %d of %d chunks on disk; %d ranks embed the other %d", domain,
                    store.n_chunks - len(pending), store.n_chunks, ranks, len(pending))
    total = sum(store.bounds(i)[1] - store.bounds(i)[0] for i in mine)
    bar = tqdm(total=total, desc=f"embedding {domain} (rank {me} of {ranks})", unit="img",
               disable=not settings.progress or me != 0 or total == 0, leave=False)
    try:
        for i, chunk in _compute_chunks(model, samples, mine, settings, bar):
            store.write_chunk(i, chunk)
            if on_chunk is not None:
                on_chunk(domain, i, chunk.stop, n)
    finally:
        bar.close()
    barrier()
    return store


def _finish_shared(store: ChunkStore, unreadable: Sequence[int]) -> None:
    """Every rank: gather the chunks each found ``unreadable`` after :func:`_fill_shared`; raise if any, else
    rank 0 records the store complete.

    Raises:
        RuntimeError: a chunk is missing or unreadable after every rank finished.
    """
    missing = sorted({i for part in gather_objects(list(unreadable)) for i in part})
    if missing:
        raise RuntimeError(f"{store.folder}: chunks {missing[:8]} are missing or unreadable after every rank "
                           "finished")
    if rank() == 0:
        store.write_progress(store.n_chunks)


def _cut_chunk(
    start: int,
    stop: int,
    dim: int,
    feats: list[torch.Tensor],
    idx: list[torch.Tensor],
    sizes: list[torch.Tensor],
    bad: list[tuple[int, str]],
) -> Chunk:
    """Move the buffered rows with sample index < ``stop`` into a :class:`Chunk` (buffers keep the rest)."""
    f = torch.cat(feats) if feats else torch.empty(0, dim)  # [b, D]
    i = torch.cat(idx) if idx else torch.empty(0, dtype=torch.long)  # [b]
    s = torch.cat(sizes) if sizes else torch.empty(0, 2, dtype=torch.long)  # [b, 2]
    take = i < stop
    rest = ~take
    feats[:] = [f[rest]] if rest.any() else []
    idx[:] = [i[rest]] if rest.any() else []
    sizes[:] = [s[rest]] if rest.any() else []
    chunk_bad = [(j, r) for j, r in bad if j < stop]
    bad[:] = [(j, r) for j, r in bad if j >= stop]
    emb = f[take].numpy().astype(np.float32) if take.any() else np.zeros((0, dim), np.float32)
    return Chunk(start, stop, emb.reshape(-1, dim), i[take].numpy(), s[take].numpy().reshape(-1, 2), chunk_bad)


def _items_of(domain: str, samples: Sequence[Sample], rows: np.ndarray, sizes: np.ndarray) -> list[Item]:
    """The :class:`Item` of each embedded row: sample indices ``rows`` [m] with their ``sizes`` [m, 2]."""
    return [
        Item(samples[j].path, domain, samples[j].label, int(w), int(h))
        for j, (w, h) in zip(rows.tolist(), sizes.tolist(), strict=True)
    ]


def _assemble(model: LoadedModel, domain: str, samples: Sequence[Sample], chunks: Sequence[Chunk]) -> EmbeddedDomain:
    """Concatenate chunks into one :class:`EmbeddedDomain` with its item table."""
    emb = np.concatenate([c.embeddings for c in chunks]) if chunks else np.zeros((0, model.dim), np.float32)
    rows = np.concatenate([c.indices for c in chunks]) if chunks else np.zeros(0, np.int64)
    wh = np.concatenate([c.sizes for c in chunks]) if chunks else np.zeros((0, 2), np.int64)
    bad = [b for c in chunks for b in c.bad]
    items = _items_of(domain, samples, rows, wh)
    warn_skipped(bad, f"domain {domain}")
    return EmbeddedDomain(
        domain=domain,
        embeddings=np.ascontiguousarray(emb, dtype=np.float32),
        items=items,
        sample_indices=rows.astype(np.int64),
        skipped=[(samples[j].path, reason) for j, reason in bad],
        feature=model.feature,
        model_hash=model.model_hash,
    )


def embed_all(
    model: LoadedModel,
    data: Mapping[str, Sequence[Sample]],
    store_base: Path | None,
    split: str | None,
    settings: EmbedSettings,
    on_chunk: ChunkCallback | None = None,
) -> dict[str, EmbeddedDomain]:
    """Each domain of ``data`` embedded by :func:`embed_samples`, its chunks in
    :func:`embeddings_folder` under ``store_base`` (None: kept in memory only)."""
    return {
        d: embed_samples(
            model, d, samples,
            embeddings_folder(store_base, d, model.feature, split) if store_base is not None else None,
            settings, on_chunk,
        )
        for d, samples in data.items()
    }


def store_samples(
    model: LoadedModel,
    domain: str,
    samples: Sequence[Sample],
    folder: Path,
    settings: EmbedSettings,
    on_chunk: ChunkCallback | None = None,
) -> StoredDomain:
    """:func:`embed_samples` that leaves the embeddings in ``folder``'s chunk store: every chunk is computed
    (or kept, with ``resume``) and written, none is held, and the complete store is returned as a
    :class:`StoredDomain` (under ``torchrun``: on every rank, each having embedded its share)."""
    if world_size() > 1:
        store = _fill_shared(model, domain, samples, folder, settings, on_chunk)
        _finish_shared(store, store.pending(range(rank(), store.n_chunks, world_size())))
    else:
        store = ChunkStore(folder, _store_key(model, samples), len(samples), settings.chunk_size, model.dim)
        first = store.completed_count() if settings.resume else 0
        if not settings.resume:
            store.clear()
        for _ in _compute_into(model, domain, samples, first, store, settings, on_chunk):
            pass
    return StoredDomain.open(store, domain, samples, feature=model.feature, model_hash=model.model_hash)


def store_all(
    model: LoadedModel,
    data: Mapping[str, Sequence[Sample]],
    store_base: Path,
    split: str | None,
    settings: EmbedSettings,
) -> dict[str, StoredDomain]:
    """:func:`store_samples` for each domain of ``data``, its chunks in :func:`embeddings_folder` under
    ``store_base``: :func:`embed_all` without holding any domain's embeddings."""
    return {d: store_samples(model, d, samples, embeddings_folder(store_base, d, model.feature, split), settings)
            for d, samples in data.items()}


def embed_domains(
    run_dir: str | os.PathLike[str] | None,
    data_root: str | os.PathLike[str],
    domains: str | Sequence[str] | None = None,
    *,
    backbone: str | None = None,
    weights: str = "default",
    split: str | None = None,
    feature: str | None = None,
    image_size: int | None = None,
    batch_size: int = 64,
    num_workers: int = 2,
    device: str | torch.device = "auto",
    progress: bool = True,
    resume: bool = True,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    embeddings_dir: str | os.PathLike[str] | None = None,
    on_chunk: ChunkCallback | None = None,
) -> dict[str, EmbeddedDomain]:
    """Embed every image of ``domains`` (all of ``data_root``'s when None) with a run's encoder or a baseline.

    Embeddings are computed ``chunk_size`` images at a time; each finished chunk is saved atomically under
    ``embeddings_dir`` (default ``RUN_DIR/embeddings``; without a run and without ``embeddings_dir`` nothing
    is saved). A killed job rerun with ``resume=True`` continues after the last complete chunk; chunks made
    by another model (hash), feature, image size or sample list are discarded. Unreadable images are
    skipped, counted and reported (``EmbeddedDomain.skipped`` and a warning).

    Under ``torchrun --nproc_per_node M [--nnodes N ...]`` every process joins the group (gloo on CPU,
    NCCL on CUDA, one GPU per process: ``cuda:$LOCAL_RANK``) and embeds its share of each domain's chunks
    into the shared store (``embeddings_dir`` or the run's, on a filesystem all machines see); a rerun
    after any rank was killed redoes only the chunks not on disk. Every rank returns the same result as a
    single process (see :func:`_embed_shared`).

    Args:
        run_dir: run folder, or None for the no-adaptation baseline (``backbone`` features).
        data_root: ``ROOT/<domain>/[<class>/]<image>``, or a folder of digit ``.npz`` files.
        domains: names (list or ``"A,B"``), aliases accepted; None for all.
        backbone, weights: the baseline's backbone and weights (see :func:`load_model`).
        split: read ``<domain>_<split>.txt`` lists instead of every image.
        feature: ``head`` | ``backbone`` (default: the run's ``model.index_feature``).
        image_size: default: the run's ``data.image_size``.
        batch_size, num_workers: loader settings (workers decode ahead while the model runs).
        device: ``auto`` picks CUDA when available.
        progress: show a progress bar per domain.
        resume: reuse complete chunks on disk (False recomputes everything).
        chunk_size: images per saved chunk.
        embeddings_dir: where chunks go (overrides ``RUN_DIR/embeddings``).
        on_chunk: ``on_chunk(domain, chunk_index, samples_done, samples_total)`` after each new chunk.

    Returns:
        domain folder name → :class:`EmbeddedDomain`.
    """
    settings = EmbedSettings(batch_size, num_workers, chunk_size, progress, resume)
    _root, data = scan_data(data_root, domains, split)  # cheap checks first, then the model
    dev = local_device(device if isinstance(device, torch.device) else resolve_device(device))
    init_distributed(dev)  # under torchrun: join the group (gloo on CPU, NCCL on CUDA); else nothing
    model = load_model(run_dir, backbone=backbone, weights=weights, feature=feature, image_size=image_size,
                       device=dev)
    return embed_all(model, data, default_store(model, embeddings_dir), split, settings, on_chunk)



def feature_vectors(
    model: LoadedModel,
    feature: str,
    embedded: Mapping[str, EmbeddedDomain],
    data: Mapping[str, Sequence[Sample]],
    split: str | None,
    settings: EmbedSettings,
    store_base: Path | None = None,
) -> dict[str, np.ndarray]:
    """Each domain's ``feature`` vectors: the embeddings at hand when they are that feature, else embedded
    (resumably, in ``store_base``, default the run's embedding store) with the same model."""
    if feature == model.feature:
        return {d: e.embeddings for d, e in embedded.items()}
    other = model.with_feature(feature)
    out = embed_all(other, data, default_store(model, store_base), split, settings)
    return {d: e.embeddings for d, e in out.items() if len(e)}

