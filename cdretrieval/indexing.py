"""Indexing a run: embeddings → one FAISS index per domain in ``RUN_DIR/index/``, and appending to one.

A batch job (``cdretrieval index``); serving reads what it writes through :func:`~cdretrieval.loading.load_run_index`.

* :func:`build_indexes` — embed each domain (resumably, :mod:`cdretrieval.domain_embeddings`), index it,
  fit the domain detector that "auto" searches use (:mod:`cdretrieval.domain_detection`), save atomically.
* :func:`add_to_index` — ``cdretrieval index --add``: append new images to one domain's index.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cdretrieval.data.folders import PathsOrFolder, Sample, collect_images, parse_domains
from cdretrieval.device import resolve_device
from cdretrieval.distributed import check_all_ranks, init_distributed, local_device, rank
from cdretrieval.domain_detection import DETECTOR_FEATURES, MAX_PER_DOMAIN, DomainDetector
from cdretrieval.domain_embeddings import (
    EmbedSettings,
    embed_all,
    embed_samples,
    feature_vectors,
    scan_data,
    store_all,
)
from cdretrieval.embedding_chunks import DEFAULT_CHUNK_SIZE
from cdretrieval.errors import CDRetrievalError, DataError
from cdretrieval.index import DEFAULT_SHARD_ROWS, INDEX_SET_FILE, ONDISK_TYPE, DomainIndex, IndexSet, Item, UseGpu
from cdretrieval.io import read_json
from cdretrieval.loading import LoadedModel, index_root, load_model, load_run_index
from cdretrieval.rerank import RerankParams, check_rerank_params
from cdretrieval.run import EMBEDDINGS_DIR

logger = logging.getLogger(__name__)

#: What :func:`build_indexes` fits the domain detector on by default (see docs/ui.md for the measurements).
DEFAULT_DETECTOR_FEATURE = "backbone"


def _provenance(model: LoadedModel, root: Path | None, split: str | None) -> dict[str, Any]:
    """What the index manifests record besides the model hash: how the vectors were made."""
    return {
        "feature": model.feature,
        "backbone": model.backbone,
        "image_size": model.image_size,
        "data_root": str(root) if root is not None else None,
        "split": split,
        "run_dir": str(model.run_dir) if model.run_dir is not None else None,
    }


def _previous_domains(root: Path) -> list[str]:
    """The domains the index set saved in ``root`` lists (empty when there is none or it is unreadable)."""
    try:
        meta = read_json(root / INDEX_SET_FILE)
    except (OSError, ValueError):
        return []
    folders = meta.get("domains") if isinstance(meta, dict) else None
    return [str(d) for d in folders] if isinstance(folders, dict) else []


def _check_no_domain_dropped(data_root: Path, scanned: Mapping[str, Any], previous: Sequence[str]) -> None:
    """Refuse an all-domains build that would silently lose a domain.

    Raises:
        DataError: a sub-folder of ``data_root`` is empty or unreadable, or a domain of the current index
            has no folder with images any more; the message names it.
    """
    for child in sorted(data_root.iterdir()):
        if child.name.startswith(".") or child.name in scanned or not child.is_dir():
            continue
        why = "cannot be read (permission denied)" if not os.access(child, os.R_OK | os.X_OK) else "has no images"
        raise DataError(
            f"domain folder {child} {why}; fix it, or name the domains to index with --domains "
            "(the other domains' indexes are then kept)"
        )
    lost = [d for d in previous if d not in scanned]
    if lost:
        raise DataError(
            f"domain(s) {lost} are in the current index but have no images under {data_root}; fix the data, "
            "or name the domains to index with --domains (the other domains' indexes are then kept)"
        )


def _merge_with_previous(iset: IndexSet, root: Path, use_gpu: UseGpu) -> IndexSet:
    """``iset`` plus the domains of the index set saved in ``root`` that ``iset`` lacks (kept as they are).

    The domain detector is the new one when it knows exactly the merged domains, else the old one when it
    does, else none (with a warning). Old domains of another model cannot be kept: they are dropped with a
    warning naming them.
    """
    previous = _previous_domains(root)
    if not [d for d in previous if d not in iset]:
        return iset
    old = IndexSet.load(root, use_gpu=use_gpu)
    features = {old[d].manifest.get("feature") for d in old} | {iset[d].manifest.get("feature") for d in iset}
    if old.model_hash != iset.model_hash or old.dim != iset.dim or len(features) > 1:
        logger.warning("the indexes of domain(s) %s in %s belong to another model or feature and are dropped; "
                       "reindex them", [d for d in old if d not in iset], root)
        return iset
    merged = {d: iset[d] if d in iset else old[d] for d in old}  # the previous order, new domains last
    merged.update({d: iset[d] for d in iset if d not in merged})
    out = IndexSet(merged)
    for candidate in (iset.detector, old.detector):
        if candidate is not None and sorted(candidate.domains) == sorted(merged):
            out.set_detector(candidate)
            break
    else:
        if len(merged) >= 2 and (iset.detector is not None or old.detector is not None):
            logger.warning("no domain detector fits the domains %s; 'auto' searches every domain until a "
                           "full `cdretrieval index` rebuild", sorted(merged))
    return out


def build_indexes(
    run_dir: str | os.PathLike[str],
    data_root: str | os.PathLike[str],
    domains: str | Sequence[str] | None = None,
    *,
    index_type: str = "flat",
    memory_budget_mb: float | None = None,
    split: str | None = None,
    feature: str | None = None,
    batch_size: int = 64,
    num_workers: int = 2,
    device: str | torch.device = "auto",
    progress: bool = True,
    resume: bool = True,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    index_dir: str | os.PathLike[str] | None = None,
    use_gpu: UseGpu = "auto",
    rerank: RerankParams | None = None,
    domain_detector: str | None = DEFAULT_DETECTOR_FEATURE,
    **index_options: Any,
) -> IndexSet:
    """Embed ``domains`` with the run's encoder (resumably, see :func:`embed_domains`) and index each one.

    The :class:`~cdretrieval.index.IndexSet` is saved to ``index_dir`` (default ``RUN_DIR/index``),
    replacing a previous one there atomically (a crash leaves the old or the new set). With ``domains``
    None every domain folder of the data root is indexed, and an empty or unreadable domain folder, or a
    domain of the previous index that has no images any more, is refused with ``DataError`` (the old index
    stays); with ``domains`` named, only those domains' indexes are replaced and the previous index's other
    domains are kept; every domain manifest records the model hash (``model_hash(encoder)``)
    and ``feature``, ``backbone``, ``image_size``, ``data_root``, ``split``, ``run_dir``.

    Under ``torchrun`` every process joins the group, embeds its share of the chunks (see
    :func:`~cdretrieval.domain_embeddings.embed_domains`) and, with ``ivf-ondisk``, fills its share of the
    shards; rank 0 writes the index set (a filesystem all ranks see); every rank returns the set.

    Args:
        index_type: ``flat`` | ``ivf`` | ``hnsw`` | ``ivfpq`` | ``ivf-ondisk`` | ``auto`` (per domain, under
            ``memory_budget_mb`` — see :func:`cdretrieval.index.choose_index_type`); ``ivf-ondisk`` needs
            ``rerank=None``, reads each domain straight from its chunk store in shards of ``shard_rows``
            samples (default 1M; no domain is ever whole in memory; a rerun keeps the shards a killed build
            filled) and is built beside the index folder (same filesystem: its lists are linked).
        rerank: re-ranking (default None = plain indexes; e.g. :data:`~cdretrieval.rerank.DEFAULT_RERANK`):
            off by default since it stopped winning on held-out data (docs/reranking.md). Given, each
            domain's vectors are replaced by their database-side augmentation before indexing and the
            params go into the manifests, so searches expand queries (see :mod:`cdretrieval.rerank`).
        domain_detector: the feature the domain detector is fitted on — ``"backbone"`` (default: the
            backbone's pooled features, embedded once more and cached unless that is what is indexed) or
            ``"head"`` — or None for no detector (then "auto" searches every domain). Needs ≥ 2 domains
            (with one, no detector is fitted). Saved as ``index/domain_detector.json``
            (:class:`~cdretrieval.domain_detection.DomainDetector`).
        index_options: passed to :meth:`DomainIndex.build` (``nlist``, ``nprobe``, ``hnsw_m``, ...).
        Others: as :func:`embed_domains`.

    Returns:
        The saved set (with ``domains`` named: including the kept domains).

    Raises:
        CheckpointError: no usable run. DataError: bad data, a domain would be dropped, or no index type fits
        the budget.
    """
    settings = EmbedSettings(batch_size, num_workers, chunk_size, progress, resume)
    check_rerank_params(rerank)
    if domain_detector is not None and domain_detector not in DETECTOR_FEATURES:
        raise ValueError(f"domain_detector must be one of {DETECTOR_FEATURES} or None, got {domain_detector!r}")
    if index_type == ONDISK_TYPE and rerank is not None:
        raise DataError(f"{ONDISK_TYPE} takes no re-ranking (DBA needs every vector in memory); build it with "
                        "rerank=None (--no-rerank)")
    root, data = scan_data(data_root, domains, split)
    dev = local_device(device if isinstance(device, torch.device) else resolve_device(device))
    init_distributed(dev)  # under torchrun: join the group (gloo on CPU, NCCL on CUDA); else nothing
    model = load_model(run_dir, feature=feature, device=dev)
    assert model.run_dir is not None
    root_of_index = index_root(model.run_dir, index_dir)
    if parse_domains(domains) is None and split is None:
        _check_no_domain_dropped(root, data, _previous_domains(root_of_index))
    options = {"ondisk_dir": root_of_index.parent, **index_options}  # ivf-ondisk lists: linked into the set
    try:
        if index_type == ONDISK_TYPE:
            iset, skipped, detector_vectors = _index_from_store(model, data, split, settings, use_gpu, options)
        else:
            iset, skipped, detector_vectors = _index_in_memory(model, data, split, settings, index_type,
                                                               memory_budget_mb, use_gpu, rerank, options)
    except CDRetrievalError:
        raise
    except ValueError as e:  # e.g. no index type fits the memory budget
        raise DataError(f"cannot build the {index_type} index: {e}") from e
    extra = _provenance(model, root, split)
    for d in iset:
        iset[d].manifest.update(extra, skipped=skipped[d])
    if domain_detector is not None and len(iset) >= 2:
        vectors = detector_vectors(domain_detector)
        iset.set_detector(DomainDetector.fit(vectors, feature=domain_detector,  # type: ignore[arg-type]
                                             model_hash=model.model_hash))
        logger.info("domain detector (%s features): held-out accuracy %s", domain_detector,
                    iset.detector.holdout_accuracy if iset.detector is not None else None)
    if parse_domains(domains) is not None:
        iset = _merge_with_previous(iset, root_of_index, use_gpu)
    error: Exception | None = None
    if rank() == 0:  # under torchrun every rank holds the same set; rank 0 writes it
        try:
            iset.save(root_of_index)
        except Exception as e:  # every rank raises below
            error = e
    check_all_ranks(error, f"saving the index set in {root_of_index}")
    return iset


#: Each domain's vectors of a feature (``head`` | ``backbone``), for fitting the domain detector.
DetectorVectors = Callable[[str], dict[str, np.ndarray]]


def _check_readable(skipped: Mapping[str, Sequence[tuple[str, str]]], sizes: Mapping[str, int]) -> None:
    """Refuse domains of which no image could be read (``sizes[d] == 0``; ``skipped[d]``: why).

    Raises:
        DataError: naming the domains and one image's reason.
    """
    unreadable = {d: skipped[d] for d, n in sizes.items() if n == 0}
    if unreadable:
        d, bad = next(iter(unreadable.items()))
        raise DataError(
            f"no readable image in domain(s) {list(unreadable)}: all {len(bad)} image(s) of {d!r} were "
            f"skipped (e.g. {bad[0][1] if bad else 'no image'}); fix or remove them, or leave the domain out "
            "with --domains"
        )


def _index_in_memory(
    model: LoadedModel,
    data: Mapping[str, Sequence[Sample]],
    split: str | None,
    settings: EmbedSettings,
    index_type: str,
    memory_budget_mb: float | None,
    use_gpu: UseGpu,
    rerank: RerankParams | None,
    options: Mapping[str, Any],
) -> tuple[IndexSet, dict[str, int], DetectorVectors]:
    """Every domain embedded into memory (resumably) and indexed: the set, each domain's skipped images
    and the detector's vectors."""
    assert model.run_dir is not None
    embedded = embed_all(model, data, model.run_dir / EMBEDDINGS_DIR, split, settings)
    _check_readable({d: e.skipped for d, e in embedded.items()}, {d: len(e) for d, e in embedded.items()})
    iset = IndexSet.build(
        {d: e.embeddings for d, e in embedded.items()},
        {d: e.items for d, e in embedded.items()},
        model.model_hash,
        index_type,
        memory_budget_mb=memory_budget_mb,
        use_gpu=use_gpu,
        rerank=rerank,
        **options,
    )

    def detector_vectors(feature: str) -> dict[str, np.ndarray]:
        return feature_vectors(model, feature, embedded, data, split, settings)

    return iset, {d: len(e.skipped) for d, e in embedded.items()}, detector_vectors


def _index_from_store(
    model: LoadedModel,
    data: Mapping[str, Sequence[Sample]],
    split: str | None,
    settings: EmbedSettings,
    use_gpu: UseGpu,
    options: Mapping[str, Any],
) -> tuple[IndexSet, dict[str, int], DetectorVectors]:
    """``ivf-ondisk`` indexes read straight from the domains' chunk stores, shard by shard (``shard_rows``
    samples of consecutive chunks each; :meth:`StoredDomain.shards`): no domain is ever whole in memory.
    The detector is fitted on a seeded sample of :data:`MAX_PER_DOMAIN` rows per domain read from disk."""
    assert model.run_dir is not None
    base = model.run_dir / EMBEDDINGS_DIR
    stored = store_all(model, data, base, split, settings)
    _check_readable({d: s.skipped for d, s in stored.items()}, {d: len(s) for d, s in stored.items()})
    shard_rows = options.get("shard_rows", DEFAULT_SHARD_ROWS)
    iset = IndexSet({
        d: DomainIndex.build_on_disk(s.shards(shard_rows), len(s), s.dim, d, model.model_hash,
                                     nlist=options.get("nlist"), nprobe=options.get("nprobe"),
                                     pq_m=options.get("pq_m"), ondisk_dir=options.get("ondisk_dir"), use_gpu=use_gpu)
        for d, s in stored.items()
    })

    def detector_vectors(feature: str) -> dict[str, np.ndarray]:
        source = stored if feature == model.feature else store_all(model.with_feature(feature), data, base, split,
                                                                   settings)
        return {d: s.sample(MAX_PER_DOMAIN) for d, s in source.items() if len(s)}

    return iset, {d: len(s.skipped) for d, s in stored.items()}, detector_vectors


@dataclass
class AddedImages:
    """What :func:`add_to_index` did."""

    domain: str
    added: list[Item]
    skipped: list[tuple[str, str]]  # (path, reason): unreadable
    duplicates: list[str]  # already indexed, left alone
    total: int  # items in the domain's index afterwards


def add_to_index(
    run_dir: str | os.PathLike[str],
    domain: str,
    paths_or_folder: PathsOrFolder,
    *,
    index_dir: str | os.PathLike[str] | None = None,
    batch_size: int = 64,
    num_workers: int = 2,
    device: str | torch.device = "auto",
    progress: bool = True,
) -> AddedImages:
    """Embed new images and append them to ``domain``'s saved index, without rebuilding it.

    Files already in the index are skipped (``duplicates``); unreadable ones are reported in ``skipped``.
    Only that domain's folder is rewritten. When the index has re-ranking (DBA), a new image's vector is
    augmented with its nearest already-indexed vectors (:meth:`DomainIndex.add`); the existing vectors are
    not revisited — rebuild with :func:`build_indexes` to refresh every neighbourhood.

    Raises:
        QueryError: ``domain`` is not indexed. DataError: no path or no readable image.
        IndexMismatchError: the index belongs to another model.
    """
    settings = EmbedSettings(batch_size, num_workers, 1, progress, resume=False)
    model, iset = load_run_index(run_dir, index_dir=index_dir, device=device, use_gpu=False)
    assert model.run_dir is not None
    index = iset[domain]  # QueryError listing the indexed domains
    samples = collect_images(paths_or_folder, domain)
    known = {os.path.normpath(os.path.abspath(it.path)) for it in index.items}
    fresh, duplicates, seen = [], [], set()
    for s in samples:
        key = os.path.normpath(s.path)
        if key in known or key in seen:
            duplicates.append(s.path)
        else:
            seen.add(key)
            fresh.append(s)
    if not fresh:
        return AddedImages(domain, [], [], duplicates, len(index))
    emb = embed_samples(model, domain, fresh, None, dataclasses.replace(settings, chunk_size=len(fresh)))
    if len(emb) == 0:
        raise DataError(f"none of the {len(fresh)} new image(s) could be read: {emb.skipped[0][1]}")
    index.add(emb.embeddings, emb.items)
    root = index_root(model.run_dir, index_dir)
    meta = read_json(root / INDEX_SET_FILE)
    index.save(root / meta["domains"][domain])
    return AddedImages(domain, emb.items, emb.skipped, duplicates, len(index))

