"""Prototypes: each epoch's clustering of the memory banks (PCS), the state the prototype losses read.

Every domain's bank is clustered with each k of :func:`~cdretrieval.config.cluster_counts` (× runs), by
spherical k-means or Sinkhorn-balanced k-means, with a concentration φ per cluster; MIM also needs joint
prototypes of all banks together. Seeds depend on (config seed, epoch, run) only, so every rank and
every resumed run clusters alike.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from cdretrieval.clustering import ClusterResult, balanced_kmeans, spherical_kmeans
from cdretrieval.config import RunConfig, cluster_counts
from cdretrieval.losses.pcs import cluster_concentration
from cdretrieval.memory import MemoryBank


@dataclass
class Prototypes:
    """Per-epoch clustering state: per-domain clusterings and the joint prototypes used by MIM."""

    per_domain: dict[str, list[ClusterResult]] = field(default_factory=dict)
    joint: Tensor | None = None  # [K, D]

    def to(self, device: torch.device) -> Prototypes:
        """These prototypes with every tensor on ``device`` (clustering runs on the CPU, steps may not)."""

        def move(c: ClusterResult) -> ClusterResult:
            conc = None if c.concentration is None else c.concentration.to(device)
            return ClusterResult(c.centroids.to(device), c.assignments.to(device), conc)

        joint = None if self.joint is None else self.joint.to(device)
        return Prototypes({d: [move(c) for c in cs] for d, cs in self.per_domain.items()}, joint)


def cluster_banks(banks: MemoryBank, cfg: RunConfig, epoch: int, need_joint: bool) -> Prototypes:
    """Cluster every domain's bank with each k (× runs); concentration per cluster; joint prototypes.

    Seeds depend on (config seed, epoch, run) so every rank and every resume gets the same result.
    """
    lc = cfg.losses
    sizes = [banks.bank(d).shape[0] for d in banks.domains]
    ks = cluster_counts(lc, sizes)
    out = Prototypes()

    def run(x: Tensor, k: int, seed: int) -> ClusterResult:
        if lc.clustering == "sinkhorn":
            return balanced_kmeans(
                x, k, n_iter=lc.kmeans_iters // 2 or 1, seed=seed, epsilon=lc.sinkhorn_epsilon,
                sinkhorn_iters=lc.sinkhorn_iters, marginal=lc.sinkhorn_marginal,
            )
        return spherical_kmeans(x, k, n_iter=lc.kmeans_iters, seed=seed)

    base = cfg.train.seed * 100_003 + epoch * 101
    for d in banks.domains:
        bank = banks.bank(d).detach().float().cpu()
        results = []
        for k in ks:
            for r in range(lc.cluster_runs):
                c = run(bank, k, base + 7 * r + k)
                c.concentration = cluster_concentration(bank, c.centroids, c.assignments, normalize_to=lc.temperature)
                results.append(c)
        out.per_domain[d] = results
    if need_joint:
        union = torch.cat([banks.bank(d).detach().float().cpu() for d in banks.domains])
        out.joint = run(union, ks[0], base + 999).centroids
    return out


__all__ = ["Prototypes", "cluster_banks"]
