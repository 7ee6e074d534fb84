"""Load test of the served UI's ``/search`` API: concurrent users, correct answers, latency, memory.

    python -m benchmarks.load_test [--users 16] [--queries 50] [--soak 2000] [--run RUN_DIR] [--out DIR]

The server is started with :func:`app.server.launch_app` (``prevent_thread_lock=True``, a free localhost port)
in a child process, so that its memory (RSS, from ``/proc``) is measured alone. Without ``--run`` a run is
made once in the cache the way the tests make theirs: EfficientNet-Lite0 (real weights) with an untrained
1280 → 64 → 32 head, 64 px, flat indexes of the demo data (``--per-domain`` images per domain).

Load: ``--users`` threads, each with its own ``gradio_client.Client``, send ``--queries`` searches each (an
image upload + source domain + target domains + k, drawn from a fixed mix of PNG and JPEG/palette/CMYK
re-encodings of demo images). Every answer is checked: ``min(k, gallery)`` results, ranks 1..n, scores
non-increasing, and the same items and scores as a direct :meth:`Retriever.search` on the same file. Reported:
errors (exceptions + wrong answers), p50/p95/max latency, throughput, the server's RSS before/after and peak.

Soak (``--soak N``): N more searches from ``--soak-users`` (default 2) users; the server's RSS is sampled every
``--sample-every`` (200) queries and the growth from the first sample to the last is reported in MB.

Numbers are from whatever machine runs it (shared 2-core CI machines: client and server compete for CPU).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.common import md_table, write_outputs

K_CHOICES = (1, 5, 10, 20, 50)


# ---------------------------------------------------------------------------------------------------------
# The run and the server


def make_run(out: Path, per_domain: int = 120) -> Path:
    """A run with indexes, made once under ``out`` (reused when complete): the tests' ``indexed_run`` recipe."""
    import torch

    from cdretrieval.config import RunConfig
    from cdretrieval.data.demo import generate_demo_data
    from cdretrieval.index import INDEX_SET_FILE
    from cdretrieval.indexing import build_indexes
    from cdretrieval.run import encoder_from_config, save_checkpoint

    run = out / "run"
    if (run / "index" / INDEX_SET_FILE).is_file():
        return run
    root = generate_demo_data(out / "data", per_domain=per_domain)
    cfg = RunConfig()
    cfg.data.root = str(root)
    cfg.data.image_size = 64
    cfg.data.num_workers = 0
    cfg.model.hidden_dim = 64
    cfg.model.dim = 32
    torch.manual_seed(0)
    save_checkpoint(run, {"model": encoder_from_config(cfg).state_dict()}, cfg)
    build_indexes(run, root, num_workers=0, progress=False, device="cpu")
    return run


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def serve_forever(run: str, port: int) -> None:
    """Child process: launch the app, print ``READY <url>``, serve until stdin closes."""
    from app.server import launch_app

    demo = launch_app(run, port=port, prevent_thread_lock=True, device="cpu")
    print(f"READY {demo.local_url}", flush=True)
    try:
        sys.stdin.read()  # the parent closes our stdin (or kills us) to stop
    finally:
        demo.close()


@contextlib.contextmanager
def server_process(run: Path, timeout: float = 180.0) -> Iterator[tuple[str, int]]:
    """``(url, pid)`` of a server child process serving ``run``."""
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"}
    repo = Path(__file__).resolve().parents[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.load_test", "--serve", str(run), "--port", str(free_port())],
        cwd=repo, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    assert proc.stdout is not None and proc.stdin is not None
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    url = None
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if line.startswith("READY "):
            url = line.split(maxsplit=1)[1].strip()
            break
    if url is None:
        proc.kill()
        raise RuntimeError("the server did not start:\n" + "".join(lines[-30:]))
    out = proc.stdout
    threading.Thread(target=lambda: out.read(), daemon=True).start()  # keep draining the child's output
    try:
        yield (url if url.endswith("/") else url + "/"), proc.pid
    finally:
        proc.stdin.close()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def rss_mb(pid: int) -> tuple[float, float]:
    """(current RSS, peak RSS) of process ``pid`` in MB, from /proc (NaN where there is no /proc)."""
    values = {"VmRSS": float("nan"), "VmHWM": float("nan")}
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, rest = line.partition(":")
            if key in values:
                values[key] = int(rest.split()[0]) / 1024
    return values["VmRSS"], values["VmHWM"]


# ---------------------------------------------------------------------------------------------------------
# Queries and their expected answers


@dataclass(frozen=True)
class Query:
    path: str
    source: str  # "auto" or a domain
    targets: tuple[str, ...]  # () = every domain but the source
    k: int
    expected: tuple[tuple[str, int, float], ...]  # (domain, item_id, score) per hit, best first


def make_queries(retriever: Any, folder: Path, n: int = 24, seed: int = 0) -> list[Query]:
    """``n`` queries: indexed images of every domain (half re-encoded as JPEG / palette PNG / CMYK JPEG),
    random source / targets / k, each with the direct ``Retriever.search`` answer."""
    from PIL import Image

    from app.ui import resolve_domains

    rng = random.Random(seed)
    domains = list(retriever.domains)
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        domain = domains[i % len(domains)]
        item = rng.choice(retriever.indexes[domain].items)
        variant = i % 4
        path = folder / f"q{i:03d}{Path(item.path).suffix}"
        if variant == 0:
            shutil.copy(item.path, path)
        else:
            img = Image.open(item.path).convert("RGB")
            if variant == 1:
                path = path.with_suffix(".jpg")
                img.save(path, "JPEG", quality=85)
            elif variant == 2:
                img.convert("P", palette=Image.Palette.ADAPTIVE).save(path, "PNG")
            else:
                path = path.with_suffix(".jpg")
                img.convert("CMYK").save(path, "JPEG", quality=90)
        source = rng.choice(["auto", domain])
        others = [d for d in domains if d != source]
        targets = tuple(rng.choice([(), (rng.choice(others),), tuple(others)]))
        k = rng.choice(K_CHOICES)
        src, tgts = resolve_domains(domains, source, list(targets))
        hits = retriever.search(str(path), tgts, k=k, source_domain=src)
        out.append(Query(str(path), source, targets, k, tuple((h.domain, h.item_id, h.score) for h in hits)))
    return out


def check_answer(q: Query, result: dict[str, Any]) -> str | None:
    """None when the server's ``/search`` result is right for ``q``, else what is wrong."""
    rows = result.get("results") if isinstance(result, dict) else None
    if not isinstance(rows, list) or result.get("ok") is not True:
        return f"not a result: {str(result)[:200]}"
    if len(rows) != len(q.expected):
        return f"{len(rows)} results, expected {len(q.expected)} (k={q.k})"
    if [r["rank"] for r in rows] != list(range(1, len(rows) + 1)):
        return f"ranks {[r['rank'] for r in rows]}"
    scores = [float(r["score"]) for r in rows]
    for domain in {r["domain"] for r in rows}:  # ranked by calibrated score: cosines are in order per domain
        own = [float(r["score"]) for r in rows if r["domain"] == domain]
        if any(a < b for a, b in itertools.pairwise(own)):
            return f"scores of {domain} not sorted: {own}"
    got = [(r["domain"], int(r["item_id"])) for r in rows]
    want = [(d, i) for d, i, _ in q.expected]
    if got != want:
        return f"items {got[:5]}... differ from the direct search {want[:5]}..."
    worst = max(abs(s - e) for s, (_, _, e) in zip(scores, q.expected, strict=True))
    if worst > 1e-5:
        return f"scores differ from the direct search by {worst:.2e}"
    return None


# ---------------------------------------------------------------------------------------------------------
# Load


@dataclass
class LoadResult:
    queries: int = 0
    errors: list[str] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)  # seconds, successful calls
    seconds: float = 0.0
    rss_samples: list[tuple[int, float]] = field(default_factory=list)  # (queries done, RSS MB)

    def summary(self) -> dict[str, Any]:
        lat = sorted(self.latencies)

        def pct(p: float) -> float | None:
            return round(1000 * lat[min(len(lat) - 1, int(p * len(lat)))], 1) if lat else None

        return {
            "queries": self.queries,
            "errors": len(self.errors),
            "first_errors": self.errors[:5],
            "p50_ms": round(1000 * statistics.median(lat), 1) if lat else None,
            "p95_ms": pct(0.95),
            "max_ms": round(1000 * lat[-1], 1) if lat else None,
            "mean_ms": round(1000 * statistics.fmean(lat), 1) if lat else None,
            "throughput_qps": round(self.queries / self.seconds, 2) if self.seconds else None,
            "seconds": round(self.seconds, 2),
        }


def run_load(
    url: str,
    queries: Sequence[Query],
    users: int,
    per_user: int,
    *,
    seed: int = 0,
    download: bool = False,
    sample_every: int = 0,
    sample: Callable[[], float] | None = None,
) -> LoadResult:
    """``users`` threads × ``per_user`` searches against ``url``; every answer checked against ``queries``."""
    from gradio_client import Client, handle_file

    result = LoadResult()
    lock = threading.Lock()
    done = 0
    clients = [Client(url, verbose=False, download_files=download) for _ in range(users)]  # not timed
    start_gate = threading.Barrier(users + 1)

    def user(u: int) -> None:
        nonlocal done
        rng = random.Random(seed * 1000 + u)
        start_gate.wait()
        for _ in range(per_user):
            q = rng.choice(queries)
            t0 = time.perf_counter()
            try:
                _, answer = clients[u].predict(handle_file(q.path), q.source, list(q.targets), q.k,
                                               api_name="/search")
                problem = check_answer(q, answer)
            except Exception as e:  # any failure of the call is an error of the load test
                problem = f"{type(e).__name__}: {e}"
            elapsed = time.perf_counter() - t0
            with lock:
                done += 1
                if problem is None:
                    result.latencies.append(elapsed)
                else:
                    result.errors.append(f"{Path(q.path).name}: {problem}")
                if sample is not None and sample_every and done % sample_every == 0:
                    result.rss_samples.append((done, round(sample(), 1)))

    threads = [threading.Thread(target=user, args=(u,), daemon=True) for u in range(users)]
    for t in threads:
        t.start()
    start_gate.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    result.seconds = time.perf_counter() - t0
    result.queries = users * per_user
    return result


# ---------------------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--users", type=int, default=16, help="concurrent clients (default 16)")
    ap.add_argument("--queries", type=int, default=50, help="searches per client (default 50)")
    ap.add_argument("--soak", type=int, default=0, help="then this many more searches, sampling memory")
    ap.add_argument("--soak-users", type=int, default=2, help="clients during the soak (default 2)")
    ap.add_argument("--sample-every", type=int, default=200, help="soak: RSS sample every N queries")
    ap.add_argument("--run", default=None, help="run folder with indexes (default: make one in the cache)")
    ap.add_argument("--per-domain", type=int, default=120, help="demo images per domain for the made run")
    ap.add_argument("--download", action="store_true", help="clients also download the result thumbnails")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    ap.add_argument("--serve", default=None, help=argparse.SUPPRESS)  # child process mode
    ap.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.serve:
        serve_forever(args.serve, args.port)
        return 0

    import torch

    from cdretrieval.paths import cache_dir
    from cdretrieval.retrieval import Retriever

    torch.set_num_threads(1)  # the client side's direct searches; leave the cores to the server
    run = Path(args.run) if args.run else make_run(cache_dir() / "load-test", args.per_domain)
    retriever = Retriever.from_run(run, device="cpu")
    with tempfile.TemporaryDirectory(prefix="load-test-") as tmp:
        queries = make_queries(retriever, Path(tmp), seed=args.seed)
        with server_process(run) as (url, pid):
            warm = run_load(url, queries[:2], 1, 2, seed=args.seed)  # first-call costs out of the numbers
            rss_before, _ = rss_mb(pid)
            load = run_load(url, queries, args.users, args.queries, seed=args.seed, download=args.download)
            rss_after, _ = rss_mb(pid)
            soak = None
            if args.soak:
                per_user = -(-args.soak // args.soak_users)
                soak = run_load(url, queries, args.soak_users, per_user, seed=args.seed + 1, download=args.download,
                                sample_every=args.sample_every, sample=lambda: rss_mb(pid)[0])
            rss_end, rss_peak_end = rss_mb(pid)

    payload: dict[str, Any] = {
        "run": str(run),
        "gallery": retriever.info()["counts"],
        "users": args.users,
        "queries_per_user": args.queries,
        "distinct_queries": len(queries),
        "download_thumbnails": args.download,
        "warmup_errors": warm.errors,
        "load": load.summary(),
        "server_rss_mb": {"before": round(rss_before, 1), "after_load": round(rss_after, 1),
                          "peak": round(rss_peak_end, 1), "end": round(rss_end, 1)},
    }
    rows = [["load", f"{args.users}×{args.queries}", load.queries, len(load.errors), load.summary()["p50_ms"],
             load.summary()["p95_ms"], load.summary()["max_ms"], load.summary()["throughput_qps"]]]
    if soak is not None:
        samples = soak.rss_samples
        growth = round(samples[-1][1] - samples[0][1], 1) if len(samples) >= 2 else None
        payload["soak"] = {**soak.summary(), "users": args.soak_users, "rss_samples_mb": samples,
                           "rss_growth_mb": growth}
        s = soak.summary()
        rows.append(["soak", f"{args.soak_users}×{per_user}", soak.queries, len(soak.errors), s["p50_ms"],
                     s["p95_ms"], s["max_ms"], s["throughput_qps"]])
    table = md_table(["phase", "users × queries", "queries", "errors", "p50 ms", "p95 ms", "max ms", "queries/s"],
                     rows)
    mem = payload["server_rss_mb"]
    notes = [f"server RSS: {mem['before']} MB before, {mem['after_load']} MB after the load, peak {mem['peak']} MB"]
    if soak is not None:
        notes.append(f"soak RSS every {args.sample_every} queries (MB): "
                     + ", ".join(f"{v}" for _, v in payload["soak"]["rss_samples_mb"])
                     + f"; growth {payload['soak']['rss_growth_mb']} MB")
    title = (f"**/search load test** — gallery {payload['gallery']}, {len(queries)} distinct queries, "
             f"every answer checked against a direct Retriever.search")
    out_dir = Path(args.out) if args.out else None
    write_outputs("load_test", payload, title + "\n\n" + table + "\n\n" + "\n".join(f"- {n}" for n in notes),
                  out_dir)
    bad = len(load.errors) + (len(soak.errors) if soak else 0) + len(warm.errors)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
