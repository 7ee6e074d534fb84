"""Speed suite: training and embedding overhead ratios, single-query latency, index build and search.

    python -m benchmarks.speed [--quick] [--out benchmarks/results] [--sizes 10000,100000,1000000] [--device auto]
                               [--threads 1,2] [--faiss-threads N] [--sections train,embed,latency,index] [--data ROOT]

Sections (one run, one ``speed.json`` + ``speed.md`` via :func:`benchmarks.common.write_outputs`):

1. **train** — images/s of the full method's step (``Trainer.train_step`` with every loss term active, memory
   banks, and the per-epoch ``cluster_banks`` time spread over the epoch's steps) ÷ images/s of the bare model's
   forward + backward + optimiser step on the same inputs (same per-domain batches, resolution and optimiser)
   with a trivial loss; in ``frozen`` mode (projection head on cached backbone features) and ``finetune`` mode
   (whole encoder on images). A time split (each loss term's forward + backward on the embeddings, bank
   update, clustering) says where the extra time goes.
2. **embed** — ``extract`` / ``iter_extract`` end to end on image files (decode → preprocess → model) ÷ the same
   model on preloaded tensors, same batch size and image size.
3. **latency** — one query file through ``Retriever.search`` on a 10k-vector gallery: p50 / p95, and its split
   into decode + preprocess, model, search.
4. **index** — :mod:`benchmarks.index_speed`: build time, QPS, recall@10 against flat, size, per index type.

Compared variants run interleaved in one process (every variant once per round, median over rounds): the
machines are shared, so only side-by-side numbers and their ratios mean anything.

Stand-ins, stated in the output too: in frozen mode the feature cache holds random features of the real cache's
shape (a step costs the same whatever the values; caching real ones would take minutes of backbone passes);
finetune steps see random image tensors and banks that were not filled by a forward pass (random unit rows, so
clustering runs the same number of iterations); the latency gallery is random unit vectors of the model's
dimension.

GPU: with ``--device auto`` on a CUDA machine the models run there (timings synchronise the device) and FAISS
searches on GPU when it has a GPU build; that path has not been run on the 2-core CPU machines these numbers
come from.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import itertools
import os
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.common import RESULTS, interleaved, md_table, medians, timed, write_outputs
from benchmarks.index_speed import INDEX_HEADERS, bench_indexes, index_table_rows
from cdretrieval.config import RunConfig
from cdretrieval.data.demo import generate_demo_data
from cdretrieval.data.digits import resolve_data_root
from cdretrieval.data.folders import Sample, scan_domains
from cdretrieval.data.images import load_image
from cdretrieval.data.transforms import eval_transform
from cdretrieval.device import autocast, resolve_device
from cdretrieval.embed import extract, iter_extract
from cdretrieval.feature_cache import feature_cache_key
from cdretrieval.index import IndexSet, Item, UseGpu
from cdretrieval.io import atomic_torch_save
from cdretrieval.loading import LoadedModel, load_model
from cdretrieval.losses.objective import active_terms, compute_losses
from cdretrieval.prototypes import Prototypes, cluster_banks
from cdretrieval.rerank import DEFAULT_RERANK
from cdretrieval.retrieval import Retriever, query_to_image
from cdretrieval.run import INDEX_DIR, encoder_from_config, save_checkpoint
from cdretrieval.train import Trainer, make_optimizer

SECTIONS = ("train", "embed", "latency", "index")
TRAIN_RATIO_GOAL = 0.85  # full step img/s ÷ bare step img/s
EMBED_RATIO_GOAL = 0.8  # end-to-end embedding img/s ÷ bare model img/s
LATENCY_P50_GOAL_MS = 50.0  # single query, end to end, up to 100k gallery vectors


def latency_goal_ms(gallery: int) -> float:
    """The p50 goal of issue 11 for a gallery of ``gallery`` vectors: 50 ms (10k), 100 ms from 1M vectors."""
    return LATENCY_P50_GOAL_MS if gallery < 1_000_000 else 100.0


# --------------------------------------------------------------------------------------------- options


@dataclass
class SuiteOptions:
    """Sizes of every section; :func:`preset` gives the full and ``--quick`` ones, tests pass tiny ones."""

    data_root: Path
    device: torch.device
    workdir: Path
    sections: tuple[str, ...] = SECTIONS
    image_size: int = 128  # training (finetune), embedding and the latency run
    frozen_batch: int = 64  # per domain per step (the default train.batch_size)
    finetune_batch: int = 64
    train_repeats: int = 3
    embed_images: int = 512
    embed_batch: int = 64
    embed_repeats: int = 3
    worker_counts: tuple[int, ...] = (0, 2)
    latency_gallery: int = 10_000
    latency_rerank: bool = True  # the gallery's manifest records the default re-ranking: queries run αQE
    latency_queries: int = 200
    index_sizes: tuple[int, ...] = (10_000, 100_000, 1_000_000)
    index_dim: int = 256
    index_queries: int = 1000
    index_repeats: int = 3
    k: int = 10
    warmup: int = 1  # untimed rounds before the timed ones (train, embed; latency: queries per block)
    threads: tuple[int, ...] = ()  # torch CPU thread counts to measure at (empty: the process's current one)
    faiss_threads: int | None = None  # FAISS OpenMP threads for the index section (None: FAISS's default)

    @property
    def thread_counts(self) -> tuple[int, ...]:
        return self.threads or (torch.get_num_threads(),)

    @property
    def use_gpu(self) -> UseGpu:
        """FAISS on GPU when the model runs on CUDA (and FAISS has a GPU build), never otherwise."""
        return "auto" if self.device.type == "cuda" else False


def default_data_root() -> Path:
    """``../shared/data/pacs`` (or ``$CDRETRIEVAL_SHARED_DATA/pacs``) when present, else the demo data set."""
    shared = Path(os.environ.get("CDRETRIEVAL_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
    pacs = shared / "pacs"
    return pacs if (pacs / "photo").is_dir() else generate_demo_data()


def preset(args: argparse.Namespace, workdir: Path) -> SuiteOptions:
    """Options for the command line: the full suite, or ``--quick`` (10k and 100k vectors, fewer repeats)."""
    opts = SuiteOptions(
        data_root=Path(args.data) if args.data else default_data_root(),
        device=resolve_device(args.device),
        workdir=workdir,
        sections=tuple(args.sections.split(",")),
        threads=tuple(int(t) for t in args.threads.split(",")) if args.threads else (),
        faiss_threads=args.faiss_threads,
        latency_gallery=args.latency_gallery,
        latency_rerank=args.latency_rerank == "on",
    )
    if args.quick:
        opts = replace(opts, finetune_batch=16, train_repeats=2, embed_images=192, embed_repeats=2,
                       latency_queries=100, index_sizes=(10_000, 100_000), index_queries=200, index_repeats=2)
    if args.sizes:
        opts = replace(opts, index_sizes=tuple(int(s) for s in args.sizes.split(",")))
    unknown = set(opts.sections) - set(SECTIONS)
    if unknown:
        raise ValueError(f"unknown section(s) {sorted(unknown)}; choose from {', '.join(SECTIONS)}")
    return opts


# --------------------------------------------------------------------------------------------- timing


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the block with ``n`` torch CPU threads (intra-op), then restore the previous count."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def percentile_ms(seconds: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(seconds) * 1000.0, q))


# --------------------------------------------------------------------------------------------- 1. training


def train_config(opts: SuiteOptions, mode: str) -> RunConfig:
    """The default config on ``opts.data_root`` with ``mode`` and that mode's batch size."""
    cfg = RunConfig()
    cfg.data.root = str(opts.data_root)
    cfg.data.image_size = opts.image_size
    cfg.data.num_workers = 0
    cfg.train.mode = mode  # type: ignore[assignment]
    cfg.train.batch_size = opts.frozen_batch if mode == "frozen" else opts.finetune_batch
    cfg.train.device = str(opts.device)
    cfg.train.epochs = 2  # epoch 1 has every term active
    return cfg


def write_random_feature_cache(cfg: RunConfig, cache_root: Path, seed: int = 0) -> dict[str, int]:
    """Frozen-mode feature caches ``[1 + V, N, F]`` of random features for every domain, where the trainer looks.

    The trainer then skips the backbone passes; its steps cost the same as with real features. Returns the
    domain sizes.
    """
    samples = scan_domains(resolve_data_root(cfg.data.root), cfg.data.domains or None, cfg.data.split)
    feature_dim = encoder_from_config(cfg, weights="none").backbone.feature_dim
    gen = torch.Generator().manual_seed(seed)
    for domain_samples in samples.values():
        n = len(domain_samples)
        feats = torch.rand(1 + cfg.train.cached_views, n, feature_dim, generator=gen).half()
        key = feature_cache_key(cfg, domain_samples)
        atomic_torch_save({"features": feats, "kept": torch.arange(n)}, cache_root / f"{key}.pt")
    return {d: len(s) for d, s in samples.items()}


@dataclass
class StepInputs:
    """One step's inputs per domain: bank positions ``[B]`` and cached-view ids ``[B]`` or images ``[B,3,S,S]``."""

    idx: dict[str, torch.Tensor]
    views: dict[str, torch.Tensor] | None
    images: dict[str, torch.Tensor] | None


def step_inputs(trainer: Trainer, seed: int = 0) -> StepInputs:
    """Random bank positions per domain plus random view ids (frozen) or random images (finetune)."""
    gen = torch.Generator().manual_seed(seed)
    b, dev, size = trainer.cfg.train.batch_size, trainer.device, trainer.cfg.data.image_size
    idx = {d: torch.randperm(len(trainer.samples[d]), generator=gen)[:b].to(dev) for d in trainer.domains}
    if trainer.mode == "frozen":
        nv = trainer.cfg.train.cached_views
        views = {d: torch.randint(1, nv + 1, (b,), generator=gen).to(dev) for d in trainer.domains}
        return StepInputs(idx, views, None)
    images = {d: torch.rand(b, 3, size, size, generator=gen).to(dev) for d in trainer.domains}
    return StepInputs(idx, None, images)


def model_outputs(trainer: Trainer, model: torch.nn.Module | None, inputs: StepInputs, d: str) -> torch.Tensor:
    """What ``model`` (None: the trainer's; or a copy) outputs for domain ``d``'s batch (:meth:`Trainer.outputs`)."""
    views = inputs.views[d] if inputs.views is not None else None
    images = inputs.images[d] if inputs.images is not None else None
    return trainer.outputs(d, inputs.idx[d], views, images, model=model)


def bare_step(trainer: Trainer, inputs: StepInputs) -> Callable[[], None]:
    """A step of a copy of the trained module (head or encoder) with a trivial loss and the same optimiser type."""
    model = copy.deepcopy(trainer.model).train()
    # The copy is the head over cached features (frozen: CachedInputModel) or the whole encoder (finetune).
    body = getattr(model, "upper", None) if trainer.mode == "frozen" else getattr(model, "backbone", None)
    head = model.head
    assert isinstance(head, torch.nn.Module)
    opt = make_optimizer(head, body, trainer.cfg.train)

    def step() -> None:
        zero = torch.zeros((), device=trainer.device)
        loss = sum((model_outputs(trainer, model, inputs, d).mean() for d in trainer.domains), zero)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def loss_term_steps(
    trainer: Trainer, inputs: StepInputs, protos: Prototypes, terms: Mapping[str, float]
) -> dict[str, Callable[[], None]]:
    """Per loss term: its forward + backward down to the embeddings (leaf tensors), model excluded."""
    with torch.no_grad():
        feats = {d: model_outputs(trainer, trainer.model, inputs, d) for d in trainer.domains}

    def run(name: str) -> Callable[[], None]:
        def step() -> None:
            leaves = {d: f.detach().clone().requires_grad_(True) for d, f in feats.items()}
            losses = compute_losses(leaves, inputs.idx, trainer.banks, protos, trainer.mim, trainer.cfg,
                                    {name: terms[name]})
            losses[name].backward()

        return step

    def bank_update() -> None:
        for d in trainer.domains:
            trainer.banks.update(d, inputs.idx[d], feats[d], trainer.cfg.losses.bank_momentum)

    return {**{f"loss:{n}": run(n) for n in terms}, "bank_update": bank_update}


def bench_training(opts: SuiteOptions, mode: str) -> dict[str, Any]:
    """Full method step vs bare model step for ``mode``, interleaved; plus the time split of the full step."""
    cfg = train_config(opts, mode)
    cache = opts.workdir / f"features-{mode}"
    if mode == "frozen":
        write_random_feature_cache(cfg, cache)
    trainer = Trainer(cfg, opts.workdir / f"run-{mode}", progress=False, feature_cache=cache)
    if mode == "frozen":
        trainer.fill_banks()  # cheap here: the head over cached features
    epoch = 1
    terms = active_terms(cfg, epoch)
    need_joint = "mim" in terms
    protos = cluster_banks(trainer.banks, cfg, epoch, need_joint).to(trainer.device)
    trainer.mim.reset()
    inputs = step_inputs(trainer)
    variants: dict[str, Callable[[], object]] = {
        "full_step": lambda: trainer.train_step(inputs.idx, protos, terms, inputs.views, inputs.images),
        "bare_step": bare_step(trainer, inputs),
        "clustering": lambda: cluster_banks(trainer.banks, cfg, epoch, need_joint),
        **loss_term_steps(trainer, inputs, protos, terms),
    }
    times = interleaved(variants, opts.train_repeats, trainer.device, opts.warmup)
    med = medians(times)
    steps = trainer.steps_per_epoch
    images = cfg.train.batch_size * len(trainer.domains)
    cluster_per_step = med["clustering"] / steps
    full_s = med["full_step"] + cluster_per_step
    split = {"model fwd+bwd+opt (bare step)": med["bare_step"],
             **{k: v for k, v in med.items() if k.startswith("loss:") or k == "bank_update"},
             "clustering / steps_per_epoch": cluster_per_step}
    split["other"] = full_s - sum(split.values())
    return {
        "mode": mode,
        "domains": {d: len(s) for d, s in trainer.samples.items()},
        "batch_per_domain": cfg.train.batch_size,
        "images_per_step": images,
        "input": "cached features [B, F]" if mode == "frozen" else f"images [B, 3, S, S], S = {opts.image_size}",
        "stand_ins": ("random cached features of the real cache's shape" if mode == "frozen"
                      else "random image tensors; banks not filled (random unit rows)"),
        "amp": str(trainer.amp),
        "terms": sorted(terms),
        "steps_per_epoch": steps,
        "step_s": med["full_step"],
        "bare_step_s": med["bare_step"],
        "clustering_s": med["clustering"],
        "full_images_per_s": images / full_s,
        "bare_images_per_s": images / med["bare_step"],
        "ratio": med["bare_step"] / full_s,
        "ratio_without_clustering": med["bare_step"] / med["full_step"],
        "split_s": split,
        "repeats": opts.train_repeats,
        "times_s": times,
    }


# --------------------------------------------------------------------------------------------- 2. embedding


def subset(root: Path, n: int) -> list[Sample]:
    """``n`` samples spread evenly over all domains of ``root`` (every k-th of the sorted list)."""
    samples = [s for ss in scan_domains(resolve_data_root(root)).values() for s in ss]
    return samples[:: max(1, len(samples) // n)][:n]


def embed_preloaded(model: LoadedModel, images: torch.Tensor, batch_size: int, channels_last: bool) -> None:
    """The model alone: batches of preloaded ``images [N,3,S,S]`` → embeddings on CPU (as ``extract`` runs it)."""
    with torch.no_grad():
        for i in range(0, len(images), batch_size):
            x = images[i : i + batch_size].to(model.device)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with autocast(model.device, model.amp):
                y = model.embed(x)
            y.float().cpu()


def library_extract(
    model: LoadedModel, samples: Sequence[Sample], batch_size: int, num_workers: int, streaming: bool
) -> Callable[[], None]:
    """One end-to-end pass over ``samples`` with ``iter_extract`` (``streaming``) or ``extract``."""
    transform = eval_transform(model.image_size)

    def run() -> None:
        if streaming:
            for _ in iter_extract(model.embed, samples, transform, device=model.device, amp=model.amp,
                                  channels_last=model.channels_last, batch_size=batch_size, num_workers=num_workers):
                pass
        else:
            extract(model.embed, samples, transform, device=model.device, amp=model.amp,
                    channels_last=model.channels_last, batch_size=batch_size, num_workers=num_workers,
                    progress=False)

    return run


def bench_embedding(opts: SuiteOptions, model: LoadedModel, samples: Sequence[Sample]) -> dict[str, Any]:
    """``extract`` (most workers) / ``iter_extract`` (each worker count) vs the bare model on preloaded tensors.

    Also times decoding + preprocessing alone (main process) and, when the library's layout for this backbone
    is NCHW, the bare model in channels_last (to check the layout choice on this machine).
    """
    transform = eval_transform(model.image_size)
    images = torch.stack([transform(load_image(s.path)) for s in samples])  # [N, 3, S, S]
    bs = opts.embed_batch

    def decode() -> None:
        for s in samples:
            transform(load_image(s.path))

    variants: dict[str, Callable[[], object]] = {
        "bare": lambda: embed_preloaded(model, images, bs, model.channels_last),
        "decode+preprocess only": decode,
        f"extract w={max(opts.worker_counts)}": library_extract(model, samples, bs, max(opts.worker_counts), False),
    }
    for w in opts.worker_counts:
        variants[f"iter_extract w={w}"] = library_extract(model, samples, bs, w, streaming=True)
    if not model.channels_last:
        cl_model = replace(model, encoder=copy.deepcopy(model.encoder).to(memory_format=torch.channels_last))
        variants["bare channels_last (info)"] = lambda: embed_preloaded(cl_model, images, bs, True)
    for _ in range(opts.warmup):  # one batch through each model copy; loader workers start afresh every pass anyway
        embed_preloaded(model, images[:bs], bs, model.channels_last)
        if not model.channels_last:
            embed_preloaded(cl_model, images[:bs], bs, True)
    times = interleaved(variants, opts.embed_repeats, model.device, warmup=0)
    med = medians(times)
    n = len(samples)
    rows = {name: {"images_per_s": n / s, "ratio_to_bare": med["bare"] / s} for name, s in med.items()}
    pipeline_default = f"iter_extract w={max(opts.worker_counts)}"
    return {
        "images": n,
        "image_size": model.image_size,
        "batch_size": bs,
        "backbone": model.backbone,
        "amp": str(model.amp),
        "channels_last": model.channels_last,
        "variants": rows,
        "ratio": rows[pipeline_default]["ratio_to_bare"],
        "ratio_variant": pipeline_default,
        "best_ratio": max(r["ratio_to_bare"] for k, r in rows.items() if k.startswith(("extract", "iter_extract"))),
        "repeats": opts.embed_repeats,
        "times_s": times,
    }


# --------------------------------------------------------------------------------------------- 3. latency


def make_bench_run(folder: Path, image_size: int, seed: int = 0) -> Path:
    """A run folder holding the default encoder (EfficientNet-Lite0 + a fresh 1024 → 256 head) at ``image_size``."""
    cfg = RunConfig()
    cfg.data.image_size = image_size
    torch.manual_seed(seed)
    encoder = encoder_from_config(cfg)
    save_checkpoint(folder, {"model": encoder.state_dict()}, cfg)
    return folder


def add_random_gallery(
    run: Path, model: LoadedModel, n: int, domain: str = "gallery", seed: int = 0, rerank: bool = False
) -> None:
    """Save an index (``auto`` type) of ``n`` random unit vectors of the model's dim as the run's index.

    ``rerank``: the manifest records :data:`~cdretrieval.rerank.DEFAULT_RERANK`, so every query runs αQE (one
    extra search and ``qe_k`` stored vectors per query), as over an index built with re-ranking. DBA is not
    computed: it changes the stored vectors at index time only, not what a query costs (random vectors either way).
    """
    vectors = np.random.default_rng(seed).standard_normal((n, model.dim), dtype=np.float32)
    items = [Item(f"gallery/{i:07d}.png", domain) for i in range(n)]
    iset = IndexSet.build({domain: vectors}, {domain: items}, model.model_hash, "auto", use_gpu=False)
    del vectors
    iset[domain].manifest.update(feature=model.feature, backbone=model.backbone, image_size=model.image_size)
    if rerank:
        iset[domain].manifest["rerank"] = DEFAULT_RERANK.to_dict()
    iset.save(run / INDEX_DIR)


def time_query(retriever: Retriever, path: str, domain: str, k: int) -> list[float]:
    """Seconds of ``Retriever.search`` end to end, then of its parts redone by hand: decode + preprocess, model,
    search (the same calls ``search`` makes, in the same order)."""
    model = retriever.model
    transform = eval_transform(model.image_size)
    marks = [time.perf_counter()]
    retriever.search(path, domain, k=k)
    marks.append(time.perf_counter())
    x = transform(query_to_image(path))[None]  # [1, 3, S, S]
    marks.append(time.perf_counter())
    with torch.no_grad(), autocast(model.device, model.amp):
        xd = x.to(model.device)
        emb = model.embed(xd.contiguous(memory_format=torch.channels_last) if model.channels_last else xd)
    q = emb.float().cpu().numpy()  # [1, D]; the copy to host waits for the device
    marks.append(time.perf_counter())
    retriever.search_embeddings(q, domain, k=k)
    marks.append(time.perf_counter())
    return [b - a for a, b in itertools.pairwise(marks)]


def time_model(model: LoadedModel, path: str, channels_last: bool) -> float:
    """Seconds of the model alone on one preprocessed query (``channels_last`` input layout or not)."""
    x = eval_transform(model.image_size)(query_to_image(path))[None].to(model.device)  # [1, 3, S, S]
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad(), autocast(model.device, model.amp):
        return timed(lambda: model.embed(x).float().cpu())


LATENCY_PARTS = ("end_to_end", "decode+preprocess", "model", "search")
CL_PART = "model channels_last (info)"


def latency_stats(seconds: Sequence[float]) -> dict[str, float]:
    return {"p50_ms": percentile_ms(seconds, 50), "p95_ms": percentile_ms(seconds, 95),
            "mean_ms": 1000.0 * float(np.mean(seconds))}


def bench_latency(
    opts: SuiteOptions, run: Path, query_paths: Sequence[str], domain: str = "gallery", block: int = 10
) -> dict[str, Any]:
    """:func:`time_query` for ``opts.latency_queries`` queries (cycling over ``query_paths``) at every torch thread
    count, interleaved in blocks of ``block`` queries.

    After each switch of thread count ``opts.warmup`` queries run untimed: OpenMP workers of the previous setting
    keep spinning for a while after their last parallel region and would slow the first query on a 2-core machine.
    """
    retriever = Retriever.from_run(run, device=opts.device, use_gpu=opts.use_gpu)
    model = retriever.model
    cl_model = None  # the library's layout is NCHW here: also time the same weights in channels_last
    if not model.channels_last:
        cl_model = replace(model, encoder=copy.deepcopy(model.encoder).to(memory_format=torch.channels_last))
    parts = LATENCY_PARTS if cl_model is None else (*LATENCY_PARTS, CL_PART)
    times: dict[int, dict[str, list[float]]] = {t: {p: [] for p in parts} for t in opts.thread_counts}
    for start in range(0, opts.latency_queries, block):
        paths = [query_paths[i % len(query_paths)] for i in range(start, min(start + block, opts.latency_queries))]
        for t in opts.thread_counts:
            with torch_threads(t):
                for _ in range(opts.warmup):
                    time_query(retriever, paths[0], domain, opts.k)
                    if cl_model is not None:
                        time_model(cl_model, paths[0], True)
                for path in paths:
                    for part, seconds in zip(LATENCY_PARTS, time_query(retriever, path, domain, opts.k), strict=True):
                        times[t][part].append(seconds)
                    if cl_model is not None:
                        times[t][CL_PART].append(time_model(cl_model, path, True))
    by_threads = {str(t): {p: latency_stats(v) for p, v in ts.items()} for t, ts in times.items()}
    default = str(opts.thread_counts[0])
    info = retriever.info()
    return {
        "gallery": len(retriever.indexes[domain]),
        "gallery_vectors": "random unit vectors of the model's dim (search cost does not depend on the values)",
        "index_type": info["index_types"][domain],
        "rerank": info["rerank"],
        "dim": info["dim"],
        "backbone": model.backbone,
        "image_size": model.image_size,
        "device": str(model.device),
        "queries": opts.latency_queries,
        "query_files": len(set(query_paths)),
        "k": opts.k,
        "threads": default,
        "p50_ms": by_threads[default]["end_to_end"]["p50_ms"],
        "p95_ms": by_threads[default]["end_to_end"]["p95_ms"],
        "split_by_threads": by_threads,
    }


# --------------------------------------------------------------------------------------------- tables


def _ms(seconds: float) -> float:
    return round(1000.0 * seconds, 1)


def train_tables(results: Sequence[Mapping[str, Any]]) -> str:
    """The ratio table (one row per mode and thread count) and the time split of the full step (one column each)."""
    rows = [[r["mode"], r["threads"], r["images_per_step"], _ms(r["step_s"]),
             f"{_ms(r['clustering_s'])} / {r['steps_per_epoch']}", _ms(r["bare_step_s"]),
             round(r["full_images_per_s"], 1), round(r["bare_images_per_s"], 1), round(r["ratio"], 3),
             round(r["ratio_without_clustering"], 3)] for r in results]
    ratio = md_table(["mode", "threads", "images/step", "full step ms", "clustering ms / steps per epoch",
                      "bare step ms", "full img/s", "bare img/s", f"ratio (goal ≥ {TRAIN_RATIO_GOAL})",
                      "ratio w/o clustering"], rows)
    parts = list(results[0]["split_s"]) if results else []
    split_rows = []
    for p in parts:
        row: list[Any] = [p]
        for r in results:
            total = r["step_s"] + r["clustering_s"] / r["steps_per_epoch"]
            row.append(f"{_ms(r['split_s'][p])} ({100 * r['split_s'][p] / total:.0f} %)")
        split_rows.append(row)
    split = md_table(["part of the full step", *(f"{r['mode']} {r['threads']}t ms (share)" for r in results)],
                     split_rows)
    note = ("Where the full step's time goes (loss terms: forward + backward down to the embeddings, each timed "
            "alone; 'other' = full step − the parts):")
    return f"{ratio}\n\n{note}\n\n{split}"


def embed_table(results: Sequence[Mapping[str, Any]]) -> str:
    rows = [[name, e["threads"], round(v["images_per_s"], 1), round(v["ratio_to_bare"], 3)]
            for e in results for name, v in e["variants"].items()]
    return md_table(["variant", "threads", "images/s", f"÷ bare (goal ≥ {EMBED_RATIO_GOAL})"], rows)


def latency_table(res: Mapping[str, Any]) -> str:
    rows = [[part, t, round(v["p50_ms"], 1), round(v["p95_ms"], 1), round(v["mean_ms"], 1)]
            for t, parts in res["split_by_threads"].items() for part, v in parts.items()]
    return md_table(["part", "threads", "p50 ms", "p95 ms", "mean ms"], rows)


def summary_rows(payload: Mapping[str, Any]) -> list[list[Any]]:
    """Headline numbers against their goals."""
    rows: list[list[Any]] = []
    for r in payload.get("train", []):
        rows.append([f"training ratio, {r['mode']}, {r['threads']} threads", round(r["ratio"], 3),
                     f"≥ {TRAIN_RATIO_GOAL}", _yes(r["ratio"] >= TRAIN_RATIO_GOAL)])
    for e in payload.get("embed", []):
        rows.append([f"embedding ratio ({e['ratio_variant']}), {e['threads']} threads", round(e["ratio"], 3),
                     f"≥ {EMBED_RATIO_GOAL}", _yes(e["ratio"] >= EMBED_RATIO_GOAL)])
    if "latency" in payload:
        for t, parts in payload["latency"]["split_by_threads"].items():
            p50 = parts["end_to_end"]["p50_ms"]
            goal = latency_goal_ms(payload["latency"]["gallery"])
            rows.append([f"single-query latency p50 ms, {payload['latency']['gallery']:,} vectors, {t} threads",
                         round(p50, 1), f"≤ {goal:g}", _yes(p50 <= goal)])
    return rows


def _yes(ok: bool) -> str:
    return "yes" if ok else "**no**"


# --------------------------------------------------------------------------------------------- the suite


def _log(msg: str) -> None:
    print(f"[speed] {msg}", flush=True)


def run_suite(opts: SuiteOptions) -> tuple[dict[str, Any], str]:
    """Run the selected sections; returns the JSON payload and the Markdown (one table per section)."""
    payload: dict[str, Any] = {"options": {k: str(v) if isinstance(v, Path | torch.device) else v
                                           for k, v in asdict(opts).items()},
                               "data_root": str(opts.data_root)}
    md: list[str] = []

    def section(title: str, table: str) -> None:
        md.append(f"### {title}\n\n{table}")
        print(f"\n### {title}\n\n{table}\n", flush=True)

    if "train" in opts.sections:
        payload["train"] = []
        for mode in ("frozen", "finetune"):
            for threads in opts.thread_counts:
                t0 = time.perf_counter()
                with torch_threads(threads):
                    payload["train"].append({"threads": threads, **bench_training(opts, mode)})
                _log(f"train/{mode}/{threads} threads done in {time.perf_counter() - t0:.0f} s")
        section("1. Training throughput: full method step ÷ bare model step", train_tables(payload["train"]))
    if "embed" in opts.sections or "latency" in opts.sections:
        run = make_bench_run(opts.workdir / "bench-run", opts.image_size)
        model = load_model(run, device=opts.device)
        if "embed" in opts.sections:
            samples = subset(opts.data_root, opts.embed_images)
            payload["embed"] = []
            for threads in opts.thread_counts:
                t0 = time.perf_counter()
                with torch_threads(threads):
                    payload["embed"].append({"threads": threads, **bench_embedding(opts, model, samples)})
                _log(f"embed/{threads} threads done in {time.perf_counter() - t0:.0f} s")
            e = payload["embed"][0]
            section(f"2. Embedding throughput: {e['images']} image files, batch {e['batch_size']}, "
                    f"{e['image_size']} px", embed_table(payload["embed"]))
        if "latency" in opts.sections:
            t0 = time.perf_counter()
            add_random_gallery(run, model, opts.latency_gallery, rerank=opts.latency_rerank)
            paths = [s.path for s in subset(opts.data_root, opts.latency_queries)]
            payload["latency"] = bench_latency(opts, run, paths)
            _log(f"latency done in {time.perf_counter() - t0:.0f} s")
            lat = payload["latency"]
            qe = "with αQE re-ranking" if lat["rerank"] else "no re-ranking"
            section(f"3. Single-query latency: Retriever.search, {lat['gallery']:,}-vector {lat['index_type']} "
                    f"gallery, {qe} ({lat['queries']} queries, k={lat['k']})", latency_table(lat))
    if "index" in opts.sections:
        payload["index"] = bench_indexes(opts.index_sizes, dim=opts.index_dim, n_queries=opts.index_queries,
                                         k=opts.k, repeats=opts.index_repeats, use_gpu=opts.use_gpu,
                                         threads=opts.faiss_threads)
        faiss_threads = payload["index"][0]["faiss_threads"] if payload["index"] else "-"
        section(f"4. Index build and search: dim {opts.index_dim}, clustered synthetic data, {opts.index_queries} "
                f"queries, k={opts.k}, FAISS threads {faiss_threads} (★ = what `auto` picks)",
                md_table(INDEX_HEADERS, index_table_rows(payload["index"])))
    payload["summary"] = summary_rows(payload)
    head = md_table(["metric", "value", "goal", "met"], payload["summary"])
    device = f"device {opts.device}, torch threads {list(opts.thread_counts)}, data {opts.data_root.name}"
    return payload, "\n\n".join([f"**Speed suite** ({device})\n\n{head}", *md])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="10k and 100k vectors, smaller batches and fewer repeats")
    ap.add_argument("--out", type=Path, default=RESULTS, help="folder for speed.json and speed.md")
    ap.add_argument("--sizes", default="", help="index sizes, comma-separated (default 10000,100000,1000000)")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda[:i]")
    ap.add_argument("--data", default="", help="image data root (default ../shared/data/pacs, else the demo data)")
    ap.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated subset of " + ",".join(SECTIONS))
    ap.add_argument("--threads", default="", help="torch CPU thread counts to compare, e.g. 1,2 (default: current)")
    ap.add_argument("--latency-gallery", type=int, default=10_000, help="vectors in the latency section's gallery")
    ap.add_argument("--latency-rerank", choices=("on", "off"), default="on",
                    help="latency gallery's manifest records the default re-ranking (αQE per query), or not")
    ap.add_argument("--faiss-threads", type=int, default=None, help="FAISS threads for the index section")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="cdr-speed-") as tmp:
        opts = preset(args, Path(tmp))
        payload, markdown = run_suite(opts)
    write_outputs("speed", payload, markdown, args.out)


if __name__ == "__main__":
    main()
