"""Short CI variant of ``benchmarks/load_test.py``: concurrent clients, every answer checked, no errors."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from benchmarks.load_test import check_answer, main, make_queries, rss_mb, run_load
from cdretrieval.retrieval import Retriever


def test_four_clients_five_queries_each_all_correct(server_url: str, retriever: Retriever, tmp_path: Path) -> None:
    queries = make_queries(retriever, tmp_path / "queries", n=8)
    assert {len(q.expected) for q in queries} <= {1, 5, 10, 20, 50}
    before, _ = rss_mb(os.getpid())
    result = run_load(server_url, queries, users=4, per_user=5, seed=1)
    assert result.errors == []
    summary = result.summary()
    assert summary["queries"] == 20 and len(result.latencies) == 20
    assert 0 < summary["p50_ms"] <= summary["p95_ms"] <= summary["max_ms"]
    after, _ = rss_mb(os.getpid())
    assert after - before < 500  # MB; a leak per query would show here only if huge, the soak measures it


def test_check_answer_catches_wrong_answers(retriever: Retriever, tmp_path: Path) -> None:
    q = make_queries(retriever, tmp_path, n=1)[0]
    right = {"ok": True, "results": [{"rank": i + 1, "domain": d, "item_id": j, "score": s}
                                     for i, (d, j, s) in enumerate(q.expected)]}
    assert check_answer(q, right) is None
    wrong_order = {**right, "results": list(reversed(right["results"]))}
    assert check_answer(q, wrong_order) is not None
    assert check_answer(q, {**right, "results": right["results"][:-1]}) is not None
    assert check_answer(q, {"ok": False, "error": "x"}) is not None
    shifted = {**right, "results": [{**r, "score": r["score"] + 1e-3} for r in right["results"]]}
    assert check_answer(q, shifted) is not None


@pytest.mark.slow
def test_benchmark_script_end_to_end(indexed_run: Path, tmp_path: Path) -> None:
    """``python -m benchmarks.load_test`` in miniature: server child process, load, soak, JSON + Markdown."""
    code = main(["--run", str(indexed_run), "--users", "2", "--queries", "3", "--soak", "20", "--sample-every", "10",
                 "--out", str(tmp_path)])
    assert code == 0
    result = json.loads((tmp_path / "load_test.json").read_text())
    assert result["load"]["errors"] == 0 and result["load"]["queries"] == 6
    assert result["soak"]["errors"] == 0 and len(result["soak"]["rss_samples_mb"]) == 2
    assert result["server_rss_mb"]["before"] > 0
    assert "p95 ms" in (tmp_path / "load_test.md").read_text()
