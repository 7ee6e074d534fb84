"""Cross-domain self-supervised pretraining: CDS + PCS (+ Sinkhorn clustering, MIM) over N domains.

One training step (per domain d, a batch of B images with bank positions ``idx_d``)::

    f_d = normalise(head(backbone(aug(x_d))))                      [B, D]
    instance        CDS eq. 1: CE(f_d·V_dᵀ/τ, idx_d)                in-domain instance discrimination
    cross_instance  CDS eq. 2–3: H(softmax(f_d·V_{≠d}ᵀ/τ))           entropy over the other domains' banks
    proto           PCS: ProtoNCE(f_d, μ_d, φ_d, c_d[idx_d])       in-domain prototypes, k ∈ {K, 2K} × runs
    cross_proto     PCS: H(softmax(f_d·μ_{≠d}ᵀ/τ))                   entropy over other domains' prototypes
    mim             PCS: −(0.5·H(p̄) − 0.05·E H(p)), p = softmax(f·μ_jointᵀ/τ)
    V_d[idx_d] ← normalise(m·V_d[idx_d] + (1−m)·f_d)                  banks (no gradient)

Prototypes are re-clustered from the banks at the start of every epoch (spherical k-means or
Sinkhorn-balanced clustering). Every term has a weight and a start epoch (:class:`~cdretrieval.config.LossTerm`).

Two modes:

* ``finetune``: the whole encoder trains on augmented images (the default on CUDA).
* ``frozen`` (the default on CPU): the backbone is frozen and its features for one clean and
  ``cached_views`` augmented views of every image are computed once (each file decoded once for all its
  views; the backbone under ONNX Runtime on CPU) and cached on disk; only the projection head trains, on
  cached views. On 2 CPU cores Lite0 trains end to end at ~20 img/s, so a
  PACS epoch would take ~8 min; frozen mode trains an epoch in seconds after a one-off cache pass.
* ``partial``: like ``frozen``, but the cache holds the feature maps below the top ``trainable_units``
  backbone units (:func:`~cdretrieval.models.backbones.split_backbone`), and those units train with the head.
  The trained units keep their BatchNorm statistics (eval mode: per-sample computation, so DDP and
  resume stay exact) and run without drop-connect.

Distributed: under ``torchrun`` each rank takes a strided shard of every domain batch; the model is
wrapped in DistributedDataParallel, features are all-gathered for identical bank updates on every rank,
MIM's marginal sees the global batch (``torch.distributed.nn.all_gather`` keeps its gradient right),
and rank 0 clusters and broadcasts. Checkpoints (rank 0, atomic, every epoch) hold model, optimiser,
scheduler, epoch, step, banks, MIM state, config, RNG and version; ``resume`` continues exactly.

The parts live beside this loop: the feature cache in :mod:`~cdretrieval.feature_cache`, the loss terms
in :mod:`~cdretrieval.losses.objective`, the per-epoch clustering in :mod:`~cdretrieval.prototypes`,
process-group helpers in :mod:`~cdretrieval.distributed` and RNG state in :mod:`~cdretrieval.rng`. Their
names are re-exported here for the code that imported them from this module.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from cdretrieval import __version__
from cdretrieval.config import (
    RunConfig,
    TrainConfig,
    backbone_lr_scale,
    cluster_counts,
    drop_retired_keys,
    validate,
)
from cdretrieval.data.datasets import warn_skipped
from cdretrieval.data.digits import resolve_data_root
from cdretrieval.data.folders import scan_domains
from cdretrieval.data.transforms import eval_transform, train_transform
from cdretrieval.device import amp_dtype, autocast, resolve_device, use_channels_last
from cdretrieval.distributed import (
    barrier,
    broadcast_object,
    gather_rows,
    gather_rows_with_grad,
    init_distributed,
    mean_over_ranks,
    rank,
    world_size,
)
from cdretrieval.embed import extract, make_loader
from cdretrieval.errors import CheckpointError, DataError
from cdretrieval.feature_cache import (
    CACHE_BATCH_VIEWS,
    CACHED_MODES,
    FEATURE_CACHE_FORMAT,
    CachedInputModel,
    ViewFeatures,
    build_feature_cache,
    extract_views,
    feature_cache_key,
)
from cdretrieval.io import atomic_write_text
from cdretrieval.losses.mim import MutualInformation
from cdretrieval.losses.objective import active_terms, compute_losses
from cdretrieval.memory import MemoryBank
from cdretrieval.models.backbones import BackboneSplit, split_backbone
from cdretrieval.paths import cache_dir
from cdretrieval.prototypes import Prototypes, cluster_banks
from cdretrieval.rng import rng_state, seed_everything, set_rng_state
from cdretrieval.run import (
    CHECKPOINT_FILE,
    LOG_FILE,
    SUMMARY_FILE,
    encoder_from_config,
    load_checkpoint,
    save_checkpoint,
)

#: Names defined here, and those re-exported from the modules they moved to (tests, benchmarks and scripts
#: import them from ``cdretrieval.train``).
__all__ = [
    "CACHED_MODES",
    "CACHE_BATCH_VIEWS",
    "FEATURE_CACHE_FORMAT",
    "CachedInputModel",
    "Prototypes",
    "TrainResult",
    "Trainer",
    "ViewFeatures",
    "active_terms",
    "build_feature_cache",
    "cluster_banks",
    "comparable_config",
    "compute_losses",
    "extract_views",
    "feature_cache_key",
    "gather_rows",
    "gather_rows_with_grad",
    "init_distributed",
    "make_optimizer",
    "pretrain",
    "rank",
    "resolve_mode",
    "world_size",
]


def make_optimizer(head: nn.Module, body: nn.Module | None, t: TrainConfig, mode: str = "finetune"
                   ) -> torch.optim.Optimizer:
    """The training optimiser (``t.optimizer``): ``head``'s trainable parameters at ``t.lr``, ``body``'s
    (the backbone, or the part of it that trains in ``mode``; None when it is frozen) at
    ``t.lr`` × :func:`~cdretrieval.config.backbone_lr_scale`."""
    groups: list[dict[str, Any]] = [{"params": [p for p in head.parameters() if p.requires_grad], "lr": t.lr}]
    if body is not None:
        groups.append({"params": [p for p in body.parameters() if p.requires_grad],
                       "lr": t.lr * backbone_lr_scale(t, mode)})
    if t.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=t.lr, momentum=0.9, weight_decay=t.weight_decay)
    return torch.optim.AdamW(groups, lr=t.lr, weight_decay=t.weight_decay)


@dataclass
class TrainResult:
    run_dir: Path
    epochs_done: int
    steps: int
    seconds: float
    images_per_second: float
    last_losses: dict[str, float]
    mode: str
    domains: dict[str, int]
    setup_seconds: float = 0.0  # scanning, model set-up and (frozen mode) the feature cache pass
    wall_seconds: float = 0.0  # the whole pretrain call


def resolve_mode(cfg: RunConfig, device: torch.device) -> str:
    """``auto`` → finetune on CUDA, partial elsewhere (the top units train over cached lower maps)."""
    mode = cfg.train.mode
    if mode == "auto":
        return "finetune" if device.type == "cuda" else "partial"
    return mode


def _lr_lambda(total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    def f(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return f


def comparable_config(cfg_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Config fields that must not change on resume (epochs, logging and workers may)."""
    d = drop_retired_keys(json.loads(json.dumps(cfg_dict)))  # an older run's checkpoint may hold them
    for k in ("epochs", "checkpoint_every", "log_every", "device"):
        d["train"].pop(k, None)
    d["data"].pop("num_workers", None)
    return d


class Trainer:
    """Runs :func:`pretrain`; exposed for tests that need to step it by hand."""

    def __init__(
        self,
        cfg: RunConfig,
        run_dir: str | os.PathLike[str],
        *,
        progress: bool = True,
        feature_cache: str | os.PathLike[str] | None = None,
    ):
        validate(cfg)
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.progress = progress and rank() == 0
        self.device = resolve_device(cfg.train.device)
        init_distributed(self.device)
        seed_everything(cfg.train.seed)
        self.mode = resolve_mode(cfg, self.device)
        self.split: BackboneSplit | None = None
        self.feature_cache = Path(feature_cache) if feature_cache else cache_dir() / "features"

        if not cfg.data.root:
            raise DataError("no data root: set data.root or pass --data")
        root = resolve_data_root(cfg.data.root)
        self.samples = scan_domains(root, cfg.data.domains or None, cfg.data.split)
        if len(self.samples) < 2:
            raise DataError(f"cross-domain pretraining needs at least 2 domains, got {list(self.samples)}")
        self.encoder = encoder_from_config(cfg).to(self.device)
        self.amp = amp_dtype(self.device, cfg.train.precision, cfg.model.backbone)
        self._prepare_inputs()
        self.domains = list(self.samples)
        sizes = {d: len(self.samples[d]) for d in self.domains}
        self.banks = MemoryBank(sizes, cfg.model.dim, seed=cfg.train.seed).to(self.device)
        k_joint = cluster_counts(cfg.losses, list(sizes.values()))[0]
        self.mim = MutualInformation(
            k_joint, momentum=None, w_sample=cfg.losses.mim_entropy_weight, w_marginal=cfg.losses.mim_diversity_weight
        ).to(self.device)
        self.model: nn.Module = self.encoder
        if self.mode in CACHED_MODES:
            self.model = CachedInputModel(self.encoder.head, self.split.upper if self.split is not None else None)
        self.ddp_model: nn.Module = self.model
        if world_size() > 1:
            self.ddp_model = nn.parallel.DistributedDataParallel(self.model)
        self.steps_per_epoch = cfg.train.steps_per_epoch or math.ceil(max(sizes.values()) / cfg.train.batch_size)
        body = self.encoder.backbone if self.mode in ("finetune", "partial") else None
        self.optimizer = make_optimizer(self.encoder.head, body, cfg.train, self.mode)
        total = self.steps_per_epoch * cfg.train.epochs
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, _lr_lambda(total, self.steps_per_epoch * cfg.train.warmup_epochs)
        )
        self.epoch = 0  # next epoch to run
        self.step = 0
        self.last_losses: dict[str, float] = {}
        self._log_path = self.run_dir / LOG_FILE

    # ---- set-up

    def _prepare_inputs(self) -> None:
        """Frozen/partial: cache backbone features (lower maps). Finetune: drop unreadable images up front."""
        self.cache: dict[str, Tensor] = {}
        if self.mode in CACHED_MODES:
            for p in self.encoder.backbone.parameters():
                p.requires_grad_(False)
            if self.mode == "partial":
                self.split = split_backbone(self.encoder.backbone, self.cfg.train.trainable_units,
                                            self.cfg.data.image_size)
                for p in self.split.upper.parameters():
                    p.requires_grad_(True)
            root = self.feature_cache
            if rank() == 0:
                missing = [d for d, s in self.samples.items()
                           if not (root / f"{feature_cache_key(self.cfg, s, self.mode)}.pt").is_file()]
                if missing and self.progress:
                    views = 1 + self.cfg.train.cached_views
                    n = sum(len(self.samples[d]) for d in missing)
                    tqdm.write(f"caching backbone features once ({views} views of {n} images in {', '.join(missing)}) "
                               f"under {root}; later runs with the same data and settings reuse them")
                for d, s in self.samples.items():
                    build_feature_cache(self.encoder, s, self.cfg, self.device, root, d, self.progress, self.split)
            barrier()
            for d, s in list(self.samples.items()):
                feats, kept = build_feature_cache(self.encoder, s, self.cfg, self.device, root, d, False, self.split)
                self.cache[d] = feats.to(self.device)
                self.samples[d] = kept

    @torch.no_grad()
    def fill_banks(self) -> None:
        """A full forward pass of every image (clean view) into its domain's bank (CDS/PCS practice)."""
        self.encoder.eval()
        for d in self.domains:
            if self.mode in CACHED_MODES:
                emb = self.embed_cached(self.cache[d][0])
                self.banks.fill(d, torch.arange(len(emb), device=self.device), emb)
            else:
                cl = use_channels_last(self.device, self.cfg.model.backbone)
                got = extract(
                    self.encoder, self.samples[d], eval_transform(self.cfg.data.image_size), device=self.device,
                    amp=self.amp, channels_last=cl, num_workers=self.cfg.data.num_workers,
                    desc=f"{d}: filling bank", progress=self.progress,
                )
                warn_skipped(got.bad, f"domain {d}")
                self.banks.fill(d, got.indices.to(self.device), got.features.to(self.device))

    @torch.no_grad()
    def embed_cached(self, x: Tensor, chunk: int = 1024) -> Tensor:
        """Cached inputs ``[N, F_in]`` (frozen/partial mode) → L2-normalised embeddings ``[N, dim]`` (eval mode)."""
        self.model.eval()
        return torch.cat([F.normalize(self.model(x[i : i + chunk]), dim=1) for i in range(0, len(x), chunk)])

    # ---- one step

    def _epoch_generator(self, epoch: int) -> torch.Generator:
        return torch.Generator().manual_seed(self.cfg.train.seed * 7919 + epoch)

    def _epoch_plan(self, epoch: int) -> dict[str, Tensor]:
        """domain → ``[steps, B]`` bank positions: a seeded permutation, repeated to fill the epoch."""
        g = self._epoch_generator(epoch)
        b = self.cfg.train.batch_size
        plan = {}
        for d in self.domains:
            n = len(self.samples[d])
            need = self.steps_per_epoch * b
            perm = torch.cat([torch.randperm(n, generator=g) for _ in range(math.ceil(need / n))])[:need]
            plan[d] = perm.view(self.steps_per_epoch, b)
        return plan

    def outputs(
        self, d: str, idx: Tensor, views: Tensor | None, images: Tensor | None, model: nn.Module | None = None
    ) -> Tensor:
        """The L2-normalised embeddings ``[b, dim]`` a training step computes for domain ``d``'s batch.

        Cached modes read view ``views[i]`` of sample ``idx[i]`` from the feature cache; finetune runs
        ``images`` ``[b, 3, S, S]`` under the trainer's autocast. ``model`` (default: the trained module,
        DDP-wrapped when distributed) may be a copy of :attr:`model`, e.g. to time the network alone.
        """
        net = self.ddp_model if model is None else model
        if self.mode in CACHED_MODES:
            assert views is not None
            x = self.cache[d][views, idx]  # [b, F_in]
            return F.normalize(net(x), dim=1)
        assert images is not None
        with autocast(self.device, self.amp):
            out = net(images)
        return out.float()

    def train_step(
        self, idx: Mapping[str, Tensor], protos: Prototypes, terms: Mapping[str, float],
        views: Mapping[str, Tensor] | None = None, images: Mapping[str, Tensor] | None = None,
    ) -> dict[str, float]:
        """One optimisation step on this rank's shard ``idx`` (domain → ``[b]``); returns the loss terms."""
        self.ddp_model.train()
        if self.mode in CACHED_MODES:
            self.encoder.backbone.eval()  # partial: trained units keep their BN statistics, no drop-connect
        feats = {
            d: self.outputs(d, idx[d], views[d] if views else None, images[d] if images else None)
            for d in self.domains
        }
        losses = compute_losses(feats, idx, self.banks, protos, self.mim, self.cfg, terms)
        total = sum((terms[n] * v for n, v in losses.items()), torch.zeros((), device=self.device))
        self.optimizer.zero_grad(set_to_none=True)
        if total.requires_grad:
            total.backward()
        self.optimizer.step()  # a no-op when no term is active yet (no gradients)
        self.scheduler.step()
        with torch.no_grad():
            for d in self.domains:
                self.banks.update(d, gather_rows(idx[d]), gather_rows(feats[d].detach()), self.cfg.losses.bank_momentum,
                                  check=False)
        self.step += 1
        names = [*losses, "total"]
        values = torch.stack([*(v.detach().float() for v in losses.values()), total.detach().float()])
        values = mean_over_ranks(values)  # the global batch's mean, not this rank's shard
        return dict(zip(names, values.tolist(), strict=True))

    # ---- epochs

    def run_epoch(self, epoch: int, max_steps: int | None = None) -> dict[str, float]:
        """Cluster (if needed), then ``steps_per_epoch`` steps; returns the epoch's mean loss terms."""
        cfg = self.cfg
        terms = active_terms(cfg, epoch)
        needs_protos = bool({"proto", "cross_proto", "mim"} & set(terms))
        protos = Prototypes()
        if needs_protos:
            protos = broadcast_object(cluster_banks(self.banks, cfg, epoch, "mim" in terms) if rank() == 0 else None)
            protos = protos.to(self.device)
            self.mim.reset()
        plan = self._epoch_plan(epoch)
        g = self._epoch_generator(epoch + 10_000)
        r, w = rank(), world_size()
        loaders = self._epoch_loaders(epoch, plan) if self.mode == "finetune" else None
        sums: dict[str, float] = {}
        steps = self.steps_per_epoch if max_steps is None else min(max_steps, self.steps_per_epoch)
        bar = tqdm(range(steps), desc=f"epoch {epoch + 1}/{cfg.train.epochs}", disable=not self.progress, leave=False)
        for s in bar:
            idx = {d: plan[d][s][r::w].to(self.device) for d in self.domains}
            views = images = None
            if self.mode in CACHED_MODES:
                nv = cfg.train.cached_views
                views = {d: torch.randint(1, nv + 1, (cfg.train.batch_size,), generator=g)[r::w].to(self.device)
                         for d in self.domains}
            else:
                assert loaders is not None
                images = {}
                for d in self.domains:
                    batch = next(loaders[d])
                    images[d] = batch["images"].to(self.device)
                    idx[d] = batch["indices"].to(self.device)
            out = self.train_step(idx, protos, terms, views, images)
            for k, v in out.items():
                sums[k] = sums.get(k, 0.0) + v
            if self.progress:
                bar.set_postfix({k: f"{v:.3f}" for k, v in out.items()})
            if rank() == 0 and (s + 1) % cfg.train.log_every == 0:
                self._log({"epoch": epoch, "step": self.step, **out, "lr": self.scheduler.get_last_lr()[0]})
        bar.close()
        return {k: v / max(1, steps) for k, v in sums.items()}

    def _epoch_loaders(self, epoch: int, plan: Mapping[str, Tensor]) -> dict[str, Any]:
        """Finetune mode: per-domain loaders that follow the epoch plan (this rank's shard of each batch)."""
        from torch.utils.data import Sampler

        class _Fixed(Sampler[int]):
            def __init__(self, order: list[int]):
                self.order = order

            def __iter__(self) -> Any:
                return iter(self.order)

            def __len__(self) -> int:
                return len(self.order)

        d_cfg = self.cfg.data
        aug = train_transform(d_cfg.image_size, d_cfg.aug_strength, d_cfg.min_scale, d_cfg.hflip, d_cfg.blur)
        r, w = rank(), world_size()
        out = {}
        for d in self.domains:
            order = plan[d][:, r::w].reshape(-1).tolist()
            loader = make_loader(self.samples[d], aug, batch_size=len(plan[d][0][r::w]),
                                 num_workers=d_cfg.num_workers, seed=self.cfg.train.seed * 31 + epoch)
            loader = torch.utils.data.DataLoader(
                loader.dataset, batch_size=loader.batch_size, sampler=_Fixed(order), num_workers=loader.num_workers,
                collate_fn=loader.collate_fn, generator=loader.generator,
            )
            out[d] = iter(loader)
        return out

    def _log(self, record: Mapping[str, Any]) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with open(self._log_path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")

    # ---- checkpoints

    def state(self) -> dict[str, Any]:
        return {
            "model": self.encoder.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "epoch": self.epoch,
            "step": self.step,
            "banks": self.banks.state_dict(),
            "mim": self.mim.state_dict(),
            "rng": rng_state(),
            "mode": self.mode,
            "domains": {d: len(s) for d, s in self.samples.items()},
            "samples": {d: [s.path for s in ss] for d, ss in self.samples.items()},
            "last_losses": self.last_losses,
            "time": time.time(),
        }

    def save(self) -> None:
        if rank() == 0:
            save_checkpoint(self.run_dir, self.state(), self.cfg)
        barrier()

    def load(self) -> bool:
        """Restore from the run folder's checkpoint; False when there is none."""
        if not (self.run_dir / CHECKPOINT_FILE).is_file():
            return False
        ckpt = load_checkpoint(self.run_dir, map_location=self.device)
        if comparable_config(ckpt["config"]) != comparable_config(self.cfg.to_dict()):
            raise CheckpointError(
                f"{self.run_dir}: its checkpoint was trained with another config; use a new --out folder, "
                "or resume with the same settings (only epochs/logging may change)"
            )
        if ckpt.get("samples") != {d: [s.path for s in ss] for d, ss in self.samples.items()}:
            raise CheckpointError(f"{self.run_dir}: the data set changed since the checkpoint; use a new --out folder")
        self.encoder.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.banks.load_state_dict(ckpt["banks"])
        self.mim.load_state_dict(ckpt["mim"])
        set_rng_state(ckpt["rng"])
        self.epoch, self.step = int(ckpt["epoch"]), int(ckpt["step"])
        self.last_losses = dict(ckpt.get("last_losses", {}))
        self._trim_log()
        return True

    def _trim_log(self) -> None:
        """Keep only the log records up to the checkpoint (a killed run may have logged past it, or died
        mid-line), so a resumed run's log reads as one uninterrupted run."""
        if rank() != 0 or not self._log_path.is_file():
            return
        kept = []
        for line in self._log_path.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(rec, dict) and int(rec.get("step", 0)) <= self.step and (
                "epoch_mean" not in rec or int(rec.get("epoch", 0)) < self.epoch
            ):
                kept.append(line)
        atomic_write_text(self._log_path, "".join(k + "\n" for k in kept))

    # ---- the whole run

    def fit(self, resume: bool = False, stop_after_epochs: int | None = None) -> TrainResult:
        """Train to ``cfg.train.epochs`` (or stop after ``stop_after_epochs`` more, for tests/interrupts)."""
        cfg = self.cfg
        if (self.run_dir / CHECKPOINT_FILE).is_file() and not resume:
            raise CheckpointError(
                f"{self.run_dir} already holds a run; pass --resume to continue it, or use a new --out"
            )
        if not (resume and self.load()):
            self.fill_banks()
        t0 = time.perf_counter()
        images = 0
        done = 0
        while self.epoch < cfg.train.epochs and (stop_after_epochs is None or done < stop_after_epochs):
            means = self.run_epoch(self.epoch)
            images += self.steps_per_epoch * cfg.train.batch_size * len(self.domains)
            self.last_losses = means
            if rank() == 0:
                self._log({"epoch": self.epoch, "step": self.step, "epoch_mean": means})
                if self.progress:
                    terms = " ".join(f"{k}={v:.3f}" for k, v in means.items())
                    tqdm.write(f"epoch {self.epoch + 1}/{cfg.train.epochs}: {terms}")
            self.epoch += 1
            done += 1
            if self.epoch % cfg.train.checkpoint_every == 0 or self.epoch == cfg.train.epochs:
                self.save()
        if done == 0 and not (self.run_dir / CHECKPOINT_FILE).is_file():
            self.save()
        seconds = time.perf_counter() - t0
        return TrainResult(
            self.run_dir, self.epoch, self.step, seconds, images / seconds if seconds > 0 else 0.0,
            self.last_losses, self.mode, {d: len(s) for d, s in self.samples.items()},
        )


def pretrain(
    cfg: RunConfig,
    run_dir: str | os.PathLike[str],
    *,
    resume: bool = False,
    progress: bool = True,
    feature_cache: str | os.PathLike[str] | None = None,
) -> TrainResult:
    """Train a run (see the module docstring) and return a summary; the run folder holds the result.

    ``seconds``/``images_per_second`` cover the training epochs; ``setup_seconds`` the set-up (in frozen mode
    mostly the one-time feature cache pass) and ``wall_seconds`` the whole call.
    """
    t0 = time.perf_counter()
    trainer = Trainer(cfg, run_dir, progress=progress, feature_cache=feature_cache)
    setup = time.perf_counter() - t0
    result = trainer.fit(resume=resume)
    result = dataclasses.replace(result, setup_seconds=setup, wall_seconds=time.perf_counter() - t0)
    if rank() == 0:
        summary = {
            "version": __version__, "mode": result.mode, "epochs": result.epochs_done, "steps": result.steps,
            "seconds": round(result.seconds, 2), "images_per_second": round(result.images_per_second, 1),
            "setup_seconds": round(result.setup_seconds, 2), "wall_seconds": round(result.wall_seconds, 2),
            "last_losses": result.last_losses, "domains": result.domains,
        }
        from cdretrieval.io import atomic_write_json

        atomic_write_json(Path(run_dir) / SUMMARY_FILE, summary)
    return result
