"""Retrieval metrics against a loop-based brute-force reference and hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest

from cdretrieval.errors import DataError, QueryError
from cdretrieval.metrics import (
    average_precision,
    evaluate_domains,
    evaluate_pair,
    format_table,
    paired_recall_at_k,
    precision_at_k,
    rank_gallery,
)


def reference_metrics(q, ql, g, gl, ks, paired=None):
    """The definitions written out one query at a time, in the most obvious way."""
    prec: dict[int, list[float]] = {k: [] for k in ks}
    rec: dict[int, list[float]] = {k: [] for k in ks}
    aps: list[float] = []
    for i in range(len(q)):
        scores = [float(np.dot(q[i], g[j])) for j in range(len(g))]
        order = sorted(range(len(g)), key=lambda j: (-scores[j], j))  # ties: lower gallery index first
        rel = [gl[j] == ql[i] for j in order]
        n_rel = sum(rel)
        if paired is not None and paired[i] >= 0:
            for k in ks:
                rec[k].append(1.0 if paired[i] in order[:k] else 0.0)
        if n_rel == 0:
            continue
        for k in ks:
            prec[k].append(sum(rel[:k]) / min(k, n_rel))
        hits, total = 0, 0.0
        for rank, is_rel in enumerate(rel, start=1):
            if is_rel:
                hits += 1
                total += hits / rank
        aps.append(total / n_rel)
    out = {f"P@{k}": float(np.mean(prec[k])) for k in ks}
    out["mAP"] = float(np.mean(aps))
    if paired is not None:
        out.update({f"R@{k}": float(np.mean(rec[k])) for k in ks})
    return out


def tied_data(seed: int, n_q: int = 23, n_g: int = 31, d: int = 4):
    """Small-integer embeddings (exact float dot products, so many exact ties) with duplicated gallery
    rows carrying different labels, a class with fewer gallery items than k, and a query class absent from
    the gallery."""
    rng = np.random.default_rng(seed)
    q = rng.integers(-2, 3, (n_q, d)).astype(np.float32)
    g = rng.integers(-2, 3, (n_g, d)).astype(np.float32)
    g[10:14] = g[3]  # four duplicates of gallery row 3: tied scores for every query
    gl = rng.integers(0, 4, n_g)
    gl[[3, 11, 13]] = [0, 1, 2]  # duplicates with different labels: tie order decides relevance
    gl[20] = 7  # class 7 has a single gallery item (< k for k = 5, 15)
    ql = rng.integers(0, 4, n_q)
    ql[0] = 7
    ql[1] = 9  # no gallery item of class 9: excluded from P@k and mAP
    paired = rng.integers(0, n_g, n_q)
    paired[2] = -1  # unpaired query
    return q, ql, g, gl, paired


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("chunk", [1, 7, 1024])
def test_evaluate_pair_matches_bruteforce(seed: int, chunk: int) -> None:
    q, ql, g, gl, paired = tied_data(seed)
    ks = (1, 5, 15)
    got = evaluate_pair(q, ql, g, gl, ks=ks, paired_index=paired, chunk=chunk)
    want = reference_metrics(q, ql, g, gl, ks, paired)
    assert got["n_query"] == len(q) and got["n_gallery"] == len(g)
    for key, value in want.items():
        assert got[key] == pytest.approx(value, abs=1e-12), key
    assert set(got) == {"n_query", "n_gallery", *want}


def test_evaluate_pair_string_labels_and_k_beyond_gallery() -> None:
    q, ql, g, gl, _ = tied_data(5)
    names = np.array(["cat", "dog", "car", "cup", "x", "y", "z", "w", "v", "u"])
    got = evaluate_pair(q, names[ql], g, names[gl], ks=(1, 40))  # k = 40 > 31 gallery items
    want = reference_metrics(q, names[ql], g, names[gl], (1, 40))
    for key, value in want.items():
        assert got[key] == pytest.approx(value, abs=1e-12)


def test_rank_gallery_breaks_ties_by_gallery_index() -> None:
    q = np.array([[1.0, 0.0]], np.float32)
    g = np.array([[0.0, 1.0], [1.0, 0.0], [0.5, 0.0], [1.0, 0.0], [1.0, 0.0]], np.float32)
    scores, order = rank_gallery(q, g)
    assert order.tolist() == [[1, 3, 4, 2, 0]]
    assert scores.tolist() == [[1.0, 1.0, 1.0, 0.5, 0.0]]


def test_average_precision_hand_computed() -> None:
    rel = np.array([[1, 0, 1, 0, 0, 1], [0, 0, 0, 0, 0, 0], [0, 1, 0, 0, 0, 0]], bool)
    ap = average_precision(rel)
    # Row 0: relevant at ranks 1, 3, 6 -> (1/1 + 2/3 + 3/6) / 3.
    assert ap[0] == pytest.approx((1 + 2 / 3 + 3 / 6) / 3)
    assert math.isnan(ap[1])  # no relevant item: undefined
    assert ap[2] == pytest.approx(0.5)


def test_precision_at_k_ucdir_denominator() -> None:
    rel = np.array([[1, 1, 0, 0, 0, 0], [0, 1, 0, 1, 1, 1], [0, 0, 0, 0, 0, 0]], bool)
    # Row 0 has only 2 relevant items: both in the top 5 -> 2 / min(5, 2) = 1.
    # Row 1 has 4: 3 in the top 5 -> 3 / 4.
    np.testing.assert_allclose(precision_at_k(rel, 5)[:2], [1.0, 0.75])
    assert math.isnan(precision_at_k(rel, 5)[2])
    np.testing.assert_allclose(precision_at_k(rel, 1)[:2], [1.0, 0.0])
    # Truncated ranking with n_relevant from the full gallery.
    np.testing.assert_allclose(precision_at_k(rel[:, :2], 2, np.array([2, 10, 0]))[:2], [1.0, 0.5])
    with pytest.raises(QueryError, match="k must be a positive integer"):
        precision_at_k(rel, 0)


def test_paired_recall_hand_checked() -> None:
    order = np.array([[2, 0, 1], [0, 1, 2], [1, 2, 0]])
    paired = np.array([0, 2, -1])
    r1, r2, r3 = (paired_recall_at_k(order, paired, k) for k in (1, 2, 3))
    np.testing.assert_array_equal(r1[:2], [0.0, 0.0])
    np.testing.assert_array_equal(r2[:2], [1.0, 0.0])
    np.testing.assert_array_equal(r3[:2], [1.0, 1.0])
    assert np.isnan([r1[2], r2[2], r3[2]]).all()


def test_queries_without_relevant_items_are_excluded() -> None:
    q = np.eye(3, dtype=np.float32)
    g = np.eye(3, dtype=np.float32)
    got = evaluate_pair(q, [0, 1, 5], g, [0, 1, 2], ks=(1,))
    assert got["P@1"] == 1.0 and got["mAP"] == 1.0  # query 2 (class 5) left out, not counted as 0
    none = evaluate_pair(q, [7, 8, 9], g, [0, 1, 2], ks=(1,))
    assert none["P@1"] is None and none["mAP"] is None


def test_evaluate_pair_validates_inputs() -> None:
    q = np.ones((2, 3), np.float32)
    g = np.ones((4, 3), np.float32)
    with pytest.raises(QueryError, match="dim 3 != gallery dim 2"):
        evaluate_pair(q, [0, 1], g[:, :2], [0, 0, 1, 1])
    with pytest.raises(DataError, match="query_labels"):
        evaluate_pair(q, [0], g, [0, 0, 1, 1])
    with pytest.raises(QueryError, match="ks entry"):
        evaluate_pair(q, [0, 1], g, [0, 0, 1, 1], ks=(0,))
    bad = g.copy()
    bad[1, 1] = np.nan
    with pytest.raises(DataError, match="NaN"):
        evaluate_pair(q, [0, 1], bad, [0, 0, 1, 1])
    with pytest.raises(DataError, match="paired_index"):
        evaluate_pair(q, [0, 1], g, [0, 0, 1, 1], paired_index=[0, 4])


def test_evaluate_domains_pairs_mean_and_table() -> None:
    rng = np.random.default_rng(3)
    emb = {d: rng.standard_normal((12, 5)).astype(np.float32) for d in ("sketch", "photo", "art")}
    lab = {d: rng.integers(0, 3, 12) for d in emb}
    paired = {("sketch", "photo"): np.arange(12)}
    res = evaluate_domains(emb, lab, ks=(1, 5), paired=paired)
    pairs = [(p["query"], p["gallery"]) for p in res["pairs"]]
    assert len(pairs) == 6 and len(set(pairs)) == 6 and all(a != b for a, b in pairs)
    for p in res["pairs"]:
        a, b = p["query"], p["gallery"]
        want = evaluate_pair(emb[a], lab[a], emb[b], lab[b], ks=(1, 5), paired_index=paired.get((a, b)))
        assert {k: v for k, v in p.items() if k not in ("query", "gallery")} == want
        assert all(0.0 <= p[k] <= 1.0 for k in ("P@1", "P@5", "mAP"))
    assert res["mean"]["mAP"] == pytest.approx(np.mean([p["mAP"] for p in res["pairs"]]))
    # R@k exists only for the paired direction (the first pair), so its mean is that pair's value.
    assert res["mean"]["R@1"] == res["pairs"][0]["R@1"]
    assert all("R@1" not in p for p in res["pairs"][1:])
    assert list(res["mean"]) == ["P@1", "P@5", "mAP", "R@1", "R@5"]

    table = format_table(res).splitlines()
    assert table[0] == "| query | gallery | n_query | n_gallery | P@1 | P@5 | mAP | R@1 | R@5 |"
    assert len(table) == 2 + 6 + 1 and table[-1].startswith("| **mean** |")
    assert all(line.count("|") == table[0].count("|") for line in table)
    assert "–" in table[3]  # an unpaired direction has no R@k


def test_evaluate_domains_validates_domains() -> None:
    emb = {"a": np.ones((2, 2)), "b": np.ones((2, 2))}
    lab = {"a": [0, 1], "b": [0, 1]}
    with pytest.raises(QueryError, match="at least two domains"):
        evaluate_domains(emb, lab, domains=["a"])
    with pytest.raises(QueryError, match="'c'"):
        evaluate_domains(emb, lab, domains=["a", "c"])
    with pytest.raises(QueryError, match="paired key"):
        evaluate_domains(emb, lab, paired={("a", "a"): np.arange(2)})
