"""On-disk IVF indexes (``index_type="ivf-ondisk"``): inverted lists in a file, memory-mapped for serving.

For domains whose vectors do not fit in memory (issue 15). :func:`build_ondisk_index` streams the vectors,
given as *shards* (slices in id order, each re-readable), three times at most:

1. **sample** (rank 0): a seeded sample of ``train_size`` rows trains the coarse quantiser (IVF-flat codes by
   default, IVF-PQ with ``pq_m``); a disjoint seeded sample of ``eval_queries`` rows is kept as held-out
   queries (rows not used for training).
2. **fill** (every rank under ``torchrun``: rank ``r`` fills shards ``r, r+W, ...``): each shard is added to
   a copy of the trained empty index and written as its own file, with its item lines and the exact top-k
   of the queries among its rows (brute force, one block at a time), then ``shard_<s>.json`` (last) naming
   the trained index, queries and ids they were made for: a rerun after a killed or failed build keeps the
   shards already filled for the same training (a deterministic seeded sample and k-means), refilling the rest.
3. **merge** (rank 0): ``faiss.contrib.ondisk.merge_ondisk`` concatenates the shards' lists into one
   ``index.ivfdata`` (FAISS ``OnDiskInvertedLists``). Each shard was added with global ids (its first id is
   the rows of the shards before it, counted in pass 1), so id ``i`` is row ``i`` of ``items.jsonl`` (the
   shards' item lines in shard order); the merged index is searched with the queries and its recall@k
   against the exact top-k is recorded in the manifest.

The folder is a :class:`~cdretrieval.index.DomainIndex` folder (see :mod:`cdretrieval.index`) with one more
file, written into a new folder and swapped in like every index save::

    index.faiss     the trained quantiser (+ PQ codebooks) and the lists' offsets: small
    index.ivfdata   the inverted lists (codes + ids): ``4·dim + 8`` bytes per vector (``pq_m + 8`` with PQ)
    items.jsonl     one item per id
    manifest.json   as for every index, plus ``ondisk``: shards (rows each), train_size, eval_queries, seed,
                    recall (recall@k of the merged index against exact search on the held-out queries)

Loading (:meth:`DomainIndex.load`) reads ``index.faiss`` with ``IO_FLAG_ONDISK_SAME_DIR | IO_FLAG_READ_ONLY``:
the lists are memory-mapped read-only from the ``index.ivfdata`` beside it (the folder may move), and pages
come from the page cache as queries touch them. ``index.faiss`` and ``items.jsonl`` are verified by size and
sha256 as for other indexes; ``index.ivfdata`` by its size only (it may be larger than memory; its sha256
is recorded for an offline check, :func:`verify_ivfdata`), and its size against the lists' extent.

Under ``torchrun`` a failure in any phase (rank 0's sampling and merge, any rank's fill) is reported to every
rank (:func:`~cdretrieval.distributed.check_all_ranks`), which then all raise instead of waiting for it.

Memory while building: the training sample, one shard's lists (``shard rows × (4·dim + 8)`` bytes), the
queries and their top-k; merging maps the shard files (page cache, not anonymous memory).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any

import faiss
import numpy as np
from faiss.contrib.ondisk import merge_ondisk

from cdretrieval.distributed import broadcast_object, check_all_ranks, gather_objects, rank, world_size
from cdretrieval.errors import DataError
from cdretrieval.index import (
    FORMAT_VERSION,
    INDEX_FILE,
    ITEMS_FILE,
    IVFDATA_FILE,
    MANIFEST_FILE,
    ONDISK_TYPE,
    PQ_NBITS,
    default_nlist,
    default_nprobe,
    normalised_blocks,
)
from cdretrieval.io import atomic_open, atomic_write_bytes, atomic_write_json, replace_dir

logger = logging.getLogger(__name__)
#: Training rows per IVF list in the default sample (FAISS warns below 39).
TRAIN_PER_LIST = 50
#: Rows normalised, added and compared with the queries at a time.
BLOCK_ROWS = 16_384
#: Bytes read at a time when files are hashed or concatenated.
IO_BLOCK = 1 << 20
#: Flags for serving: lists read from the ``index.ivfdata`` beside ``index.faiss``, mapped read-only.
LOAD_FLAGS = faiss.IO_FLAG_ONDISK_SAME_DIR | faiss.IO_FLAG_READ_ONLY

#: Row blocks of one shard, in id order: ``(vectors [m, D], items)`` with one item per row (any objects
#: with ``to_dict()``, e.g. :class:`~cdretrieval.index.Item`). A shard is called once per pass.
Shard = Callable[[], Iterable[tuple[np.ndarray, Sequence[Any]]]]


@dataclass(frozen=True)
class OnDiskParams:
    """How an on-disk IVF index is trained and searched (None: the defaults of :mod:`cdretrieval.index`)."""

    nlist: int | None = None  # IVF lists (default ~4·√n)
    nprobe: int | None = None  # lists visited per query (default 2·√nlist, at least 16)
    pq_m: int | None = None  # None: flat codes (exact vectors on disk); else PQ with pq_m bytes per vector
    train_size: int | None = None  # rows sampled to train (default min(n, 50·nlist))
    eval_queries: int = 1000  # held-out rows queried for the recorded recall (fewer when n is small)
    k: int = 10  # recall@k
    seed: int = 0  # the samples' seed

    def __post_init__(self) -> None:
        for name in ("nlist", "nprobe", "pq_m", "train_size"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"{name} must be a positive integer or None, got {v!r}")
        for name, low in (("eval_queries", 0), ("k", 1), ("seed", 0)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ValueError(f"{name} must be an integer ≥ {low}, got {v!r}")


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean over queries of |found_q ∩ truth_q| / |truth_q| (ids ``[Q, k]``; -1 = missing slot)."""
    if found.shape[0] != truth.shape[0]:
        raise ValueError(f"found has {found.shape[0]} queries, truth {truth.shape[0]}")
    hits = [len(set(f[f >= 0].tolist()) & set(t[t >= 0].tolist())) / max(1, int((t >= 0).sum()))
            for f, t in zip(found, truth, strict=True)]
    return float(np.mean(hits)) if hits else 0.0


class ExactTopK:
    """The exact inner-product top-``k`` of fixed ``queries`` [Q, D] among rows seen block by block."""

    def __init__(self, queries: np.ndarray, k: int) -> None:
        self.queries = np.ascontiguousarray(queries, dtype=np.float32)
        self.k = k
        self.scores = np.full((len(queries), k), -np.inf, np.float32)  # [Q, k], best first
        self.ids = np.full((len(queries), k), -1, np.int64)  # [Q, k]

    def update(self, block: np.ndarray, first_id: int) -> None:
        """Take rows ``block`` [m, D] with ids ``first_id ..`` into account."""
        if len(self.queries) == 0 or len(block) == 0:
            return
        scores, ids = faiss.knn(self.queries, block, min(self.k, len(block)), metric=faiss.METRIC_INNER_PRODUCT)
        self.merge(scores, np.where(ids >= 0, ids + first_id, -1))  # [Q, k'] each: no [Q, m] temporaries

    def merge(self, scores: np.ndarray, ids: np.ndarray) -> None:
        """Fold candidate ``(scores, ids)`` [Q, c] into the current top-k."""
        s = np.concatenate([self.scores, scores], axis=1)  # [Q, k + c]
        i = np.concatenate([self.ids, ids], axis=1)
        order = np.argsort(-s, axis=1, kind="stable")[:, : self.k]  # [Q, k]
        self.scores = np.take_along_axis(s, order, axis=1)
        self.ids = np.take_along_axis(i, order, axis=1)


def _unit_blocks(vectors: np.ndarray, what: str) -> Iterator[np.ndarray]:
    """``vectors`` checked and L2-normalised, :data:`BLOCK_ROWS` rows at a time (``DataError`` on a bad row)."""
    a = np.asarray(vectors)
    if a.ndim != 2 or a.shape[1] == 0:
        raise DataError(f"{what} must be 2-D [N, D], got shape {a.shape}")
    for _, block in normalised_blocks(a, what, DataError, chunk=BLOCK_ROWS):
        yield block


def _sample_ids(n: int, train_size: int, n_queries: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Disjoint sorted row ids: ``train_size`` to train on and ``n_queries`` held-out queries (seeded)."""
    picked = np.random.default_rng(seed).choice(n, size=train_size + n_queries, replace=False)
    return np.sort(picked[:train_size]), np.sort(picked[train_size:])


def _gather_rows(
    shards: Sequence[Shard], wanted: Sequence[np.ndarray], dim: int
) -> tuple[list[np.ndarray], list[int]]:
    """One pass over every shard: the unit rows with the sorted ids of each array of ``wanted``, and the
    number of rows of each shard."""
    out = [np.empty((len(w), dim), np.float32) for w in wanted]
    filled = [0] * len(wanted)
    counts: list[int] = []
    first = 0
    for s, shard in enumerate(shards):
        counts.append(-first)
        for vectors, _items in shard():
            for block in _unit_blocks(vectors, f"vectors of shard {s}"):
                if block.shape[1] != dim:
                    raise DataError(f"shard {s} has {block.shape[1]}-d vectors, expected {dim}")
                stop = first + len(block)
                for j, w in enumerate(wanted):
                    lo, hi = np.searchsorted(w, [first, stop])
                    out[j][filled[j] : filled[j] + hi - lo] = block[w[lo:hi] - first]
                    filled[j] += int(hi - lo)
                first = stop
        counts[-1] += first
    if any(f != len(w) for f, w in zip(filled, wanted, strict=True)):
        raise DataError(f"the shards hold {first} vectors, fewer than the sample needs")
    return out, counts


def _gpu_clustering_index(dim: int) -> faiss.Index | None:
    """A flat inner-product index on every GPU FAISS sees (faiss-gpu), for the coarse k-means; None without.

    k-means is the expensive part of training (``t · nlist · D`` per iteration); the trained centroids land
    in the CPU quantiser as usual, so filling, merging and serving stay on the CPU."""
    if faiss.get_num_gpus() == 0 or not hasattr(faiss, "index_cpu_to_all_gpus"):
        return None
    return faiss.index_cpu_to_all_gpus(faiss.IndexFlatIP(dim))


def train_empty_index(sample: np.ndarray, nlist: int, pq_m: int | None) -> faiss.IndexIVF:
    """An empty IVF index (inner product) trained on the unit rows ``sample`` [t, D]: IVF-flat, or IVF-PQ
    with ``pq_m`` 8-bit sub-quantisers. The coarse k-means runs on the GPUs when FAISS sees any."""
    dim = sample.shape[1]
    quantizer = faiss.IndexFlatIP(dim)
    index: faiss.IndexIVF
    if pq_m is None:
        index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
    else:
        if dim % pq_m:
            raise ValueError(f"pq_m={pq_m} must divide the embedding dim {dim}")
        index = faiss.IndexIVFPQ(quantizer, dim, nlist, pq_m, PQ_NBITS, faiss.METRIC_INNER_PRODUCT)
    gpu = _gpu_clustering_index(dim)
    if gpu is not None:
        index.clustering_index = gpu  # IndexIVF.train runs the k-means there, then adds the centroids here
    index.train(sample)
    if gpu is not None:
        index.clustering_index = None  # type: ignore[assignment]  # the GPU index is released, never written
    return index


@contextlib.contextmanager
def _faiss_writer(path: Path) -> Iterator[Any]:
    """A FAISS writer into ``path``, written atomically (temporary file, fsync, rename) and streamed."""
    fh: IO[Any]
    with atomic_open(path, "wb") as fh:
        yield faiss.PyCallbackIOWriter(fh.write)  # type: ignore[attr-defined]  # not in the stubs


def _shard_paths(work: Path, s: int) -> tuple[Path, Path, Path]:
    """The index, item lines and exact top-k files of shard ``s`` in ``work``."""
    return work / f"shard_{s:05d}.faiss", work / f"shard_{s:05d}.items.jsonl", work / f"shard_{s:05d}.topk.npz"


def _shard_key(
    trained: bytes, queries: np.ndarray, k: int, first_id: int, rows: int | None, domain: str
) -> dict[str, Any]:
    """What a filled shard's files depend on besides its vectors: the trained index, the queries, its ids."""
    return {"trained": hashlib.sha256(trained).hexdigest(), "first_id": int(first_id), "rows": rows, "k": int(k),
            "queries": hashlib.sha256(np.ascontiguousarray(queries, np.float32).tobytes()).hexdigest(),
            "domain": domain}


def _filled_before(work: Path, s: int, key: dict[str, Any]) -> int | None:
    """The row count shard ``s`` was filled with for ``key`` by an earlier (killed or failed) build whose
    files are all in ``work``, else None."""
    done = work / f"shard_{s:05d}.json"
    try:
        record = json.loads(done.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("key") != key or not all(p.is_file() for p in _shard_paths(work, s)):
        return None
    return int(record["rows"])


def fill_shard(
    trained: bytes, shard: Shard, s: int, first_id: int, queries: np.ndarray, k: int, work: Path, domain: str,
    *, rows: int | None = None,
) -> int:
    """Add shard ``s`` (ids from ``first_id`` on; ``rows`` of them when known) to a copy of the ``trained``
    (serialised) empty index; write its index, its item lines and its queries' exact top-k into ``work``,
    then ``shard_<s>.json`` recording what they were made from; return its row count.

    A shard whose files an earlier build already wrote for the same trained index, queries and ids (its
    ``shard_<s>.json`` written last, every file atomically) is not read or filled again.
    """
    key = _shard_key(trained, queries, k, first_id, rows, domain)
    earlier = _filled_before(work, s, key)
    if earlier is not None:
        logger.info("%s: shard %d already filled (%d rows), kept", domain, s, earlier)
        return earlier
    index = faiss.deserialize_index(np.frombuffer(trained, dtype=np.uint8))
    exact = ExactTopK(queries, k)
    index_path, items_path, topk_path = _shard_paths(work, s)
    n = 0
    with atomic_open(items_path, "w") as fh:
        for vectors, items in shard():
            if len(items) != len(vectors):
                raise DataError(f"shard {s}: {len(vectors)} vectors but {len(items)} items; need one per row")
            for it in items:
                if getattr(it, "domain", domain) != domain:
                    raise DataError(f"shard {s}: item {it.path} has domain {it.domain!r}, the index is {domain!r}")
                fh.write(json.dumps(it.to_dict(), ensure_ascii=False) + "\n")
            for block in _unit_blocks(vectors, f"vectors of shard {s}"):
                ids = np.arange(first_id + n, first_id + n + len(block), dtype=np.int64)
                index.add_with_ids(block, ids)  # global ids: the merge keeps them as they are
                exact.update(block, first_id + n)
                n += len(block)
    with _faiss_writer(index_path) as writer:
        faiss.write_index(index, writer)
    with atomic_open(topk_path, "wb") as fh:
        np.savez(fh, scores=exact.scores, ids=exact.ids)
    atomic_write_json(work / f"shard_{s:05d}.json", {"key": key, "rows": n})  # last: the shard is complete
    return n


def _concat_items(work: Path, n_shards: int, out: Path) -> tuple[int, str]:
    """Concatenate the shards' item lines into ``out`` (atomically); ``(bytes, sha256)`` of the result."""
    h, size = hashlib.sha256(), 0
    with atomic_open(out, "wb") as dst:
        for s in range(n_shards):
            with open(_shard_paths(work, s)[1], "rb") as src:
                while block := src.read(IO_BLOCK):
                    h.update(block)
                    size += len(block)
                    dst.write(block)
    return size, h.hexdigest()


def file_sha256(path: Path) -> str:
    """sha256 of a file of any size, read :data:`IO_BLOCK` bytes at a time."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(IO_BLOCK):
            h.update(block)
    return h.hexdigest()


def verify_ivfdata(folder: str | os.PathLike[str]) -> bool:
    """Whether ``folder/index.ivfdata`` has the size and sha256 its manifest records (reads the whole file)."""
    folder = Path(folder)
    expected = json.loads((folder / MANIFEST_FILE).read_text())["files"][IVFDATA_FILE]
    path = folder / IVFDATA_FILE
    return path.stat().st_size == expected["bytes"] and file_sha256(path) == expected["sha256"]


def _exact_truth(work: Path, n_shards: int, queries: np.ndarray, k: int) -> np.ndarray:
    """The exact top-k ids [Q, k] of the queries among all rows, from the shards' top-k."""
    exact = ExactTopK(queries, k)
    for s in range(n_shards):
        with np.load(_shard_paths(work, s)[2], allow_pickle=False) as z:
            exact.merge(z["scores"], z["ids"])
    return exact.ids


def _merge(
    trained: bytes, work: Path, counts: Sequence[int], queries: np.ndarray, params: OnDiskParams, nprobe: int,
    folder: Path,
) -> tuple[dict[str, Any], float]:
    """Merge the shards into ``folder`` (``index.faiss``, ``index.ivfdata``, ``items.jsonl``): their file
    entries for the manifest and the merged index's recall@k on the queries."""
    index = faiss.deserialize_index(np.frombuffer(trained, dtype=np.uint8))
    shard_files = [str(_shard_paths(work, s)[0]) for s in range(len(counts))]
    merge_ondisk(index, shard_files, str(folder / IVFDATA_FILE))  # the shards' ids, as added
    if index.ntotal != sum(counts):
        raise DataError(f"merged {index.ntotal} vectors, the shards hold {sum(counts)}")
    faiss.extract_index_ivf(index).nprobe = nprobe
    index_bytes = faiss.serialize_index(index).tobytes()  # quantiser + list offsets: small
    atomic_write_bytes(folder / INDEX_FILE, index_bytes)
    items_bytes, items_sha = _concat_items(work, len(counts), folder / ITEMS_FILE)
    recall = 1.0
    if len(queries):
        _, found = index.search(queries, params.k)
        recall = recall_at_k(found, _exact_truth(work, len(counts), queries, params.k))
    ivfdata = folder / IVFDATA_FILE
    files = {
        INDEX_FILE: {"bytes": len(index_bytes), "sha256": hashlib.sha256(index_bytes).hexdigest()},
        ITEMS_FILE: {"bytes": items_bytes, "sha256": items_sha},
        IVFDATA_FILE: {"bytes": ivfdata.stat().st_size, "sha256": file_sha256(ivfdata)},
    }
    return files, recall


def build_ondisk_index(
    folder: str | os.PathLike[str],
    shards: Sequence[Shard],
    n: int,
    dim: int,
    domain: str,
    model_hash: str,
    params: OnDiskParams = OnDiskParams(),
    *,
    work_dir: str | os.PathLike[str] | None = None,
    extra_manifest: dict[str, Any] | None = None,
) -> Path:
    """Build an on-disk IVF index of the ``n`` vectors of ``shards`` into ``folder`` (replaced atomically).

    Under ``torchrun`` every rank calls it with the same arguments (a filesystem all ranks share): rank 0
    samples, trains and merges, and every rank fills its shards ``r, r+W, ...``. Shard files live in
    ``work_dir`` (default ``.<folder name>.shards`` beside ``folder``), removed after the merge; a failed or
    killed build leaves them, and a rerun with the same vectors keeps those already filled.

    Args:
        shards: slices of the vectors in id order (see :data:`Shard`); ids run through them in order.
        n: total rows of all shards (checked).
        params: training, sampling and search parameters (:class:`OnDiskParams`).
        extra_manifest: more manifest entries (provenance).

    Raises:
        DataError: too few vectors to train, bad rows or items, shards not holding ``n`` rows.
        ValueError: a bad parameter.
    """
    folder = Path(folder)
    if not shards or n < 1 or dim < 1:
        raise DataError(f"nothing to index for domain {domain!r} ({len(shards)} shards, {n} vectors)")
    nlist = params.nlist or default_nlist(n)
    nprobe = params.nprobe or default_nprobe(nlist)
    if nprobe > nlist:
        raise ValueError(f"nprobe={nprobe} exceeds nlist={nlist}")
    train_size = min(n, params.train_size or TRAIN_PER_LIST * nlist)
    min_train = max(nlist, 2**8 if params.pq_m else 1)
    if train_size < min_train:
        raise DataError(f"{ONDISK_TYPE} with nlist={nlist} needs ≥ {min_train} training vectors, domain {domain!r} "
                        f"has {train_size} to train on; use a smaller nlist or another index type")
    n_queries = min(params.eval_queries, n - train_size)
    work = Path(work_dir) if work_dir is not None else folder.parent / f".{folder.name}.shards"
    t0 = time.perf_counter()

    trained: bytes | None = None
    queries = np.empty((0, dim), np.float32)
    ordered: list[int] = []  # rows per shard
    error: Exception | None = None
    if rank() == 0:
        try:
            trained, queries, ordered = _train(shards, n, dim, domain, train_size, n_queries, nlist, params, work)
        except Exception as e:  # every rank raises below
            error = e
    check_all_ranks(error, f"sampling and training the index of domain {domain!r}")
    trained, queries, ordered = broadcast_object((trained, queries, ordered))
    assert trained is not None
    train_s = time.perf_counter() - t0

    firsts = np.concatenate([[0], np.cumsum(ordered)]).tolist()
    filled: dict[int, int] = {}
    try:
        for s in range(rank(), len(shards), world_size()):
            filled[s] = fill_shard(trained, shards[s], s, firsts[s], queries, params.k, work, domain, rows=ordered[s])
    except Exception as e:  # every rank raises below
        error = e
    check_all_ranks(error, f"filling shards of domain {domain!r}")
    changed = {s: c for part in gather_objects(filled) for s, c in part.items() if c != ordered[s]}
    if changed:
        raise DataError(f"shards {sorted(changed)} of domain {domain!r} changed while the index was built")
    fill_s = time.perf_counter() - t0 - train_s

    if rank() == 0:
        def fill(tmp: Path) -> None:
            files, recall = _merge(trained, work, ordered, queries, params, nprobe, tmp)
            codec = {"pq_m": params.pq_m, "pq_nbits": PQ_NBITS} if params.pq_m else {}
            atomic_write_json(tmp / MANIFEST_FILE, {
                "format_version": FORMAT_VERSION, "model_hash": model_hash, "dim": int(dim),
                "metric": "inner_product", "normalized": True, "index_type": ONDISK_TYPE,
                "requested_index_type": ONDISK_TYPE, "count": int(n), "domain": domain,
                "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "faiss_version": faiss.__version__, "params": {"nlist": nlist, "nprobe": nprobe, **codec},
                "rerank": None, "dba_graph": None, **(extra_manifest or {}),
                "ondisk": {"shards": ordered, "train_size": train_size, "seed": params.seed,
                           "eval_queries": len(queries), "recall": {"k": params.k, "recall": recall},
                           "seconds": {"train": round(train_s, 2), "fill": round(fill_s, 2),
                                       "merge": round(time.perf_counter() - t0 - train_s - fill_s, 2)},
                           "params": asdict(params)},
                "files": files,
            })
        try:
            replace_dir(folder, fill)
            shutil.rmtree(work, ignore_errors=True)
        except Exception as e:  # every rank raises below
            error = e
    check_all_ranks(error, f"merging the shards of domain {domain!r}")  # also the barrier before loading
    return folder


def _train(
    shards: Sequence[Shard], n: int, dim: int, domain: str, train_size: int, n_queries: int, nlist: int,
    params: OnDiskParams, work: Path,
) -> tuple[bytes, np.ndarray, list[int]]:
    """Pass 1 (rank 0): the serialised trained empty index, the held-out queries [Q, D] and each shard's rows."""
    work.mkdir(parents=True, exist_ok=True)
    train_ids, query_ids = _sample_ids(n, train_size, n_queries, params.seed)
    (sample, queries), ordered = _gather_rows(shards, [train_ids, query_ids], dim)
    if sum(ordered) != n:
        raise DataError(f"the shards of domain {domain!r} hold {sum(ordered)} vectors, expected {n}")
    return faiss.serialize_index(train_empty_index(sample, nlist, params.pq_m)).tobytes(), queries, ordered


def array_shards(vectors: np.ndarray, items: Sequence[Any], shard_rows: int) -> list[Shard]:
    """Shards of an in-memory array and its items, ``shard_rows`` rows each."""
    n = len(vectors)

    def shard(start: int) -> Shard:
        return lambda: [(vectors[start : start + shard_rows], items[start : start + shard_rows])]

    return [shard(s) for s in range(0, n, shard_rows)]
