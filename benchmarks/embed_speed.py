"""Embedding speed on this machine.

Two comparisons, each side by side in one process (the machines are shared: only ratios within a run
mean much):

* default — a bare backbone on random tensors: fp32 vs bf16 autocast, NCHW vs channels_last (best of
  ``--repeats`` timed batches after a warm-up)::

    python -m benchmarks.embed_speed [--backbone efficientnet_lite0] [--image-size 128] [--batch 64]

* ``--runtime`` — eager PyTorch vs ONNX Runtime (:meth:`cdretrieval.loading.LoadedModel.backbone_forward`)
  for what the library runs: the whole embedding pass of indexing / evaluation (decode + transform +
  network + chunking, ``domain_embeddings.embed_all`` on ``--images`` real images drawn evenly from every domain of
  ``--data``, for each ``--workers`` count), and single queries through :class:`~cdretrieval.retrieval.Retriever`
  (``encode`` and a ``search`` of another domain, path in → results out, median ms). Rounds alternate the
  runtimes; the pass reports the median images/s, and the largest difference between the two runtimes'
  embeddings::

    python -m benchmarks.embed_speed --runtime [--data ../shared/data/pacs] [--images 512] [--image-size 128]
                                     [--workers 0,2] [--rounds 3] [--queries 20] [--out-dir DIR]

  The ONNX graph is exported into a fresh temporary cache first (its time is reported, then loading
  the cached graph).
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import tempfile
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.common import interleaved, md_table, timed_call, write_outputs
from cdretrieval.models.backbones import build_backbone

REPO = Path(__file__).resolve().parents[1]
RUNTIMES = ("torch", "onnxruntime")


def _args(args: argparse.Namespace) -> dict[str, Any]:
    return {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}


def _throughput(model: torch.nn.Module, x: torch.Tensor, bf16: bool, repeats: int) -> float:
    """Best images/s of ``repeats`` forward passes over ``x``, after one untimed warm-up pass."""
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        times = interleaved({"model": lambda: model(x)}, repeats, warmup=1)["model"]
    return x.shape[0] / min(times)


def layouts(args: argparse.Namespace) -> None:
    """fp32 / bf16 × NCHW / channels_last of the bare backbone on random tensors."""
    model = build_backbone(args.backbone).eval()
    x = torch.rand(args.batch, 3, args.image_size, args.image_size)
    rows, results = [], {}
    for layout in ("nchw", "channels_last"):
        m = model.to(memory_format=torch.channels_last) if layout == "channels_last" else model
        xi = x.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else x
        for precision in ("fp32", "bf16"):
            ips = _throughput(m, xi, precision == "bf16", args.repeats)
            results[f"{layout}/{precision}"] = ips
            rows.append([layout, precision, round(ips, 1)])
    base = results["nchw/fp32"]
    for r in rows:
        r.append(round(results[f"{r[0]}/{r[1]}"] / base, 2))
    table = md_table(["layout", "precision", "images/s", "× fp32 NCHW"], rows)
    threads = torch.get_num_threads()
    title = f"{args.backbone} @ {args.image_size}px, batch {args.batch}, inference, CPU threads {threads}"
    write_outputs("embed_speed", {"args": _args(args), "images_per_s": results}, f"**{title}**\n\n{table}",
                  out_dir=args.out_dir)


# ------------------------------------------------------------------------------------------ --runtime


def _pick(root: Path, n: int, seed: int = 0) -> dict[str, list[Any]]:
    """About ``n`` samples drawn evenly (seeded) from every domain of ``root``, each domain's in path order."""
    from cdretrieval.data.folders import scan_domains

    domains = scan_domains(root)
    per = max(1, n // len(domains))
    rng = random.Random(seed)
    return {d: sorted(rng.sample(s, min(per, len(s))), key=lambda x: x.path) for d, s in domains.items()}


def runtimes(args: argparse.Namespace) -> None:
    """Eager PyTorch vs ONNX Runtime: the embedding pass and single queries (see the module docstring)."""
    from cdretrieval.domain_embeddings import EmbedSettings, embed_all
    from cdretrieval.index import IndexSet
    from cdretrieval.loading import load_model
    from cdretrieval.retrieval import Retriever

    workers = [int(w) for w in str(args.workers).split(",")]
    data = _pick(Path(args.data), args.images)
    n = sum(len(s) for s in data.values())
    kw: dict[str, Any] = {"backbone": args.backbone, "weights": args.weights, "image_size": args.image_size,
                          "device": "cpu"}

    cache_before = os.environ.get("CDRETRIEVAL_CACHE")
    with tempfile.TemporaryDirectory(prefix="embed-speed-") as tmp:
        os.environ["CDRETRIEVAL_CACHE"] = tmp  # a fresh ONNX cache: the first build exports
        models = {r: load_model(None, runtime=r, **kw) for r in RUNTIMES}
        setup: dict[str, float] = {}
        for r, m in models.items():
            setup[f"{r} build"], fwd = timed_call(m.backbone_forward)
            assert fwd.runtime == r, f"{r} asked for, {fwd.runtime} built ({fwd.reason})"
        setup["onnxruntime load cached"], _ = timed_call(load_model(None, runtime="onnxruntime", **kw).backbone_forward)

        # The whole embedding pass, runtimes alternating within each round.
        rates: dict[tuple[str, int], list[float]] = {(r, w): [] for r in RUNTIMES for w in workers}
        emb: dict[str, Any] = {}
        for rnd in range(args.rounds):
            for w in workers:
                for r in RUNTIMES if rnd % 2 == 0 else RUNTIMES[::-1]:
                    settings = EmbedSettings(args.batch, w, chunk_size=10_000, progress=False, resume=False)
                    t, out = timed_call(partial(embed_all, models[r], data, None, None, settings))
                    rates[(r, w)].append(n / t)
                    emb[r] = out
        max_diff = max(float(np.abs(emb["onnxruntime"][d].embeddings - emb["torch"][d].embeddings).max())
                       for d in data)

        # Single queries through the Retriever: a flat index per domain of the pass's (PyTorch) embeddings.
        iset = IndexSet.build({d: e.embeddings for d, e in emb["torch"].items()},
                              {d: e.items for d, e in emb["torch"].items()}, models["torch"].model_hash, "flat",
                              use_gpu=False, rerank=None)
        retrievers = {r: Retriever(models[r], iset) for r in RUNTIMES}
        domains = list(data)
        queries = [(s.path, domains[(i + 1) % len(domains)])
                   for i, d in enumerate(domains) for s in data[d][: max(1, args.queries // len(domains))]]
        latency: dict[tuple[str, str], list[float]] = {(r, op): [] for r in RUNTIMES for op in ("encode", "search")}
        for r in RUNTIMES:  # warm-up
            retrievers[r].search(queries[0][0], queries[0][1], k=10)
        for i, (path, target) in enumerate(queries):
            for r in RUNTIMES if i % 2 == 0 else RUNTIMES[::-1]:
                latency[(r, "encode")].append(timed_call(partial(retrievers[r].encode, path))[0] * 1e3)
                latency[(r, "search")].append(
                    timed_call(partial(retrievers[r].search, path, target, k=10))[0] * 1e3)
    if cache_before is None:
        os.environ.pop("CDRETRIEVAL_CACHE", None)
    else:
        os.environ["CDRETRIEVAL_CACHE"] = cache_before

    med = {k: statistics.median(v) for k, v in rates.items()}
    rows: list[list[Any]] = []
    for w in workers:
        rows.append([f"embedding pass, {w} loader worker(s)", "images/s (median)", f"{med[('torch', w)]:.1f}",
                     f"{med[('onnxruntime', w)]:.1f}", f"{med[('onnxruntime', w)] / med[('torch', w)]:.2f}×"])
    lat = {k: statistics.median(v) for k, v in latency.items()}
    for op in ("encode", "search"):
        rows.append([f"one query: Retriever.{op}", "ms (median)", f"{lat[('torch', op)]:.1f}",
                     f"{lat[('onnxruntime', op)]:.1f}", f"{lat[('torch', op)] / lat[('onnxruntime', op)]:.2f}×"])
    table = md_table(["what", "unit", "eager PyTorch", "ONNX Runtime", "speed-up"], rows)
    threads = torch.get_num_threads()
    precision = "bf16" if models["torch"].amp is not None else "fp32"
    layout = ", channels_last" if models["torch"].channels_last else ""
    title = (f"{args.backbone} @ {args.image_size}px (PyTorch: {precision}{layout}, the CPU defaults; "
             f"ONNX Runtime: fp32), {n} images of {Path(args.data).name} "
             f"({', '.join(f'{d} {len(s)}' for d, s in data.items())}), batch {args.batch}, "
             f"{args.rounds} round(s), {len(queries)} queries, torch threads {threads}")
    notes = (f"Max |ONNX Runtime − PyTorch| over the normalised embeddings: {max_diff:.2g}. "
             f"Setup: ONNX export + check {setup['onnxruntime build']:.1f} s, loading the cached graph "
             f"{setup['onnxruntime load cached']:.2f} s, PyTorch {setup['torch build']:.3f} s.")
    payload = {
        "args": _args(args),
        "images": n,
        "pass_images_per_s": {f"{r}/workers={w}": v for (r, w), v in rates.items()},
        "query_ms": {f"{r}/{op}": v for (r, op), v in latency.items()},
        "max_abs_diff": max_diff,
        "setup_s": setup,
    }
    write_outputs("embed_runtime", payload, f"**{title}**\n\n{table}\n\n{notes}", out_dir=args.out_dir)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", default="efficientnet_lite0")
    ap.add_argument("--weights", default="default", help="--runtime: backbone weights (default | none | file)")
    ap.add_argument("--image-size", type=int, default=128)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3, help="layouts: timed batches per variant")
    ap.add_argument("--runtime", action="store_true", help="compare eager PyTorch and ONNX Runtime instead")
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "pacs"), help="--runtime: data root")
    ap.add_argument("--images", type=int, default=512, help="--runtime: images in the pass")
    ap.add_argument("--workers", default="0,2", help="--runtime: loader worker counts, comma-separated")
    ap.add_argument("--rounds", type=int, default=3, help="--runtime: timed passes per runtime and worker count")
    ap.add_argument("--queries", type=int, default=20, help="--runtime: single queries timed per runtime")
    ap.add_argument("--out-dir", type=Path, default=None, help="where results go (default benchmarks/results)")
    args = ap.parse_args(argv)
    if args.runtime:
        runtimes(args)
    else:
        layouts(args)


if __name__ == "__main__":
    main()
