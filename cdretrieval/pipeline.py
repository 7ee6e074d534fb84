"""Library entry points behind the CLI: embed domains, build / extend indexes, evaluate retrieval.

Each ``cdretrieval`` command calls exactly one function here:

* :func:`embed_domains` — ``cdretrieval embed``: every image of each domain → an L2-normalised embedding,
  saved resumably under ``RUN_DIR/embeddings/`` (see :mod:`cdretrieval.embedding_chunks`).
* :func:`build_indexes` — ``cdretrieval index``: embeddings → one FAISS index per domain in ``RUN_DIR/index/``,
  plus the domain detector that "auto" searches use (:mod:`cdretrieval.domain_detection`).
* :func:`add_to_index` — ``cdretrieval index --add``: append new images to one domain's index.
* :func:`evaluate` — ``cdretrieval evaluate``: P@k / mAP (and paired R@k) for every directed domain pair, and
  (given an index's domain detector) its accuracy on the evaluated images.

Without a run folder, embedding and evaluation use the backbone's pooled features with no adaptation
(the ``none`` row of the README's benchmark tables).

On the CPU the backbone runs under ONNX Runtime (:meth:`LoadedModel.backbone_forward`; 3–4× the eager
PyTorch embedding pass for Lite0 at 128 px, see docs/runtime.md); ``$CDRETRIEVAL_RUNTIME=torch`` keeps
PyTorch, CUDA always does.

Embedding folder layout::

    RUN_DIR/embeddings/<safe domain>/<feature>[-<safe split>]/progress.json, chunk_000000.npz, ...
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from cdretrieval.config import MAX_IMAGE_SIZE, MIN_IMAGE_SIZE, RunConfig
from cdretrieval.data.datasets import warn_skipped
from cdretrieval.data.digits import paired_domains, resolve_data_root
from cdretrieval.data.folders import Sample, parse_domains, scan_domains
from cdretrieval.data.images import is_image_file
from cdretrieval.data.transforms import eval_transform
from cdretrieval.device import amp_dtype, resolve_device, use_channels_last
from cdretrieval.domain_detection import DETECTOR_FEATURES, DomainDetector
from cdretrieval.embed import ExtractedBatch, iter_extract
from cdretrieval.embedding_chunks import DEFAULT_CHUNK_SIZE, Chunk, ChunkStore, samples_fingerprint
from cdretrieval.errors import CDRetrievalError, CheckpointError, DataError, IndexMismatchError, QueryError
from cdretrieval.index import INDEX_SET_FILE, MANIFEST_FILE, IndexSet, Item, UseGpu, load_detector, safe_domain_name
from cdretrieval.io import read_json
from cdretrieval.metrics import evaluate_domains
from cdretrieval.models.backbones import DEFAULT_BACKBONE
from cdretrieval.models.encoder import Encoder, build_encoder, state_dict_hash
from cdretrieval.models.runtime import RUNTIMES, FrozenForward, frozen_forward
from cdretrieval.rerank import DEFAULT_RERANK, RerankParams
from cdretrieval.run import CHECKPOINT_FILE, INDEX_DIR, load_encoder, model_hash

logger = logging.getLogger(__name__)

EMBEDDINGS_DIR = "embeddings"
FEATURES = ("head", "backbone")
#: What :func:`build_indexes` fits the domain detector on by default (see docs/ui.md for the measurements).
DEFAULT_DETECTOR_FEATURE = "backbone"

#: ``on_chunk(domain, chunk_index, samples_done, samples_total)``, called after each newly computed chunk.
ChunkCallback = Callable[[str, int, int, int], None]


# ---------------------------------------------------------------------------------------------------------
# The model that embeds


class _BackboneForwards:
    """The :class:`FrozenForward` of one encoder's backbone per (image side, runtime choice): each built once,
    on first use, under a lock (concurrent callers wait for the one build). Shared by the copies
    :meth:`LoadedModel.with_feature` makes, since every feature comes from the same backbone pass."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._built: dict[tuple[int, str | None], FrozenForward] = {}

    def get(
        self, backbone: torch.nn.Module, image_size: int, device: torch.device, runtime: str | None
    ) -> FrozenForward:
        with self._lock:
            fwd = self._built.get((image_size, runtime))
            if fwd is None:
                fwd = frozen_forward(backbone, image_size, device, runtime=runtime)
                self._built[(image_size, runtime)] = fwd
                logger.info("%s backbone at %d px runs on %s (%s)", type(backbone).__name__, image_size,
                            fwd.runtime, fwd.reason)
            return fwd


@dataclass
class LoadedModel:
    """An encoder ready to embed, and what its embeddings depend on.

    The backbone's forward pass runs through :func:`~cdretrieval.models.runtime.frozen_forward`: on the CPU an
    ONNX Runtime graph of the backbone (exported once per weights and image side, cached, checked against
    PyTorch), else PyTorch. The exported graph is the backbone alone (``[B, 3, S, S]`` → pooled ``[B, F]``);
    the L2 normalisation (``backbone`` feature) and the small projection head (``head`` feature) run in
    PyTorch fp32 on its output, so one graph serves both features, both at once (the Retriever's
    ``extra`` feature) and the training feature cache (which exports the same backbone: same cache key).
    """

    encoder: Encoder  # eval mode, on ``device``
    backbone: str
    feature: str  # "head" | "backbone": which output is the embedding
    image_size: int  # eval transform side in pixels
    model_hash: str  # run: model_hash(encoder), what index manifests record; baseline: "<backbone>:<hash>"
    cache_key_hash: str  # what cached embeddings depend on (the baseline's random head is left out)
    run_dir: Path | None  # absolute; None for the baseline
    device: torch.device
    amp: torch.dtype | None  # autocast dtype of the PyTorch path (ONNX Runtime runs fp32)
    channels_last: bool  # input layout of the PyTorch path
    config: RunConfig | None = None
    #: ``auto`` | ``onnxruntime`` | ``torch`` for the backbone's forward; None reads ``$CDRETRIEVAL_RUNTIME``.
    runtime: str | None = None
    _forwards: _BackboneForwards = field(default_factory=_BackboneForwards, init=False, repr=False, compare=False)

    @property
    def dim(self) -> int:
        """Embedding dimension for ``feature``."""
        return self.encoder.output_dim(self.feature)

    def backbone_forward(self) -> FrozenForward:
        """The backbone's forward pass at ``image_size``, built on first use: under ONNX Runtime an export the
        first time these weights and side are seen (2.5 s for Lite0 at 128 px here), afterwards loading the
        cached graph (0.1 s for Lite0, 1 s for resnet18)."""
        return self._forwards.get(self.encoder.backbone, self.image_size, self.device, self.runtime)

    def input_settings(self) -> tuple[torch.dtype | None, bool]:
        """``(autocast dtype, channels_last)`` for the inputs of :meth:`embed`: the model's under PyTorch,
        ``(None, False)`` under ONNX Runtime (its graph is fp32 NCHW; anything else is only converted back)."""
        if self.backbone_forward().runtime == "onnxruntime":
            return None, False
        return self.amp, self.channels_last

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """``[B,3,H,W]`` in [0,1] → L2-normalised ``[B, dim]`` (``Encoder.embed`` through the backbone runtime)."""
        return self.embed_features(x, (self.feature,))[0]

    def embed_features(self, x: torch.Tensor, features: Sequence[str]) -> list[torch.Tensor]:
        """Several features of ``x`` from one backbone pass: one L2-normalised ``[B, dim(feature)]`` each.

        Without gradient. Under PyTorch this is exactly ``Encoder.embed`` (in the caller's autocast); under
        ONNX Runtime the backbone's graph runs fp32 and the normalisation / head run in fp32, autocast off.
        """
        for feature in features:
            _check_feature(feature)
        fwd = self.backbone_forward()
        onnx = fwd.runtime == "onnxruntime"
        with torch.no_grad(), torch.autocast(self.device.type, enabled=False) if onnx else contextlib.nullcontext():
            f = fwd(x)  # [B, F]
            out = {}
            if "backbone" in features:
                out["backbone"] = F.normalize(f.float(), dim=1)
            if "head" in features:
                out["head"] = self.encoder.project(f)
        return [out[feature] for feature in features]

    def with_feature(self, feature: str) -> LoadedModel:
        """The same model embedding with another ``feature`` (sharing the built backbone forward)."""
        _check_feature(feature)
        if feature == "head" and self.run_dir is None:
            raise CheckpointError("feature 'head' needs a trained run folder; the baseline has only 'backbone'")
        other = dataclasses.replace(self, feature=feature)
        other._forwards = self._forwards
        return other


def check_image_size(size: Any, what: str) -> int:
    """``size`` as an image side in pixels: a multiple of 32 in [MIN_IMAGE_SIZE, MAX_IMAGE_SIZE].

    Raises:
        DataError: anything else, naming ``what`` (e.g. the manifest it was read from).
    """
    ok = isinstance(size, int) and not isinstance(size, bool)
    if not ok or size % 32 or not MIN_IMAGE_SIZE <= size <= MAX_IMAGE_SIZE:
        raise DataError(f"{what} must be a multiple of 32 in [{MIN_IMAGE_SIZE}, {MAX_IMAGE_SIZE}], got {size!r}")
    return int(size)


def _check_feature(feature: str) -> None:
    if feature not in FEATURES:
        raise ValueError(f"feature must be one of {FEATURES}, got {feature!r}")


def load_model(
    run_dir: str | os.PathLike[str] | None,
    *,
    backbone: str | None = None,
    weights: str = "default",
    feature: str | None = None,
    image_size: int | None = None,
    device: str | torch.device = "auto",
    runtime: str | None = None,
) -> LoadedModel:
    """The encoder of a run (``run_dir``), or the no-adaptation baseline ``backbone`` (``run_dir=None``).

    Args:
        run_dir: run folder written by ``cdretrieval pretrain``; None for the baseline.
        backbone: baseline backbone (default EfficientNet-Lite0); with a run it must match the run's.
        weights: baseline backbone weights (``default``, ``none``, or a state-dict file); ignored with a run.
        feature: ``head`` | ``backbone`` (default: the run's ``model.index_feature``; ``backbone`` without run).
        image_size: eval image side (default: the run's ``data.image_size``; 128 without a run).
        device: ``auto`` | ``cpu`` | ``cuda[:i]`` | a torch.device.
        runtime: the backbone's runtime, ``auto`` | ``onnxruntime`` | ``torch`` (None: ``$CDRETRIEVAL_RUNTIME``,
            default ``auto``: ONNX Runtime on the CPU when it works); see :meth:`LoadedModel.backbone_forward`.
    """
    if runtime is not None and runtime not in RUNTIMES:
        raise ValueError(f"runtime must be one of {RUNTIMES} or None, got {runtime!r}")
    dev = device if isinstance(device, torch.device) else resolve_device(device)
    cfg: RunConfig | None = None
    run: Path | None = None
    if run_dir is not None:
        run = Path(run_dir).expanduser().resolve()
        encoder, cfg = load_encoder(run, device=dev)
        if backbone is not None and backbone != cfg.model.backbone:
            raise CheckpointError(f"backbone {backbone!r} given, but the run {run} uses {cfg.model.backbone!r}")
        name = cfg.model.backbone
        feature = feature or cfg.model.index_feature
        size = image_size or cfg.data.image_size
        precision = cfg.train.precision
        full_hash = model_hash(encoder)
        cache_hash = full_hash
    else:
        name = backbone or DEFAULT_BACKBONE
        encoder = build_encoder(name, weights).to(dev).eval()
        feature = feature or "backbone"
        size = image_size or RunConfig().data.image_size
        precision = "auto"
        # The baseline's head is random and unused: only the backbone decides its embeddings.
        full_hash = cache_hash = f"{name}:{state_dict_hash(encoder.backbone)}"
    check_image_size(size, "image_size")
    _check_feature(feature)
    if feature == "head" and run is None:
        raise CheckpointError("feature 'head' needs a trained run folder (--run); the baseline has only 'backbone'")
    eval_transform(size)  # validates the size (multiple of 32) before any work
    channels_last = use_channels_last(dev, name)
    if channels_last:
        encoder = encoder.to(memory_format=torch.channels_last)  # hashes were taken above (layout-independent)
    return LoadedModel(
        encoder=encoder,
        backbone=name,
        feature=feature,
        image_size=size,
        model_hash=full_hash,
        cache_key_hash=cache_hash,
        run_dir=run,
        device=dev,
        amp=amp_dtype(dev, precision, name),
        channels_last=channels_last,
        config=cfg,
        runtime=runtime,
    )


# ---------------------------------------------------------------------------------------------------------
# Embedding


@dataclass
class EmbeddedDomain:
    """One domain's embeddings: row ``j`` of ``embeddings`` is ``items[j]`` (unreadable files are left out)."""

    domain: str
    embeddings: np.ndarray  # [N_ok, D] float32, L2-normalised
    items: list[Item]  # path, domain, label, width, height per row
    sample_indices: np.ndarray  # [N_ok] int64, index of each row in the domain's sorted sample list
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason) of unreadable files
    feature: str = "head"
    model_hash: str = ""

    @property
    def labels(self) -> list[str | None]:
        """Class label (class folder name) per row; None in the unlabeled layout."""
        return [it.label for it in self.items]

    def __len__(self) -> int:
        return len(self.items)


def _check_rerank(rerank: Any) -> None:
    """Fail before any model work when ``rerank`` is neither a :class:`RerankParams` nor None."""
    if rerank is not None and not isinstance(rerank, RerankParams):
        raise ValueError(f"rerank must be a RerankParams or None, got {rerank!r}")


def _check_embed_args(batch_size: int, num_workers: int, chunk_size: int) -> None:
    for name, value, low in (("batch_size", batch_size, 1), ("num_workers", num_workers, 0),
                             ("chunk_size", chunk_size, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an integer ≥ {low}, got {value!r}")


def _scan(
    data_root: str | os.PathLike[str], domains: str | Sequence[str] | None, split: str | None
) -> tuple[Path, dict[str, list[Sample]]]:
    """Absolute folder-layout root (``.npz`` digits materialised) and its domains' samples."""
    root = resolve_data_root(data_root).resolve()  # absolute: item paths must work from any cwd
    return root, scan_domains(root, parse_domains(domains), split)


def embeddings_folder(base: Path, domain: str, feature: str, split: str | None) -> Path:
    """``base/<safe domain>/<feature>[-<safe split>]``: one chunk store per domain, feature and split."""
    sub = feature if split is None else f"{feature}-{safe_domain_name(split)}"
    return base / safe_domain_name(domain) / sub


def _embed_domain(
    model: LoadedModel,
    domain: str,
    samples: Sequence[Sample],
    folder: Path | None,
    *,
    chunk_size: int,
    batch_size: int,
    num_workers: int,
    progress: bool,
    resume: bool,
    on_chunk: ChunkCallback | None,
) -> EmbeddedDomain:
    """Embed ``samples`` chunk by chunk, reusing (``resume``) and writing chunks in ``folder`` when given."""
    n, dim = len(samples), model.dim
    store: ChunkStore | None = None
    chunks: list[Chunk] = []
    if folder is not None:
        key = {
            "model_hash": model.cache_key_hash,
            "feature": model.feature,
            "image_size": model.image_size,
            "samples": samples_fingerprint(samples),
        }
        store = ChunkStore(folder, key, n, chunk_size, dim)
        if resume:
            chunks = store.completed()
        else:
            store.clear()
    n_chunks = -(-n // chunk_size)
    start = chunks[-1].stop if chunks else 0  # the stored chunks are the leading ones
    if chunks:
        logger.info("%s: resuming at image %d of %d (%d chunks on disk)", domain, start, n, len(chunks))

    bar = tqdm(total=n, initial=start, desc=f"embedding {domain}", unit="img", disable=not progress or start >= n,
               leave=False)
    feats: list[torch.Tensor] = []  # buffered rows not yet in a chunk
    idx: list[torch.Tensor] = []
    sizes: list[torch.Tensor] = []
    bad: list[tuple[int, str]] = []
    seen = start
    try:
        if start < n:  # the backbone's runtime decides the input settings (ONNX Runtime: fp32 NCHW)
            amp, channels_last = model.input_settings()
            batches: Iterator[ExtractedBatch] = iter_extract(
                model.embed, samples[start:], eval_transform(model.image_size), device=model.device, amp=amp,
                channels_last=channels_last, batch_size=batch_size, num_workers=num_workers,
            )
        else:  # all on disk: no model, no loader (its workers would start for nothing)
            batches = iter(())
        for batch in batches:
            if len(batch.indices):
                feats.append(batch.features)
                idx.append(batch.indices + start)  # loader indices are relative to samples[start:]
                sizes.append(batch.sizes)
            bad.extend((i + start, reason) for i, reason in batch.bad)
            seen += batch.count
            bar.update(batch.count)
            # Batches come in sample order: every chunk that ends at or before ``seen`` is complete.
            while len(chunks) < n_chunks and seen >= min((len(chunks) + 1) * chunk_size, n):
                i = len(chunks)
                chunk = _cut_chunk(i * chunk_size, min((i + 1) * chunk_size, n), dim, feats, idx, sizes, bad)
                chunks.append(chunk)
                if store is not None:
                    store.write(i, chunk)
                if on_chunk is not None:
                    on_chunk(domain, i, chunk.stop, n)
    finally:
        bar.close()
    assert len(chunks) == n_chunks and seen == n, f"{domain}: embedded {seen} of {n} images"
    return _assemble(model, domain, samples, chunks)


def _cut_chunk(
    start: int,
    stop: int,
    dim: int,
    feats: list[torch.Tensor],
    idx: list[torch.Tensor],
    sizes: list[torch.Tensor],
    bad: list[tuple[int, str]],
) -> Chunk:
    """Move the buffered rows with sample index < ``stop`` into a :class:`Chunk` (buffers keep the rest)."""
    f = torch.cat(feats) if feats else torch.empty(0, dim)  # [b, D]
    i = torch.cat(idx) if idx else torch.empty(0, dtype=torch.long)  # [b]
    s = torch.cat(sizes) if sizes else torch.empty(0, 2, dtype=torch.long)  # [b, 2]
    take = i < stop
    rest = ~take
    feats[:] = [f[rest]] if rest.any() else []
    idx[:] = [i[rest]] if rest.any() else []
    sizes[:] = [s[rest]] if rest.any() else []
    chunk_bad = [(j, r) for j, r in bad if j < stop]
    bad[:] = [(j, r) for j, r in bad if j >= stop]
    emb = f[take].numpy().astype(np.float32) if take.any() else np.zeros((0, dim), np.float32)
    return Chunk(start, stop, emb.reshape(-1, dim), i[take].numpy(), s[take].numpy().reshape(-1, 2), chunk_bad)


def _assemble(model: LoadedModel, domain: str, samples: Sequence[Sample], chunks: Sequence[Chunk]) -> EmbeddedDomain:
    """Concatenate chunks into one :class:`EmbeddedDomain` with its item table."""
    emb = np.concatenate([c.embeddings for c in chunks]) if chunks else np.zeros((0, model.dim), np.float32)
    rows = np.concatenate([c.indices for c in chunks]) if chunks else np.zeros(0, np.int64)
    wh = np.concatenate([c.sizes for c in chunks]) if chunks else np.zeros((0, 2), np.int64)
    bad = [b for c in chunks for b in c.bad]
    items = [
        Item(samples[j].path, domain, samples[j].label, int(w), int(h))
        for j, (w, h) in zip(rows.tolist(), wh.tolist(), strict=True)
    ]
    warn_skipped(bad, f"domain {domain}")
    return EmbeddedDomain(
        domain=domain,
        embeddings=np.ascontiguousarray(emb, dtype=np.float32),
        items=items,
        sample_indices=rows.astype(np.int64),
        skipped=[(samples[j].path, reason) for j, reason in bad],
        feature=model.feature,
        model_hash=model.model_hash,
    )


def _embed_all(
    model: LoadedModel,
    data: Mapping[str, Sequence[Sample]],
    store_base: Path | None,
    split: str | None,
    *,
    chunk_size: int,
    batch_size: int,
    num_workers: int,
    progress: bool,
    resume: bool,
    on_chunk: ChunkCallback | None = None,
) -> dict[str, EmbeddedDomain]:
    return {
        d: _embed_domain(
            model,
            d,
            samples,
            embeddings_folder(store_base, d, model.feature, split) if store_base is not None else None,
            chunk_size=chunk_size,
            batch_size=batch_size,
            num_workers=num_workers,
            progress=progress,
            resume=resume,
            on_chunk=on_chunk,
        )
        for d, samples in data.items()
    }


def embed_domains(
    run_dir: str | os.PathLike[str] | None,
    data_root: str | os.PathLike[str],
    domains: str | Sequence[str] | None = None,
    *,
    backbone: str | None = None,
    weights: str = "default",
    split: str | None = None,
    feature: str | None = None,
    image_size: int | None = None,
    batch_size: int = 64,
    num_workers: int = 2,
    device: str | torch.device = "auto",
    progress: bool = True,
    resume: bool = True,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    embeddings_dir: str | os.PathLike[str] | None = None,
    on_chunk: ChunkCallback | None = None,
) -> dict[str, EmbeddedDomain]:
    """Embed every image of ``domains`` (all of ``data_root``'s when None) with a run's encoder or a baseline.

    Embeddings are computed ``chunk_size`` images at a time; each finished chunk is saved atomically under
    ``embeddings_dir`` (default ``RUN_DIR/embeddings``; without a run and without ``embeddings_dir`` nothing
    is saved). A killed job rerun with ``resume=True`` continues after the last complete chunk; chunks made
    by another model (hash), feature, image size or sample list are discarded. Unreadable images are
    skipped, counted and reported (``EmbeddedDomain.skipped`` and a warning).

    Args:
        run_dir: run folder, or None for the no-adaptation baseline (``backbone`` features).
        data_root: ``ROOT/<domain>/[<class>/]<image>``, or a folder of digit ``.npz`` files.
        domains: names (list or ``"A,B"``), aliases accepted; None for all.
        backbone, weights: the baseline's backbone and weights (see :func:`load_model`).
        split: read ``<domain>_<split>.txt`` lists instead of every image.
        feature: ``head`` | ``backbone`` (default: the run's ``model.index_feature``).
        image_size: default: the run's ``data.image_size``.
        batch_size, num_workers: loader settings (workers decode ahead while the model runs).
        device: ``auto`` picks CUDA when available.
        progress: show a progress bar per domain.
        resume: reuse complete chunks on disk (False recomputes everything).
        chunk_size: images per saved chunk.
        embeddings_dir: where chunks go (overrides ``RUN_DIR/embeddings``).
        on_chunk: ``on_chunk(domain, chunk_index, samples_done, samples_total)`` after each new chunk.

    Returns:
        domain folder name → :class:`EmbeddedDomain`.
    """
    _check_embed_args(batch_size, num_workers, chunk_size)
    _root, data = _scan(data_root, domains, split)  # cheap checks first, then the model
    model = load_model(run_dir, backbone=backbone, weights=weights, feature=feature, image_size=image_size,
                       device=device)
    if embeddings_dir is not None:
        base: Path | None = Path(embeddings_dir)
    else:
        base = model.run_dir / EMBEDDINGS_DIR if model.run_dir is not None else None
    return _embed_all(model, data, base, split, chunk_size=chunk_size, batch_size=batch_size,
                      num_workers=num_workers, progress=progress, resume=resume, on_chunk=on_chunk)


# ---------------------------------------------------------------------------------------------------------
# Indexes


def _index_root(run: Path, index_dir: str | os.PathLike[str] | None) -> Path:
    return Path(index_dir) if index_dir is not None else run / INDEX_DIR


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
    rerank: RerankParams | None = DEFAULT_RERANK,
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

    Args:
        index_type: ``flat`` | ``ivf`` | ``hnsw`` | ``ivfpq`` | ``auto`` (per domain, under
            ``memory_budget_mb`` — see :func:`cdretrieval.index.choose_index_type`).
        rerank: re-ranking (default :data:`~cdretrieval.rerank.DEFAULT_RERANK`; None = plain indexes): each
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
    _check_embed_args(batch_size, num_workers, chunk_size)
    _check_rerank(rerank)
    if domain_detector is not None and domain_detector not in DETECTOR_FEATURES:
        raise ValueError(f"domain_detector must be one of {DETECTOR_FEATURES} or None, got {domain_detector!r}")
    root, data = _scan(data_root, domains, split)
    model = load_model(run_dir, feature=feature, device=device)
    assert model.run_dir is not None
    index_root = _index_root(model.run_dir, index_dir)
    if parse_domains(domains) is None and split is None:
        _check_no_domain_dropped(root, data, _previous_domains(index_root))
    embedded = _embed_all(model, data, model.run_dir / EMBEDDINGS_DIR, split, chunk_size=chunk_size,
                          batch_size=batch_size, num_workers=num_workers, progress=progress, resume=resume)
    unreadable = {d: e.skipped for d, e in embedded.items() if len(e) == 0}
    if unreadable:
        d, skipped = next(iter(unreadable.items()))
        raise DataError(
            f"no readable image in domain(s) {list(unreadable)}: all {len(skipped)} image(s) of {d!r} were "
            f"skipped (e.g. {skipped[0][1]}); fix or remove them, or leave the domain out with --domains"
        )
    try:
        iset = IndexSet.build(
            {d: e.embeddings for d, e in embedded.items()},
            {d: e.items for d, e in embedded.items()},
            model.model_hash,
            index_type,
            memory_budget_mb=memory_budget_mb,
            use_gpu=use_gpu,
            rerank=rerank,
            **index_options,
        )
    except CDRetrievalError:
        raise
    except ValueError as e:  # e.g. no index type fits the memory budget
        raise DataError(f"cannot build the {index_type} index: {e}") from e
    extra = _provenance(model, root, split)
    for d in iset:
        iset[d].manifest.update(extra, skipped=len(embedded[d].skipped))
    if domain_detector is not None and len(embedded) >= 2:
        vectors = _feature_vectors(model, domain_detector, embedded, data, split, chunk_size=chunk_size,
                                   batch_size=batch_size, num_workers=num_workers, progress=progress, resume=resume)
        iset.set_detector(DomainDetector.fit(vectors, feature=domain_detector,  # type: ignore[arg-type]
                                             model_hash=model.model_hash))
        logger.info("domain detector (%s features): held-out accuracy %s", domain_detector,
                    iset.detector.holdout_accuracy if iset.detector is not None else None)
    if parse_domains(domains) is not None:
        iset = _merge_with_previous(iset, index_root, use_gpu)
    iset.save(index_root)
    return iset


def _feature_vectors(
    model: LoadedModel,
    feature: str,
    embedded: Mapping[str, EmbeddedDomain],
    data: Mapping[str, Sequence[Sample]],
    split: str | None,
    *,
    chunk_size: int,
    batch_size: int,
    num_workers: int,
    progress: bool,
    resume: bool,
    store_base: Path | None = None,
) -> dict[str, np.ndarray]:
    """Each domain's ``feature`` vectors: the embeddings at hand when they are that feature, else embedded
    (resumably, in ``store_base``, default the run's embedding store) with the same model."""
    if feature == model.feature:
        return {d: e.embeddings for d, e in embedded.items()}
    other = model.with_feature(feature)
    base = store_base if store_base is not None else (
        model.run_dir / EMBEDDINGS_DIR if model.run_dir is not None else None)
    out = _embed_all(other, data, base, split, chunk_size=chunk_size, batch_size=batch_size,
                     num_workers=num_workers, progress=progress, resume=resume)
    return {d: e.embeddings for d, e in out.items() if len(e)}


def _recorded_build(root: Path) -> tuple[str | None, str | None]:
    """Best effort, for messages: the model hash and data root an index folder records (None if unreadable)."""
    try:
        meta = read_json(root / INDEX_SET_FILE)
        first = next(iter(meta["domains"].values()))
        manifest = read_json(root / first / MANIFEST_FILE)
        return str(meta.get("model_hash")), manifest.get("data_root")
    except (OSError, ValueError, KeyError, TypeError, AttributeError, StopIteration):
        return None, None


def _mismatched_hash(root: Path, expected: str) -> str | None:
    """Best effort, for messages: a model hash recorded in ``root`` (index set, then each domain manifest)
    that differs from ``expected`` — the one that made loading fail; None when none is readable."""
    try:
        meta = read_json(root / INDEX_SET_FILE)
        recorded = [meta.get("model_hash")]
        for sub in meta["domains"].values():
            recorded.append(read_json(root / sub / MANIFEST_FILE).get("model_hash"))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return next((str(h) for h in recorded if isinstance(h, str) and h != expected), None)


def load_run_index(
    run_dir: str | os.PathLike[str],
    *,
    index_dir: str | os.PathLike[str] | None = None,
    device: str | torch.device = "auto",
    use_gpu: UseGpu = "auto",
    on_stage: Callable[[str], None] | None = None,
) -> tuple[LoadedModel, IndexSet]:
    """A run's encoder and its saved indexes, checked to belong together.

    The embedding ``feature`` is the one the index recorded. An index built with another model (hash) or
    dimension is refused with :class:`IndexMismatchError` saying how to rebuild it. ``on_stage(message)``
    is told what is being loaded as each part starts (e.g. to print it).
    """
    say = on_stage or (lambda _message: None)
    say(f"loading the model from {Path(run_dir) / CHECKPOINT_FILE}")
    model = load_model(run_dir, device=device)
    assert model.run_dir is not None
    root = _index_root(model.run_dir, index_dir)
    say(f"loading the indexes from {root}")
    recorded_hash, recorded_root = _recorded_build(root)
    rebuild = f"rerun `cdretrieval index --run {model.run_dir} --data {recorded_root or 'ROOT'}`"
    try:
        iset = IndexSet.load(root, expected_model_hash=model.model_hash, use_gpu=use_gpu)
    except IndexMismatchError as e:
        recorded_hash = _mismatched_hash(root, model.model_hash) or recorded_hash
        raise IndexMismatchError(
            f"the index in {root} was built with another model (hash {str(recorded_hash)[:12]}…) than the "
            f"run's checkpoint (hash {model.model_hash[:12]}…): the run was retrained or changed since; {rebuild}"
        ) from e
    first = iset[iset.domains[0]].manifest
    feature = str(first.get("feature", model.feature))
    for d in iset:
        if iset[d].manifest.get("feature", feature) != feature:
            raise IndexMismatchError(f"the domains in {root} were indexed with different features; {rebuild}")
    model = model.with_feature(feature)
    if iset.dim != model.dim:
        raise IndexMismatchError(
            f"the index in {root} holds {iset.dim}-d vectors but the run's {feature!r} feature is "
            f"{model.dim}-d; {rebuild}"
        )
    size = first.get("image_size", model.image_size)
    for d in iset:
        recorded = iset[d].manifest.get("image_size", size)
        check_image_size(recorded, f"the image_size recorded in {root / safe_domain_name(d) / MANIFEST_FILE}")
        if recorded != size:
            raise IndexMismatchError(f"the domains in {root} were indexed at different image sizes; {rebuild}")
    if size != model.image_size:
        model = dataclasses.replace(model, image_size=size)  # queries must be resized as the gallery was
    return model, iset


PathsOrFolder = str | os.PathLike[str] | Sequence[str | os.PathLike[str]]


def collect_images(paths_or_folder: PathsOrFolder, domain: str) -> list[Sample]:
    """Samples for image files and folders (walked recursively; a sub-folder name becomes the label).

    Raises:
        DataError: a path does not exist, or no image file is found.
    """
    entries = [paths_or_folder] if isinstance(paths_or_folder, (str, os.PathLike)) else list(paths_or_folder)
    if not entries:
        raise DataError("no image paths given")
    out: list[Sample] = []
    for entry in entries:
        p = Path(entry).expanduser().resolve()
        if p.is_dir():
            for dirpath, dirs, files in os.walk(p):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                here = Path(dirpath)
                label = None if here == p else here.relative_to(p).parts[0]
                out.extend(Sample(str(here / f), domain, label) for f in sorted(files) if is_image_file(f))
        elif p.is_file():
            out.append(Sample(str(p), domain, None))
        else:
            raise DataError(f"{entry}: no such file or folder")
    if not out:
        raise DataError(f"no image files found in {[str(e) for e in entries]}")
    return out


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
    _check_embed_args(batch_size, num_workers, 1)
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
    emb = _embed_domain(model, domain, fresh, None, chunk_size=max(1, len(fresh)), batch_size=batch_size,
                        num_workers=num_workers, progress=progress, resume=False, on_chunk=None)
    if len(emb) == 0:
        raise DataError(f"none of the {len(fresh)} new image(s) could be read: {emb.skipped[0][1]}")
    index.add(emb.embeddings, emb.items)
    root = _index_root(model.run_dir, index_dir)
    meta = read_json(root / INDEX_SET_FILE)
    index.save(root / meta["domains"][domain])
    return AddedImages(domain, emb.items, emb.skipped, duplicates, len(index))


# ---------------------------------------------------------------------------------------------------------
# Evaluation


def _check_ks(ks: Sequence[int]) -> list[int]:
    out = list(ks)
    if not out:
        raise QueryError("ks must name at least one cut-off")
    for k in out:
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise QueryError(f"every k must be a positive integer, got {k!r} in {list(ks)}")
    return [int(k) for k in out]


def _paired_indices(root: Path, embedded: Mapping[str, EmbeddedDomain]) -> dict[tuple[str, str], np.ndarray]:
    """For instance-paired domains (``pairs.json``), query row → gallery row of the same file stem (or -1).

    MNIST image i and MNIST-M image i share the stem; a stem that is unreadable in one domain, or repeated
    within one, pairs with nothing.
    """

    def stems(e: EmbeddedDomain) -> dict[str, int]:
        rows: dict[str, int] = {}
        repeated = set()
        for j, it in enumerate(e.items):
            s = Path(it.path).stem
            if s in rows:
                repeated.add(s)
            rows[s] = j
        return {s: j for s, j in rows.items() if s not in repeated}

    out: dict[tuple[str, str], np.ndarray] = {}
    for a, b in paired_domains(root):
        if a not in embedded or b not in embedded:
            continue
        for q, g in ((a, b), (b, a)):
            gallery = stems(embedded[g])
            out[(q, g)] = np.array([gallery.get(Path(it.path).stem, -1) for it in embedded[q].items], np.int64)
    return out


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
    _check_embed_args(batch_size, num_workers, DEFAULT_CHUNK_SIZE)
    _check_rerank(rerank)
    detector = _resolve_detector(domain_detector)
    root, data = _scan(data_root, names, split)
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
    if embeddings_dir is not None:
        base: Path | None = Path(embeddings_dir)
    else:
        base = model.run_dir / EMBEDDINGS_DIR if model.run_dir is not None else None
    embedded = _embed_all(model, data, base, split, chunk_size=DEFAULT_CHUNK_SIZE, batch_size=batch_size,
                          num_workers=num_workers, progress=progress, resume=resume)
    empty = [d for d, e in embedded.items() if len(e) == 0]
    if empty:
        raise DataError(f"no readable image in domain(s) {empty}")
    result = evaluate_domains(
        {d: e.embeddings for d, e in embedded.items()},
        {d: np.array(e.labels) for d, e in embedded.items()},
        domains=list(embedded),
        ks=ks,
        paired=_paired_indices(root, embedded),
        rerank=rerank,
    )
    detection: dict[str, Any] | None = None
    if detector is not None:
        vectors = _feature_vectors(model, detector.feature, embedded, data, split, chunk_size=DEFAULT_CHUNK_SIZE,
                                   batch_size=batch_size, num_workers=num_workers, progress=progress,
                                   resume=resume, store_base=base)
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
