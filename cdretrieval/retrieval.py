"""Query an image from one domain, get the nearest images of other domains: :class:`Retriever`.

A query can be a file path, raw file bytes (an upload), a PIL image, a numpy array or a torch tensor;
every form is turned into the same RGB PIL image and then the same eval transform the gallery went
through, so one image gives one embedding whatever form it arrives in.

Re-ranking (:mod:`cdretrieval.rerank`): when a target domain's index was built with re-ranking (its
manifest records the params), the query is expanded against that domain (αQE: one extra search) and the
results come from a second search with the expanded query; their scores are those of the expanded query.
``rerank=False`` searches plainly, ``True`` expands even over an index built without re-ranking (with
:data:`~cdretrieval.rerank.DEFAULT_RERANK`; that gallery has no DBA).
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Union

import numpy as np
import torch
from PIL import Image

from cdretrieval.data.images import as_rgb_image, load_image, load_image_bytes
from cdretrieval.data.transforms import eval_transform
from cdretrieval.device import autocast
from cdretrieval.errors import ImageLoadError, IndexMismatchError, QueryError
from cdretrieval.index import IndexSet, Item, UseGpu, _normalised_rows
from cdretrieval.pipeline import LoadedModel, load_run_index
from cdretrieval.rerank import DEFAULT_RERANK, RerankParams, alpha_query_expansion
from cdretrieval.run import INDEX_DIR

#: Everything :meth:`Retriever.encode` accepts.
Query = Union[str, os.PathLike, bytes, bytearray, memoryview, Image.Image, np.ndarray, torch.Tensor]  # noqa: UP007


@dataclass(frozen=True)
class SearchResult:
    """One hit: ``rank`` is 1-based, ``score`` the cosine similarity, ``item_id`` the row in its domain's index."""

    rank: int
    path: str
    domain: str
    score: float
    label: str | None
    item_id: int

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return asdict(self)


# ---------------------------------------------------------------------------------------------------------
# Query → RGB image


def _array_to_image(a: np.ndarray, what: str) -> Image.Image:
    """``(H,W)``, ``(H,W,1)``, ``(H,W,3)`` or ``(H,W,4)`` uint8, or float in [0, 1] → RGB PIL image."""
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    if not (a.ndim == 2 or (a.ndim == 3 and a.shape[2] in (3, 4))):
        raise QueryError(f"{what} must have shape (H,W), (H,W,3) or (H,W,4), got {a.shape}")
    if a.shape[0] < 1 or a.shape[1] < 1:
        raise QueryError(f"{what} has no pixels (shape {a.shape})")
    if np.issubdtype(a.dtype, np.floating):
        if not np.isfinite(a).all():
            raise QueryError(f"{what} contains NaN or infinite values")
        lo, hi = float(a.min()), float(a.max())
        if lo < -1e-6 or hi > 1 + 1e-6:
            raise QueryError(f"{what} is float with values in [{lo:.3g}, {hi:.3g}]; expected [0, 1] (or use uint8)")
        a = (np.clip(a, 0.0, 1.0) * 255.0).round().astype(np.uint8)  # exact inverse of ToTensor's x / 255
    elif a.dtype != np.uint8:
        raise QueryError(f"{what} must be uint8 or float in [0, 1], got dtype {a.dtype}")
    mode = "L" if a.ndim == 2 else ("RGB" if a.shape[2] == 3 else "RGBA")
    return as_rgb_image(Image.fromarray(np.ascontiguousarray(a), mode=mode), what)


def query_to_image(query: Any, name: str = "query") -> Image.Image:
    """Any accepted query form (see :data:`Query`) → an RGB PIL image.

    Raises:
        QueryError: unsupported type, wrong shape or dtype, unreadable or missing file, corrupt bytes.
    """
    try:
        if isinstance(query, (str, os.PathLike)):
            return load_image(query)
        if isinstance(query, (bytes, bytearray, memoryview)):
            return load_image_bytes(bytes(query), name)
        if isinstance(query, Image.Image):
            return as_rgb_image(query, name)
        if isinstance(query, torch.Tensor):
            if query.is_meta or query.layout != torch.strided:
                raise QueryError(f"{name} tensor must be a dense tensor with data, got layout {query.layout} "
                                 f"on device {query.device}")
            t = query.detach().cpu()
            if t.ndim != 3 or t.shape[0] not in (1, 3):
                raise QueryError(f"{name} tensor must have shape (3,H,W) (or (1,H,W)), got {tuple(t.shape)}")
            if not (t.dtype.is_floating_point or t.dtype == torch.uint8):
                raise QueryError(f"{name} tensor must be float in [0, 1] or uint8, got {t.dtype}")
            return _array_to_image(t.float().numpy().transpose(1, 2, 0) if t.dtype.is_floating_point
                                   else t.numpy().transpose(1, 2, 0), f"{name} tensor")  # (C,H,W) → (H,W,C)
        if isinstance(query, np.ndarray):
            return _array_to_image(query, f"{name} array")
    except ImageLoadError as e:
        raise QueryError(str(e)) from e
    raise QueryError(
        f"{name} must be a path, bytes, PIL image, numpy array or torch tensor, got {type(query).__name__}"
    )


# ---------------------------------------------------------------------------------------------------------


class Retriever:
    """Cross-domain search over a run's per-domain indexes.

    Build with :meth:`from_run`. Safe to share between threads: the model forward runs under a lock (CPU
    FAISS searches run concurrently; a GPU index is searched under a lock as well).

    Args:
        model: the encoder (its ``feature`` and ``image_size`` must be those the index was built with).
        indexes: one index per domain, built with ``model``.
        index_dir: where the indexes were loaded from (reported by :meth:`info`).
    """

    def __init__(self, model: LoadedModel, indexes: IndexSet, *, index_dir: str | os.PathLike[str] | None = None):
        if indexes.dim != model.dim:
            raise IndexMismatchError(
                f"the indexes hold {indexes.dim}-d vectors but the model's {model.feature!r} feature is "
                f"{model.dim}-d; rebuild them with `cdretrieval index --run RUN_DIR ...`"
            )
        self.model = model
        self.indexes = indexes
        self.index_dir = Path(index_dir) if index_dir is not None else None
        self._transform = eval_transform(model.image_size)
        self._model_lock = threading.Lock()
        on_gpu = any(indexes[d].on_gpu for d in indexes)
        self._index_lock: threading.Lock | None = threading.Lock() if on_gpu else None
        # Normalised absolute path → stored path, for resolve_item_path (no file system access per call).
        self._paths = {
            os.path.normpath(os.path.abspath(it.path)): it.path for d in indexes for it in indexes[d].items
        }

    @classmethod
    def from_run(
        cls,
        run_dir: str | os.PathLike[str],
        *,
        device: str | torch.device = "auto",
        index_dir: str | os.PathLike[str] | None = None,
        use_gpu: UseGpu = "auto",
    ) -> Retriever:
        """Load a run's encoder and its indexes (default ``RUN_DIR/index``).

        Raises:
            CheckpointError: no usable run. IndexFileError: no (complete) index; build it with
                ``cdretrieval index --run RUN_DIR --data ROOT``. IndexMismatchError: the index was built with
                another model; the message says to rerun ``cdretrieval index --run RUN_DIR ...``.
        """
        model, indexes = load_run_index(run_dir, index_dir=index_dir, device=device, use_gpu=use_gpu)
        assert model.run_dir is not None
        return cls(model, indexes, index_dir=index_dir if index_dir is not None else model.run_dir / INDEX_DIR)

    # -- description ------------------------------------------------------------------------------------
    @property
    def domains(self) -> list[str]:
        """The indexed domains."""
        return self.indexes.domains

    def info(self) -> dict[str, Any]:
        """What is being served: model, feature, data root, counts and index types per domain."""
        manifests = {d: self.indexes[d].manifest for d in self.indexes}
        types = {d: str(m["index_type"]) for d, m in manifests.items()}
        first = next(iter(manifests.values()))
        params = {d: self.indexes[d].rerank for d in self.indexes}
        distinct = set(params.values())
        rerank: dict[str, Any] | None
        if len(distinct) == 1:  # the usual case: one setting for every domain
            only = next(iter(distinct))
            rerank = only.to_dict() if only is not None else None
        else:
            rerank = {d: p.to_dict() if p is not None else None for d, p in params.items()}
        return {
            "backbone": self.model.backbone,
            "image_size": self.model.image_size,
            "feature": self.model.feature,
            "data_root": first.get("data_root"),
            "run_dir": str(self.model.run_dir) if self.model.run_dir is not None else None,
            "index_dir": str(self.index_dir) if self.index_dir is not None else None,
            "model_hash": self.model.model_hash,
            "device": str(self.model.device),
            "dim": self.indexes.dim,
            "domains": self.domains,
            "counts": {d: len(self.indexes[d]) for d in self.indexes},
            "index_type": ",".join(sorted(set(types.values()))),
            "index_types": types,
            "rerank": rerank,
        }

    # -- encoding ---------------------------------------------------------------------------------------
    def encode_batch(self, queries: Sequence[Query]) -> np.ndarray:
        """Embed several queries in one forward pass: ``[Q, D]`` float32, L2-normalised rows."""
        images = [query_to_image(q, f"query {i}") for i, q in enumerate(queries)]
        if not images:
            return np.zeros((0, self.model.dim), np.float32)
        x = torch.stack([self._transform(img) for img in images])  # [Q, 3, S, S]
        x = x.to(self.model.device)
        if self.model.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with self._model_lock, torch.no_grad(), autocast(self.model.device, self.model.amp):
            y = self.model.embed(x)  # [Q, D]
        return y.float().cpu().numpy()

    def encode(self, query: Query) -> np.ndarray:
        """Embed one query (path, bytes, PIL image, (H,W)/(H,W,3) array, (3,H,W) tensor): ``[D]`` float32."""
        return self.encode_batch([query])[0]

    # -- searching --------------------------------------------------------------------------------------
    def _targets(self, target_domain: str | Sequence[str] | None, source_domain: str | None) -> list[str]:
        """The domains to search, validated (QueryError naming the known ones)."""
        known = self.domains
        if source_domain is not None and source_domain not in known:
            raise QueryError(f"unknown source domain {source_domain!r}; indexed domains: {known}")
        if target_domain is None:
            targets = [d for d in known if d != source_domain]
            if not targets:
                raise QueryError(f"no domain to search besides the source {source_domain!r}; indexed: {known}")
            return targets
        if isinstance(target_domain, str):
            names = [target_domain]
        elif isinstance(target_domain, Sequence):
            names = list(target_domain)
        else:
            raise QueryError(f"target_domain must be a domain name, a list of them or None, got {target_domain!r}")
        if not names:
            raise QueryError(f"no target domain given; indexed domains: {known}")
        for d in names:
            if not isinstance(d, str) or d not in known:
                raise QueryError(f"unknown target domain {d!r}; indexed domains: {known}")
        return list(dict.fromkeys(names))  # drop repeats, keep order

    @staticmethod
    def _check_k(k: Any) -> int:
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise QueryError(f"k must be a positive integer, got {k!r}")
        return int(k)

    @staticmethod
    def _check_rerank(rerank: Any) -> bool | None:
        if rerank is not None and not isinstance(rerank, (bool, np.bool_)):
            raise QueryError(f"rerank must be True, False or None (the index's setting), got {rerank!r}")
        return None if rerank is None else bool(rerank)

    def rerank_params(self, domain: str, rerank: bool | None = None) -> RerankParams | None:
        """The query expansion searches of ``domain`` use: None = plain search.

        ``rerank=None`` follows the domain's manifest, ``False`` is plain, ``True`` the manifest's params or
        :data:`~cdretrieval.rerank.DEFAULT_RERANK` for an index built without re-ranking.
        """
        rerank = self._check_rerank(rerank)
        recorded = self.indexes[domain].rerank
        if rerank is False:
            return None
        if rerank is True and recorded is None:
            return DEFAULT_RERANK
        return recorded if recorded is not None and recorded.uses_qe else None

    def _lock(self) -> contextlib.AbstractContextManager[Any]:
        return self._index_lock if self._index_lock is not None else contextlib.nullcontext()

    def search_embeddings(
        self,
        embeddings: Any,
        target_domain: str | Sequence[str] | None = None,
        k: int = 10,
        source_domain: str | None = None,
        rerank: bool | None = None,
    ) -> list[list[SearchResult]]:
        """:meth:`search_batch` for query embeddings ``[Q, D]`` that are already computed."""
        k = self._check_k(k)
        targets = self._targets(target_domain, source_domain)
        rerank = self._check_rerank(rerank)
        if isinstance(embeddings, torch.Tensor):  # any device; bf16/fp16 (numpy has no bf16) as float32
            embeddings = embeddings.detach().cpu()
            embeddings = embeddings.float() if embeddings.is_floating_point() else embeddings
        try:
            q = np.asarray(embeddings)
        except (TypeError, ValueError, RuntimeError) as e:  # ragged lists, ...
            raise QueryError(f"query embeddings must be a numeric [Q, {self.indexes.dim}] array ({e})") from e
        if q.dtype.kind not in "iuf":  # complex, strings, objects, bools: not embeddings
            raise QueryError(f"query embeddings must be real numbers, got dtype {q.dtype}")
        with np.errstate(over="ignore"):  # values beyond float32 become inf, reported just below
            q = q.astype(np.float32)
        if q.ndim == 1:
            q = q[None, :]
        if q.ndim != 2 or q.shape[1] != self.indexes.dim:
            raise QueryError(f"query embeddings must be [Q, {self.indexes.dim}], got shape {q.shape}")
        if q.shape[0] == 0:
            return []
        scores, cols_domain, cols_id = [], [], []
        unit: np.ndarray | None = None  # [Q, D] normalised queries, for query expansion
        for t_idx, t in enumerate(targets):
            params = self.rerank_params(t, rerank)
            if params is not None and unit is None:
                unit = _normalised_rows(q, "query embeddings", QueryError, expected_dim=self.indexes.dim)
            with self._lock():
                # αQE is specific to the target domain: expand against it, then search it again.
                qt = q if params is None else alpha_query_expansion(unit, self.indexes[t], params)
                s, ids = self.indexes[t].search(qt, k)  # [Q, k_t] each, best first
            scores.append(s)
            cols_id.append(ids)
            cols_domain.append(np.full(ids.shape[1], t_idx))
        s_all = np.concatenate(scores, axis=1)  # [Q, Σ k_t]
        id_all = np.concatenate(cols_id, axis=1)
        dom_all = np.concatenate(cols_domain)  # [Σ k_t]
        # Merge the targets by score; the stable sort keeps target order, then index rank, among ties.
        order = np.argsort(-s_all, axis=1, kind="stable")[:, :k]  # [Q, ≤ k]
        out: list[list[SearchResult]] = []
        for qi in range(q.shape[0]):
            hits: list[SearchResult] = []
            for col in order[qi]:
                item_id = int(id_all[qi, col])
                if item_id < 0:  # an approximate index found fewer than k neighbours
                    continue
                domain = targets[int(dom_all[col])]
                item = self.indexes[domain].items[item_id]
                hits.append(SearchResult(len(hits) + 1, item.path, domain, float(s_all[qi, col]), item.label,
                                         item_id))
            out.append(hits)
        return out

    def search_batch(
        self,
        queries: Sequence[Query],
        target_domain: str | Sequence[str] | None = None,
        k: int = 10,
        source_domain: str | None = None,
        rerank: bool | None = None,
    ) -> list[list[SearchResult]]:
        """:meth:`search` for several queries, embedded in one batch; one result list per query."""
        if isinstance(queries, (str, bytes, bytearray, memoryview, os.PathLike, Image.Image, np.ndarray,
                                torch.Tensor)):
            raise QueryError(f"search_batch takes a list of queries, got one {type(queries).__name__}; use search()")
        try:
            queries = list(queries)
        except TypeError:
            raise QueryError(f"search_batch takes a list of queries, got {type(queries).__name__}") from None
        k = self._check_k(k)
        self._targets(target_domain, source_domain)  # fail before the (slower) forward pass
        self._check_rerank(rerank)
        return self.search_embeddings(self.encode_batch(queries), target_domain, k, source_domain, rerank)

    def search(
        self,
        query: Query,
        target_domain: str | Sequence[str] | None = None,
        k: int = 10,
        source_domain: str | None = None,
        rerank: bool | None = None,
    ) -> list[SearchResult]:
        """The ``k`` indexed images most similar to ``query``, best first (ranks 1..k).

        Args:
            query: path, image bytes, PIL image, numpy (H,W)/(H,W,3) uint8 or float [0,1], tensor (3,H,W) in [0,1].
            target_domain: one domain, several (merged by score, best ``k`` overall), or None for every indexed
                domain except ``source_domain``.
            k: results wanted, ≥ 1; more than the gallery holds returns all of it.
            source_domain: the query's own domain, left out when ``target_domain`` is None.
            rerank: None (default) = as each target index's manifest says; False = plain search; True =
                query expansion even over an index built without re-ranking (see :meth:`rerank_params`).
                With expansion, each target domain gets its own expanded query (one extra search per
                domain) and ``score`` is the expanded query's cosine similarity.

        Raises:
            QueryError: unknown domain (the message lists the indexed ones), ``k`` ≤ 0, bad query.
        """
        return self.search_batch([query], target_domain, k, source_domain, rerank)[0]

    # -- items ------------------------------------------------------------------------------------------
    def item(self, domain: str, item_id: int) -> Item:
        """The indexed item ``item_id`` of ``domain``."""
        items = self.indexes[domain].items
        if isinstance(item_id, bool) or not isinstance(item_id, (int, np.integer)) or not 0 <= item_id < len(items):
            raise QueryError(f"item_id must be in [0, {len(items)}) for domain {domain!r}, got {item_id!r}")
        return items[int(item_id)]

    def example_items(self, domain: str, n: int = 8, seed: int = 0) -> list[Item]:
        """``n`` distinct indexed items of ``domain`` picked at random (deterministic for a ``seed``)."""
        if domain not in self.indexes:
            raise QueryError(f"unknown domain {domain!r}; indexed domains: {self.domains}")
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
            raise QueryError(f"n must be a non-negative integer, got {n!r}")
        items = self.indexes[domain].items
        picks = np.random.default_rng(seed).choice(len(items), size=min(int(n), len(items)), replace=False)
        return [items[int(i)] for i in picks]

    def resolve_item_path(self, path: Any) -> Path | None:
        """``path`` as the stored path of an indexed item, or None when it is not one (serve nothing else)."""
        if not isinstance(path, (str, os.PathLike)):
            return None
        try:
            key = os.path.normpath(os.path.abspath(os.fspath(path)))
        except (TypeError, ValueError):
            return None
        hit = self._paths.get(key)
        return Path(hit) if hit is not None else None

    def __repr__(self) -> str:
        counts = ", ".join(f"{d}={len(self.indexes[d])}" for d in self.indexes)
        return f"Retriever({self.model.backbone}, feature={self.model.feature!r}, {counts})"
