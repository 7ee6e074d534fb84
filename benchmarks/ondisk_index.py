"""An on-disk IVF index (``ivf-ondisk``) over N synthetic clustered vectors, built shard by shard (issue 15).

    python -m benchmarks.ondisk_index [--n 10000000] [--dim 256] [--shard-rows 1000000] [--queries 1000]
                                     [--nlist N] [--nprobe N] [--pq-m M] [--train-size N] [--dir DIR] [--keep]

The vectors are generated shard by shard (:func:`benchmarks.index_speed.clustered_blocks`, one seed per shard),
never all in memory: :func:`cdretrieval.ondisk.build_ondisk_index` samples and trains, fills each shard into its
own file and merges them into ``index.ivfdata``. Reported: build seconds (train / fill / merge), the process's
peak RSS (``VmHWM``: includes file pages mapped while merging and searching) and the peak anonymous RSS (sampled
every 0.2 s: what the page cache cannot take back), the folder's size on disk, the load seconds and RSS after
:meth:`DomainIndex.load` (item table included), queries/s of one batch of ``--queries`` fresh queries (median of
3), recall@10 against exact search over all N vectors (streamed over the shards again), and the held-out recall
the manifest records. Markdown table + JSON under ``benchmarks/results/`` (``ondisk_index.{md,json}``).

Linux only (``/proc``).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from benchmarks.common import RESULTS, md_table, timed_call, write_outputs
from benchmarks.index_speed import clustered_blocks, clustered_vectors
from cdretrieval.index import DomainIndex, Item
from cdretrieval.ondisk import ExactTopK, OnDiskParams, Shard, build_ondisk_index, recall_at_k

DOMAIN, MODEL_HASH = "bench", "synthetic-clustered"
QUERY_SEED = 10**6  # shard s uses seed 1 + s; the queries one no shard uses


def status_kib(field: str) -> int:
    """A ``/proc/self/status`` field in KiB (``VmHWM``, ``VmRSS``, ``RssAnon``)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


class AnonPeak:
    """The largest ``RssAnon`` seen, sampled every ``every`` seconds in a thread while the block runs."""

    def __init__(self, every: float = 0.2) -> None:
        self.every, self.peak_kib = every, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_kib = max(self.peak_kib, status_kib("RssAnon"))
            self._stop.wait(self.every)

    def __enter__(self) -> AnonPeak:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_kib = max(self.peak_kib, status_kib("RssAnon"))


def synthetic_shards(n: int, dim: int, shard_rows: int) -> list[Shard]:
    """Shards of ``shard_rows`` clustered vectors (shard ``s``: seed ``1 + s``) with synthetic items."""

    def shard(s: int) -> Shard:
        first, m = s * shard_rows, min(shard_rows, n - s * shard_rows)

        def blocks() -> Iterator[tuple[np.ndarray, list[Item]]]:
            for start, block in clustered_blocks(m, dim, seed=1 + s):
                ids = range(first + start, first + start + len(block))
                yield block, [Item(f"synthetic/{i}.png", DOMAIN) for i in ids]

        return blocks

    return [shard(s) for s in range(-(-n // shard_rows))]


def exact_ids(shards: list[Shard], queries: np.ndarray, k: int) -> np.ndarray:
    """The exact top-``k`` ids of ``queries`` among every shard's vectors, one block at a time."""
    exact, first = ExactTopK(queries, k), 0
    for shard in shards:
        for block, _ in shard():
            exact.update(block, first)
            first += len(block)
    return exact.ids


def folder_bytes(folder: Path) -> dict[str, int]:
    """Size of each file of the index folder."""
    return {p.name: p.stat().st_size for p in sorted(folder.iterdir()) if p.is_file()}


def run(args: argparse.Namespace, where: Path) -> dict[str, Any]:
    """Build, load, search and score the index in ``where``; every measured figure."""
    shards = synthetic_shards(args.n, args.dim, args.shard_rows)
    params = OnDiskParams(nlist=args.nlist, nprobe=args.nprobe, pq_m=args.pq_m, train_size=args.train_size,
                          eval_queries=args.queries, seed=0)
    folder = where / "index"
    with AnonPeak() as build_peak:
        build_s, _ = timed_call(lambda: build_ondisk_index(folder, shards, args.n, args.dim, DOMAIN, MODEL_HASH,
                                                           params, work_dir=where / "shards"))
    hwm_build = status_kib("VmHWM")
    print(f"[ondisk] built {args.n:,} vectors in {build_s:.0f} s", flush=True)
    load_s, index = timed_call(lambda: DomainIndex.load(folder, use_gpu=False))
    rss_loaded = status_kib("VmRSS")
    queries = clustered_vectors(args.queries, args.dim, seed=QUERY_SEED)
    times, found = [], np.empty(0)
    for _ in range(3):
        seconds, (_, found) = timed_call(lambda: index.search(queries, args.k))
        times.append(seconds)
    truth_s, truth = timed_call(lambda: exact_ids(shards, queries, args.k))
    manifest = index.manifest
    return {
        "n": args.n, "dim": args.dim, "shards": len(shards), "shard_rows": args.shard_rows,
        "params": manifest["params"], "train_size": manifest["ondisk"]["train_size"],
        "build_s": build_s, "build_parts_s": manifest["ondisk"]["seconds"],
        "peak_rss_mib": hwm_build / 1024, "peak_anon_rss_mib": build_peak.peak_kib / 1024,
        "raw_vectors_mib": args.n * args.dim * 4 / 2**20, "files_bytes": folder_bytes(folder),
        "disk_mib": sum(folder_bytes(folder).values()) / 2**20, "load_s": load_s,
        "rss_after_load_mib": rss_loaded / 1024,
        "queries": args.queries, "k": args.k, "search_s": statistics.median(times),
        "qps": args.queries / statistics.median(times), "recall": recall_at_k(found, truth),
        "heldout_recall": manifest["ondisk"]["recall"]["recall"], "exact_search_s": truth_s,
        "faiss_threads": faiss.omp_get_max_threads(),
    }


def table(r: dict[str, Any]) -> str:
    """The Markdown table of one run."""
    parts = r["build_parts_s"]
    codec = f"PQ{r['params']['pq_m']}" if "pq_m" in r["params"] else "flat"
    heads = ["vectors", "codes", "nlist / nprobe", "build s (train / fill / merge)", "peak RSS MiB (anon)",
             "raw vectors MiB", "on disk MiB", "load s", "queries/s", "recall@10 vs exact (held-out rows)"]
    row = [f"{r['n']:,}", codec, f"{r['params']['nlist']:,} / {r['params']['nprobe']}",
           f"{r['build_s']:,.0f} ({parts['train']:,.0f} / {parts['fill']:,.0f} / {parts['merge']:,.0f})",
           f"{r['peak_rss_mib']:,.0f} ({r['peak_anon_rss_mib']:,.0f})", f"{r['raw_vectors_mib']:,.0f}",
           f"{r['disk_mib']:,.0f}", f"{r['load_s']:.1f}", f"{r['qps']:,.0f}",
           f"{r['recall']:.3f} ({r['heldout_recall']:.3f})"]
    title = (f"**On-disk IVF index** (dim {r['dim']}, {r['shards']} shards of ≤ {r['shard_rows']:,}, "
             f"train sample {r['train_size']:,}, {r['queries']:,} queries, {r['faiss_threads']} FAISS threads)")
    return f"{title}\n\n{md_table(heads, [row])}"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=10_000_000)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--shard-rows", type=int, default=1_000_000)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--nlist", type=int, default=None)
    ap.add_argument("--nprobe", type=int, default=None)
    ap.add_argument("--pq-m", type=int, default=None, help="PQ codes of this many bytes (default: flat codes)")
    ap.add_argument("--train-size", type=int, default=None)
    ap.add_argument("--dir", type=Path, default=None, help="where the index is built (default: a temporary folder)")
    ap.add_argument("--keep", action="store_true", help="keep the index folder")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    where = Path(tempfile.mkdtemp(prefix="ondisk-bench-", dir=args.dir))
    try:
        result = run(args, where)
    finally:
        if not args.keep:
            shutil.rmtree(where, ignore_errors=True)
    write_outputs("ondisk_index", {"result": result}, table(result), args.out)


if __name__ == "__main__":
    main()
