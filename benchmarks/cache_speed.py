"""Frozen-mode feature cache speed: eager PyTorch vs ONNX Runtime, and the old vs new cache data path.

    python -m benchmarks.cache_speed [--images 512] [--views 4] [--workers 2] [--image-size 128]
                                     [--backbones efficientnet_lite0,resnet18] [--torch-images 128] [--data ROOT]

One process, side by side (the machines are shared; only ratios within a run mean much):

1. **inference** — images/s of each backbone on random ``[batch, 3, S, S]`` tensors: eager PyTorch fp32,
   PyTorch with the project's CPU defaults (:func:`~cdretrieval.device.amp_dtype` /
   :func:`~cdretrieval.device.use_channels_last`) where they differ, and ONNX Runtime
   (:func:`~cdretrieval.models.runtime.frozen_forward`). Rounds interleaved, median.
2. **components** — single-thread milliseconds per image of decode, clean transform and augmentation
   (the per-view seeding included), as a DataLoader worker does them.
3. **data** — image views/s of the loaders alone (no model): the old path (one decode per view) and the new
   one (:class:`~cdretrieval.data.views.MultiViewDataset`, one decode for all ``1 + V`` views).
4. **cache pass** — image views/s of the whole pass, loader + model, per view: *old* is the former
   ``build_feature_cache`` (one ``extract`` per view) with eager PyTorch (on ``--torch-images`` images: it
   is slow) and with ONNX Runtime; *new* is :func:`~cdretrieval.feature_cache.build_feature_cache` as it now is
   (ONNX Runtime, one decode per image for all views).
   Each row has a prediction from sections 1–2: the pass is CPU-bound on ``C`` cores shared by the model
   (all threads while it runs) and the loader workers, so one view costs ≈ ``t_model + t_data / C``
   (``t_data`` single-thread, see 2), and the workers cannot deliver more than ``W / t_data``.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path

import torch

from benchmarks.common import interleaved, md_table, medians, timed_call, write_outputs
from cdretrieval.config import RunConfig
from cdretrieval.data.folders import Sample, scan_domains
from cdretrieval.data.images import load_image
from cdretrieval.data.transforms import eval_transform, train_transform
from cdretrieval.data.views import view_seed
from cdretrieval.device import amp_dtype, autocast, use_channels_last
from cdretrieval.embed import extract, make_loader
from cdretrieval.feature_cache import build_feature_cache
from cdretrieval.models.backbones import build_backbone
from cdretrieval.models.encoder import Encoder, build_encoder
from cdretrieval.models.runtime import frozen_forward

CPU = torch.device("cpu")


def pick_samples(root: Path, n: int, seed: int = 0) -> list[Sample]:
    """``n`` images drawn evenly (seeded) from every domain under ``root``, in path order."""
    domains = scan_domains(root)
    per = max(1, n // len(domains))
    rng = random.Random(seed)
    out: list[Sample] = []
    for samples in domains.values():
        out += rng.sample(samples, min(per, len(samples)))
    return sorted(out[:n], key=lambda s: s.path)


def median_rate(fn: Callable[[], int], rounds: int) -> float:
    """Median items/s of ``rounds`` calls of ``fn`` (which returns how many items it processed)."""
    rates = []
    for _ in range(rounds):
        seconds, n = timed_call(fn)
        rates.append(n / seconds)
    return statistics.median(rates)


# --------------------------------------------------------------------------------------------- 1. inference


def bench_inference(
    names: Sequence[str], image_size: int, batch: int, rounds: int
) -> tuple[dict[str, dict[str, float]], dict[str, str]]:
    """backbone → variant → images/s (median over interleaved rounds, after one warm-up), and each
    backbone's ONNX Runtime status (``runtime: reason``)."""
    x = torch.rand(batch, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))
    out: dict[str, dict[str, float]] = {}
    status: dict[str, str] = {}
    for name in names:
        model = build_backbone(name, "default" if name == "efficientnet_lite0" else "none").eval()
        fast = frozen_forward(model, image_size, CPU)
        status[name] = f"{fast.runtime}: {fast.reason}"
        amp, cl = amp_dtype(CPU, "auto", name), use_channels_last(CPU, name)
        variants: dict[str, Callable[[], object]] = {"torch fp32": partial(_eager, model, x, None, False)}
        if amp is not None or cl:
            tag = f"torch {'bf16' if amp is not None else 'fp32'}{' channels_last' if cl else ''} (project default)"
            cl_model = build_backbone(name, "default" if name == "efficientnet_lite0" else "none").eval()
            if cl:
                cl_model = cl_model.to(memory_format=torch.channels_last)
            variants[tag] = partial(_eager, cl_model, x, amp, cl)
        if fast.runtime == "onnxruntime":
            variants["onnxruntime fp32"] = partial(fast, x)
        times = interleaved(variants, rounds, warmup=1)
        out[name] = {k: batch / t for k, t in medians(times).items()}
    return out, status


def _eager(model: torch.nn.Module, x: torch.Tensor, amp: torch.dtype | None, cl: bool) -> torch.Tensor:
    if cl:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad(), autocast(CPU, amp):
        out: torch.Tensor = model(x)
    return out


# --------------------------------------------------------------------------------------------- 2. components


def bench_components(samples: Sequence[Sample], cfg: RunConfig) -> dict[str, float]:
    """Single-thread ms per image: decode, clean transform, one seeded augmented view (as workers run them)."""
    d = cfg.data
    clean = eval_transform(d.image_size)
    aug = train_transform(d.image_size, d.aug_strength, d.min_scale, d.hflip, d.blur)
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # what a DataLoader worker has
    try:
        t0 = time.perf_counter()
        images = [load_image(s.path) for s in samples]
        t1 = time.perf_counter()
        for img in images:
            clean(img)
        t2 = time.perf_counter()
        state = torch.get_rng_state()
        for i, img in enumerate(images):
            torch.default_generator.manual_seed(view_seed(0, 1, i))
            aug(img)
        t3 = time.perf_counter()
        torch.set_rng_state(state)
    finally:
        torch.set_num_threads(before)
    n = len(samples)
    return {"decode_ms": 1e3 * (t1 - t0) / n, "clean_ms": 1e3 * (t2 - t1) / n, "augment_ms": 1e3 * (t3 - t2) / n}


# --------------------------------------------------------------------------------------------- 3. + 4. paths


def old_view_pass(
    fn: Callable[[torch.Tensor], torch.Tensor] | None, samples: Sequence[Sample], cfg: RunConfig, augmented: bool,
    amp: torch.dtype | None = None, channels_last: bool = False,
) -> int:
    """One view of the former cache pass (``extract`` over every file, decoding each again); with ``fn``
    None only the loader runs. Returns the images processed."""
    d = cfg.data
    transform = (train_transform(d.image_size, d.aug_strength, d.min_scale, d.hflip, d.blur) if augmented
                 else eval_transform(d.image_size))
    seed = cfg.train.seed * 1009 if augmented else None
    if fn is None:
        return sum(len(b["indices"]) for b in make_loader(samples, transform, 64, d.num_workers, seed=seed))
    got = extract(fn, samples, transform, device=CPU, amp=amp, channels_last=channels_last, batch_size=64,
                  num_workers=d.num_workers, seed=seed, progress=False)
    return len(got.indices)


def new_pass(encoder: Encoder | None, samples: Sequence[Sample], cfg: RunConfig) -> int:
    """The new pass over all ``1 + V`` views (one decode per image): ``build_feature_cache`` into a fresh
    folder (runtime set-up from the cached ``.onnx`` and the fp16 save included); with ``encoder`` None only
    its loader runs. Returns the image views processed."""
    from torch.utils.data import DataLoader

    from cdretrieval.data.datasets import collate_skipping
    from cdretrieval.data.views import MultiViewDataset
    from cdretrieval.feature_cache import CACHE_BATCH_VIEWS

    nv, d = cfg.train.cached_views, cfg.data
    if encoder is not None:
        with tempfile.TemporaryDirectory(prefix="cache-speed-") as tmp:
            feats, _ = build_feature_cache(encoder, samples, cfg, CPU, Path(tmp), "bench", progress=False)
        return feats.shape[0] * feats.shape[1]
    aug = train_transform(d.image_size, d.aug_strength, d.min_scale, d.hflip, d.blur)
    ds = MultiViewDataset(samples, eval_transform(d.image_size), aug, nv, cfg.train.seed)
    loader = DataLoader(ds, batch_size=max(1, CACHE_BATCH_VIEWS // (1 + nv)), num_workers=d.num_workers,
                        collate_fn=collate_skipping, prefetch_factor=4 if d.num_workers else None)
    return sum(b["images"].shape[0] * b["images"].shape[1] for b in loader)


def predict(t_model_ms: float, t_data_ms: float, workers: int, cores: int) -> float:
    """Predicted image views/s of a pass: CPU-bound on ``cores`` shared by model and loader, capped by what
    ``workers`` processes (or the main process, when 0) can decode."""
    if workers == 0:
        return 1e3 / (t_model_ms + t_data_ms)
    return min(1e3 / (t_model_ms + t_data_ms / cores), workers * 1e3 / t_data_ms)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=None, help="a domain-folder data set (default ../shared/data/pacs)")
    ap.add_argument("--images", type=int, default=512)
    ap.add_argument("--torch-images", type=int, default=128, help="images for the slow eager-PyTorch cache pass")
    ap.add_argument("--views", type=int, default=4, help="augmented views per image (train.cached_views)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--image-size", type=int, default=128)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--backbones", default="efficientnet_lite0,resnet18")
    ap.add_argument("--rounds", type=int, default=3, help="timed rounds of the inference section")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)

    from benchmarks.speed import default_data_root

    root = Path(args.data) if args.data else default_data_root()
    names = [n.strip() for n in args.backbones.split(",") if n.strip()]
    cfg = RunConfig()
    cfg.data.image_size, cfg.data.num_workers, cfg.train.cached_views = args.image_size, args.workers, args.views
    samples = pick_samples(root, args.images)
    cores = os.cpu_count() or 1
    t_start = time.perf_counter()

    inference, status = bench_inference(names, args.image_size, args.batch, args.rounds)
    comp = bench_components(samples[:64], cfg)
    data = {
        "old clean": median_rate(lambda: old_view_pass(None, samples, cfg, False), 1),
        "old augmented": median_rate(lambda: old_view_pass(None, samples, cfg, True), 1),
        f"new 1+{args.views} views": median_rate(lambda: new_pass(None, samples, cfg), 1),
    }

    main_bb = names[0]
    encoder = build_encoder(main_bb, "default" if main_bb == "efficientnet_lite0" else "none")
    cfg.model.backbone = main_bb
    model = encoder.backbone.eval()
    fast = frozen_forward(model, args.image_size, CPU)
    eager = next((v for k, v in inference[main_bb].items() if k.endswith("(project default)")),
                 inference[main_bb]["torch fp32"])  # what the old pass ran
    ort_rate = inference[main_bb].get("onnxruntime fp32", eager)
    amp, cl = amp_dtype(CPU, "auto", main_bb), use_channels_last(CPU, main_bb)
    few = samples[: args.torch_images]
    dec, cln, aug = comp["decode_ms"], comp["clean_ms"], comp["augment_ms"]
    nv, w = args.views, args.workers
    new_data_ms = (dec + cln + nv * aug) / (1 + nv)
    passes: list[tuple[str, str, str, float, float]] = [  # path, model, views, predicted, measured
        ("old", "torch eager", "clean", predict(1e3 / eager, dec + cln, w, cores),
         median_rate(lambda: old_view_pass(model, few, cfg, False, amp, cl), 1)),
        ("old", "torch eager", "augmented", predict(1e3 / eager, dec + aug, w, cores),
         median_rate(lambda: old_view_pass(model, few, cfg, True, amp, cl), 1)),
        ("old", fast.runtime, "clean", predict(1e3 / ort_rate, dec + cln, w, cores),
         median_rate(lambda: old_view_pass(fast, samples, cfg, False), 1)),
        ("old", fast.runtime, "augmented", predict(1e3 / ort_rate, dec + aug, w, cores),
         median_rate(lambda: old_view_pass(fast, samples, cfg, True), 1)),
        ("new", fast.runtime, f"all 1+{nv}", predict(1e3 / ort_rate, new_data_ms, w, cores),
         median_rate(lambda: new_pass(encoder, samples, cfg), 1)),
    ]
    seconds = time.perf_counter() - t_start

    inf_rows = []
    for name, variants in inference.items():
        base = variants["torch fp32"]
        inf_rows += [[name, k, round(v, 1), round(v / base, 2)] for k, v in variants.items()]
    pass_rows = [[p, m, v, round(pred, 1), round(meas, 1), round(meas / pred, 2)] for p, m, v, pred, meas in passes]
    old_ort = {v: meas for p, m, v, _, meas in passes if p == "old" and m == fast.runtime}
    new_rate = passes[-1][4]
    old_mix = (1 + nv) / (1 / old_ort["clean"] + nv / old_ort["augmented"])  # old path's rate over 1+V views
    old_eager_mix = (1 + nv) / (1 / passes[0][4] + nv / passes[1][4])
    threads = torch.get_num_threads()
    text = "\n\n".join([
        f"**Feature-cache speed: {len(samples)} images from {root.name}, {args.image_size} px, {nv} augmented "
        f"views, {w} loader workers, {threads} torch threads, {cores} cores (shared machine)**",
        f"Inference, batch {args.batch}:\n\n"
        + md_table(["backbone", "variant", "images/s", "× torch fp32"], inf_rows),
        "Data path alone (no model), image views/s:\n\n"
        + md_table(["loader", "views/s"], [[k, round(v, 1)] for k, v in data.items()]),
        "Single-thread cost per image (ms): " + ", ".join(f"{k[:-3]} {v:.2f}" for k, v in comp.items()),
        f"Cache pass, {main_bb}, image views/s (torch eager rows on {len(few)} images):\n\n"
        + md_table(["path", "model", "views", "predicted", "measured", "measured ÷ predicted"], pass_rows),
        f"Whole cache pass (1 clean + {nv} augmented views per image): old path + eager torch "
        f"{old_eager_mix:.1f} views/s, old path + {fast.runtime} {old_mix:.1f}, new path {new_rate:.1f} "
        f"({new_rate / old_eager_mix:.1f}× the old eager pass, {new_rate / old_mix:.2f}× old path + same runtime).",
        "ONNX Runtime status: " + "; ".join(f"{k}: {v}" for k, v in status.items()),
    ])
    payload = {
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "images": len(samples), "cores": cores, "seconds": round(seconds, 1),
        "inference_images_per_s": inference, "onnxruntime_status": status,
        "components_ms": comp, "data_views_per_s": data,
        "cache_pass_views_per_s": [
            {"path": p, "model": m, "views": v, "predicted": pred, "measured": meas} for p, m, v, pred, meas in passes
        ],
        "whole_pass_views_per_s": {"old_eager": old_eager_mix, "old_onnxruntime": old_mix, "new": new_rate},
    }
    write_outputs("cache_speed", payload, text, args.out)


if __name__ == "__main__":
    main()
