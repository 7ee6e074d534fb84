"""Run configuration: dataclasses with the papers' defaults, YAML in and out.

Every loss is a named term with a weight and a start epoch (PCS style), so an ablation is a config:
``losses.terms.instance.weight: 0`` switches CDS instance discrimination off.
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

from cdretrieval.io import atomic_write_text

#: Bounds on sizes read from a config (a typo like ``image_size: 96000`` must fail, not exhaust memory).
MIN_IMAGE_SIZE, MAX_IMAGE_SIZE = 32, 1024
MAX_EPOCHS, MAX_BATCH_SIZE, MAX_CACHED_VIEWS, MAX_DIM = 100_000, 65_536, 64, 65_536

#: ``train.backbone_lr_scale`` when the config leaves it None, per training mode: finetune moves a pretrained
#: backbone gently (CDS/PCS); partial mode's few top units learn at the head's rate (docs/defaults.md, Round 3).
BACKBONE_LR_SCALE: dict[str, float] = {"finetune": 0.1, "partial": 1.0}

#: Keys that earlier versions wrote and nothing read (section → names): dropped when a config is read, so the
#: ``config.yaml`` and checkpoints of older run folders still load, and still resume (see
#: :func:`drop_retired_keys`). Any other unknown key stays an error.
RETIRED_KEYS: dict[str, frozenset[str]] = {
    "train": frozenset({"tensorboard"}),  # no TensorBoard writer was ever wired up; log.jsonl holds the losses
    "losses": frozenset({"mim_momentum"}),  # the MIM marginal is the batch's own (PCS), not a running mean
}

#: Loss terms the trainer knows (see ``cdretrieval.losses``).
LOSS_TERMS: tuple[str, ...] = ("instance", "cross_instance", "proto", "cross_proto", "mim")


@dataclass
class DataConfig:
    """Where the images are and how they are turned into tensors."""

    root: str = ""
    domains: list[str] = field(default_factory=list)  # empty → every domain folder under root
    split: str | None = None  # None → all images; else <domain>_<split>.txt lists
    # multiple of 32; 160 beat 128 by +0.04 held-out PACS mAP and keeps CPU pretraining on PACS under 10 min
    # (docs/defaults.md, Round 3)
    image_size: int = 160
    aug_strength: float = 1.0  # photometric augmentation strength (0 = none, 1 = MoCo v2)
    min_scale: float = 0.35  # RandomResizedCrop smallest area
    hflip: float = 0.5
    blur: float = 0.3
    num_workers: int = 2


@dataclass
class ModelConfig:
    """Encoder = backbone + projection head; which feature is indexed."""

    backbone: str = "efficientnet_lite0"
    weights: str = "default"  # default (offline for Lite0) | imagenet | none | path to a state dict
    hidden_dim: int = 1024
    dim: int = 256
    index_feature: Literal["head", "backbone"] = "head"


@dataclass
class LossTerm:
    """One named loss term: ``weight × loss`` from ``start_epoch`` on (0-based)."""

    weight: float = 1.0
    start_epoch: int = 0


def _default_terms() -> dict[str, LossTerm]:
    return {
        "instance": LossTerm(1.0, 0),  # CDS in-domain instance discrimination (eq. 1)
        "cross_instance": LossTerm(0.5, 1),  # CDS cross-domain entropy over the other banks (eq. 2-3)
        "proto": LossTerm(1.0, 1),  # PCS in-domain prototypical contrastive
        "cross_proto": LossTerm(1.0, 1),  # PCS cross-domain instance–prototype entropy
        "mim": LossTerm(1.0, 1),  # PCS mutual-information maximisation (its own inner weights below)
    }


@dataclass
class LossConfig:
    """Loss terms and their hyper-parameters (defaults of the CDS and PCS papers, see cdretrieval/losses)."""

    terms: dict[str, LossTerm] = field(default_factory=_default_terms)
    # τ for every softmax over banks and prototypes (the papers use 0.1 with a fine-tuned network); on frozen
    # features 0.2 lifted held-out PACS mAP 0.476 → 0.548 (0.15–0.5 all ≥ 0.53, 0.05: 0.373; docs/defaults.md)
    temperature: float = 0.2
    cross_topk: int | None = None  # CDS official code keeps the top-k (700) logits; None = all
    bank_momentum: float = 0.5  # V[i] ← normalise(m·V[i] + (1−m)·f_i)
    clustering: Literal["kmeans", "sinkhorn"] = "kmeans"
    num_clusters: list[int] = field(default_factory=list)  # empty → label-free rule, see cluster_counts()
    cluster_runs: int = 1  # k-means runs (seeds) per k
    kmeans_iters: int = 20
    sinkhorn_epsilon: float = 0.05
    sinkhorn_iters: int = 3
    sinkhorn_marginal: Literal["uniform", "kmeans"] = "uniform"
    mim_entropy_weight: float = 0.05  # per-sample entropy (down)
    mim_diversity_weight: float = 0.5  # marginal entropy (up)
    domain_pairing: Literal["all_others", "pairs"] = "all_others"


@dataclass
class TrainConfig:
    """Optimisation and run mechanics."""

    # auto: finetune on CUDA, partial on CPU (docs/defaults.md "Round 3": partial beat frozen on every seed)
    mode: Literal["auto", "frozen", "partial", "finetune"] = "auto"
    cached_views: int = 4  # frozen/partial mode: augmented views cached per image (plus one clean view)
    trainable_units: int = 2  # partial mode: top backbone units trained (Lite0 2 = last MBConv block + conv
    # head; ResNet 2 = layer3 + layer4); the lower units run once per image, cached
    epochs: int = 10  # chosen on held-out PACS (docs/defaults.md): 8-10 beat 15 and 30 (over-fitting)
    batch_size: int = 64  # per domain per step
    steps_per_epoch: int | None = None  # None → largest domain / batch_size
    optimizer: Literal["sgd", "adamw"] = "adamw"
    lr: float = 1e-3
    # backbone (finetune) or trained top units (partial) lr = lr × this; None = the mode's measured default
    # (finetune 0.1, partial 1.0: see BACKBONE_LR_SCALE)
    backbone_lr_scale: float | None = None
    weight_decay: float = 1e-4
    warmup_epochs: int = 1
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"
    checkpoint_every: int = 1  # epochs
    log_every: int = 20  # steps


@dataclass
class RunConfig:
    """Everything a run needs; saved as ``config.yaml`` in the run folder."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    losses: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def save(self, path: str | os.PathLike[str]) -> None:
        atomic_write_text(path, self.to_yaml())

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunConfig:
        """A config from its :meth:`to_dict` form (retired keys of older versions dropped, others strict)."""
        return _from_dict(cls, drop_retired_keys(data), "config")

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> RunConfig:
        p = Path(path)
        if not p.is_file():
            raise ValueError(f"config file {p} not found")
        try:
            data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            raise ValueError(f"{p}: not valid YAML ({e})") from e
        if not isinstance(data, dict):
            raise ValueError(f"{p}: expected a mapping at the top level")
        cfg = cls.from_dict(data)
        validate(cfg)
        return cfg


T = TypeVar("T")


def _convert(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        if not isinstance(value, dict):
            raise ValueError(f"{where}: expected a mapping, got {value!r}")
        return _from_dict(tp, value, where)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _convert(inner[0], value, where)
    if origin is typing.Literal:
        if value not in args:
            raise ValueError(f"{where}: {value!r} is not one of {', '.join(map(repr, args))}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ValueError(f"{where}: expected a list, got {value!r}")
        return [_convert(args[0], v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{where}: expected a mapping, got {value!r}")
        return {str(k): _convert(args[1], v, f"{where}.{k}") for k, v in value.items()}
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float, str, bool) and not isinstance(value, tp):
        raise ValueError(f"{where}: expected {tp.__name__}, got {value!r}")
    return value


def drop_retired_keys(data: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of a config mapping without the :data:`RETIRED_KEYS` (the input is left alone)."""
    out = dict(data)
    for section, names in RETIRED_KEYS.items():
        if isinstance(out.get(section), Mapping):
            out[section] = {k: v for k, v in out[section].items() if k not in names}
    return out


def _from_dict(cls: type[T], data: dict[str, Any], where: str) -> T:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = set(data) - names
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}; known: {', '.join(sorted(names))}")
    kwargs = {k: _convert(hints[k], v, f"{where}.{k}") for k, v in data.items()}
    return cls(**kwargs)


def validate(cfg: RunConfig) -> None:
    """Check values that types cannot; raise ``ValueError`` naming the bad one."""
    unknown = set(cfg.losses.terms) - set(LOSS_TERMS)
    if unknown:
        raise ValueError(f"losses.terms: unknown term(s) {sorted(unknown)}; known: {', '.join(LOSS_TERMS)}")
    for name, term in cfg.losses.terms.items():
        if term.weight < 0 or term.start_epoch < 0:
            raise ValueError(f"losses.terms.{name}: weight and start_epoch must be ≥ 0, got {term}")
    if cfg.data.image_size % 32 or not MIN_IMAGE_SIZE <= cfg.data.image_size <= MAX_IMAGE_SIZE:
        raise ValueError(
            f"data.image_size must be a multiple of 32 in [{MIN_IMAGE_SIZE}, {MAX_IMAGE_SIZE}], "
            f"got {cfg.data.image_size}"
        )
    if cfg.train.epochs < 1 or cfg.train.batch_size < 2:
        raise ValueError(f"train.epochs ≥ 1 and train.batch_size ≥ 2 required, got {cfg.train}")
    bounded = {
        "train.epochs": (cfg.train.epochs, MAX_EPOCHS), "train.batch_size": (cfg.train.batch_size, MAX_BATCH_SIZE),
        "train.cached_views": (cfg.train.cached_views, MAX_CACHED_VIEWS), "model.dim": (cfg.model.dim, MAX_DIM),
        "model.hidden_dim": (cfg.model.hidden_dim, MAX_DIM), "data.num_workers": (cfg.data.num_workers, 64),
    }
    for name, (value, high) in bounded.items():
        if value > high:
            raise ValueError(f"{name} must be ≤ {high}, got {value}")
    if min(cfg.model.dim, cfg.model.hidden_dim) < 1 or cfg.data.num_workers < 0:
        raise ValueError(f"model.dim and model.hidden_dim must be ≥ 1 and data.num_workers ≥ 0, got {cfg.model}")
    if cfg.train.lr <= 0 or cfg.train.weight_decay < 0:
        raise ValueError(
            f"train.lr must be > 0 and train.weight_decay ≥ 0, got {cfg.train.lr}, {cfg.train.weight_decay}"
        )
    if not 0.0 <= cfg.losses.bank_momentum < 1.0:
        raise ValueError(f"losses.bank_momentum must be in [0, 1), got {cfg.losses.bank_momentum}")
    if cfg.losses.temperature <= 0:
        raise ValueError(f"losses.temperature must be > 0, got {cfg.losses.temperature}")
    if any(k < 2 for k in cfg.losses.num_clusters):
        raise ValueError(f"losses.num_clusters must all be ≥ 2, got {cfg.losses.num_clusters}")
    if cfg.train.cached_views < 1:
        raise ValueError(f"train.cached_views must be ≥ 1, got {cfg.train.cached_views}")
    if cfg.train.trainable_units < 1:
        raise ValueError(f"train.trainable_units must be ≥ 1, got {cfg.train.trainable_units}")
    if cfg.train.backbone_lr_scale is not None and cfg.train.backbone_lr_scale < 0:
        raise ValueError(f"train.backbone_lr_scale must be ≥ 0 (or null), got {cfg.train.backbone_lr_scale}")


def backbone_lr_scale(t: TrainConfig, mode: str) -> float:
    """The backbone's (finetune) or trained top units' (partial) lr multiplier: the config's, else the mode's."""
    return t.backbone_lr_scale if t.backbone_lr_scale is not None else BACKBONE_LR_SCALE.get(mode, 0.1)


def cluster_counts(cfg: LossConfig, domain_sizes: list[int]) -> list[int]:
    """The k values to cluster each domain with (each run ``cluster_runs`` times).

    Given ``num_clusters`` they are used as is (clipped to the smallest domain). Otherwise a label-free
    rule: K = clip(round(√N_min / 2), 4, 200) and k ∈ {K, 2K} — a few times more clusters than a small
    benchmark's classes (PACS: 7) and fewer than large ones (DomainNet: 345), over-clustering being the
    safe side for prototypical contrastive learning (PCL uses k ≫ #classes).
    """
    n_min = min(domain_sizes)
    if cfg.num_clusters:
        ks = cfg.num_clusters
    else:
        base = int(min(200, max(4, round(math.sqrt(n_min) / 2))))
        ks = [base, 2 * base]
    return sorted({max(2, min(k, n_min)) for k in ks})


# --------------------------------------------------------------------------------------------- overrides


def parse_value(text: str) -> Any:
    """A ``--set`` value: YAML scalars/lists (``0.5``, ``true``, ``[7, 14]``, ``null``); ``1e-3`` as a float."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ValueError(f"cannot parse value {text!r}: {e}") from e
    if isinstance(value, str):
        try:
            return float(text)  # YAML 1.1 reads "1e-3" as a string
        except ValueError:
            return value
    return value


def parse_sets(items: Sequence[str]) -> dict[str, Any]:
    """``["train.lr=5e-4", ...]`` → ``{"train.lr": 0.0005}`` (the CLI's and the benchmarks' ``--set``)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
        out[key.strip()] = parse_value(value.strip())
    return out


def apply_overrides(cfg: RunConfig, overrides: Mapping[str, Any]) -> RunConfig:
    """A copy of ``cfg`` with dotted fields set (``train.lr``, ``losses.terms.mim.weight``), validated.

    Unknown keys raise ``ValueError`` naming the key, as unknown YAML keys do.
    """
    data = cfg.to_dict()
    for key, value in overrides.items():
        parts = key.split(".")
        node: Any = data
        for part in parts[:-1]:
            if not isinstance(node, dict) or part not in node:
                raise ValueError(f"unknown config key {key!r} (no {part!r})")
            node = node[part]
        if not isinstance(node, dict) or parts[-1] not in node:
            raise ValueError(f"unknown config key {key!r}")
        node[parts[-1]] = value
    out = RunConfig.from_dict(data)
    validate(out)
    return out
