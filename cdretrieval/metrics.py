"""Cross-domain retrieval metrics (UCDIR protocol, Hu & Lee ECCV 2022): P@k, mAP, paired recall@k, in numpy.

Conventions shared by every function here:

* Similarity is the inner product of the embeddings (cosine when they are L2-normalised).
* A gallery is ranked by descending score; equal scores keep gallery order (stable sort on ``-score``), so
  results are deterministic and a tie never favours a relevant item by accident.
* P@k uses UCDIR's denominator ``min(k, #relevant in gallery)``: a query whose class has only 3 gallery
  items can still reach P@15 = 1.
* A query with no relevant gallery item has no defined P@k or AP: the per-query functions give NaN for it
  and the means (``evaluate_pair``) leave it out. A mean over no query at all is ``None`` (JSON ``null``).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from pathlib import PurePath
from typing import Any

import numpy as np

from cdretrieval.errors import DataError, QueryError
from cdretrieval.rerank import (
    ArrayGallery,
    RerankParams,
    alpha_query_expansion,
    database_side_augmentation,
    l2_normalize,
)

Metrics = dict[str, Any]


def _to_numpy(x: Any) -> np.ndarray:
    """Array view of ``x``; a torch tensor (any device) is detached and copied to host first."""
    if hasattr(x, "detach") and hasattr(x, "cpu"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _check_k(k: Any, name: str = "k") -> int:
    """``k`` as a positive int, else ``QueryError`` naming it."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise QueryError(f"{name} must be a positive integer, got {k!r}")
    return int(k)


def _check_embeddings(x: Any, name: str) -> np.ndarray:
    """``x`` as a finite 2-D float array [N, D] (float32 unless already float64)."""
    a = _to_numpy(x)
    if a.ndim != 2:
        raise DataError(f"{name} must be 2-D [N, D], got shape {a.shape}")
    if a.shape[1] == 0:
        raise DataError(f"{name} has zero-dimensional embeddings (shape {a.shape})")
    if a.dtype != np.float64:
        a = a.astype(np.float32, copy=False)
    if not np.isfinite(a).all():
        raise DataError(f"{name} contains NaN or infinite values")
    return a


def _check_labels(labels: Any, n: int, name: str) -> np.ndarray:
    """``labels`` as a 1-D array of length ``n``."""
    a = _to_numpy(labels)
    if a.ndim != 1 or a.shape[0] != n:
        raise DataError(f"{name} must be 1-D with {n} entries (one per embedding), got shape {a.shape}")
    return a


def rank_gallery(query_emb: Any, gallery_emb: Any) -> tuple[np.ndarray, np.ndarray]:
    """Rank the gallery for each query by inner product.

    Args:
        query_emb: [Q, D] query embeddings.
        gallery_emb: [G, D] gallery embeddings.

    Returns:
        ``(scores, order)``, both [Q, G]: ``order[q]`` lists gallery indices best first and
        ``scores[q, r] = <query q, gallery order[q, r]>``. Ties keep ascending gallery index.
    """
    q = _check_embeddings(query_emb, "query_emb")
    g = _check_embeddings(gallery_emb, "gallery_emb")
    if q.shape[1] != g.shape[1]:
        raise QueryError(f"query dim {q.shape[1]} != gallery dim {g.shape[1]}")
    sims = q @ g.T  # [Q, G]
    # Stable sort of the negated scores: descending by score, ascending index among equal scores.
    order = np.argsort(-sims, axis=1, kind="stable")  # [Q, G]
    scores = np.take_along_axis(sims, order, axis=1)  # [Q, G]
    return scores, order


def _check_relevance(relevance_sorted: Any) -> np.ndarray:
    """``relevance_sorted`` as a 2-D bool array [Q, G]."""
    rel = _to_numpy(relevance_sorted)
    if rel.ndim != 2:
        raise DataError(f"relevance_sorted must be 2-D [Q, G], got shape {rel.shape}")
    if rel.dtype != np.bool_:
        if not np.isin(rel, (0, 1)).all():
            raise DataError("relevance_sorted must be boolean (or 0/1)")
        rel = rel.astype(bool)
    return rel


def precision_at_k(relevance_sorted: Any, k: int, n_relevant: Any | None = None) -> np.ndarray:
    """UCDIR precision at k: (#relevant among the top k) / min(k, #relevant in the gallery).

    Args:
        relevance_sorted: [Q, G'] bool, ``True`` where the item at that rank is relevant. It may be cut to
            the first ``G' >= min(k, G)`` ranks when ``n_relevant`` is given.
        k: cut-off, >= 1. ``k > G'`` counts the whole row.
        n_relevant: [Q] number of relevant items in the *whole* gallery; by default the row sums.

    Returns:
        [Q] float64; NaN for a query with no relevant gallery item (left out of means).
    """
    k = _check_k(k)
    rel = _check_relevance(relevance_sorted)
    if n_relevant is None:
        n_rel = rel.sum(axis=1)
    else:
        n_rel = _to_numpy(n_relevant)
        if n_rel.shape != (rel.shape[0],):
            raise DataError(f"n_relevant must have shape ({rel.shape[0]},), got {n_rel.shape}")
    hits = rel[:, :k].sum(axis=1)  # [Q]
    denom = np.minimum(k, n_rel).astype(np.float64)  # [Q]
    if (hits > denom).any():
        raise DataError("n_relevant is smaller than the relevant items counted in the top k")
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, hits / denom, np.nan)


def average_precision(relevance_sorted: Any) -> np.ndarray:
    """Average precision over the whole ranked gallery.

    AP = mean over the relevant ranks r (1-based) of precision@r = (#relevant in the top r) / r.

    Args:
        relevance_sorted: [Q, G] bool, the full ranking (not truncated).

    Returns:
        [Q] float64; NaN for a query with no relevant gallery item.
    """
    rel = _check_relevance(relevance_sorted)
    n_rel = rel.sum(axis=1)  # [Q]
    hits_so_far = np.cumsum(rel, axis=1, dtype=np.int64)  # [Q, G]
    ranks = np.arange(1, rel.shape[1] + 1, dtype=np.float64)  # [G]
    prec_sum = np.where(rel, hits_so_far / ranks, 0.0).sum(axis=1)  # [Q]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n_rel > 0, prec_sum / n_rel, np.nan)


def paired_rows(
    paths: Mapping[str, Sequence[str]], pairs: Sequence[tuple[str, str]]
) -> dict[tuple[str, str], np.ndarray]:
    """For instance-paired domains, ``(query, gallery)`` → ``[N_query]`` gallery row of the same file stem (-1:
    none): the ``paired`` argument of :func:`evaluate_domains`. ``paths`` holds each domain's file per row.

    MNIST image i and MNIST-M image i share the stem; a stem repeated within one domain pairs with nothing.
    Pairs with a domain missing from ``paths`` are left out.
    """

    def stems(rows_paths: Sequence[str]) -> dict[str, int]:
        rows: dict[str, int] = {}
        repeated: set[str] = set()
        for j, p in enumerate(rows_paths):
            s = PurePath(p).stem
            if s in rows:
                repeated.add(s)
            rows[s] = j
        return {s: j for s, j in rows.items() if s not in repeated}

    out: dict[tuple[str, str], np.ndarray] = {}
    for a, b in pairs:
        if a in paths and b in paths:
            for q, g in ((a, b), (b, a)):
                gallery = stems(paths[g])
                out[(q, g)] = np.array([gallery.get(PurePath(p).stem, -1) for p in paths[q]], np.int64)
    return out


def paired_recall_at_k(order: Any, paired_index: Any, k: int) -> np.ndarray:
    """Instance-level recall@k: 1 when the query's paired gallery item is in its top k, else 0.

    Args:
        order: [Q, G'] gallery indices best first (``G' >= min(k, G)``; the rest may be cut).
        paired_index: [Q] int, the gallery index paired with each query (e.g. MNIST image i ↔ MNIST-M
            image i); a negative value means "no pair" and gives NaN.
        k: cut-off, >= 1.

    Returns:
        [Q] float64 in {0, 1}, NaN where unpaired.
    """
    k = _check_k(k)
    ordr = _to_numpy(order)
    pidx = _to_numpy(paired_index)
    if ordr.ndim != 2:
        raise DataError(f"order must be 2-D [Q, G], got shape {ordr.shape}")
    if pidx.shape != (ordr.shape[0],) or not np.issubdtype(pidx.dtype, np.integer):
        raise DataError(
            f"paired_index must be integers of shape ({ordr.shape[0]},), got {pidx.dtype} {pidx.shape}"
        )
    found = (ordr[:, :k] == pidx[:, None]).any(axis=1)  # [Q]
    return np.where(pidx >= 0, found.astype(np.float64), np.nan)


def _encode_labels(
    query_labels: np.ndarray, gallery_labels: np.ndarray
) -> tuple[np.ndarray, np.ndarray, int]:
    """Map arbitrary hashable labels to shared integer codes: ([Q] int64, [G] int64, number of codes)."""
    codes: dict[Any, int] = {}
    g = np.fromiter((codes.setdefault(x, len(codes)) for x in gallery_labels.tolist()), np.int64,
                    count=len(gallery_labels))
    # A query label absent from the gallery gets a fresh code (relevant to nothing).
    q = np.fromiter((codes.setdefault(x, len(codes)) for x in query_labels.tolist()), np.int64,
                    count=len(query_labels))
    return q, g, len(codes)


def _nanmean_or_none(values: np.ndarray) -> float | None:
    """Mean over the non-NaN entries, ``None`` when there is none."""
    finite = values[~np.isnan(values)]
    return float(finite.mean()) if finite.size else None


def evaluate_pair(
    query_emb: Any,
    query_labels: Any,
    gallery_emb: Any,
    gallery_labels: Any,
    ks: Sequence[int] = (1, 5, 15),
    paired_index: Any | None = None,
    chunk: int = 1024,
) -> Metrics:
    """Retrieval quality of one directed domain pair (queries from A, gallery from B).

    Args:
        query_emb: [Q, D]; query_labels: [Q] (class, any hashable).
        gallery_emb: [G, D]; gallery_labels: [G].
        ks: cut-offs for P@k (and R@k).
        paired_index: optional [Q] int, gallery index paired with each query (negative = none); adds R@k.
        chunk: queries ranked at a time; peak memory is about ``chunk * G * 21`` bytes.

    Returns:
        ``{"n_query", "n_gallery", "P@k" for k in ks, "mAP", "R@k" when paired}``; metric values are means
        over the queries that have at least one relevant gallery item (paired ones for R@k), ``None`` when
        there is no such query.
    """
    q = _check_embeddings(query_emb, "query_emb")
    g = _check_embeddings(gallery_emb, "gallery_emb")
    if q.shape[0] == 0 or g.shape[0] == 0:
        raise DataError(f"need at least one query and one gallery item, got Q={q.shape[0]}, G={g.shape[0]}")
    if q.shape[1] != g.shape[1]:
        raise QueryError(f"query dim {q.shape[1]} != gallery dim {g.shape[1]}")
    ql = _check_labels(query_labels, q.shape[0], "query_labels")
    gl = _check_labels(gallery_labels, g.shape[0], "gallery_labels")
    ks = [_check_k(k, "ks entry") for k in ks]
    if not ks:
        raise QueryError("ks must name at least one cut-off")
    chunk = _check_k(chunk, "chunk")
    pidx = None
    if paired_index is not None:
        pidx = _to_numpy(paired_index)
        if pidx.shape != (q.shape[0],) or not np.issubdtype(pidx.dtype, np.integer):
            raise DataError(
                f"paired_index must be integers of shape ({q.shape[0]},), got {pidx.dtype} {pidx.shape}"
            )
        if (pidx >= g.shape[0]).any():
            raise DataError(f"paired_index has entries >= gallery size {g.shape[0]} (max {int(pidx.max())})")

    q_codes, g_codes, n_codes = _encode_labels(ql, gl)
    n_relevant = np.bincount(g_codes, minlength=n_codes)[q_codes]  # [Q]

    n_q = q.shape[0]
    prec = {k: np.empty(n_q) for k in ks}
    rec = {k: np.empty(n_q) for k in ks} if pidx is not None else {}
    ap = np.empty(n_q)
    for start in range(0, n_q, chunk):
        sl = slice(start, min(start + chunk, n_q))
        _, order = rank_gallery(q[sl], g)  # [C, G]
        relevance = g_codes[order] == q_codes[sl, None]  # [C, G] bool
        for k in ks:
            prec[k][sl] = precision_at_k(relevance, k, n_relevant[sl])
            if pidx is not None:
                rec[k][sl] = paired_recall_at_k(order, pidx[sl], k)
        ap[sl] = average_precision(relevance)

    out: Metrics = {"n_query": int(n_q), "n_gallery": int(g.shape[0])}
    for k in ks:
        out[f"P@{k}"] = _nanmean_or_none(prec[k])
    out["mAP"] = _nanmean_or_none(ap)
    for k in rec:
        out[f"R@{k}"] = _nanmean_or_none(rec[k])
    return out


def _metric_keys(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """Metric names present in ``rows``, in first-seen order (P@k, mAP, R@k as evaluate_pair emits them)."""
    keys: dict[str, None] = {}
    for row in rows:
        for key in row:
            if key.startswith(("P@", "R@")) or key == "mAP":
                keys.setdefault(key, None)
    return list(keys)


def evaluate_domains(
    embeddings: Mapping[str, Any],
    labels: Mapping[str, Any],
    domains: Sequence[str] | None = None,
    ks: Sequence[int] = (1, 5, 15),
    paired: Mapping[tuple[str, str], Any] | None = None,
    chunk: int = 1024,
    rerank: RerankParams | None = None,
) -> dict[str, Any]:
    """Evaluate every directed pair (A → B, A ≠ B) of ``domains``, each domain both as query and gallery.

    Args:
        embeddings: domain → [N_d, D] embeddings.
        labels: domain → [N_d] class labels.
        domains: the domains to use, in table order (default: the keys of ``embeddings``); at least two.
        ks: cut-offs for P@k / R@k.
        paired: optional (A, B) → [N_A] int paired gallery index in B for each query of A (adds R@k).
        chunk: see :func:`evaluate_pair`.
        rerank: re-ranking as served (:mod:`cdretrieval.rerank`): each gallery domain is replaced by its
            database-side augmentation (L2-normalised float32, neighbour graph as at index time), queries
            stay raw (a query is a new image) and get α-query expansion against each gallery domain
            (exact search) before the gallery is ranked. This is what a
            :class:`~cdretrieval.retrieval.Retriever` over flat indexes built with the same params returns.

    Returns:
        ``{"pairs": [{"query": A, "gallery": B, "n_query", "n_gallery", "P@k"..., "mAP", "R@k"...}],
        "mean": {metric: mean over the pairs that have it (None if none)}}``.
    """
    names = list(embeddings) if domains is None else list(domains)
    if len(names) < 2:
        raise QueryError(f"need at least two domains to evaluate, got {names}")
    if len(set(names)) != len(names):
        raise QueryError(f"domains listed twice in {names}")
    for d in names:
        if d not in embeddings or d not in labels:
            raise QueryError(
                f"domain {d!r} has no embeddings or labels; "
                f"available: {sorted(set(embeddings) & set(labels))}"
            )
    paired = paired or {}
    for a, b in paired:
        if a not in names or b not in names or a == b:
            raise QueryError(f"paired key {(a, b)!r} is not a pair of distinct evaluated domains {names}")
    if rerank is not None and not isinstance(rerank, RerankParams):
        raise QueryError(f"rerank must be a RerankParams or None, got {rerank!r}")

    queries: Mapping[str, Any] = embeddings
    galleries: Mapping[str, Any] = embeddings
    expand: dict[str, ArrayGallery] = {}
    if rerank is not None:
        queries = {d: _unit_rows(embeddings[d], f"embeddings[{d!r}]") for d in names}  # [N_d, D] float32
        galleries = {d: database_side_augmentation(queries[d], rerank) for d in names}
        expand = {d: ArrayGallery(galleries[d]) for d in names}

    rows: list[dict[str, Any]] = []
    for a, b in itertools.permutations(names, 2):
        q = queries[a]
        if rerank is not None:
            q = alpha_query_expansion(q, expand[b], rerank)  # specific to gallery domain b
        metrics = evaluate_pair(
            q,
            labels[a],
            galleries[b],
            labels[b],
            ks=ks,
            paired_index=paired.get((a, b)),
            chunk=chunk,
        )
        rows.append({"query": a, "gallery": b, **metrics})

    mean: dict[str, float | None] = {}
    for key in _metric_keys(rows):
        vals = [row[key] for row in rows if row.get(key) is not None]
        mean[key] = float(np.mean(vals)) if vals else None
    return {"pairs": rows, "mean": mean}


def _unit_rows(x: Any, name: str) -> np.ndarray:
    """``x`` [N, D] as L2-normalised float32 rows; ``DataError`` naming ``name`` otherwise."""
    a = _check_embeddings(x, name)
    if a.shape[0] == 0:
        raise DataError(f"{name} has no rows")
    try:
        return l2_normalize(a, name)
    except ValueError as e:
        raise DataError(str(e)) from e


def _fmt(value: Any) -> str:
    """A table cell: 4 decimals for floats, '–' for missing/undefined."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def format_table(result: Mapping[str, Any]) -> str:
    """Markdown table of an :func:`evaluate_domains` result: one row per pair, then the mean row."""
    if "pairs" not in result or "mean" not in result:
        raise DataError(f"not an evaluate_domains result (keys {sorted(result)}); need 'pairs' and 'mean'")
    rows: Sequence[Mapping[str, Any]] = result["pairs"]
    metric_keys = _metric_keys([*rows, result["mean"]])
    header = ["query", "gallery", "n_query", "n_gallery", *metric_keys]
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join(["---"] * 2 + ["---:"] * (len(header) - 2)) + "|",
    ]
    for row in rows:
        cells = [_fmt(row.get(h)) for h in header]
        lines.append("| " + " | ".join(cells) + " |")
    mean = result["mean"]
    lines.append("| **mean** | | | | " + " | ".join(_fmt(mean.get(k)) for k in metric_keys) + " |")
    return "\n".join(lines)
