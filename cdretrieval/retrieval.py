"""Query an image from one domain, get the nearest images of other domains: :class:`Retriever`.

A query can be a file path, raw file bytes (an upload), a PIL image, a numpy array or a torch tensor;
every form is turned into the same RGB PIL image and then the same eval transform the gallery went
through, so one image gives one embedding whatever form it arrives in.

Re-ranking (:mod:`cdretrieval.rerank`): when a target domain's index was built with re-ranking (its
manifest records the params), the query is expanded against that domain (αQE: one extra search) and the
results come from a second search with the expanded query; their scores are those of the expanded query.
``rerank=False`` searches plainly, ``True`` expands even over an index built without re-ranking (with
:data:`~cdretrieval.rerank.DEFAULT_RERANK`; that gallery has no DBA).

The query's domain (``source_domain``): a domain name, or ``"auto"`` (:data:`AUTO`; ``None`` means the
same), the default. "auto" *detects* the domain with the index set's
:class:`~cdretrieval.domain_detection.DomainDetector` (:meth:`Retriever.detect_domain`) and, when no
target is given, searches every *other* domain; :meth:`Retriever.retrieve` reports the detected domain
and its confidence (:class:`SearchResponse`). An index set built without a detector still works: "auto"
then searches every domain (``SearchResponse.source == "unknown"``).

Merging several target domains (:func:`merge_calibrated`): raw cosines of different domains are not
comparable (a query's own domain scores systematically higher, some domains are tighter than others, and
with query expansion each domain is searched with its own expanded query), so each hit's score is
calibrated against *that query's* score distribution over *that domain*: ``z = (s − μ) / σ``, where μ and
σ are the mean and standard deviation of the (expanded) query's cosines with a fixed random sample of the
domain's stored vectors (:data:`CALIBRATION_SAMPLE`, drawn once when the Retriever is built). The merged
list is ranked by ``z``: a constant offset (or a scale) of one domain's cosines changes none of its z, so
no domain crowds the others out by its offset alone, while a domain whose best hits stand out further
from its own background still gets more of the list. ``SearchResult.score`` stays the raw cosine;
``SearchResult.calibrated_score`` is the z the merge ranked by (within a domain both give the same order).

Measured (docs/ui.md) on a PACS subset (300 images per domain, a briefly trained head): merging by raw
cosine left one domain as little as 6 % of a query's top 10 (sketch queries got 86 % cartoons); the
background z-score gave every domain ≥ 18 % at a merged P@10 of 0.600 (raw cosine 0.627), where a z-score
against the query's own top-100 hits (0.522) or rank interleaving (0.556) lost more.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Final, Literal, Union

import numpy as np
import torch
from PIL import Image

from cdretrieval.data.folders import escapes_root
from cdretrieval.data.images import as_rgb_image, load_image, load_image_bytes
from cdretrieval.data.transforms import eval_transform
from cdretrieval.device import autocast
from cdretrieval.domain_detection import Detection, DomainDetector
from cdretrieval.errors import ImageLoadError, IndexMismatchError, QueryError
from cdretrieval.index import IndexSet, Item, UseGpu, normalised_rows
from cdretrieval.loading import LoadedModel, load_run_index
from cdretrieval.rerank import DEFAULT_RERANK, RerankParams, alpha_query_expansion
from cdretrieval.run import INDEX_DIR

#: Everything :meth:`Retriever.encode` accepts.
Query = Union[str, os.PathLike, bytes, bytearray, memoryview, Image.Image, np.ndarray, torch.Tensor]  # noqa: UP007


#: ``source_domain`` value that detects the query's domain (None means the same).
AUTO: Final = "auto"
#: Stored vectors per domain (a seeded random sample) whose cosines with a query give that domain's score
#: distribution for the calibrated merge (all of them for a smaller domain).
CALIBRATION_SAMPLE: Final = 1000
_MIN_STD: Final = 1e-6  # a degenerate background (all cosines equal) is given this spread


@dataclass(frozen=True)
class SearchResult:
    """One hit: ``rank`` is 1-based, ``score`` the cosine similarity, ``item_id`` the row in its domain's index.

    ``calibrated_score`` is the per-domain z-score the results were ranked by (see :func:`merge_calibrated`);
    within one domain it orders hits exactly as ``score`` does.
    """

    rank: int
    path: str
    domain: str
    score: float
    label: str | None
    item_id: int
    calibrated_score: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return asdict(self)


SourceKind = Literal["given", "detected", "unknown"]


@dataclass(frozen=True)
class SearchResponse:
    """One query's answer: its results and which domain the query was taken to be.

    Attributes:
        results: best first.
        source_domain: the query's domain — given, or detected — or None when unknown (no detector).
        source: ``"given"``, ``"detected"`` or ``"unknown"`` ("auto" over an index without a detector).
        detection: the detector's answer when ``source == "detected"``.
        target_domains: the domains searched.
    """

    results: list[SearchResult]
    source_domain: str | None
    source: SourceKind
    detection: Detection | None
    target_domains: list[str]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict: ``source_domain``, ``source``, ``detected`` (or null), ``target_domains``, ``results``."""
        return {
            "source_domain": self.source_domain,
            "source": self.source,
            "detected": self.detection.to_dict() if self.detection is not None else None,
            "target_domains": list(self.target_domains),
            "results": [r.to_dict() for r in self.results],
        }


def calibrate_scores(scores: np.ndarray, background: np.ndarray) -> np.ndarray:
    """Per query row, ``(s − mean(b)) / std(b)``: hit scores ``s`` as z-scores against the background ``b``.

    Args:
        scores: ``[Q, n]`` cosines of each query's hits in one domain (``-inf`` = no hit, kept as ``-inf``).
        background: ``[Q, m]`` cosines of the same queries with a sample of that domain (m ≥ 1).

    Adding a constant to (or multiplying by c > 0) both rows of one query leaves its z-scores unchanged.
    """
    s = np.asarray(scores, dtype=np.float64)
    b = np.asarray(background, dtype=np.float64)
    mean = b.mean(axis=1, keepdims=True)
    std = np.maximum(b.std(axis=1, keepdims=True), _MIN_STD)
    with np.errstate(invalid="ignore"):
        z = (s - mean) / std
    return np.where(np.isfinite(s), z, -np.inf)


def merge_calibrated(
    scores: Sequence[np.ndarray], backgrounds: Sequence[np.ndarray], k: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Merge per-domain hit lists into one best-``k`` list per query, ranked by calibrated score.

    Args:
        scores: one ``[Q, n_t]`` array per target domain, each row best first (``-inf`` = no hit).
        backgrounds: per target domain, the ``[Q, m_t]`` cosines of the queries with a sample of it
            (see :func:`calibrate_scores`).
        k: hits wanted per query.

    Returns:
        ``(domain, column, z)``, each ``[Q, k']`` (``k' = min(k, Σ n_t)``): the target index and the column
        within that target's array of each merged hit, and its z-score; best first. Ties keep target order,
        then in-domain rank. Missing hits sort last (z = -inf).
    """
    z_all = np.concatenate([calibrate_scores(s, b) for s, b in zip(scores, backgrounds, strict=True)], axis=1)
    dom = np.concatenate([np.full(s.shape[1], t) for t, s in enumerate(scores)])
    col = np.concatenate([np.arange(s.shape[1]) for s in scores])
    order = np.argsort(-z_all, axis=1, kind="stable")[:, :k]  # [Q, k']
    return dom[order], col[order], np.take_along_axis(z_all, order, axis=1)


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


def _calibration_sample(index: Any, rng: np.random.Generator) -> np.ndarray:
    """Up to :data:`CALIBRATION_SAMPLE` stored vectors of ``index`` (a ``DomainIndex``), drawn with ``rng``."""
    n = len(index)
    return index.reconstruct(np.sort(rng.choice(n, size=min(CALIBRATION_SAMPLE, n), replace=False)))


class Retriever:
    """Cross-domain search over a run's per-domain indexes, with domain detection for "auto" queries.

    Build with :meth:`from_run`. Safe to share between threads: the model forward runs under a lock (CPU
    FAISS searches run concurrently; a GPU index is searched under a lock as well). Several target domains
    are merged by calibrated score (see the module docstring). On the CPU the backbone runs under ONNX
    Runtime (:meth:`LoadedModel.backbone_forward <cdretrieval.loading.LoadedModel.backbone_forward>`,
    built on the first query; ``$CDRETRIEVAL_RUNTIME=torch`` keeps PyTorch), "auto" queries included: their
    index and detector features come from its one pass.

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
        rng = np.random.default_rng(0)
        self._calibration = {d: _calibration_sample(indexes[d], rng) for d in indexes}  # [m, D] per domain
        # Normalised absolute path → stored path, for resolve_item_path (no file system access per call).
        self._paths = {
            os.path.normpath(os.path.abspath(it.path)): it.path for d in indexes for it in indexes[d].items
        }
        # Per stored path, the data root its domain was indexed from (links must not lead out of it).
        self._roots: dict[str, str | None] = {}
        for d in indexes:
            root = indexes[d].manifest.get("data_root")
            for it in indexes[d].items:
                self._roots[it.path] = root if isinstance(root, str) and root else None

    @classmethod
    def from_run(
        cls,
        run_dir: str | os.PathLike[str],
        *,
        device: str | torch.device = "auto",
        index_dir: str | os.PathLike[str] | None = None,
        use_gpu: UseGpu = "auto",
        on_stage: Callable[[str], None] | None = None,
    ) -> Retriever:
        """Load a run's encoder and its indexes (default ``RUN_DIR/index``); ``on_stage(message)`` is told
        what is being loaded as each part starts.

        Raises:
            CheckpointError: no usable run. IndexFileError: no (complete) index; build it with
                ``cdretrieval index --run RUN_DIR --data ROOT``. IndexMismatchError: the index was built with
                another model; the message says to rerun ``cdretrieval index --run RUN_DIR ...``.
        """
        model, indexes = load_run_index(run_dir, index_dir=index_dir, device=device, use_gpu=use_gpu,
                                        on_stage=on_stage)
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
            "domain_detection": self.detector.summary() if self.detector is not None else None,
        }

    # -- encoding ---------------------------------------------------------------------------------------
    def _forward(self, queries: Sequence[Query], extra: str | None = None) -> tuple[np.ndarray, np.ndarray | None]:
        """Embed ``queries`` in one forward pass: ``([Q, D]`` index embeddings, ``[Q, D']`` ``extra`` feature or None).

        ``extra`` (``"head"`` / ``"backbone"``): a second output of the same pass (the backbone runs once).
        """
        images = [query_to_image(q, f"query {i}") for i, q in enumerate(queries)]
        if not images:
            empty = np.zeros((0, self.model.dim), np.float32)
            return empty, (np.zeros((0, 0), np.float32) if extra is not None else None)
        x = torch.stack([self._transform(img) for img in images])  # [Q, 3, S, S]
        features = [self.model.feature] if extra is None or extra == self.model.feature else [self.model.feature, extra]
        # The backbone's runtime (ONNX Runtime on the CPU, else PyTorch) is built on the first query (once,
        # under its own lock); both features come from its one pass (LoadedModel.embed_features).
        amp, channels_last = self.model.input_settings()
        x = x.to(self.model.device)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with self._model_lock, torch.no_grad(), autocast(self.model.device, amp):
            outs = self.model.embed_features(x, features)  # [Q, D], ([Q, D'])
        y = outs[0]
        other = outs[-1] if extra is not None else None
        return y.float().cpu().numpy(), (other.float().cpu().numpy() if other is not None else None)

    def encode_batch(self, queries: Sequence[Query]) -> np.ndarray:
        """Embed several queries in one forward pass: ``[Q, D]`` float32, L2-normalised rows."""
        return self._forward(queries)[0]

    def encode(self, query: Query) -> np.ndarray:
        """Embed one query (path, bytes, PIL image, (H,W)/(H,W,3) array, (3,H,W) tensor): ``[D]`` float32."""
        return self.encode_batch([query])[0]

    # -- domain detection -------------------------------------------------------------------------------
    @property
    def detector(self) -> DomainDetector | None:
        """The index set's domain detector; None when it was built without one (detection unavailable)."""
        return self.indexes.detector

    def _require_detector(self) -> DomainDetector:
        if self.detector is None:
            where = f" in {self.index_dir}" if self.index_dir is not None else ""
            raise QueryError(
                f"domain detection is unavailable: the index{where} was built without a domain detector; "
                "rebuild it with `cdretrieval index --run RUN_DIR --data ROOT` (searches with 'auto' then "
                "cover every domain)"
            )
        return self.detector

    def detect_domain_batch(self, queries: Sequence[Query]) -> list[Detection]:
        """:meth:`detect_domain` for several queries (one forward pass)."""
        detector = self._require_detector()
        queries = self._query_list(queries, "detect_domain_batch", "detect_domain")
        _, vectors = self._forward(queries, detector.feature)
        return detector.detect(vectors) if len(queries) else []

    def detect_domain(self, query: Query) -> Detection:
        """The query's most probable indexed domain: ``(domain, confidence, {domain: probability})``.

        :class:`~cdretrieval.domain_detection.Detection` is a named tuple (``domain, confidence,
        probabilities``), so ``domain, confidence, probs = retriever.detect_domain(q)`` works.

        Raises:
            QueryError: detection unavailable (index built without a detector; the message says how to
                rebuild), or a bad query.
        """
        return self.detect_domain_batch([query])[0]

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

    def _source(self, source_domain: Any) -> str | None:
        """``source_domain`` checked: a known domain, or None for "auto" (``"auto"`` or None)."""
        if source_domain is None or (isinstance(source_domain, str) and source_domain == AUTO):
            return None
        if not isinstance(source_domain, str) or source_domain not in self.indexes:
            raise QueryError(f"unknown source domain {source_domain!r}; use 'auto' or one of {self.domains}")
        return source_domain

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

    @staticmethod
    def _query_list(queries: Any, method: str, single: str) -> list[Any]:
        if isinstance(queries, (str, bytes, bytearray, memoryview, os.PathLike, Image.Image, np.ndarray,
                                torch.Tensor)):
            raise QueryError(f"{method} takes a list of queries, got one {type(queries).__name__}; use {single}()")
        try:
            return list(queries)
        except TypeError:
            raise QueryError(f"{method} takes a list of queries, got {type(queries).__name__}") from None

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

    def _as_embeddings(self, embeddings: Any) -> np.ndarray:
        """Query embeddings as ``[Q, D]`` float32 (validated; rows need not be normalised)."""
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
        return q

    def _scored(
        self, domain: str, unit: np.ndarray, k: int, rerank: bool | None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """One target's ``(scores [Q, k'], ids [Q, k'], background [Q, m])`` for unit queries ``[Q, D]``.

        With query expansion, the expanded query (specific to ``domain``) is used for both.
        """
        params = self.rerank_params(domain, rerank)
        with self._lock():
            # αQE is specific to the target domain: expand against it, then search it again.
            qt = unit if params is None else alpha_query_expansion(unit, self.indexes[domain], params)
            scores, ids = self.indexes[domain].search(qt, k)  # best first
        return scores, ids, qt @ self._calibration[domain].T

    def _search_targets(
        self, q: np.ndarray, targets: Sequence[str], k: int, rerank: bool | None
    ) -> list[list[SearchResult]]:
        """Search ``targets`` with queries ``q`` ``[Q, D]``; merge them by calibrated score (best ``k``)."""
        unit = normalised_rows(q, "query embeddings", QueryError, expected_dim=self.indexes.dim)  # [Q, D]
        scored = [self._scored(t, unit, k, rerank) for t in targets]
        scores = [s for s, _, _ in scored]
        ids = [i for _, i, _ in scored]
        dom, col, z = merge_calibrated(scores, [b for _, _, b in scored], k)  # [Q, k'] each
        out: list[list[SearchResult]] = []
        for qi in range(q.shape[0]):
            hits: list[SearchResult] = []
            for t_idx, c, zz in zip(dom[qi].tolist(), col[qi].tolist(), z[qi].tolist(), strict=True):
                item_id = int(ids[t_idx][qi, c])
                if item_id < 0:  # an approximate index found fewer than k neighbours
                    continue
                domain = targets[t_idx]
                item = self.indexes[domain].items[item_id]
                hits.append(SearchResult(len(hits) + 1, item.path, domain, float(scores[t_idx][qi, c]), item.label,
                                         item_id, round(zz, 6)))
            out.append(hits)
        return out

    def _respond(
        self,
        q: np.ndarray,
        detector_vectors: np.ndarray | None,
        target_domain: str | Sequence[str] | None,
        k: int,
        source: str | None,
        rerank: bool | None,
    ) -> list[SearchResponse]:
        """Detect (when ``source`` is None and vectors are given), pick targets per query, search, respond."""
        n = q.shape[0]
        detections: list[Detection | None] = [None] * n
        if source is None and detector_vectors is not None and self.detector is not None and n:
            detections = list(self.detector.detect(detector_vectors))
        sources = [source if source is not None else (d.domain if d is not None else None) for d in detections]
        groups: dict[tuple[str, ...], list[int]] = {}
        for qi, src in enumerate(sources):
            groups.setdefault(tuple(self._targets(target_domain, src)), []).append(qi)
        results: list[list[SearchResult]] = [[] for _ in range(n)]
        for targets, rows in groups.items():  # queries with the same targets are searched together
            for qi, hits in zip(rows, self._search_targets(q[rows], targets, k, rerank), strict=True):
                results[qi] = hits
        kinds: list[SourceKind] = [
            "given" if source is not None else ("detected" if d is not None else "unknown") for d in detections
        ]
        targets_of = {qi: list(t) for t, rows in groups.items() for qi in rows}
        return [SearchResponse(results[qi], sources[qi], kinds[qi], detections[qi], targets_of[qi]) for qi in range(n)]

    def search_embeddings(
        self,
        embeddings: Any,
        target_domain: str | Sequence[str] | None = None,
        k: int = 10,
        source_domain: str | None = AUTO,
        rerank: bool | None = None,
    ) -> list[list[SearchResult]]:
        """:meth:`search_batch` for query embeddings ``[Q, D]`` that are already computed.

        With ``source_domain="auto"`` the domain is detected from the embeddings when the detector reads the
        index's own feature; otherwise (or without a detector) every domain is searched.
        """
        return [r.results for r in self.retrieve_embeddings(embeddings, target_domain, k, source_domain, rerank)]

    def retrieve_embeddings(
        self,
        embeddings: Any,
        target_domain: str | Sequence[str] | None = None,
        k: int = 10,
        source_domain: str | None = AUTO,
        rerank: bool | None = None,
    ) -> list[SearchResponse]:
        """:meth:`retrieve_batch` for query embeddings ``[Q, D]`` (see :meth:`search_embeddings`)."""
        k = self._check_k(k)
        source = self._source(source_domain)
        self._targets(target_domain, source)
        rerank = self._check_rerank(rerank)
        q = self._as_embeddings(embeddings)
        if q.shape[0] == 0:
            return []
        detector = self.detector
        usable = source is None and detector is not None and detector.feature == self.model.feature
        vectors = normalised_rows(q, "query embeddings", QueryError, expected_dim=self.indexes.dim) if usable else None
        return self._respond(q, vectors, target_domain, k, source, rerank)

    def retrieve_batch(
        self,
        queries: Sequence[Query],
        target_domain: str | Sequence[str] | None = None,
        k: int = 10,
        source_domain: str | None = AUTO,
        rerank: bool | None = None,
    ) -> list[SearchResponse]:
        """:meth:`retrieve` for several queries, embedded (and their domains detected) in one forward pass."""
        queries = self._query_list(queries, "retrieve_batch", "retrieve")
        k = self._check_k(k)
        source = self._source(source_domain)
        self._targets(target_domain, source)  # fail before the (slower) forward pass
        rerank = self._check_rerank(rerank)
        detector = self.detector if source is None else None
        q, vectors = self._forward(queries, detector.feature if detector is not None else None)
        if q.shape[0] == 0:
            return []
        return self._respond(q, vectors, target_domain, k, source, rerank)

    def retrieve(
        self,
        query: Query,
        target_domain: str | Sequence[str] | None = None,
        k: int = 10,
        source_domain: str | None = AUTO,
        rerank: bool | None = None,
    ) -> SearchResponse:
        """:meth:`search`, answered with the query's domain (given or detected) and the domains searched."""
        return self.retrieve_batch([query], target_domain, k, source_domain, rerank)[0]

    def search_batch(
        self,
        queries: Sequence[Query],
        target_domain: str | Sequence[str] | None = None,
        k: int = 10,
        source_domain: str | None = AUTO,
        rerank: bool | None = None,
    ) -> list[list[SearchResult]]:
        """:meth:`search` for several queries, embedded in one batch; one result list per query."""
        queries = self._query_list(queries, "search_batch", "search")
        return [r.results for r in self.retrieve_batch(queries, target_domain, k, source_domain, rerank)]

    def search(
        self,
        query: Query,
        target_domain: str | Sequence[str] | None = None,
        k: int = 10,
        source_domain: str | None = AUTO,
        rerank: bool | None = None,
    ) -> list[SearchResult]:
        """The ``k`` indexed images most similar to ``query``, best first (ranks 1..k).

        Args:
            query: path, image bytes, PIL image, numpy (H,W)/(H,W,3) uint8 or float [0,1], tensor (3,H,W) in [0,1].
            target_domain: one domain, several (merged by per-domain calibrated score, best ``k`` overall; see
                :func:`merge_calibrated`), or None for every indexed domain except the query's own.
            k: results wanted, ≥ 1; more than the gallery holds returns all of it.
            source_domain: the query's own domain, left out when ``target_domain`` is None; ``"auto"``
                (default) or None detects it (:meth:`detect_domain`) — without a detector in the index,
                "auto" searches every domain. :meth:`retrieve` reports what was detected.
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
        """``path`` as the stored path of an indexed item, or None when it is not one (serve nothing else),
        or when it is a link that leads out of the data root its domain was indexed from."""
        if not isinstance(path, (str, os.PathLike)):
            return None
        try:
            key = os.path.normpath(os.path.abspath(os.fspath(path)))
        except (TypeError, ValueError):
            return None
        hit = self._paths.get(key)
        if hit is None:
            return None
        root = self._roots.get(hit)
        if escapes_root(hit, root if root is not None else os.path.dirname(os.path.abspath(hit))):
            return None  # a link out of the data root (indexed before such links were skipped): never shown
        return Path(hit)

    def __repr__(self) -> str:
        counts = ", ".join(f"{d}={len(self.indexes[d])}" for d in self.indexes)
        return f"Retriever({self.model.backbone}, feature={self.model.feature!r}, {counts})"
