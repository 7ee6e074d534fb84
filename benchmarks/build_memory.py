"""Peak memory of building an index, each build in its own process so peaks do not mix.

    python -m benchmarks.build_memory [--sizes 1000000] [--types flat,ivf,hnsw,ivfpq] [--dim 256]
                                      [--rerank] [--baseline-tree DIR] [--out benchmarks/results]

A child process makes ``n`` clustered float32 vectors (:func:`benchmarks.index_speed.clustered_vectors`), notes its
resident memory, resets the kernel's peak counter (``/proc/self/clear_refs``), runs
``DomainIndex.build(vectors, ..., index_type)`` and reads the peak (``VmHWM``). Reported: the raw vectors' size,
the build's peak *above* the memory held before it (the vectors, Python, FAISS), that peak ÷ the raw vectors (the
issue 11 goal: ≤ 1.5 at 1M), the whole process's peak, and the build seconds. ``--rerank`` builds with the default
re-ranking (DBA at index time). ``--baseline-tree DIR`` also runs each case with an older checkout of
``cdretrieval/`` first on ``PYTHONPATH``, right after the current code.

Linux only (``/proc``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from benchmarks.common import RESULTS, md_table, write_outputs

PEAK_RATIO_GOAL = 1.5  # build peak above the vectors ÷ raw float32 vectors

_CHILD = """
import gc, json, sys, time
import numpy as np
from benchmarks.index_speed import clustered_vectors
from cdretrieval.index import DomainIndex, Item
from cdretrieval.rerank import DEFAULT_RERANK

def kib(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)

n, dim, kind, rerank = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4] == "1"
x = clustered_vectors(n, dim, seed=1)
items = [Item(f"synthetic/{i}.png", "bench") for i in range(n)]
gc.collect()
before = kib("VmRSS")
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset VmHWM to the current RSS
t0 = time.perf_counter()
index = DomainIndex.build(x, items, "bench", "synthetic", kind, use_gpu=False,
                          rerank=DEFAULT_RERANK if rerank else None)
seconds = time.perf_counter() - t0
print(json.dumps({"before_kib": before, "peak_kib": kib("VmHWM"), "after_kib": kib("VmRSS"),
                  "build_s": seconds, "raw_bytes": x.nbytes, "ntotal": int(index.index.ntotal)}))
"""


def measure_build(n: int, dim: int, index_type: str, rerank: bool, tree: Path | None) -> dict[str, Any]:
    """One build in a fresh process (``tree`` first on ``PYTHONPATH`` when given): its memory figures."""
    env = dict(os.environ)
    repo = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(([str(tree)] if tree is not None else []) + [repo])
    done = subprocess.run([sys.executable, "-c", _CHILD, str(n), str(dim), index_type, "1" if rerank else "0"],
                          env=env, capture_output=True, text=True, check=False, cwd=tree or repo)
    if done.returncode != 0:
        raise RuntimeError(f"build {index_type} n={n} failed: {done.stderr[-2000:]}")
    res: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    extra = (res["peak_kib"] - res["before_kib"]) * 1024
    res.update(n=n, dim=dim, index_type=index_type, rerank=rerank, code="baseline" if tree else "current",
               build_peak_bytes=extra, build_peak_ratio=extra / res["raw_bytes"])
    return res


def memory_rows(results: list[dict[str, Any]]) -> list[list[Any]]:
    """Markdown rows, one per build."""
    mib = 2**20
    return [[f"{r['n']:,}", r["index_type"] + (" + DBA" if r["rerank"] else ""), r["code"],
             f"{r['raw_bytes'] / mib:,.0f}", f"{r['build_peak_bytes'] / mib:,.0f}", f"{r['build_peak_ratio']:.2f}",
             f"{r['peak_kib'] / 1024:,.0f}", f"{r['build_s']:.1f}"] for r in results]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1000000")
    ap.add_argument("--types", default="flat,ivf,hnsw,ivfpq")
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--rerank", action="store_true", help="build with the default re-ranking (DBA)")
    ap.add_argument("--baseline-tree", type=Path, default=None, help="folder holding an older cdretrieval/")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    trees: list[Path | None] = [None] + ([args.baseline_tree.resolve()] if args.baseline_tree else [])
    results = []
    for n in (int(s) for s in args.sizes.split(",")):
        for kind in args.types.split(","):
            for tree in trees:
                results.append(measure_build(n, args.dim, kind, args.rerank, tree))
                print(f"[build_memory] {json.dumps(results[-1])}", flush=True)
    heads = ["vectors", "type", "code", "raw MiB", "build peak above before, MiB",
             f"÷ raw (goal ≤ {PEAK_RATIO_GOAL})", "process peak MiB", "build s"]
    md = f"**Index build memory** (dim {args.dim}, one process per build)\n\n{md_table(heads, memory_rows(results))}"
    write_outputs("build_memory", {"results": results}, md, args.out)


if __name__ == "__main__":
    main()
