"""Pictures of a quality run: retrieval grids, t-SNE embedding maps and loss curves.

Figures are drawn with matplotlib's object API on the Agg canvas (``Figure`` + ``FigureCanvasAgg``), so
nothing here touches pyplot's global state or needs a display.

* :func:`retrieval_grid` — one row per query from domain A: the query, then its top-k results from domain
  B, each framed green (same class as the query) or red.
* :func:`embedding_map` — t-SNE of the embeddings before (backbone) and after adaptation, coloured by
  domain and by class (a 2×2 panel), on at most ``max_points`` points.
* :func:`loss_curves` — the loss terms of a run's ``log.jsonl``: per-step records as thin lines, the
  per-epoch means (``epoch_mean`` records) as markers joined while the set of active terms stays the
  same, and the learning rate below.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import Colormap
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from cdretrieval.data.images import load_image

CORRECT = "#1a9850"
WRONG = "#d73027"
QUERY = "#4575b4"


def _save(fig: Figure, out_path: str | os.PathLike[str]) -> Path:
    """Render ``fig`` with Agg into ``out_path`` (PNG), creating the folder."""
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(out, dpi=fig.dpi, format="png")
    return out


def _thumbnail(path: str, size: int) -> np.ndarray:
    """The image at ``path`` as an RGB array fitted into ``size``×``size`` (grey placeholder if unreadable)."""
    try:
        img = load_image(path)
    except (OSError, ValueError):
        return np.full((size, size, 3), 200, np.uint8)
    img.thumbnail((size, size))
    return np.asarray(img)


def _framed(ax: Axes, image: np.ndarray, colour: str, caption: str) -> None:
    """Show ``image`` in ``ax`` with a thick coloured frame and a caption underneath."""
    ax.imshow(image)
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(True)
        spine.set_edgecolor(colour)
        spine.set_linewidth(4)
    ax.set_xlabel(caption, fontsize=7)


def retrieval_grid(
    query_paths: Sequence[str],
    query_labels: Sequence[str],
    result_paths: Sequence[Sequence[str]],
    result_labels: Sequence[Sequence[str]],
    out_path: str | os.PathLike[str],
    *,
    scores: Sequence[Sequence[float]] | None = None,
    title: str | None = None,
    thumb: int = 96,
) -> Path:
    """Draw queries (first column) and their ranked results; results of the query's class framed green.

    Args:
        query_paths, query_labels: ``Q`` query images and their classes.
        result_paths, result_labels: ``Q`` rows of ``k`` ranked gallery images and their classes.
        out_path: the PNG to write.
        scores: optional ``Q × k`` similarity scores, printed under each result.
        title: figure title.
        thumb: thumbnail side in pixels.

    Returns:
        ``out_path`` as a Path.
    """
    n_q = len(query_paths)
    if n_q == 0:
        raise ValueError("retrieval_grid needs at least one query")
    rows = [len(query_labels), len(result_paths), len(result_labels)] + ([len(scores)] if scores is not None else [])
    if any(n != n_q for n in rows):
        raise ValueError(f"queries, their labels, results (and scores) must have {n_q} rows, got {rows}")
    k = len(result_paths[0])
    widths = {len(r) for r in result_paths} | {len(r) for r in result_labels}
    if scores is not None:
        widths |= {len(r) for r in scores}
    if k == 0 or widths != {k}:
        raise ValueError(f"every result row needs the same k ≥ 1 paths, labels (and scores), got widths {widths}")
    fig = Figure(figsize=(1.3 * (k + 1), 1.45 * n_q + (0.4 if title else 0.0)), dpi=100)
    axes = fig.subplots(n_q, k + 1, squeeze=False)
    for i in range(n_q):
        _framed(axes[i][0], _thumbnail(query_paths[i], thumb), QUERY, f"query: {query_labels[i]}")
        for j in range(k):
            ok = result_labels[i][j] == query_labels[i]
            caption = str(result_labels[i][j]) + (f" {scores[i][j]:.2f}" if scores is not None else "")
            _framed(axes[i][j + 1], _thumbnail(result_paths[i][j], thumb), CORRECT if ok else WRONG, caption)
    for j in range(k):
        axes[0][j + 1].set_title(f"#{j + 1}", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, out_path)


# --------------------------------------------------------------------------------------------- t-SNE


def _check_embedding_sets(
    before: Mapping[str, Any], after: Mapping[str, Any], labels: Mapping[str, Sequence[Any]]
) -> list[str]:
    domains = list(before)
    if not domains or set(after) != set(domains) or set(labels) != set(domains):
        raise ValueError(
            f"before, after and labels must name the same domains, got {sorted(before)}, {sorted(after)}, "
            f"{sorted(labels)}"
        )
    for d in domains:
        n = len(labels[d])
        if np.asarray(before[d]).shape[0] != n or np.asarray(after[d]).shape[0] != n:
            raise ValueError(
                f"domain {d!r}: before {np.asarray(before[d]).shape}, after {np.asarray(after[d]).shape} and "
                f"{n} labels must have the same number of rows"
            )
    return domains


def _subsample(sizes: Mapping[str, int], max_points: int, seed: int) -> dict[str, np.ndarray]:
    """Row indices per domain, proportional to the domain sizes, at most ``max_points`` in all."""
    total = sum(sizes.values())
    rng = np.random.default_rng(seed)
    out = {}
    for d, n in sizes.items():
        take = n if total <= max_points else max(1, round(n * max_points / total))
        out[d] = np.sort(rng.choice(n, size=min(n, take), replace=False))
    return out


def tsne_2d(x: np.ndarray, seed: int = 0) -> np.ndarray:
    """``[N, D]`` → ``[N, 2]`` t-SNE (after PCA to ≤ 50 dims); perplexity adapted to small ``N``."""
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE

    n = x.shape[0]
    if n < 5:
        raise ValueError(f"t-SNE needs at least 5 points, got {n}")
    x = x.astype(np.float32)
    if x.shape[1] > 50 and n > 50:
        x = PCA(n_components=50, random_state=seed).fit_transform(x)
    perplexity = float(min(30.0, max(2.0, (n - 1) / 3)))
    # exact gradients are faster than Barnes-Hut for a few hundred points; 500 iterations suffice for a
    # picture; one thread, as the benchmark machines are shared
    tsne = TSNE(
        n_components=2, perplexity=perplexity, init="pca", learning_rate="auto", random_state=seed, max_iter=500,
        method="exact" if n <= 300 else "barnes_hut", n_jobs=1,
    )
    return np.asarray(tsne.fit_transform(x))


def _palette(n: int) -> list[Any]:
    """``n`` distinguishable colours (tab10/tab20 when they suffice, else a hue wheel)."""
    from matplotlib import colormaps

    name = "tab10" if n <= 10 else "tab20" if n <= 20 else "hsv"
    cmap: Colormap = colormaps[name]
    if name == "hsv":
        return [cmap(i / n) for i in range(n)]
    return [cmap(i) for i in range(n)]


def _scatter(ax: Axes, xy: np.ndarray, groups: Sequence[str], title: str, legend_max: int = 20) -> None:
    """Scatter ``xy`` coloured by ``groups``; a legend when there are few groups."""
    names = sorted(set(groups), key=str)
    colours = dict(zip(names, _palette(len(names)), strict=True))
    g = np.asarray(groups, dtype=object)
    for name in names:
        sel = g == name
        ax.scatter(xy[sel, 0], xy[sel, 1], s=6, color=colours[name], alpha=0.7, linewidths=0, label=str(name))
    ax.set_title(title, fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
    if len(names) <= legend_max:
        ax.legend(fontsize=6, markerscale=2, loc="best", ncol=1 if len(names) <= 10 else 2, frameon=False)


def embedding_map(
    before: Mapping[str, Any],
    after: Mapping[str, Any],
    labels: Mapping[str, Sequence[Any]],
    out_path: str | os.PathLike[str],
    *,
    max_points: int = 2000,
    seed: int = 0,
    title: str | None = None,
    names: tuple[str, str] = ("before (backbone)", "after adaptation (head)"),
) -> Path:
    """2×2 t-SNE panel: rows before / after adaptation, columns coloured by domain / by class.

    Args:
        before: domain → ``[N_d, D1]`` embeddings before adaptation.
        after: domain → ``[N_d, D2]`` embeddings after adaptation, same rows (images) as ``before``.
        labels: domain → ``N_d`` class labels.
        out_path: the PNG to write.
        max_points: at most this many points in all (the same subsample in both rows).
        seed: subsampling and t-SNE seed.
        title: figure title.
        names: the two row names.
    """
    domains = _check_embedding_sets(before, after, labels)
    if max_points < 5:
        raise ValueError(f"max_points must be ≥ 5, got {max_points}")
    keep = _subsample({d: len(labels[d]) for d in domains}, max_points, seed)
    dom = [d for d in domains for _ in keep[d]]
    cls = [str(labels[d][i]) for d in domains for i in keep[d]]
    fig = Figure(figsize=(10, 9.5), dpi=100)
    axes = fig.subplots(2, 2, squeeze=False)
    for row, (name, sets) in enumerate(zip(names, (before, after), strict=True)):
        x = np.concatenate([np.asarray(sets[d], dtype=np.float32)[keep[d]] for d in domains])
        xy = tsne_2d(x, seed)
        _scatter(axes[row][0], xy, dom, f"{name}: by domain")
        _scatter(axes[row][1], xy, cls, f"{name}: by class")
    fig.suptitle(title or f"t-SNE of {len(dom)} embeddings", fontsize=11)
    fig.tight_layout()
    return _save(fig, out_path)


# --------------------------------------------------------------------------------------------- loss curves


def read_log(log_jsonl_path: str | os.PathLike[str]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(per-step records, per-epoch records) of a run's ``log.jsonl``; ``ValueError`` naming a bad line."""
    path = Path(log_jsonl_path)
    if not path.is_file():
        raise ValueError(f"log file {path} not found")
    steps: list[dict[str, Any]] = []
    epochs: list[dict[str, Any]] = []
    for lineno, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            rec = json.loads(raw)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{lineno}: not JSON ({e})") from e
        if not isinstance(rec, dict) or "step" not in rec:
            raise ValueError(f"{path}:{lineno}: expected an object with a 'step', got {raw[:80]!r}")
        (epochs if "epoch_mean" in rec else steps).append(rec)
    return steps, epochs


def _terms(records: Sequence[Mapping[str, Any]]) -> list[str]:
    """Numeric loss-term names in first-seen order (``total`` last)."""
    seen: dict[str, None] = {}
    for rec in records:
        for k, v in rec.items():
            if k not in ("epoch", "step", "lr") and isinstance(v, (int, float)) and math.isfinite(v):
                seen.setdefault(k, None)
    names = [k for k in seen if k != "total"]
    return [*names, "total"] if "total" in seen else names


def _same_terms(records: Sequence[Mapping[str, Any]]) -> list[list[Mapping[str, Any]]]:
    """Consecutive records with the same set of terms: epoch means are joined by lines only within one
    (when a term starts, ``total`` changes meaning and a line across the change would mislead)."""
    out: list[list[Mapping[str, Any]]] = []
    for rec in records:
        if out and set(out[-1][-1]) == set(rec):
            out[-1].append(rec)
        else:
            out.append([rec])
    return out


def loss_curves(
    log_jsonl_path: str | os.PathLike[str],
    out_path: str | os.PathLike[str] | None = None,
    *,
    title: str | None = None,
) -> Path:
    """Plot the loss terms (and learning rate) of a run's ``log.jsonl``; returns the PNG path.

    The default ``out_path`` is ``loss_curves.png`` next to the log.
    """
    steps, epochs = read_log(log_jsonl_path)
    epoch_means = [{"step": r["step"], **r["epoch_mean"]} for r in epochs if isinstance(r["epoch_mean"], dict)]
    names = _terms([*steps, *epoch_means])
    if not names:
        raise ValueError(f"{log_jsonl_path}: no loss records")
    has_lr = any(isinstance(r.get("lr"), (int, float)) for r in steps)
    fig = Figure(figsize=(9, 6.5 if has_lr else 5), dpi=100)
    if has_lr:
        ax, ax_lr = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    else:
        ax, ax_lr = fig.subplots(1, 1), None
    colours = dict(zip(names, _palette(len(names)), strict=True))
    for name in names:
        pts = [(r["step"], r[name]) for r in steps if isinstance(r.get(name), (int, float))]
        if pts:
            x, y = zip(*pts, strict=True)
            ax.plot(x, y, color=colours[name], linewidth=0.8, alpha=0.45)
        for segment in _same_terms(epoch_means):
            ep = [(r["step"], r[name]) for r in segment if isinstance(r.get(name), (int, float))]
            if ep:
                x, y = zip(*ep, strict=True)
                ax.plot(x, y, color=colours[name], linewidth=2 if name == "total" else 1.5, marker="o",
                        markersize=3)
    handles = [Line2D([0], [0], color=colours[n], linewidth=2, label=n) for n in names]
    ax.legend(handles=handles, fontsize=8, loc="best")
    ax.set_ylabel("loss (unweighted term; total = weighted sum)")
    ax.grid(alpha=0.3)
    ax.set_title(title or f"loss terms: per step (thin) and epoch means (markers) — {Path(log_jsonl_path).name}",
                 fontsize=10)
    if ax_lr is not None:
        lr = [(r["step"], r["lr"]) for r in steps if isinstance(r.get("lr"), (int, float))]
        x, y = zip(*lr, strict=True)
        ax_lr.plot(x, y, color="black", linewidth=1)
        ax_lr.set_ylabel("lr")
        ax_lr.grid(alpha=0.3)
        ax_lr.set_xlabel("step")
    else:
        ax.set_xlabel("step")
    fig.tight_layout()
    out = Path(out_path) if out_path is not None else Path(log_jsonl_path).with_name("loss_curves.png")
    return _save(fig, out)
