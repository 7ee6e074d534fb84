"""Per-domain FAISS indexes over L2-normalised embeddings, with an item table and a manifest.

One :class:`DomainIndex` holds the images of one visual domain; an :class:`IndexSet` is a folder with one
``DomainIndex`` sub-folder per domain. Vectors are L2-normalised float32 and compared by inner product,
so every score is a cosine similarity in [-1, 1].

Folder layout of a saved ``DomainIndex`` (written into a new folder beside the old one, the manifest last,
then swapped in by renaming, so a crash at any moment leaves the old or the new folder whole)::

    index.faiss     faiss.serialize_index of the CPU index
    items.jsonl     one JSON object per vector, in id order: path, domain, label, width, height
    manifest.json   format_version, model_hash, dim, metric, index_type, count, domain, created,
                    faiss_version, params (nlist, nprobe, ...), files (size + sha256 of the two above),
                    rerank (re-ranking params, or null) and dba_graph ("exact" / "hnsw", or null)

Re-ranking (:mod:`cdretrieval.rerank`): an index built with ``rerank=RerankParams(...)`` holds the
database-side-augmented (DBA) vectors of its domain instead of the raw embeddings, and its manifest records
the params, so a loaded index describes itself; an index saved before re-ranking existed (no ``rerank``
key) loads as "no re-ranking". Query expansion needs the stored vectors of the top hits:
:meth:`DomainIndex.reconstruct` reads them back from the FAISS index itself (flat and HNSW exactly, IVF
through a direct map that every IVF index here keeps, IVF-PQ as its compressed approximations), so the
on-disk format has no extra file.

GPU: when FAISS sees a GPU (``faiss.get_num_gpus() > 0``, i.e. the faiss-gpu build on a CUDA machine) and
``use_gpu`` allows it, searches run on a GPU copy (sharded over all GPUs when there are several); the CPU
index stays the source of truth and is what gets saved. With faiss-cpu nothing GPU-related is touched.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import re
import shutil
import tempfile
import warnings
import weakref
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import faiss
import numpy as np

from cdretrieval.domain_detection import DETECTOR_FILE, DomainDetector
from cdretrieval.errors import DataError, IndexFileError, IndexMismatchError, QueryError
from cdretrieval.io import atomic_write_bytes, atomic_write_json, read_json, recover_dir, replace_dir
from cdretrieval.rerank import RerankParams, augment_new_items, database_side_augmentation, knn_graph_method

if TYPE_CHECKING:
    from cdretrieval.ondisk import Shard

logger = logging.getLogger(__name__)

UseGpu = bool | Literal["auto"]

FORMAT_VERSION = 1
INDEX_FILE = "index.faiss"
ITEMS_FILE = "items.jsonl"
MANIFEST_FILE = "manifest.json"
INDEX_SET_FILE = "indexset.json"
INDEX_TYPES = ("flat", "ivf", "hnsw", "ivfpq")  # held in memory
ONDISK_TYPE = "ivf-ondisk"  # IVF lists in a memory-mapped file (cdretrieval.ondisk)
ALL_INDEX_TYPES = (*INDEX_TYPES, ONDISK_TYPE)
IVFDATA_FILE = "index.ivfdata"  # the lists of an ivf-ondisk index
DEFAULT_SHARD_ROWS = 1_000_000  # vectors per shard of an ivf-ondisk build (the most it holds in memory at once)

AUTO_FLAT_MAX = 50_000  # "auto": exact search up to this many vectors (a 1k-query search stays ~0.1 s)
AUTO_HNSW_MAX = 1_000_000  # "auto": beyond this HNSW builds too slowly on CPU; IVF trains and adds fast
PQ_NBITS = 8  # bits per PQ sub-code: 256 centroids per sub-quantizer
MIN_IVF_POINTS_PER_LIST = 39  # FAISS's own minimum of training points per k-means centroid
DEFAULT_EF_SEARCH = 128
DEFAULT_EF_CONSTRUCTION = 128
GPU_MAX_K = 1024  # FAISS GPU k-selection limit (2048 on recent builds); larger k searches on CPU

_REBUILD_HINT = "rebuild it with `cdretrieval index --run RUN_DIR ...`"


@dataclass
class Item:
    """One indexed image: where it is, its domain and, when known, its class label and size in pixels."""

    path: str
    domain: str
    label: str | None = None
    width: int | None = None
    height: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.path, str) or not self.path:
            raise DataError(f"Item.path must be a non-empty string, got {self.path!r}")
        if not isinstance(self.domain, str) or not self.domain:
            raise DataError(f"Item.domain must be a non-empty string, got {self.domain!r} (path {self.path})")
        if self.label is not None and not isinstance(self.label, str):
            raise DataError(f"Item.label must be a string or None, got {self.label!r} (path {self.path})")
        for name in ("width", "height"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise DataError(f"Item.{name} must be a positive int or None, got {v!r} (path {self.path})")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Item:
        """Inverse of :meth:`to_dict`; unknown keys are ignored (forward compatibility)."""
        if not isinstance(d, Mapping) or "path" not in d or "domain" not in d:
            raise DataError(f"an item needs at least 'path' and 'domain', got {d!r}")
        return cls(
            path=d["path"],
            domain=d["domain"],
            label=d.get("label"),
            width=d.get("width"),
            height=d.get("height"),
        )


# ---------------------------------------------------------------------------------------------------------
# Input checks


def _to_numpy(x: Any) -> np.ndarray:
    """Array view of ``x``; a torch tensor (any device) is detached and copied to host first."""
    if hasattr(x, "detach") and hasattr(x, "cpu"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


#: Rows validated and normalised at a time: the float64 temporaries stay ≤ NORMALISE_CHUNK × D (8 MiB at
#: D = 256) however many rows there are (a float64 copy of 1M × 256 rows was 2 GiB, issue 11).
NORMALISE_CHUNK = 4096


def _rows_2d(x: Any, name: str, error: type[ValueError], expected_dim: int | None, allow_1d: bool) -> np.ndarray:
    """``x`` as a 2-D array view ``[N, D]`` (no copy), its shape checked; raises ``error`` naming ``name``."""
    a = _to_numpy(x)
    if allow_1d and a.ndim == 1:
        a = a[None, :]  # one query [D] -> [1, D]
    if a.ndim != 2:
        raise error(f"{name} must be 2-D [N, D], got shape {a.shape}")
    if expected_dim is not None and a.shape[1] != expected_dim:
        raise error(f"{name} have dim {a.shape[1]}, but the index has dim {expected_dim}")
    if a.shape[1] == 0:
        raise error(f"{name} have dimension 0 (shape {a.shape})")
    return a


def normalised_blocks(
    a: np.ndarray, name: str, error: type[ValueError], chunk: int = NORMALISE_CHUNK
) -> Iterator[tuple[int, np.ndarray]]:
    """Validate and L2-normalise the 2-D array ``a`` ``chunk`` rows at a time: yields ``(first row, block)``
    with ``block`` a new ``[c, D]`` float32 C-contiguous array of unit rows.

    Each block is computed as :func:`normalised_rows` computes the whole array (norms in float64: no overflow
    for large float32 values), so the blocks stacked are exactly its result; only one block's float64
    temporaries exist at a time. Raises ``error`` at the first non-numeric, non-finite or all-zero row
    (blocks before it have been yielded).
    """
    if a.shape[0] == 0:
        try:
            a.astype(np.float64)
        except (TypeError, ValueError) as e:
            raise error(f"{name} must be numeric, got dtype {a.dtype}") from e
        return
    for start in range(0, a.shape[0], chunk):
        try:
            b64 = a[start : start + chunk].astype(np.float64)  # [c, D]
        except (TypeError, ValueError) as e:
            raise error(f"{name} must be numeric, got dtype {a.dtype}") from e
        finite = np.isfinite(b64).all(axis=1)  # [c]
        if not finite.all():
            raise error(f"{name} row {start + int(np.flatnonzero(~finite)[0])} contains NaN or infinite values")
        norms = np.linalg.norm(b64, axis=1, keepdims=True)  # [c, 1]
        if (norms == 0).any():
            raise error(f"{name} row {start + int(np.flatnonzero(norms[:, 0] == 0)[0])} is all zeros and cannot "
                        "be L2-normalised")
        b64 /= norms  # in place: one float64 block, not two
        yield start, np.ascontiguousarray(b64, dtype=np.float32)


def normalised_rows(
    x: Any, name: str, error: type[ValueError], expected_dim: int | None = None, allow_1d: bool = False
) -> np.ndarray:
    """Validate ``x`` as [N, D] finite non-zero vectors and return them L2-normalised, float32, C-contiguous.

    One new float32 array; no float64 copy of ``x`` (rows are done in blocks, :func:`normalised_blocks`).
    Raises ``error`` (the caller's exception class) naming ``name`` and the bad shape or row.
    """
    a = _rows_2d(x, name, error, expected_dim, allow_1d)
    out = np.empty(a.shape, np.float32)
    for start, block in normalised_blocks(a, name, error):
        out[start : start + block.shape[0]] = block
    return out


#: CPU searches of fewer queries than this run on one OpenMP thread (see :func:`_few_query_threads`).
FEW_QUERIES = 8


@contextlib.contextmanager
def _few_query_threads(n_queries: int, on_cpu: bool) -> Iterator[None]:
    """One FAISS OpenMP thread for a CPU search of fewer than :data:`FEW_QUERIES` queries, restored after.

    FAISS splits a search over its queries: a single query gains nothing from a second thread, and on a busy
    2-core machine waking it cost milliseconds (a 10k flat search of one query: 1.3 ms with 2 threads, 0.25 ms
    with 1; up to 26 ms under load). OpenMP's thread count is per calling thread, so concurrent searches in
    other threads are not affected.
    """
    if not on_cpu or n_queries >= FEW_QUERIES:
        yield
        return
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


def _add_normalised(index: faiss.Index, a: np.ndarray, name: str) -> None:
    """Add the rows of ``a`` to ``index`` L2-normalised, one block at a time (no full normalised copy).

    Raises ``DataError`` at the first bad row; ``index`` then holds the rows before it (callers discard it).
    """
    for _, block in normalised_blocks(a, name, DataError):
        index.add(block)


def _check_items(items: Sequence[Item], n: int, domain: str) -> list[Item]:
    """``items`` as a list of ``n`` :class:`Item` of ``domain``."""
    items = list(items)
    if len(items) != n:
        raise DataError(f"got {n} embeddings but {len(items)} items for domain {domain!r}; need one per row")
    for i, it in enumerate(items):
        if not isinstance(it, Item):
            raise DataError(f"items[{i}] must be an Item, got {type(it).__name__}")
        if it.domain != domain:
            raise DataError(f"items[{i}] ({it.path}) has domain {it.domain!r}, the index is for {domain!r}")
    return items


def _check_positive_int(value: Any, name: str) -> int:
    """``value`` as an int >= 1, else ``ValueError`` naming it."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _check_use_gpu(use_gpu: Any) -> UseGpu:
    """``use_gpu`` checked: exactly True, False or "auto"."""
    if isinstance(use_gpu, bool):
        return use_gpu
    if isinstance(use_gpu, str) and use_gpu == "auto":
        return "auto"
    raise ValueError(f"use_gpu must be True, False or 'auto', got {use_gpu!r}")


# ---------------------------------------------------------------------------------------------------------
# Index type choice and parameters


def default_nlist(n: int) -> int:
    """IVF lists for ``n`` vectors: about 4·√n, but at most n // 39 so every list trains on ≥ 39 points."""
    return max(1, min(round(4 * math.sqrt(n)), n // MIN_IVF_POINTS_PER_LIST))


def default_nprobe(nlist: int) -> int:
    """Lists visited per query: 2·√nlist, at least 16 (or all lists when there are fewer)."""
    return min(nlist, max(16, math.ceil(2 * math.sqrt(nlist))))


def default_pq_m(dim: int) -> int:
    """PQ sub-quantizers: the largest divisor of ``dim`` up to min(64, dim // 4) (≥ 4 dims per sub-vector).

    With 8-bit codes that stores ``m`` bytes per vector instead of ``4·dim`` (16× smaller for dim ≤ 256).
    """
    cap = max(1, min(64, dim // 4))
    return max(m for m in range(1, cap + 1) if dim % m == 0)


def estimate_index_mb(
    index_type: str, n: int, dim: int, *, hnsw_m: int = 32, pq_m: int | None = None
) -> float:
    """Rough resident size in MiB of an index of ``n`` vectors of ``dim`` float32 (used by the auto rule).

    flat: 4·dim bytes per vector; ivf: + 8-byte id; hnsw: + ~2·M 4-byte graph links; ivfpq: pq_m code bytes +
    8-byte id, plus coarse centroids and PQ codebooks; ivf-ondisk: the coarse centroids and ~24 bytes per list
    (its lists, ``4·dim + 8`` bytes per vector, stay on disk; the page cache holds what queries touch).
    """
    if index_type not in ALL_INDEX_TYPES:
        raise ValueError(f"unknown index_type {index_type!r}; choose one of {ALL_INDEX_TYPES} or 'auto'")
    vec = 4 * dim
    if index_type == ONDISK_TYPE:
        total = default_nlist(n) * (vec + 24)
    elif index_type == "flat":
        total = n * vec
    elif index_type == "ivf":
        total = n * (vec + 8) + default_nlist(n) * vec
    elif index_type == "hnsw":
        total = n * (vec + 8 * hnsw_m + 16)
    else:
        m = pq_m or default_pq_m(dim)
        total = n * (m + 8) + default_nlist(n) * vec + (2**PQ_NBITS) * vec
    return total / 2**20


def choose_index_type(
    n: int, dim: int, memory_budget_mb: float | None = None, *, hnsw_m: int = 32, pq_m: int | None = None
) -> str:
    """The index type ``index_type="auto"`` builds for ``n`` vectors of ``dim`` under a memory budget.

    Rule (first match wins; "fits" = :func:`estimate_index_mb` ≤ ``memory_budget_mb``, always true for None):

    1. ``n ≤ 50,000`` and flat fits → ``"flat"`` (exact, and fast enough at this size).
    2. ``n ≤ 1,000,000`` and hnsw fits → ``"hnsw"`` (best recall/speed; graph costs ~8·M bytes/vector).
    3. ivf fits (≈ flat size) → ``"ivf"`` (fast to train and to add to at any size).
    4. ``n > 1,000,000`` and ivf-ondisk fits → ``"ivf-ondisk"`` (ivf's recall, its lists memory-mapped from
       disk; only the centroids are resident).
    5. ``n ≥ 256`` (PQ codebooks must train) and ivfpq fits → ``"ivfpq"`` (compressed; lower recall).
    6. otherwise ``ValueError`` naming the smallest estimate.
    """
    n = _check_positive_int(n, "n")
    dim = _check_positive_int(dim, "dim")
    if memory_budget_mb is not None and not memory_budget_mb > 0:
        raise ValueError(f"memory_budget_mb must be positive or None, got {memory_budget_mb!r}")
    budget = math.inf if memory_budget_mb is None else float(memory_budget_mb)

    def fits(kind: str) -> bool:
        return estimate_index_mb(kind, n, dim, hnsw_m=hnsw_m, pq_m=pq_m) <= budget

    if n <= AUTO_FLAT_MAX and fits("flat"):
        return "flat"
    if n <= AUTO_HNSW_MAX and fits("hnsw"):
        return "hnsw"
    if fits("ivf"):
        return "ivf"
    if n > AUTO_HNSW_MAX and fits(ONDISK_TYPE):
        return ONDISK_TYPE
    if n >= 2**PQ_NBITS and fits("ivfpq"):
        return "ivfpq"
    smallest = estimate_index_mb("ivfpq" if n >= 2**PQ_NBITS else "flat", n, dim, hnsw_m=hnsw_m, pq_m=pq_m)
    raise ValueError(
        f"no index type fits memory_budget_mb={memory_budget_mb} for {n} vectors of dim {dim} "
        f"(smallest needs ~{smallest:.3g} MiB)"
    )


def _make_index(
    index_type: str,
    n: int,
    dim: int,
    domain: str,
    *,
    nlist: int | None,
    nprobe: int | None,
    hnsw_m: int,
    ef_search: int | None,
    ef_construction: int | None,
    pq_m: int | None,
) -> tuple[faiss.Index, dict[str, int]]:
    """An untrained empty FAISS index of ``index_type`` for ``n`` training vectors, and its parameters.

    Approximate types never fall back silently: when the data is too small to train what was asked for,
    this raises ``DataError`` saying so (the default ``nlist`` shrinks with ``n`` instead, see
    :func:`default_nlist`; "auto" only picks a type it can train).
    """
    ip = faiss.METRIC_INNER_PRODUCT
    if index_type == "flat":
        return faiss.IndexFlatIP(dim), {}
    if index_type == "hnsw":
        m = _check_positive_int(hnsw_m, "hnsw_m")
        ef_s = _check_positive_int(ef_search or DEFAULT_EF_SEARCH, "ef_search")
        ef_c = _check_positive_int(ef_construction or DEFAULT_EF_CONSTRUCTION, "ef_construction")
        index = faiss.IndexHNSWFlat(dim, m, ip)
        index.hnsw.efConstruction = ef_c
        index.hnsw.efSearch = ef_s
        return index, {"hnsw_m": m, "ef_search": ef_s, "ef_construction": ef_c}
    if index_type not in ("ivf", "ivfpq"):
        raise ValueError(f"unknown index_type {index_type!r}; choose one of {INDEX_TYPES} or 'auto'")

    lists = default_nlist(n) if nlist is None else _check_positive_int(nlist, "nlist")
    if lists > n:
        raise DataError(
            f"{index_type} with nlist={lists} needs at least {lists} training vectors, domain {domain!r} "
            f"has {n}; use a smaller nlist or index_type='flat'"
        )
    probe = default_nprobe(lists) if nprobe is None else _check_positive_int(nprobe, "nprobe")
    if probe > lists:
        raise ValueError(f"nprobe={probe} exceeds nlist={lists}")
    quantizer = faiss.IndexFlatIP(dim)
    params = {"nlist": lists, "nprobe": probe}
    ivf: faiss.IndexIVF
    if index_type == "ivf":
        ivf = faiss.IndexIVFFlat(quantizer, dim, lists, ip)
    else:
        m = default_pq_m(dim) if pq_m is None else _check_positive_int(pq_m, "pq_m")
        if dim % m:
            raise ValueError(f"pq_m={m} must divide the embedding dim {dim}")
        if n < 2**PQ_NBITS:
            raise DataError(
                f"ivfpq needs at least {2**PQ_NBITS} training vectors ({PQ_NBITS}-bit codes), "
                f"domain {domain!r} has {n}; use index_type='flat'"
            )
        ivf = faiss.IndexIVFPQ(quantizer, dim, lists, m, PQ_NBITS, ip)
        params.update(pq_m=m, pq_nbits=PQ_NBITS)
    ivf.nprobe = probe
    # The quantizer stays alive: FAISS's Python constructor keeps a reference to it on the index.
    return ivf, params


def _apply_search_params(index: faiss.Index, params: Mapping[str, Any]) -> None:
    """Set nprobe / efSearch from the manifest (FAISS stores them too; the manifest is authoritative).

    Raises:
        ValueError: ``params`` is not a mapping or a value is not a positive integer. RuntimeError: FAISS
            cannot set it on this index (e.g. nprobe on a flat index).
    """
    if not isinstance(params, Mapping):
        raise ValueError(f"params must be a JSON object, got {params!r}")
    for key in ("nprobe", "ef_search"):
        if key in params:
            _check_positive_int(params[key], key)
    space = faiss.ParameterSpace()
    if "nprobe" in params:
        space.set_index_parameter(index, "nprobe", int(params["nprobe"]))
    if "ef_search" in params:
        space.set_index_parameter(index, "efSearch", int(params["ef_search"]))


def _num_gpus() -> int:
    """GPUs FAISS can use: 0 on faiss-cpu builds (which may lack the symbol altogether)."""
    get = getattr(faiss, "get_num_gpus", None)
    return int(get()) if get is not None else 0


def _gpu_copy(index: faiss.Index, index_type: str, use_gpu: UseGpu) -> faiss.Index | None:
    """A GPU copy of ``index`` for searching (sharded over all GPUs when > 1), or None to search on CPU."""
    if use_gpu is False:
        return None
    ngpu = _num_gpus()
    if ngpu == 0:
        if use_gpu is True:
            warnings.warn("use_gpu=True but FAISS sees no GPU (CPU build or no device); searching on CPU",
                          stacklevel=3)
        return None
    if index_type == "hnsw":
        logger.info("FAISS has no GPU HNSW; searching the hnsw index on CPU")
        return None
    try:
        options = faiss.GpuMultipleClonerOptions()
        options.shard = ngpu > 1  # split the vectors over the GPUs rather than replicating them
        options.useFloat16 = index_type == "ivfpq"  # float16 lookup tables: larger pq_m fits shared memory
        return faiss.index_cpu_to_all_gpus(index, co=options, ngpu=ngpu)
    except Exception as e:  # best effort: any GPU failure leaves the (correct) CPU index in charge
        logger.warning("could not move the %s index to GPU (%s); searching on CPU", index_type, e)
        return None


def _ensure_direct_map(index: faiss.Index) -> None:
    """Give an IVF index an id → (list, offset) map so ``reconstruct`` works (8 bytes per vector)."""
    ivf = faiss.try_extract_index_ivf(index)  # None: not an IVF index
    if ivf is not None and ivf.direct_map.type == faiss.DirectMap.NoMap:  # type: ignore[attr-defined]
        ivf.make_direct_map(True)


def rerank_from_manifest(manifest: Mapping[str, Any]) -> RerankParams | None:
    """The re-ranking params a manifest records; None when it records none (or predates re-ranking).

    Raises:
        ValueError: a malformed ``rerank`` entry.
    """
    value = manifest.get("rerank")
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise ValueError(f"'rerank' must be an object or null, got {value!r}")
    return RerankParams.from_dict(value)


def _check_rerank(rerank: Any) -> RerankParams | None:
    if rerank is not None and not isinstance(rerank, RerankParams):
        raise ValueError(f"rerank must be a RerankParams or None, got {rerank!r}")
    return rerank


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# ---------------------------------------------------------------------------------------------------------


class DomainIndex:
    """A FAISS index of one domain's L2-normalised embeddings, its item table and its manifest.

    Row ``i`` of the index is ``items[i]``. Build with :meth:`build`, or :meth:`load` a saved folder.
    """

    def __init__(
        self, index: faiss.Index, items: Sequence[Item], manifest: Mapping[str, Any], use_gpu: UseGpu = "auto"
    ) -> None:
        self.index = index  # CPU index: source of truth, what gets saved
        self.items: list[Item] = list(items)
        self.manifest: dict[str, Any] = dict(manifest)
        assert index.ntotal == len(self.items) == self.manifest["count"], "index/items/manifest out of sync"
        assert index.d == self.manifest["dim"]
        self.rerank: RerankParams | None = rerank_from_manifest(self.manifest)
        self._use_gpu = _check_use_gpu(use_gpu)
        if self.on_disk:  # lists memory-mapped read-only: no direct map (a pass over every id), no GPU copy
            self._gpu_index = None
            return
        _ensure_direct_map(index)  # reconstruct() for query expansion
        self._gpu_index = _gpu_copy(index, self.index_type, self._use_gpu)

    # -- properties -----------------------------------------------------------------------------------
    @property
    def domain(self) -> str:
        return str(self.manifest["domain"])

    @property
    def model_hash(self) -> str:
        return str(self.manifest["model_hash"])

    @property
    def dim(self) -> int:
        return int(self.manifest["dim"])

    @property
    def index_type(self) -> str:
        return str(self.manifest["index_type"])

    @property
    def on_disk(self) -> bool:
        """Whether the inverted lists live in a memory-mapped ``index.ivfdata`` (``ivf-ondisk``)."""
        return self.index_type == ONDISK_TYPE

    @property
    def ivfdata_path(self) -> Path:
        """The file an on-disk index maps its lists from (``ValueError`` for in-memory types)."""
        if not self.on_disk:
            raise ValueError(f"a {self.index_type!r} index has no {IVFDATA_FILE}")
        lists: Any = faiss.extract_index_ivf(self.index).invlists
        return Path(faiss.downcast_InvertedLists(lists).filename)  # type: ignore[attr-defined]  # OnDisk

    @property
    def on_gpu(self) -> bool:
        """Whether searches run on a GPU copy."""
        return self._gpu_index is not None

    def __len__(self) -> int:
        return int(self.index.ntotal)

    def __repr__(self) -> str:
        return (
            f"DomainIndex(domain={self.domain!r}, count={len(self)}, dim={self.dim}, "
            f"type={self.index_type!r}, gpu={self.on_gpu})"
        )

    # -- building -------------------------------------------------------------------------------------
    @classmethod
    def build(
        cls,
        embeddings: Any,
        items: Sequence[Item],
        domain: str,
        model_hash: str,
        index_type: str = "flat",
        *,
        nlist: int | None = None,
        nprobe: int | None = None,
        hnsw_m: int = 32,
        ef_search: int | None = None,
        ef_construction: int | None = None,
        pq_m: int | None = None,
        memory_budget_mb: float | None = None,
        use_gpu: UseGpu = "auto",
        rerank: RerankParams | None = None,
        ondisk_dir: str | os.PathLike[str] | None = None,
        shard_rows: int = DEFAULT_SHARD_ROWS,
    ) -> DomainIndex:
        """Index ``embeddings`` [N, D] (L2-normalised here) of ``domain``, one :class:`Item` per row.

        Args:
            index_type: "flat" (exact, default), "ivf", "hnsw", "ivfpq", "ivf-ondisk" or "auto" (see
                :func:`choose_index_type`). "ivf-ondisk" (:mod:`cdretrieval.ondisk`) is built in ``shard_rows``
                shards into a new temporary folder under ``ondisk_dir`` (default: the system's), trained on a
                sample, its lists then memory-mapped from there; :meth:`save` links (or copies) them into the
                saved folder; it takes no re-ranking.
            nlist, nprobe: IVF lists (default :func:`default_nlist`) and lists probed per query
                (default :func:`default_nprobe`); IVF types are trained on ``embeddings`` themselves.
            hnsw_m, ef_search, ef_construction: HNSW graph degree and beam widths (defaults 32, 128, 128).
            pq_m: PQ sub-quantizers for "ivfpq" (default :func:`default_pq_m`), 8 bits each.
            memory_budget_mb: budget for "auto" (None = unlimited).
            use_gpu: "auto"/True search on GPU when FAISS has one; False never.
            rerank: re-ranking params (None = plain index). With DBA (``dba_k > 1``) the index holds each
                vector's :func:`~cdretrieval.rerank.database_side_augmentation` (neighbour graph exact up
                to :data:`~cdretrieval.rerank.EXACT_KNN_MAX` vectors, HNSW above); the params are recorded
                in the manifest for query expansion at search time.

        Raises:
            DataError: no embeddings (empty domain), non-finite or zero rows, items that don't match, or too
                few vectors to train the requested approximate type (no silent fallback).
            ValueError: unknown ``index_type`` or bad parameter.
        """
        if not isinstance(domain, str) or not domain:
            raise DataError(f"domain must be a non-empty string, got {domain!r}")
        if not isinstance(model_hash, str) or not model_hash:
            raise DataError(f"model_hash must be a non-empty string, got {model_hash!r}")
        x = _to_numpy(embeddings)
        if x.size == 0 and x.ndim <= 2:
            raise DataError(
                f"domain {domain!r} has no embeddings to index (shape {x.shape}); is its image folder empty?"
            )
        what = f"embeddings of domain {domain!r}"
        a = _rows_2d(x, what, DataError, None, False)  # [N, D], the caller's array (never modified)
        n, dim = a.shape
        rerank = _check_rerank(rerank)
        items = _check_items(items, n, domain)
        requested = index_type
        if index_type == "auto":
            index_type = choose_index_type(n, dim, memory_budget_mb, hnsw_m=hnsw_m, pq_m=pq_m)
        if index_type == ONDISK_TYPE:
            if rerank is not None:
                raise DataError(f"{ONDISK_TYPE} (domain {domain!r}, {requested!r} requested) takes no re-ranking: "
                                "DBA needs every vector in memory; build it with rerank=None (--no-rerank)")
            return cls._build_on_disk(a, items, domain, model_hash, requested, nlist=nlist, nprobe=nprobe,
                                      pq_m=pq_m, ondisk_dir=ondisk_dir, shard_rows=shard_rows, use_gpu=use_gpu)
        unit: np.ndarray | None = None  # [N, D] unit rows when they must all exist at once
        dba_graph = None
        if rerank is not None and rerank.uses_dba:
            unit = normalised_rows(a, what, DataError)
            dba_graph = knn_graph_method(n)
            unit = database_side_augmentation(unit, rerank)  # [N, D] unit rows, replaces the raw vectors

        index, params = _make_index(
            index_type, n, dim, domain, nlist=nlist, nprobe=nprobe, hnsw_m=hnsw_m, ef_search=ef_search,
            ef_construction=ef_construction, pq_m=pq_m,
        )
        # Memory: besides the index, at most one normalised copy of the vectors exists (for DBA, or while an
        # IVF type trains; freed before the adding starts), else one block of them (NORMALISE_CHUNK rows).
        if not index.is_trained:
            training = unit if unit is not None else normalised_rows(a, what, DataError)
            index.train(training)  # k-means (coarse lists, PQ codebooks) on the domain's own vectors
            del training
        if unit is not None:
            index.add(unit)
        else:
            _add_normalised(index, a, what)  # the same unit rows, block by block

        manifest = {
            "format_version": FORMAT_VERSION,
            "model_hash": model_hash,
            "dim": int(dim),
            "metric": "inner_product",
            "normalized": True,
            "index_type": index_type,
            "requested_index_type": requested,
            "count": int(index.ntotal),
            "domain": domain,
            "created": _now_iso(),
            "faiss_version": faiss.__version__,
            "params": params,
            "rerank": rerank.to_dict() if rerank is not None else None,
            "dba_graph": dba_graph,
        }
        return cls(index, items, manifest, use_gpu=use_gpu)

    @classmethod
    def _build_on_disk(
        cls,
        a: np.ndarray,
        items: Sequence[Item],
        domain: str,
        model_hash: str,
        requested: str,
        *,
        nlist: int | None,
        nprobe: int | None,
        pq_m: int | None,
        ondisk_dir: str | os.PathLike[str] | None,
        shard_rows: int,
        use_gpu: UseGpu,
    ) -> DomainIndex:
        """:meth:`build_on_disk` of the rows ``a`` in shards of ``shard_rows`` rows."""
        from cdretrieval.ondisk import array_shards

        shard_rows = _check_positive_int(shard_rows, "shard_rows")
        return cls.build_on_disk(array_shards(a, items, shard_rows), len(a), a.shape[1], domain, model_hash,
                                 requested=requested, nlist=nlist, nprobe=nprobe, pq_m=pq_m, ondisk_dir=ondisk_dir,
                                 use_gpu=use_gpu)

    @classmethod
    def build_on_disk(
        cls,
        shards: Sequence[Shard],
        n: int,
        dim: int,
        domain: str,
        model_hash: str,
        *,
        requested: str = ONDISK_TYPE,
        nlist: int | None = None,
        nprobe: int | None = None,
        pq_m: int | None = None,
        ondisk_dir: str | os.PathLike[str] | None = None,
        use_gpu: UseGpu = "auto",
    ) -> DomainIndex:
        """An ``ivf-ondisk`` index of the ``n`` vectors (``dim``-d) of ``shards``, built by
        :func:`~cdretrieval.ondisk.build_ondisk_index` into a new temporary folder under ``ondisk_dir``
        (default: the system's) and loaded from there (the folder is removed when the index is
        garbage-collected; :meth:`save` links its lists into the saved folder).

        ``shards`` are :data:`~cdretrieval.ondisk.Shard` s, re-readable slices of the vectors and their items
        in id order (e.g. :meth:`cdretrieval.domain_embeddings.StoredDomain.shards`: no more than one shard's
        rows are ever in memory). With ``ondisk_dir`` the shard files are kept in
        ``ondisk_dir/.<safe domain>.ondisk-shards`` until the merge, so a rerun after a failed or killed
        build keeps the shards already filled. Under ``torchrun`` every rank calls it with the same arguments
        (a filesystem every rank sees): the ranks fill the shards, rank 0's temporary folder holds the index.

        Raises:
            DataError: a bad domain or model hash, no shards, or what :func:`build_ondisk_index` raises.
        """
        from cdretrieval.distributed import broadcast_object, rank
        from cdretrieval.ondisk import OnDiskParams, build_ondisk_index

        if not isinstance(domain, str) or not domain:
            raise DataError(f"domain must be a non-empty string, got {domain!r}")
        if not isinstance(model_hash, str) or not model_hash:
            raise DataError(f"model_hash must be a non-empty string, got {model_hash!r}")
        n, dim = _check_positive_int(n, "n"), _check_positive_int(dim, "dim")
        params = OnDiskParams(nlist=nlist, nprobe=nprobe, pq_m=pq_m)
        work = Path(ondisk_dir) / f".{safe_domain_name(domain)}.ondisk-shards" if ondisk_dir is not None else None
        tmp_name: str | None = None
        if rank() == 0:
            if ondisk_dir is not None:
                Path(ondisk_dir).mkdir(parents=True, exist_ok=True)
            tmp_name = tempfile.mkdtemp(prefix="cdretrieval-ondisk-", dir=ondisk_dir)
        tmp = Path(broadcast_object(tmp_name))  # every rank builds into rank 0's folder
        try:
            folder = build_ondisk_index(tmp / "index", shards, n, dim, domain, model_hash, params, work_dir=work,
                                        extra_manifest={"requested_index_type": requested})
            built = cls.load(folder, use_gpu=use_gpu)
        except BaseException:
            if rank() == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            raise
        if rank() == 0:  # its creator removes it; the mapped file's pages outlive the unlink
            weakref.finalize(built, shutil.rmtree, tmp, True)
        return built

    def add(self, embeddings: Any, items: Sequence[Item]) -> None:
        """Append ``embeddings`` [M, D] and their items without rebuilding (IVF types keep their training).

        New rows get ids ``len(self) .. len(self) + M - 1``. An empty [0, D] batch is a no-op. With DBA
        (:attr:`rerank`), a new vector is augmented with its ``dba_k − 1`` nearest *stored* (augmented)
        vectors plus itself (:func:`~cdretrieval.rerank.augment_new_items`); existing vectors are left as
        they are — rebuilding the index recomputes every neighbourhood.
        """
        x = _to_numpy(embeddings)
        if x.ndim == 2 and x.shape[0] == 0 and len(items) == 0:
            return
        if self.on_disk:
            raise DataError(f"the {ONDISK_TYPE} index of domain {self.domain!r} is read-only (its lists are "
                            f"memory-mapped); rebuild it to add images: {_REBUILD_HINT}")
        # One float32 normalised copy of the batch (all rows checked before any is added: a bad row leaves
        # the index unchanged); no float64 copy.
        x = normalised_rows(x, "added embeddings", DataError, expected_dim=self.dim)
        new_items = _check_items(items, x.shape[0], self.domain)
        if self.rerank is not None and self.rerank.uses_dba and len(self) > 0:
            x = augment_new_items(x, self, self.rerank)
        self.index.add(x)
        self.items.extend(new_items)
        self.manifest["count"] = int(self.index.ntotal)
        self.manifest["updated"] = _now_iso()
        if self._gpu_index is not None:
            self._gpu_index = _gpu_copy(self.index, self.index_type, self._use_gpu)  # refresh the GPU copy

    # -- searching ------------------------------------------------------------------------------------
    def search(self, queries: Any, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` items for each query by cosine similarity (queries are L2-normalised here).

        Args:
            queries: [Q, D] (or one [D] query).
            k: results per query, ≥ 1; k > N gives N.

        Returns:
            ``(scores, ids)``, [Q, k'] float32 and int64 with ``k' = min(k, N)``, best first. Approximate
            types may find fewer than k' neighbours: missing slots have id -1 and score -inf.
        """
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise QueryError(f"k must be a positive integer, got {k!r}")
        q = normalised_rows(queries, "queries", QueryError, expected_dim=self.dim, allow_1d=True)  # [Q, D]
        k_eff = min(int(k), len(self))
        if q.shape[0] == 0:
            return np.empty((0, k_eff), np.float32), np.empty((0, k_eff), np.int64)
        index = self._gpu_index if self._gpu_index is not None and k_eff <= GPU_MAX_K else self.index
        with _few_query_threads(q.shape[0], index is self.index):
            scores, ids = index.search(q, k_eff)  # [Q, k'] each
        scores = np.where(ids >= 0, scores, -np.inf).astype(np.float32)
        return scores, ids.astype(np.int64)

    def reconstruct(self, ids: Any) -> np.ndarray:
        """The stored vectors of ``ids`` [n]: [n, D] float32 (the DBA vectors when the index has DBA).

        Exact for flat, HNSW and IVF indexes; IVF-PQ gives the decoded (approximate) vectors.

        Raises:
            QueryError: an id outside ``[0, len(self))``.
        """
        i = np.asarray(ids).reshape(-1)
        if i.size == 0:
            return np.empty((0, self.dim), np.float32)
        if self.on_disk:
            raise QueryError(f"a {ONDISK_TYPE} index keeps no id map, so it cannot reconstruct vectors")
        if not np.issubdtype(i.dtype, np.integer) or i.min() < 0 or i.max() >= len(self):
            raise QueryError(f"ids must be integers in [0, {len(self)}), got {i[:8].tolist()}...")
        out = self.index.reconstruct_batch(np.ascontiguousarray(i, dtype=np.int64))  # CPU index
        return np.asarray(out, dtype=np.float32).reshape(i.size, self.dim)

    # -- persistence ----------------------------------------------------------------------------------
    def save(self, folder: str | Path) -> Path:
        """Write the index folder (see module docstring); returns its path. Replaces a previous save atomically.

        The new folder is written completely beside the old one and then renamed into place
        (:func:`cdretrieval.io.replace_dir`), so a crash at any moment leaves the old or the new index.
        """
        folder = Path(folder)
        replace_dir(folder, self.write_files)
        return folder

    def write_files(self, folder: Path) -> None:
        """Write ``index.faiss``, ``items.jsonl`` and then ``manifest.json`` into the existing empty ``folder``."""
        index_bytes = faiss.serialize_index(self.index).tobytes()  # CPU index, never the GPU copy
        lines = (json.dumps(it.to_dict(), ensure_ascii=False) + "\n" for it in self.items)
        items_bytes = "".join(lines).encode("utf-8")
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(folder / INDEX_FILE, index_bytes)
        atomic_write_bytes(folder / ITEMS_FILE, items_bytes)
        manifest = dict(self.manifest)
        manifest["count"] = len(self)
        manifest["files"] = {
            INDEX_FILE: {"bytes": len(index_bytes), "sha256": _sha256(index_bytes)},
            ITEMS_FILE: {"bytes": len(items_bytes), "sha256": _sha256(items_bytes)},
        }
        if self.on_disk:  # the same lists under the new folder: linked when possible, else copied
            _link_or_copy(self.ivfdata_path, folder / IVFDATA_FILE)
            manifest["files"][IVFDATA_FILE] = self.manifest["files"][IVFDATA_FILE]
        atomic_write_json(folder / MANIFEST_FILE, manifest)  # last: marks the folder complete
        self.manifest = manifest

    @classmethod
    def load(
        cls,
        folder: str | Path,
        expected_model_hash: str | None = None,
        expected_dim: int | None = None,
        *,
        use_gpu: UseGpu = "auto",
        verify_checksums: bool = True,
    ) -> DomainIndex:
        """Load a folder written by :meth:`save`.

        Raises:
            IndexMismatchError: built with another model hash or dim than expected.
            IndexFileError: folder/manifest/file missing, unknown format_version, checksum or count mismatch,
                unreadable index or item table.
        """
        folder = Path(folder)
        manifest_path = folder / MANIFEST_FILE
        recover_dir(folder)  # a save killed between its two renames is undone, stale temporaries removed
        if not folder.is_dir():
            raise IndexFileError(
                f"no index folder at {folder}; build one with `cdretrieval index --run RUN_DIR ...`"
            )
        if not manifest_path.is_file():
            raise IndexFileError(
                f"{folder} has no {MANIFEST_FILE}: the index is missing or its save did not finish; "
                f"{_REBUILD_HINT}"
            )
        try:
            manifest = read_json(manifest_path)
        except (OSError, ValueError) as e:
            raise IndexFileError(f"cannot read {manifest_path}: {e}; {_REBUILD_HINT}") from e
        if not isinstance(manifest, dict):
            raise IndexFileError(f"{manifest_path} is not a JSON object; {_REBUILD_HINT}")
        version = manifest.get("format_version")
        if version != FORMAT_VERSION:
            raise IndexFileError(
                f"{manifest_path} has format_version {version!r}; this cdretrieval reads version "
                f"{FORMAT_VERSION}; {_REBUILD_HINT}"
            )
        required = ("model_hash", "dim", "metric", "index_type", "count", "domain", "files")
        missing = [key for key in required if key not in manifest]
        if missing:
            raise IndexFileError(f"{manifest_path} lacks {missing}; {_REBUILD_HINT}")
        if manifest["metric"] != "inner_product":
            raise IndexFileError(f"{manifest_path}: metric {manifest['metric']!r} is not 'inner_product'")
        if expected_model_hash is not None and manifest["model_hash"] != expected_model_hash:
            raise IndexMismatchError(
                f"index at {folder} was built with model {manifest['model_hash']!r}, but the model in use is "
                f"{expected_model_hash!r}; {_REBUILD_HINT}"
            )
        if expected_dim is not None and manifest["dim"] != expected_dim:
            raise IndexMismatchError(
                f"index at {folder} holds {manifest['dim']}-d embeddings, but the model gives "
                f"{expected_dim}-d; {_REBUILD_HINT}"
            )

        blobs = {
            name: _read_checked(folder, name, manifest, verify_checksums) for name in (INDEX_FILE, ITEMS_FILE)
        }
        try:
            if manifest["index_type"] == ONDISK_TYPE:
                index = _read_on_disk(folder, manifest)
            else:
                index = faiss.deserialize_index(np.frombuffer(blobs[INDEX_FILE], dtype=np.uint8))
        except RuntimeError as e:
            raise IndexFileError(
                f"{folder / INDEX_FILE} is not a readable FAISS index ({e}); {_REBUILD_HINT}"
            ) from e
        items = _parse_items(blobs[ITEMS_FILE], folder / ITEMS_FILE)

        count = manifest["count"]
        if not (index.ntotal == len(items) == count):
            raise IndexFileError(
                f"{folder}: index has {index.ntotal} vectors, {ITEMS_FILE} {len(items)} items, "
                f"manifest count {count}; they must agree; {_REBUILD_HINT}"
            )
        if index.d != manifest["dim"] or index.metric_type != faiss.METRIC_INNER_PRODUCT:
            raise IndexFileError(
                f"{folder / INDEX_FILE}: dim {index.d} / metric {index.metric_type} do not match the "
                f"manifest (dim {manifest['dim']}, inner product); {_REBUILD_HINT}"
            )
        try:
            rerank_from_manifest(manifest)
        except (ValueError, TypeError) as e:
            raise IndexFileError(f"{manifest_path}: bad 'rerank' entry ({e}); {_REBUILD_HINT}") from e
        try:
            _apply_search_params(index, manifest.get("params", {}))
        except (RuntimeError, TypeError, ValueError, AttributeError) as e:  # FAISS: "could not set parameter"
            raise IndexFileError(
                f"{manifest_path}: search parameters {manifest.get('params')!r} do not fit its "
                f"{manifest['index_type']!r} index ({str(e).strip().splitlines()[0] if str(e).strip() else e!r}); "
                f"{_REBUILD_HINT}"
            ) from e
        return cls(index, items, manifest, use_gpu=use_gpu)


def _link_or_copy(src: Path, dst: Path) -> None:
    """``dst`` as a hard link to ``src`` (same filesystem: instant, no extra space), else a copy."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def _read_on_disk(folder: Path, manifest: Mapping[str, Any]) -> faiss.Index:
    """The ``ivf-ondisk`` index of ``folder``, its lists mapped read-only from ``folder/index.ivfdata``.

    ``index.faiss`` has been verified by the caller; the (possibly larger than memory) ``index.ivfdata`` is
    checked by size only: against the manifest, and against the extent of the lists ``index.faiss`` records.

    Raises:
        IndexFileError: the lists file is missing or its size differs.
    """
    from cdretrieval.ondisk import LOAD_FLAGS

    path = folder / IVFDATA_FILE
    expected = manifest["files"].get(IVFDATA_FILE) if isinstance(manifest["files"], dict) else None
    if not isinstance(expected, dict):
        raise IndexFileError(f"{folder / MANIFEST_FILE} records no size for {IVFDATA_FILE}; {_REBUILD_HINT}")
    try:
        size = path.stat().st_size
    except FileNotFoundError as e:
        raise IndexFileError(f"{path} is missing: an {ONDISK_TYPE} index keeps its lists there; the index folder "
                             f"is incomplete; {_REBUILD_HINT}") from e
    if size != expected.get("bytes"):
        raise IndexFileError(f"{path} has {size} bytes, the manifest records {expected.get('bytes')}: it is "
                             f"truncated or from another build; {_REBUILD_HINT}")
    index = faiss.read_index(str(folder / INDEX_FILE), LOAD_FLAGS)
    ivf = faiss.try_extract_index_ivf(index)
    invlists: Any = faiss.downcast_InvertedLists(ivf.invlists) if ivf is not None and ivf.invlists else None
    if not isinstance(invlists, faiss.OnDiskInvertedLists) or invlists.totsize != size:
        raise IndexFileError(f"{folder / INDEX_FILE} does not describe the lists in {path} (another build?); "
                             f"{_REBUILD_HINT}")
    return index


def _read_checked(folder: Path, name: str, manifest: Mapping[str, Any], verify: bool) -> bytes:
    """Bytes of ``folder/name``, checked against the manifest's recorded size (and sha256 if ``verify``)."""
    path = folder / name
    try:
        data = path.read_bytes()
    except FileNotFoundError as e:
        raise IndexFileError(f"{path} is missing; the index folder is incomplete; {_REBUILD_HINT}") from e
    expected = manifest["files"].get(name) if isinstance(manifest["files"], dict) else None
    if not isinstance(expected, dict):
        raise IndexFileError(f"{folder / MANIFEST_FILE} records no size/checksum for {name}; {_REBUILD_HINT}")
    if len(data) != expected.get("bytes") or (verify and _sha256(data) != expected.get("sha256")):
        raise IndexFileError(
            f"{path} is corrupt or was replaced ({len(data)} bytes, checksum differs from the manifest); "
            f"{_REBUILD_HINT}"
        )
    return data


def _parse_items(data: bytes, path: Path) -> list[Item]:
    """Items from JSON-lines bytes; errors name the file and line."""
    items = []
    for lineno, line in enumerate(data.decode("utf-8", errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            items.append(Item.from_dict(json.loads(line)))
        except (json.JSONDecodeError, DataError) as e:
            raise IndexFileError(f"{path}:{lineno}: not a valid item ({e})") from e
    return items


# ---------------------------------------------------------------------------------------------------------


def safe_domain_name(domain: str) -> str:
    """Folder name for ``domain``: itself when it is plain ``[A-Za-z0-9_-]``, else a cleaned name + hash.

    The hash keeps distinct domains distinct ("Real World" and "Real_World" get different folders).
    """
    if not isinstance(domain, str) or not domain:
        raise DataError(f"domain must be a non-empty string, got {domain!r}")
    clean = re.sub(r"[^A-Za-z0-9_-]+", "_", domain).strip("_")[:64]
    if clean == domain:
        return domain
    return f"{clean or 'domain'}-{hashlib.sha1(domain.encode()).hexdigest()[:8]}"


class IndexSet:
    """One :class:`DomainIndex` per domain, all from the same model (same hash and dim), and optionally the
    :class:`~cdretrieval.domain_detection.DomainDetector` that tells a query's domain among them.

    Saved as ``<root>/<safe domain name>/`` sub-folders, ``<root>/domain_detector.json`` when there is a
    detector, and ``<root>/indexset.json`` (written last) that maps domain names to folders and records the
    detector file's size and sha256 (``"domain_detector": {...}`` or null; older sets lack the key and load
    without a detector).
    """

    def __init__(self, indexes: Mapping[str, DomainIndex], detector: DomainDetector | None = None) -> None:
        if not indexes:
            raise DataError("an IndexSet needs at least one domain index")
        for name, idx in indexes.items():
            if idx.domain != name:
                raise DataError(f"index for domain {idx.domain!r} was registered under {name!r}")
        first = next(iter(indexes.values()))
        for idx in indexes.values():
            if idx.model_hash != first.model_hash or idx.dim != first.dim:
                raise IndexMismatchError(
                    f"domain {idx.domain!r} was indexed with model {idx.model_hash!r} ({idx.dim}-d) but "
                    f"{first.domain!r} with {first.model_hash!r} ({first.dim}-d); {_REBUILD_HINT}"
                )
        self._indexes = dict(indexes)
        self.detector: DomainDetector | None = None
        self.set_detector(detector)

    def set_detector(self, detector: DomainDetector | None) -> None:
        """Attach (or with None, drop) the domain detector; it must know exactly these domains and this model.

        Raises:
            IndexMismatchError: another model, other domains, or (feature ``index``) another dim.
        """
        if detector is not None:
            if not isinstance(detector, DomainDetector):
                raise TypeError(f"detector must be a DomainDetector or None, got {type(detector).__name__}")
            if sorted(detector.domains) != sorted(self._indexes):
                raise IndexMismatchError(
                    f"the domain detector knows domains {detector.domains}, the index set has {self.domains}; "
                    f"{_REBUILD_HINT}"
                )
            if detector.model_hash != self.model_hash:
                raise IndexMismatchError(
                    f"the domain detector was fitted for model {detector.model_hash!r}, the indexes hold model "
                    f"{self.model_hash!r}; {_REBUILD_HINT}"
                )
            indexed = {self._indexes[d].manifest.get("feature") for d in self._indexes}
            if indexed == {detector.feature} and detector.dim != self.dim:
                raise IndexMismatchError(
                    f"the domain detector reads {detector.dim}-d {detector.feature} vectors, the indexes hold "
                    f"{self.dim}-d ones; {_REBUILD_HINT}"
                )
        self.detector = detector

    @classmethod
    def build(
        cls,
        embeddings: Mapping[str, Any],
        items: Mapping[str, Sequence[Item]],
        model_hash: str,
        index_type: str = "flat",
        **options: Any,
    ) -> IndexSet:
        """:meth:`DomainIndex.build` for each domain of ``embeddings`` (``options`` are passed on)."""
        if set(embeddings) != set(items):
            raise DataError(
                f"embeddings are for domains {sorted(embeddings)} but items for {sorted(items)}; "
                "they must match"
            )
        return cls(
            {
                d: DomainIndex.build(embeddings[d], items[d], d, model_hash, index_type, **options)
                for d in embeddings
            }
        )

    @property
    def domains(self) -> list[str]:
        return list(self._indexes)

    @property
    def model_hash(self) -> str:
        return next(iter(self._indexes.values())).model_hash

    @property
    def dim(self) -> int:
        return next(iter(self._indexes.values())).dim

    def __getitem__(self, domain: str) -> DomainIndex:
        try:
            return self._indexes[domain]
        except KeyError:
            raise QueryError(f"unknown domain {domain!r}; available domains: {self.domains}") from None

    def __contains__(self, domain: object) -> bool:
        return domain in self._indexes

    def __iter__(self) -> Iterator[str]:
        return iter(self._indexes)

    def __len__(self) -> int:
        return len(self._indexes)

    def save(self, root: str | Path) -> Path:
        """Save every domain into ``root/<safe name>/`` then ``root/indexset.json``; returns ``root``.

        The whole set is written into a new folder beside ``root`` and swapped in by renaming
        (:func:`cdretrieval.io.replace_dir`): a crash at any moment leaves the old or the new set, whole.
        """
        root = Path(root)
        folders = {d: safe_domain_name(d) for d in self._indexes}
        lowered = [f.lower() for f in folders.values()]
        if len(set(lowered)) != len(lowered):  # case-insensitive file systems would merge them
            raise DataError(f"domain names {sorted(folders)} map to folders that differ only in case")
        _check_replaceable(root)
        replace_dir(root, lambda tmp: self._write_files(tmp, folders))
        return root

    def _write_files(self, root: Path, folders: Mapping[str, str]) -> None:
        """Write every domain folder, the detector and then ``indexset.json`` into the empty folder ``root``."""
        for d, idx in self._indexes.items():
            idx.write_files(root / folders[d])
        detector_entry: dict[str, Any] | None = None
        if self.detector is not None:
            blob = self.detector.to_json_bytes()
            atomic_write_bytes(root / DETECTOR_FILE, blob)
            detector_entry = {"file": DETECTOR_FILE, "bytes": len(blob), "sha256": _sha256(blob),
                              "feature": self.detector.feature}
        atomic_write_json(
            root / INDEX_SET_FILE,
            {
                "format_version": FORMAT_VERSION,
                "model_hash": self.model_hash,
                "dim": self.dim,
                "domains": dict(folders),
                "domain_detector": detector_entry,
            },
        )

    @classmethod
    def load(
        cls,
        root: str | Path,
        expected_model_hash: str | None = None,
        expected_dim: int | None = None,
        *,
        use_gpu: UseGpu = "auto",
        verify_checksums: bool = True,
    ) -> IndexSet:
        """Load a folder written by :meth:`save`; the same checks as :meth:`DomainIndex.load` per domain."""
        root = Path(root)
        path = root / INDEX_SET_FILE
        recover_dir(root)  # a save killed between its two renames is undone, stale temporaries removed
        if not path.is_file():
            raise IndexFileError(f"no index set at {root} ({INDEX_SET_FILE} missing); {_REBUILD_HINT}")
        try:
            meta = read_json(path)
        except (OSError, ValueError) as e:
            raise IndexFileError(f"cannot read {path}: {e}; {_REBUILD_HINT}") from e
        if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION:
            version = meta.get("format_version") if isinstance(meta, dict) else None
            raise IndexFileError(
                f"{path} has format_version {version!r}; this cdretrieval reads {FORMAT_VERSION}; "
                f"{_REBUILD_HINT}"
            )
        folders = meta.get("domains")
        if not isinstance(folders, dict) or not folders:
            raise IndexFileError(f"{path} lists no domains; {_REBUILD_HINT}")
        indexes = {}
        for domain, sub in folders.items():
            if not isinstance(sub, str) or Path(sub).name != sub or sub in ("", ".", ".."):
                raise IndexFileError(f"{path}: bad folder name {sub!r} for domain {domain!r}")
            idx = DomainIndex.load(
                root / sub,
                expected_model_hash,
                expected_dim,
                use_gpu=use_gpu,
                verify_checksums=verify_checksums,
            )
            if idx.domain != domain:
                raise IndexFileError(f"{root / sub} holds domain {idx.domain!r}, but {path} says {domain!r}")
            indexes[domain] = idx
        iset = cls(indexes)
        iset.set_detector(_load_detector(root, meta.get("domain_detector"), verify_checksums))
        return iset


def _check_replaceable(root: Path) -> None:
    """Refuse to replace an existing folder ``root`` that holds anything but an index set (or its debris)."""
    if not root.is_dir():
        return
    index_files = {INDEX_FILE, ITEMS_FILE, MANIFEST_FILE, IVFDATA_FILE}
    for entry in root.iterdir():
        name = entry.name
        if name in (INDEX_SET_FILE, DETECTOR_FILE) or name.startswith("."):
            continue
        if entry.is_dir() and not entry.is_symlink():
            inner = {p.name for p in entry.iterdir() if not p.name.startswith(".")}
            if inner <= index_files:
                continue
        raise DataError(
            f"{root} holds {name!r}, which is not part of an index set; refusing to replace that folder "
            "(choose an empty or new --index-dir)"
        )


def load_detector(root: str | os.PathLike[str], verify_checksums: bool = True) -> DomainDetector | None:
    """Just the domain detector of the index set saved in ``root`` (None when it has none).

    Raises:
        IndexFileError: no index set at ``root``, or its detector file is missing, altered or unreadable.
    """
    root = Path(root)
    try:
        meta = read_json(root / INDEX_SET_FILE)
    except (OSError, ValueError) as e:
        raise IndexFileError(f"no readable index set at {root} ({e}); {_REBUILD_HINT}") from e
    if not isinstance(meta, dict):
        raise IndexFileError(f"{root / INDEX_SET_FILE} is not a JSON object; {_REBUILD_HINT}")
    return _load_detector(root, meta.get("domain_detector"), verify_checksums)


def _load_detector(root: Path, entry: Any, verify: bool) -> DomainDetector | None:
    """The domain detector ``indexset.json`` records (``entry``), checked; None when it records none.

    Raises:
        IndexFileError: the recorded file is missing, altered or unreadable.
    """
    if entry is None:
        return None
    if not isinstance(entry, dict) or entry.get("file") != DETECTOR_FILE:
        raise IndexFileError(f"{root / INDEX_SET_FILE}: bad 'domain_detector' entry {entry!r}; {_REBUILD_HINT}")
    path = root / DETECTOR_FILE
    try:
        data = path.read_bytes()
    except FileNotFoundError as e:
        raise IndexFileError(f"{path} is missing; the index folder is incomplete; {_REBUILD_HINT}") from e
    if len(data) != entry.get("bytes") or (verify and _sha256(data) != entry.get("sha256")):
        raise IndexFileError(f"{path} is corrupt or was replaced (size or checksum differs); {_REBUILD_HINT}")
    try:
        return DomainDetector.from_dict(json.loads(data.decode("utf-8")))
    except (ValueError, TypeError, KeyError) as e:
        raise IndexFileError(f"{path}: not a usable domain detector ({e}); {_REBUILD_HINT}") from e
