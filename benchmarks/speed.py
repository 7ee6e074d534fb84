"""Speed suite: whole pretrain runs, embedding overhead ratio, single-query latency, index build and search.

    python -m benchmarks.speed [--quick] [--out benchmarks/results] [--sizes 10000,100000,1000000] [--device auto]
                               [--threads 1,2] [--faiss-threads N] [--sections train,embed,latency,index] [--data ROOT]
                               [--train-images 300] [--train-modes partial,frozen,finetune]
                               [--finetune-cpu-images 64] [--train-set KEY=VALUE ...]

Sections (one run, one ``speed.json`` + ``speed.md`` via :func:`benchmarks.common.write_outputs`):

1. **train** — the whole default :func:`cdretrieval.train.pretrain`, as a user runs it (default config, only the
   mode set), once per training mode the machine can run: on CPU ``partial`` (the default: the top backbone units
   train over cached lower feature maps), ``frozen`` and ``finetune`` (on at most ``--finetune-cpu-images``
   images per domain: slow there); on CUDA ``finetune`` (the default), ``partial`` and ``frozen``. Each run
   reads at most ``--train-images`` images per domain of the data (every k-th of a domain's sorted files, so all
   classes; 0: all) and gets a fresh ``$CDRETRIEVAL_CACHE``, so its set-up includes the feature-cache pass and
   the ONNX export. Reported: set-up s, s/epoch, train img/s (:class:`~cdretrieval.train.TrainResult`), wall s,
   and whether ONNX Runtime ran the cache pass.
2. **embed** — ``extract`` / ``iter_extract`` end to end on image files (decode → preprocess → model) ÷ the same
   model on preloaded tensors, same batch size and image size.
3. **latency** — one query file through ``Retriever.search`` on a 10k-vector gallery: p50 / p95, and its split
   into decode + preprocess, model, search.
4. **index** — :mod:`benchmarks.index_speed`: build time, QPS, recall@10 against flat, size, per index type.

Compared variants of sections 2–4 run interleaved in one process (every variant once per round, median over
rounds): the machines are shared, so only side-by-side numbers and their ratios mean anything. Section 1's runs
are sequential, whole runs: read them as what a user waits for on this machine at this load.

Stand-ins, stated in the output too: the latency gallery is random unit vectors of the model's dimension.

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
import re
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.common import RESULTS, interleaved, md_table, medians, timed, write_outputs
from benchmarks.index_speed import INDEX_HEADERS, bench_indexes, index_table_rows
from cdretrieval.config import RunConfig, apply_overrides, parse_sets
from cdretrieval.data.demo import generate_demo_data
from cdretrieval.data.digits import resolve_data_root
from cdretrieval.data.folders import Sample, scan_domains
from cdretrieval.data.images import load_image
from cdretrieval.data.transforms import eval_transform
from cdretrieval.device import autocast, resolve_device
from cdretrieval.embed import extract, iter_extract
from cdretrieval.index import IndexSet, Item, UseGpu
from cdretrieval.loading import LoadedModel, load_model
from cdretrieval.rerank import DEFAULT_RERANK
from cdretrieval.retrieval import Retriever, query_to_image
from cdretrieval.run import INDEX_DIR, encoder_from_config, save_checkpoint
from cdretrieval.train import pretrain, resolve_mode

SECTIONS = ("train", "embed", "latency", "index")
TRAIN_MODES = ("partial", "frozen", "finetune")
PRETRAIN_WALL_GOAL_S = 600.0  # the default pretrain on all of PACS, feature cache included
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
    image_size: int = 128  # embedding and the latency run (training uses the config's data.image_size)
    train_images: int = 300  # per domain, for every pretrain run (0: every image)
    train_modes: tuple[str, ...] = ()  # empty: default_train_modes(device)
    finetune_cpu_images: int = 64  # per domain, finetune on CPU (0: not run there)
    train_overrides: dict[str, Any] = field(default_factory=dict)  # config fields for the pretrain runs
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
    warmup: int = 1  # untimed rounds before the timed ones (embed; latency: queries per block)
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


def _given(value: int | None, default: int) -> int:
    """An integer option's value, ``default`` when it was not given."""
    return default if value is None else value


def preset(args: argparse.Namespace, workdir: Path) -> SuiteOptions:
    """Options for the command line: the full suite, or ``--quick`` (10k and 100k vectors, fewer images and
    repeats)."""
    opts = SuiteOptions(
        data_root=Path(args.data) if args.data else default_data_root(),
        device=resolve_device(args.device),
        workdir=workdir,
        sections=tuple(args.sections.split(",")),
        threads=tuple(int(t) for t in args.threads.split(",")) if args.threads else (),
        faiss_threads=args.faiss_threads,
        latency_gallery=args.latency_gallery,
        latency_rerank=args.latency_rerank == "on",
        train_images=_given(args.train_images, 100 if args.quick else 300),
        train_modes=tuple(m for m in args.train_modes.split(",") if m),
        finetune_cpu_images=_given(args.finetune_cpu_images, 32 if args.quick else 64),
        train_overrides=parse_sets(args.train_set),
    )
    if args.quick:
        opts = replace(opts, embed_images=192, embed_repeats=2, latency_queries=100, index_sizes=(10_000, 100_000),
                       index_queries=200, index_repeats=2)
    if args.sizes:
        opts = replace(opts, index_sizes=tuple(int(s) for s in args.sizes.split(",")))
    unknown = set(opts.sections) - set(SECTIONS)
    if unknown:
        raise ValueError(f"unknown section(s) {sorted(unknown)}; choose from {', '.join(SECTIONS)}")
    bad_modes = set(opts.train_modes) - set(TRAIN_MODES)
    if bad_modes:
        raise ValueError(f"unknown training mode(s) {sorted(bad_modes)}; choose from {', '.join(TRAIN_MODES)}")
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


def default_train_modes(device: torch.device) -> tuple[str, ...]:
    """The modes section 1 runs by default: every mode, the device's default (``train.mode: auto``) first, then
    the cached ones, finetune last (on CPU with :attr:`SuiteOptions.finetune_cpu_images` images per domain)."""
    default = resolve_mode(RunConfig(), device)
    return (default, *(m for m in TRAIN_MODES if m != default))


def capped_view(root: Path, per_domain: int, out: Path) -> tuple[Path, str | None]:
    """A data root holding at most ``per_domain`` images of every domain of ``root``, and its split name.

    The view links each domain folder of ``root`` and lists every k-th image of the domain's sorted files (so
    every class is represented) in ``<domain>_<split>.txt`` (the library's split lists). ``per_domain`` ≤ 0:
    ``root`` itself and no split (every image).
    """
    real = resolve_data_root(root)
    if per_domain <= 0:
        return real, None
    split = f"cap{per_domain}"
    out.mkdir(parents=True, exist_ok=True)
    for domain, samples in scan_domains(real).items():
        keep = samples[:: max(1, len(samples) // per_domain)][:per_domain]
        lines = [Path(s.path).relative_to(real).as_posix() for s in keep]
        if any(re.search(r"\s", line) for line in lines):
            raise ValueError(f"domain {domain!r}: file names with whitespace cannot go into a split list; "
                             "pass --train-images 0 to train on every image of the folder instead")
        link = out / domain
        if not link.is_symlink():
            os.symlink((real / domain).resolve(), link, target_is_directory=True)
        (out / f"{domain}_{split}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return out, split


@contextlib.contextmanager
def fresh_cache(folder: Path) -> Iterator[Path]:
    """Point ``$CDRETRIEVAL_CACHE`` at ``folder`` for the block (restored after): the feature cache and the
    exported ONNX graph start empty, as on a new user's first run."""
    before = os.environ.get("CDRETRIEVAL_CACHE")
    os.environ["CDRETRIEVAL_CACHE"] = str(folder)
    try:
        yield folder
    finally:
        if before is None:
            os.environ.pop("CDRETRIEVAL_CACHE", None)
        else:
            os.environ["CDRETRIEVAL_CACHE"] = before


def pretrain_config(opts: SuiteOptions, root: Path, split: str | None, mode: str) -> RunConfig:
    """The default config on ``root`` (``split``) in ``mode`` on ``opts.device``, then ``opts.train_overrides``."""
    fields = {"data.root": str(root), "data.split": split, "train.mode": mode, "train.device": str(opts.device)}
    return apply_overrides(RunConfig(), {**fields, **opts.train_overrides})


def bench_pretrain(opts: SuiteOptions, mode: str, per_domain: int, tag: str) -> dict[str, Any]:
    """One whole default :func:`~cdretrieval.train.pretrain` in ``mode`` on at most ``per_domain`` images per
    domain, with a fresh cache folder (feature cache and ONNX graph) under ``opts.workdir``.

    ONNX Runtime ran the cache pass iff an exported graph landed in that cache: :func:`frozen_forward` caches a
    graph only once it ran and matched PyTorch, and PyTorch runs instead otherwise.
    """
    root, split = capped_view(opts.data_root, per_domain, opts.workdir / f"view-{max(per_domain, 0)}")
    cfg = pretrain_config(opts, root, split, mode)
    with warnings.catch_warnings(record=True) as caught, fresh_cache(opts.workdir / f"cache-{tag}") as cache:
        warnings.simplefilter("always")
        res = pretrain(cfg, opts.workdir / f"run-{tag}", progress=False)
    cached = res.mode in ("frozen", "partial")
    onnx = cached and any((cache / "onnx").glob("*.onnx"))
    images = sum(res.domains.values())
    return {
        "mode": res.mode,
        "images": images,
        "domains": res.domains,
        "images_per_domain_cap": per_domain if per_domain > 0 else None,
        "image_size": cfg.data.image_size,
        "batch_per_domain": cfg.train.batch_size,
        "num_workers": cfg.data.num_workers,
        "epochs": res.epochs_done,
        "steps": res.steps,
        "setup_s": res.setup_seconds,
        "train_s": res.seconds,
        "epoch_s": res.seconds / max(1, res.epochs_done),
        "train_images_per_s": res.images_per_second,
        "wall_s": res.wall_seconds,
        "cache_runtime": ("onnxruntime" if onnx else "torch") if cached else None,
        "warnings": sorted({str(w.message) for w in caught}),  # e.g. why PyTorch ran the cache pass
        "last_losses": res.last_losses,
    }


def train_runs(opts: SuiteOptions) -> list[dict[str, Any]]:
    """:func:`bench_pretrain` for every mode of ``opts.train_modes`` (default: :func:`default_train_modes`) at
    every torch thread count; finetune on CPU gets ``opts.finetune_cpu_images`` images per domain (0: skipped)."""
    runs = []
    for mode in opts.train_modes or default_train_modes(opts.device):
        per_domain = opts.train_images
        if mode == "finetune" and opts.device.type != "cuda":
            if opts.finetune_cpu_images <= 0:
                continue
            per_domain = opts.finetune_cpu_images if per_domain <= 0 else min(per_domain, opts.finetune_cpu_images)
        for threads in opts.thread_counts:
            t0 = time.perf_counter()
            with torch_threads(threads):
                runs.append({"threads": threads, **bench_pretrain(opts, mode, per_domain, f"{mode}-{threads}t")})
            _log(f"train/{mode}/{threads} threads done in {time.perf_counter() - t0:.0f} s")
    return runs


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


def train_table(results: Sequence[Mapping[str, Any]]) -> str:
    """One row per pretrain run: images, epochs, set-up (feature cache included), s/epoch, train img/s, wall."""
    runtime = {"onnxruntime": "ONNX Runtime", "torch": "PyTorch", None: "– (no cache)"}
    rows = [[r["mode"], r["threads"], f"{r['images']:,}", r["epochs"], f"{r['setup_s']:.1f}", f"{r['epoch_s']:.1f}",
             f"{r['train_images_per_s']:.1f}", f"{r['wall_s']:.1f}", runtime[r["cache_runtime"]]] for r in results]
    return md_table(["mode", "threads", "images", "epochs", "set-up s (incl. feature cache)", "s/epoch",
                     "train img/s", "wall s", "cache pass ran on"], rows, right_align=True)


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
    for r in payload.get("train", []):  # the goal is for a whole data set: capped runs are not compared
        if r["images_per_domain_cap"] is None and r["mode"] == payload["default_mode"]:
            rows.append([f"default pretrain wall s ({r['mode']}, all {r['images']:,} images), {r['threads']} threads",
                         round(r["wall_s"], 1), f"≤ {PRETRAIN_WALL_GOAL_S:g} (all of PACS)",
                         _yes(r["wall_s"] <= PRETRAIN_WALL_GOAL_S)])
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
        payload["default_mode"] = resolve_mode(RunConfig(), opts.device)
        payload["train"] = train_runs(opts)
        cap = f"≤ {opts.train_images} images per domain" if opts.train_images > 0 else "every image"
        if opts.device.type != "cuda":
            cap += f" (finetune ≤ {opts.finetune_cpu_images})"
        section(f"1. Whole default pretrain per mode (default here: {payload['default_mode']}): "
                f"{opts.data_root.name}, {cap}, fresh feature cache and ONNX graph per run",
                train_table(payload["train"]))
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
    ap.add_argument("--quick", action="store_true",
                    help="10k and 100k vectors, fewer images (training ≤ 100 per domain) and fewer repeats")
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
    ap.add_argument("--train-images", type=int, default=None,
                    help="images per domain for each pretrain run of the train section (default 300, --quick 100; "
                    "0: every image)")
    ap.add_argument("--train-modes", default="",
                    help="training modes to run, comma-separated, of " + ",".join(TRAIN_MODES)
                    + " (default: all; the device's default mode first)")
    ap.add_argument("--finetune-cpu-images", type=int, default=None,
                    help="images per domain for finetune on CPU, where it is slow (default 64, --quick 32; "
                    "0: skip finetune on CPU)")
    ap.add_argument("--train-set", action="append", default=[], metavar="KEY=VALUE",
                    help="config field for the pretrain runs, e.g. train.epochs=3 (repeatable; default: defaults)")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="cdr-speed-") as tmp:
        opts = preset(args, Path(tmp))
        payload, markdown = run_suite(opts)
    write_outputs("speed", payload, markdown, args.out)


if __name__ == "__main__":
    main()
