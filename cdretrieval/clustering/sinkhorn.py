"""Sinkhorn–Knopp soft assignment and Sinkhorn-balanced spherical clustering.

An alternative to plain k-means assignments that forbids collapse onto a few prototypes, after
SeLa (Asano et al., "Self-labelling via simultaneous clustering and representation learning", ICLR 2020),
SwAV (Caron et al., "Unsupervised Learning of Visual Features by Contrasting Cluster Assignments",
NeurIPS 2020, Alg. 1 / ``distributed_sinkhorn``) and ProtoOT (prototype marginals taken from k-means
cluster proportions instead of uniform).
"""

from __future__ import annotations

import math
import warnings
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from cdretrieval.clustering.kmeans import ClusterResult, reseed_empty_clusters, spherical_kmeans, working_points

# Tolerance on "the prototype marginal sums to 1" (it is renormalised exactly afterwards).
_MARGINAL_SUM_TOL = 1e-4


@torch.no_grad()
def sinkhorn(
    scores: Tensor,
    epsilon: float = 0.05,
    n_iters: int = 3,
    prototype_marginal: Tensor | None = None,
) -> Tensor:
    """Entropy-regularised optimal-transport soft assignment of N samples to K prototypes.

    Finds Q ∝ diag(a)·exp(S/ε)·diag(b) whose column sums (prototype masses) equal
    ``prototype_marginal`` (uniform 1/K by default) and whose row sums (sample masses) equal 1/N, by
    alternating column and row normalisation (Sinkhorn–Knopp; SeLa eq. 7–8, SwAV Alg. 1). The result is
    returned scaled by N so every **row sums to 1**: one soft assignment per sample.

    Computed in float32 in the log domain: ``log Q = S/ε`` and each normalisation subtracts a
    ``logsumexp``. This is the same iteration as the ``exp`` form with the maximum subtracted, but it
    can neither overflow (large S/ε) nor underflow a whole column to zero; SwAV's plain ``exp(S/ε)``
    overflows float32 once S/ε > 88, e.g. un-normalised features at ε = 0.05.

    With the default 3 iterations (SwAV) the rows are exact (the row step is last) and the columns are
    close to, not exactly at, their marginals; more iterations converge.

    Args:
        scores: ``[N, K]`` similarities of samples to prototypes (cosine for normalised features).
        epsilon: entropic regularisation ε > 0 (smaller = harder assignments).
        n_iters: number of (column, row) normalisation rounds, >= 1.
        prototype_marginal: ``[K]`` non-negative target mass of each prototype, summing to 1 (e.g.
            k-means cluster proportions as in ProtoOT); ``None`` = uniform 1/K.

    Returns:
        ``[N, K]`` soft assignments (rows sum to 1), same dtype and device as ``scores``, no gradient.
    """
    if scores.dim() != 2:
        raise ValueError(f"scores must be a 2-D [N, K] tensor, got shape {tuple(scores.shape)}")
    if not scores.is_floating_point():
        raise ValueError(f"scores must be floating point, got dtype {scores.dtype}")
    n, k = scores.shape
    if n == 0 or k == 0:
        raise ValueError(f"scores must be non-empty, got shape {tuple(scores.shape)}")
    if not (isinstance(epsilon, int | float) and epsilon > 0 and math.isfinite(epsilon)):
        raise ValueError(f"epsilon must be a finite number > 0, got {epsilon!r}")
    if isinstance(n_iters, bool) or not isinstance(n_iters, int) or n_iters < 1:
        raise ValueError(f"n_iters must be an integer >= 1, got {n_iters!r}")
    if not bool(torch.isfinite(scores).all()):
        raise ValueError("scores contain NaN or infinite values")

    log_q = scores.detach().float() / epsilon  # [N, K]
    log_col_target = _log_prototype_marginal(prototype_marginal, k, log_q.device)  # [K]
    log_row_target = -math.log(n)  # each sample carries mass 1/N
    keep = torch.isfinite(log_col_target)  # [K] prototypes with zero mass stay at zero

    for _ in range(n_iters):
        # Columns: prototype c receives total mass marginal[c].
        col_mass = torch.logsumexp(log_q, dim=0)  # [K]
        log_q = torch.where(keep, log_q - col_mass + log_col_target, float("-inf"))
        # Rows: sample i carries total mass 1/N.
        row_mass = torch.logsumexp(log_q, dim=1, keepdim=True)  # [N, 1]
        log_q = log_q - row_mass + log_row_target

    q = torch.exp(log_q + math.log(n))  # [N, K], rows sum to 1
    return q.to(scores.dtype)


def _log_prototype_marginal(marginal: Tensor | None, k: int, device: torch.device) -> Tensor:
    """Validate a ``[K]`` prototype marginal and return its log (``-inf`` where it is 0)."""
    if marginal is None:
        return torch.full((k,), -math.log(k), device=device)
    if marginal.shape != (k,):
        raise ValueError(f"prototype_marginal must have shape ({k},), got {tuple(marginal.shape)}")
    m = marginal.detach().to(device, torch.float32)
    if not bool(torch.isfinite(m).all()) or bool((m < 0).any()):
        raise ValueError(f"prototype_marginal must be finite and non-negative, got {m.tolist()}")
    total = float(m.sum())
    if abs(total - 1.0) > _MARGINAL_SUM_TOL:
        raise ValueError(f"prototype_marginal must sum to 1, sums to {total:.6f}")
    return torch.log(m / total)


def balanced_kmeans(
    x: Tensor,
    k: int,
    n_iter: int = 10,
    seed: int = 0,
    epsilon: float = 0.05,
    sinkhorn_iters: int = 20,
    marginal: Literal["uniform", "kmeans"] = "uniform",
) -> ClusterResult:
    """Spherical clustering whose assignments are balanced by Sinkhorn (SeLa / SwAV / ProtoOT style).

    1. Initialise centroids with :func:`spherical_kmeans` (same ``k`` and ``seed``).
    2. Repeat ``n_iter`` times: ``Q = sinkhorn(x·Cᵀ)`` ``[N, K]``; centroid ``c`` = L2-normalised
       Q-weighted mean ``normalise(Σ_i Q[i, c]·x_i)``.
    3. Hard assignment = ``argmax_c Q[i, c]`` with the final centroids.

    Args:
        x: ``[N, D]`` features (L2-normalised here, detached).
        k: number of clusters, ``1 <= k <= N``.
        n_iter: balanced refinement rounds, >= 1.
        seed: seed of the k-means initialisation.
        epsilon: Sinkhorn ε (features are normalised, so ε = 0.05 cannot overflow).
        sinkhorn_iters: Sinkhorn iterations per round. Default 20, not SwAV's 3: SwAV balances each
            mini-batch online, here a whole bank is clustered offline and balance is the point. On an
            elongated blob that k-means cuts 250/39/29/82, the max/min cluster-size ratio over 8 seeds
            was 1.9–2.8 with 3 iterations, ≤ 1.84 with 10 and ≤ 1.39 with 20 (more iterations did not
            help further: the argmax of a soft balanced Q is only near-balanced).
        marginal: prototype mass constraint: ``"uniform"`` (1/K each, SeLa/SwAV) or ``"kmeans"`` (the
            cluster proportions of the k-means initialisation, as in ProtoOT: keeps natural imbalance
            while still preventing collapse).

    Returns:
        :class:`ClusterResult` with unit ``centroids [K, D]`` and hard ``assignments [N]``.

    Warns:
        UserWarning: when some cluster ended up with no hard-assigned point; it is reseeded with the
        farthest point (the k-means initialisation may warn too).
    """
    if marginal not in ("uniform", "kmeans"):
        raise ValueError(f"marginal must be 'uniform' or 'kmeans', got {marginal!r}")
    if isinstance(n_iter, bool) or not isinstance(n_iter, int) or n_iter < 1:
        raise ValueError(f"n_iter must be an integer >= 1, got {n_iter!r}")
    init = spherical_kmeans(x, k, seed=seed)  # validates x and k
    points = working_points(x)  # [N, D]
    n = points.shape[0]

    prototype_marginal: Tensor | None = None
    if marginal == "kmeans":
        prototype_marginal = init.sizes().to(torch.float32) / n  # [K], no zeros after reseeding

    centroids = init.centroids  # [K, D]
    for _ in range(n_iter):
        q = sinkhorn(points @ centroids.T, epsilon, sinkhorn_iters, prototype_marginal)  # [N, K]
        sums = q.T.to(points.dtype) @ points  # [K, D]
        # A prototype whose column mass vanished keeps its previous direction instead of becoming 0.
        dead = sums.norm(dim=1) <= torch.finfo(sums.dtype).eps  # [K]
        centroids = torch.where(dead[:, None], centroids, F.normalize(sums, dim=1))

    q = sinkhorn(points @ centroids.T, epsilon, sinkhorn_iters, prototype_marginal)  # [N, K]
    assignments = q.argmax(dim=1)  # [N]
    similarity = (points * centroids[assignments]).sum(dim=1)  # [N]
    centroids, assignments, n_reseeded = reseed_empty_clusters(points, centroids, assignments, similarity)
    if n_reseeded:
        warnings.warn(
            f"balanced_kmeans(k={k}, N={n}): {n_reseeded} empty cluster(s) reseeded from the farthest points",
            UserWarning,
            stacklevel=2,
        )
    return ClusterResult(centroids=centroids, assignments=assignments)


__all__ = ["balanced_kmeans", "sinkhorn"]
