"""Index build and search speed of every :class:`~cdretrieval.index.DomainIndex` type on clustered synthetic data.

For each gallery size: build ``flat``, ``ivf``, ``hnsw`` and ``ivfpq`` with the library's defaults, then search
the same queries with each, in interleaved rounds (every type once per round, median over rounds), and score
recall@k against the exact (flat) result. ``auto`` is reported as the type :func:`choose_index_type` picks for
that size (the rule ``DomainIndex.build(index_type="auto")`` applies), not built a second time.

Used by :mod:`benchmarks.speed` (section "index").
"""

from __future__ import annotations

import contextlib
import gc
import statistics
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import faiss
import numpy as np

from benchmarks.common import timed_call
from cdretrieval.index import INDEX_TYPES, DomainIndex, Item, UseGpu, choose_index_type, estimate_index_mb
from cdretrieval.ondisk import recall_at_k

DOMAIN = "bench"
MODEL_HASH = "synthetic-clustered"


@dataclass
class IndexRow:
    """One index type at one size: build time, search speed, recall against flat, size."""

    n: int
    index_type: str
    build_s: float
    search_s: float  # median over rounds, all queries in one batch
    qps: float
    recall: float  # recall@k against flat search
    serialized_mb: float  # faiss.serialize_index size (what is saved; ≈ resident size)
    estimated_mb: float  # estimate_index_mb, the figure the "auto" rule uses
    params: dict[str, Any]
    on_gpu: bool


def clustered_vectors(n: int, dim: int, seed: int, n_centres: int = 1000, spread: float = 0.6) -> np.ndarray:
    """``[n, dim]`` float32 unit vectors around ``n_centres`` random unit centres (a mixture like real embeddings).

    Each point is a centre plus isotropic noise of expected norm ``spread``, normalised. The centres depend only
    on ``n_centres`` and ``dim`` (seed 0), so gallery and queries drawn with different seeds share clusters.
    """
    out = np.empty((n, dim), np.float32)
    for start, block in clustered_blocks(n, dim, seed, n_centres, spread):
        out[start : start + len(block)] = block
    return out


def clustered_blocks(
    n: int, dim: int, seed: int, n_centres: int = 1000, spread: float = 0.6, step: int = 100_000
) -> Iterator[tuple[int, np.ndarray]]:
    """:func:`clustered_vectors` ``step`` rows at a time: ``(first row, block [m, dim])``, never all ``n`` rows in
    memory (the same rows as :func:`clustered_vectors` for the default ``step``)."""
    centres = np.random.default_rng(0).standard_normal((n_centres, dim), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    rng = np.random.default_rng(seed)
    for start in range(0, n, step):
        m = min(step, n - start)
        block = centres[rng.integers(n_centres, size=m)]  # [m, dim]
        block += rng.standard_normal((m, dim), dtype=np.float32) * np.float32(spread / np.sqrt(dim))
        block /= np.linalg.norm(block, axis=1, keepdims=True)
        yield start, block


@contextlib.contextmanager
def faiss_threads(n: int | None) -> Iterator[None]:
    """Run the block with ``n`` FAISS OpenMP threads (None: leave FAISS's setting), then restore it."""
    before = faiss.omp_get_max_threads()
    if n is not None:
        faiss.omp_set_num_threads(n)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


def _serialized_mb(index: DomainIndex) -> float:
    return float(faiss.serialize_index(index.index).nbytes) / 2**20


def _search_rounds(
    indexes: dict[str, DomainIndex], queries: np.ndarray, k: int, repeats: int
) -> tuple[dict[str, list[float]], dict[str, np.ndarray]]:
    """Search every index ``repeats`` times, interleaved (one search per type per round); times and last ids."""
    times: dict[str, list[float]] = {t: [] for t in indexes}
    ids: dict[str, np.ndarray] = {}
    for _ in range(repeats):
        for name, index in indexes.items():
            seconds, (_, ids[name]) = timed_call(partial(index.search, queries, k))
            times[name].append(seconds)
    return times, ids


def bench_index_size(
    n: int,
    *,
    dim: int = 256,
    n_queries: int = 1000,
    k: int = 10,
    repeats: int = 3,
    types: Sequence[str] = INDEX_TYPES,
    use_gpu: UseGpu = False,
    seed: int = 0,
) -> dict[str, Any]:
    """Build each of ``types`` over ``n`` clustered vectors and time ``n_queries`` searches; ``flat`` is the truth.

    Returns ``{"n", "dim", "queries", "k", "auto_picks", "rows": [IndexRow as dict, ...]}``.
    """
    if "flat" not in types:
        raise ValueError(f"types must include 'flat' (the ground truth), got {list(types)}")
    x = clustered_vectors(n, dim, seed=seed + 1)
    queries = clustered_vectors(n_queries, dim, seed=seed + 2)
    items = [Item(f"synthetic/{i}.png", DOMAIN) for i in range(n)]
    indexes: dict[str, DomainIndex] = {}
    build_s: dict[str, float] = {}
    for t in types:
        gc.collect()
        t0 = time.perf_counter()
        indexes[t] = DomainIndex.build(x, items, DOMAIN, MODEL_HASH, t, use_gpu=use_gpu)
        build_s[t] = time.perf_counter() - t0
    del x, items
    gc.collect()
    times, ids = _search_rounds(indexes, queries, k, repeats)
    rows = []
    for t, index in indexes.items():
        search_s = statistics.median(times[t])
        rows.append(IndexRow(
            n=n, index_type=t, build_s=build_s[t], search_s=search_s, qps=n_queries / search_s,
            recall=recall_at_k(ids[t], ids["flat"]), serialized_mb=_serialized_mb(index),
            estimated_mb=estimate_index_mb(t, n, dim), params=dict(index.manifest["params"]), on_gpu=index.on_gpu,
        ).__dict__)
    indexes.clear()
    gc.collect()
    return {"n": n, "dim": dim, "queries": n_queries, "k": k, "auto_picks": choose_index_type(n, dim), "rows": rows}


def bench_indexes(
    sizes: Sequence[int],
    *,
    dim: int = 256,
    n_queries: int = 1000,
    k: int = 10,
    repeats: int = 3,
    use_gpu: UseGpu = False,
    threads: int | None = None,
    log: bool = True,
) -> list[dict[str, Any]]:
    """:func:`bench_index_size` for every size (one size's indexes in memory at a time) with ``threads`` FAISS
    threads (None: FAISS's default, one per core)."""
    out = []
    for n in sizes:
        t0 = time.perf_counter()
        with faiss_threads(threads):
            res = bench_index_size(n, dim=dim, n_queries=n_queries, k=k, repeats=repeats, use_gpu=use_gpu)
        out.append({**res, "faiss_threads": threads or faiss.omp_get_max_threads()})
        if log:
            print(f"[index] {n:,} vectors done in {time.perf_counter() - t0:.0f} s", flush=True)
    return out


def index_table_rows(results: Sequence[dict[str, Any]]) -> list[list[Any]]:
    """Markdown rows: size, type (★ = what auto picks), build s, QPS, recall@k, MiB (serialised / estimate), params."""
    rows = []
    for res in results:
        for r in res["rows"]:
            star = " ★auto" if r["index_type"] == res["auto_picks"] else ""
            params = ", ".join(f"{k}={v}" for k, v in r["params"].items() if k != "pq_nbits") or "-"
            rows.append([f"{res['n']:,}", r["index_type"] + star, round(r["build_s"], 2), f"{r['qps']:,.0f}",
                         round(r["recall"], 3), f"{r['serialized_mb']:.1f} / {r['estimated_mb']:.1f}", params])
    return rows


INDEX_HEADERS = ["vectors", "type", "build s", "QPS", "recall@10 vs flat", "MiB (saved / est.)", "params"]
