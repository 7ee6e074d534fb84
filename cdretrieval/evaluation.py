"""Evaluating retrieval: P@k / mAP (and paired R@k) for every directed domain pair of a labelled data set.

A batch job (``cdretrieval evaluate``): embeds with :mod:`cdretrieval.domain_embeddings`, scores with
:mod:`cdretrieval.metrics`. Without a run folder it evaluates the backbone's pooled features with no
adaptation (the ``none`` row of the README's benchmark tables).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from cdretrieval.data.digits import paired_domains
from cdretrieval.data.folders import parse_domains
from cdretrieval.domain_detection import DomainDetector
from cdretrieval.domain_embeddings import (
    EmbedSettings,
    default_store,
    embed_all,
    feature_vectors,
    scan_data,
)
from cdretrieval.embedding_chunks import DEFAULT_CHUNK_SIZE
from cdretrieval.errors import DataError, IndexMismatchError, QueryError
from cdretrieval.index import load_detector
from cdretrieval.loading import load_model
from cdretrieval.metrics import evaluate_domains, paired_rows
from cdretrieval.rerank import RerankParams, check_rerank_params


def _check_ks(ks: Sequence[int]) -> list[int]:
    out = list(ks)
    if not out:
        raise QueryError("ks must name at least one cut-off")
    for k in out:
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise QueryError(f"every k must be a positive integer, got {k!r} in {list(ks)}")
    return [int(k) for k in out]


def evaluate(
    data_root: str | os.PathLike[str],
    domains: str | Sequence[str] | None = None,
    *,
    run_dir: str | os.PathLike[str] | None = None,
    backbone: str | None = None,
    weights: str = "default",
    ks: Sequence[int] = (1, 5, 15),
    split: str | None = None,
    feature: str | None = None,
    image_size: int | None = None,
    batch_size: int = 64,
    num_workers: int = 2,
    device: str | torch.device = "auto",
    progress: bool = True,
    resume: bool = True,
    embeddings_dir: str | os.PathLike[str] | None = None,
    rerank: RerankParams | None = None,
    domain_detector: DomainDetector | str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """Retrieval quality for every directed pair of ``domains`` (:mod:`cdretrieval.metrics`); classes = ground truth.

    With ``run_dir`` the run's encoder is evaluated; without, the no-adaptation ``backbone`` baseline.
    Instance-paired domains (``paired_domains(root)``, e.g. MNIST ↔ MNIST-M) also get ``R@k`` of the pair.
    With ``rerank``, galleries get DBA and queries αQE against each gallery domain, as a
    :class:`~cdretrieval.retrieval.Retriever` over a flat index built with the same params does (see
    :func:`cdretrieval.metrics.evaluate_domains`).

    With ``domain_detector`` (a :class:`~cdretrieval.domain_detection.DomainDetector`, or an index folder
    such as ``RUN_DIR/index`` whose detector is read), the result also holds ``domain_detection``: how
    often the detector names the evaluated images' own domain (folder). Give it images the index was not
    built from (e.g. index the train split, evaluate the test split) for a held-out accuracy.

    Returns:
        ``{"pairs": [{"query", "gallery", "n_query", "n_gallery", "P@k"..., "mAP", ["R@k"...]}, ...],
        "mean": {...}, "run", "backbone", "feature", "image_size", "model_hash", "data_root", "split", "ks",
        "skipped": {domain: count}, "rerank": params dict or None, "domain_detection": {"accuracy",
        "per_domain": {domain: accuracy}, "n", "feature", "fit_holdout_accuracy"} or None}`` (metric values
        in [0, 1], None where undefined).

    Raises:
        QueryError: fewer than two domains, bad ``ks``, an index folder without a detector.
        DataError: images outside class folders. IndexMismatchError: a detector of another model.
        IndexFileError: an unreadable detector.
    """
    ks = _check_ks(ks)
    names = parse_domains(domains)
    if names is not None and len(names) < 2:
        raise QueryError(f"need at least two domains to evaluate, got {names}")
    settings = EmbedSettings(batch_size, num_workers, DEFAULT_CHUNK_SIZE, progress, resume)
    check_rerank_params(rerank)
    detector = _resolve_detector(domain_detector)
    root, data = scan_data(data_root, names, split)
    model = load_model(run_dir, backbone=backbone, weights=weights, feature=feature, image_size=image_size,
                       device=device)
    if detector is not None and detector.model_hash != model.model_hash:
        raise IndexMismatchError(
            f"the domain detector was fitted for model {detector.model_hash[:12]}…, the evaluated model is "
            f"{model.model_hash[:12]}…; evaluate the run whose index holds the detector"
        )
    if len(data) < 2:
        raise QueryError(f"need at least two domains to evaluate, {root} has {list(data)}")
    for d, samples in data.items():
        unlabeled = [s.path for s in samples if s.label is None]
        if unlabeled:
            raise DataError(
                f"domain {d!r} has {len(unlabeled)} image(s) outside class folders (e.g. {unlabeled[0]}); "
                "evaluation needs ROOT/<domain>/<class>/<image>"
            )
    base = default_store(model, embeddings_dir)
    embedded = embed_all(model, data, base, split, settings)
    empty = [d for d, e in embedded.items() if len(e) == 0]
    if empty:
        raise DataError(f"no readable image in domain(s) {empty}")
    result = evaluate_domains(
        {d: e.embeddings for d, e in embedded.items()},
        {d: np.array(e.labels) for d, e in embedded.items()},
        domains=list(embedded),
        ks=ks,
        paired=paired_rows({d: [it.path for it in e.items] for d, e in embedded.items()}, paired_domains(root)),
        rerank=rerank,
    )
    detection: dict[str, Any] | None = None
    if detector is not None:
        vectors = feature_vectors(model, detector.feature, embedded, data, split, settings, store_base=base)
        detection = {**detector.accuracy(vectors), "feature": detector.feature,
                     "fit_holdout_accuracy": detector.holdout_accuracy}
    result.update(
        run=str(model.run_dir) if model.run_dir is not None else None,
        backbone=model.backbone,
        feature=model.feature,
        image_size=model.image_size,
        model_hash=model.model_hash,
        data_root=str(root),
        split=split,
        ks=ks,
        skipped={d: len(e.skipped) for d, e in embedded.items()},
        rerank=rerank.to_dict() if rerank is not None else None,
        domain_detection=detection,
    )
    return result


def _resolve_detector(detector: DomainDetector | str | os.PathLike[str] | None) -> DomainDetector | None:
    """A detector given as such, or read from an index folder (QueryError when that index has none)."""
    if detector is None or isinstance(detector, DomainDetector):
        return detector
    if not isinstance(detector, (str, os.PathLike)):
        raise QueryError(f"domain_detector must be a DomainDetector or an index folder, got {detector!r}")
    found = load_detector(detector)
    if found is None:
        raise QueryError(
            f"the index in {detector} has no domain detector; rebuild it with `cdretrieval index --run RUN_DIR ...`"
        )
    return found
