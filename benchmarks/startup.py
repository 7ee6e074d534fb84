"""Cold start: a fresh ``cdretrieval search`` process, ``Retriever.from_run``, and ``serve`` until HTTP answers.

    python -m benchmarks.startup --run RUN --query IMAGE --target DOMAIN [--rounds 5] [--baseline-tree DIR]
                                 [--port 7871] [--out benchmarks/results]

Every measurement is a new Python process (nothing imported or cached in memory; the OS file cache and the
ONNX graph cache under ``$CDRETRIEVAL_CACHE/onnx`` are warm, as for a user's second start). With
``--baseline-tree DIR`` (a checkout of an older commit, e.g. ``git archive HEAD~1 cdretrieval app | tar -x -C
DIR``) each round runs the baseline's code (``PYTHONPATH=DIR``) right after the current code, so the two are
measured side by side on the same loaded machine; medians over rounds, and their ratio.

Measured:

* ``search``: wall seconds of ``python -m cdretrieval.cli search --run RUN --query IMAGE --target DOMAIN --json``.
* ``import``, ``from_run``, ``first query``: inside one fresh process, ``import cdretrieval.retrieval``, then
  ``Retriever.from_run(RUN)``, then one ``search`` (which builds the ONNX Runtime session).
* ``serve``: seconds from starting ``python -m cdretrieval.cli serve --run RUN --port PORT`` until ``GET /``
  answers 200.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from benchmarks.common import RESULTS, md_table, write_outputs

#: Targets of issue 11 (idle machine), seconds.
GOALS = {"search process": 3.0, "from_run": 2.0, "serve until HTTP 200": 6.0}

_IN_PROCESS = """
import json, sys, time
t0 = time.perf_counter()
from cdretrieval.retrieval import Retriever
t1 = time.perf_counter()
r = Retriever.from_run(sys.argv[1], device="cpu")
t2 = time.perf_counter()
r.search(sys.argv[2], target_domain=sys.argv[3], k=10)
t3 = time.perf_counter()
print(json.dumps({"import": t1 - t0, "from_run": t2 - t1, "first query": t3 - t2}))
"""


def _env(tree: Path | None) -> dict[str, str]:
    """The environment of a measured process: ``tree`` first on ``PYTHONPATH`` when given (such a process also
    runs in ``tree``: ``-m`` and ``-c`` put the working directory before ``PYTHONPATH``)."""
    env = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False")
    if tree is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(tree), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def time_search_process(run: Path, query: Path, target: str, tree: Path | None) -> float:
    """Wall seconds of one ``cdretrieval search`` process (it must succeed)."""
    argv = [sys.executable, "-m", "cdretrieval.cli", "search", "--run", str(run), "--query", str(query),
            "--target", target, "--json", "--device", "cpu"]
    t0 = time.perf_counter()
    subprocess.run(argv, env=_env(tree), check=True, capture_output=True, timeout=300, cwd=tree)
    return time.perf_counter() - t0


def time_in_process(run: Path, query: Path, target: str, tree: Path | None) -> dict[str, float]:
    """Seconds of ``import cdretrieval.retrieval``, ``Retriever.from_run`` and the first query in a fresh process."""
    done = subprocess.run([sys.executable, "-c", _IN_PROCESS, str(run), str(query), target], env=_env(tree),
                          check=True, capture_output=True, text=True, timeout=300, cwd=tree)
    return {k: float(v) for k, v in json.loads(done.stdout.strip().splitlines()[-1]).items()}


def time_serve(run: Path, port: int, tree: Path | None, timeout: float = 180.0) -> float:
    """Seconds from starting ``cdretrieval serve`` until ``GET http://127.0.0.1:PORT/`` answers 200."""
    argv = [sys.executable, "-m", "cdretrieval.cli", "serve", "--run", str(run), "--port", str(port)]
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, env=_env(tree), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tree)
    try:
        while time.perf_counter() - t0 < timeout:
            if proc.poll() is not None:
                raise RuntimeError(f"serve exited with {proc.returncode} before answering")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2) as resp:
                    if resp.status == 200:
                        return time.perf_counter() - t0
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.05)
        raise TimeoutError(f"serve did not answer within {timeout} s")
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def one_round(run: Path, query: Path, target: str, port: int, tree: Path | None) -> dict[str, float]:
    """Every measurement once for the code in ``tree`` (None: the installed, current code)."""
    out = {"search process": time_search_process(run, query, target, tree)}
    out.update(time_in_process(run, query, target, tree))
    out["serve until HTTP 200"] = time_serve(run, port, tree)
    return out


def bench_startup(
    run: Path, query: Path, target: str, *, rounds: int, port: int, baseline: Path | None
) -> dict[str, dict[str, list[float]]]:
    """``rounds`` interleaved rounds: ``{"current": {metric: [s, ...]}, "baseline": ...}``."""
    trees: dict[str, Path | None] = {"current": None}
    if baseline is not None:
        trees["baseline"] = baseline
    times: dict[str, dict[str, list[float]]] = {name: {} for name in trees}
    for r in range(rounds):
        for name, tree in trees.items():
            for metric, seconds in one_round(run, query, target, port, tree).items():
                times[name].setdefault(metric, []).append(seconds)
        print(f"[startup] round {r + 1}/{rounds} done", flush=True)
    return times


def startup_rows(times: Mapping[str, Mapping[str, Sequence[float]]]) -> list[list[Any]]:
    """Markdown rows: metric, current median (min–max), baseline median, current ÷ baseline, goal."""
    rows: list[list[Any]] = []
    for metric, values in times["current"].items():
        cur = statistics.median(values)
        row: list[Any] = [metric, f"{cur:.2f} ({min(values):.2f}–{max(values):.2f})"]
        if "baseline" in times:
            base = statistics.median(times["baseline"][metric])
            row += [f"{base:.2f}", f"{cur / base:.2f}"]
        goal = GOALS.get(metric)
        row.append(f"≤ {goal:g} (idle)" if goal is not None else "-")
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, required=True, help="run folder with a checkpoint and its index")
    ap.add_argument("--query", type=Path, required=True, help="query image")
    ap.add_argument("--target", required=True, help="target domain")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--port", type=int, default=7871)
    ap.add_argument("--baseline-tree", type=Path, default=None, help="folder holding an older cdretrieval/ + app/")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    times = bench_startup(args.run.resolve(), args.query.resolve(), args.target, rounds=args.rounds, port=args.port,
                          baseline=args.baseline_tree.resolve() if args.baseline_tree else None)
    heads = ["what", "current s, median (min–max)"]
    if "baseline" in times:
        heads += ["baseline s, median", "current ÷ baseline"]
    table = md_table([*heads, "goal s"], startup_rows(times))
    md = f"**Cold start** ({args.rounds} rounds, fresh processes, warm file and ONNX caches)\n\n{table}"
    write_outputs("startup", {"times_s": times, "rounds": args.rounds}, md, args.out)


if __name__ == "__main__":
    main()
