"""PCS prototype losses: in-domain prototypical contrastive and cross-domain instance–prototype entropy.

Yue, Zheng, Zhang, Darrell, Keutzer, Sangiovanni-Vincentelli, "Prototypical Cross-domain Self-supervised
Learning for Few-shot Unsupervised Domain Adaptation", CVPR 2021 (PCS). The in-domain term is the
prototype part of ProtoNCE from PCL (Li, Zhou, Xiong, Hoi, "Prototypical Contrastive Learning of
Unsupervised Representations", ICLR 2021), applied per domain by PCS §3.2.

Equations are cited by section and name: PCS §3.2 "In-domain Prototypical Contrastive Learning",
PCS §3.3 "Cross-domain Instance-Prototype Self-supervised Learning", PCL "ProtoNCE" and "Concentration
estimation". (The equation numbers could not be re-checked against the papers here.)

Prototypes μ_c come from spherical k-means of a domain's memory bank (:mod:`cdretrieval.clustering`);
they and the concentrations φ_c are constants here (detached): the gradient reaches the features only.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from cdretrieval.clustering.kmeans import ClusterResult
from cdretrieval.losses.cds import cross_domain_entropy_loss
from cdretrieval.validation import check_features_against, check_positions, check_positive, check_rows

# PCS's `alpha` in φ_c = Σ‖v−μ_c‖ / (n_c·log(n_c + alpha)): damps φ of small clusters.
_CONCENTRATION_ALPHA = 10.0


def prototypical_loss(
    features: Tensor, prototypes: Tensor, assignments: Tensor, concentration: Tensor, *, check: bool = True
) -> Tensor:
    """In-domain prototypical contrastive loss: PCS §3.2 (ProtoNCE's prototype term, PCL).

    L = −(1/B) Σ_i log [ exp(f_i·μ_{c(i)}/φ_{c(i)}) / Σ_c exp(f_i·μ_c/φ_c) ]: cross-entropy of the
    logits f_i·μ_cᵀ/φ_c (one temperature per prototype column) toward i's own cluster c(i).

    Args:
        features: ``[B, D]`` L2-normalised embeddings of a batch from one domain (gradient flows).
        prototypes: ``[K, D]`` L2-normalised centroids μ_c of that domain's bank (detached).
        assignments: ``[B]`` int64 cluster c(i) of each sample in ``[0, K)``.
        concentration: ``[K]`` positive per-cluster temperature φ_c (detached), see
            :func:`cluster_concentration`.
        check: validate the arguments (False: trust the caller, no device sync).

    Returns:
        Scalar loss, mean over the batch.
    """
    if check:
        check_features_against(features, prototypes, "prototypes")
        k = prototypes.shape[0]
        check_positions(assignments, "assignments", features.shape[0], k)
        if concentration.shape != (k,):
            raise ValueError(f"concentration must have shape ({k},), got {tuple(concentration.shape)}")
        if not bool((concentration > 0).all()) or not bool(torch.isfinite(concentration).all()):
            raise ValueError(f"concentration must be finite and > 0, got min {float(concentration.min())}")

    phi = concentration.detach().to(features.dtype)  # [K]
    logits = features @ prototypes.detach().to(features.dtype).T / phi  # [B, K], column c scaled by 1/φ_c
    return F.cross_entropy(logits, assignments)


def multi_prototypical_loss(
    features: Tensor, indices: Tensor, clusterings: Sequence[ClusterResult], *, check: bool = True
) -> Tensor:
    """PCS §3.2 in-domain prototypical loss averaged over several clusterings (PCL ProtoNCE's 1/M Σ_m).

    PCS/PCL run k-means several times (different k and seeds, e.g. k ∈ {K, 2K} × M runs) on the same
    bank; the loss is the mean of :func:`prototypical_loss` over those clusterings.

    Args:
        features: ``[B, D]`` L2-normalised embeddings of a batch from one domain (gradient flows).
        indices: ``[B]`` int64 positions of the batch samples in the domain's bank; the cluster of
            sample i in clustering m is ``clusterings[m].assignments[indices[i]]``.
        clusterings: clusterings of that domain's bank, each with ``concentration`` set.
        check: validate the arguments (False: trust the caller, no device sync).

    Returns:
        Scalar loss, mean over clusterings of the batch-mean losses.
    """
    if check and len(clusterings) == 0:
        raise ValueError("clusterings is empty: need at least one ClusterResult")
    losses = []
    for m, clustering in enumerate(clusterings):
        concentration = clustering.concentration
        if concentration is None:  # not a value check: without φ there is no loss to compute
            raise ValueError(
                f"clusterings[{m}].concentration is None: compute it with cluster_concentration(...) first"
            )
        if check:
            check_positions(indices, "indices", features.shape[0], clustering.assignments.shape[0])
        assigned = clustering.assignments.to(features.device)[indices.to(features.device)]  # [B]
        losses.append(prototypical_loss(features, clustering.centroids, assigned, concentration, check=check))
    return torch.stack(losses).mean()


@torch.no_grad()
def cluster_concentration(
    bank: Tensor,
    centroids: Tensor,
    assignments: Tensor,
    floor: float = 0.05,
    normalize_to: float | None = 0.1,
) -> Tensor:
    """Per-cluster concentration φ_c, the temperature of each prototype (PCL "Concentration estimation").

    Steps, in order:

    1. φ_c = Σ_{v∈c} ‖v − μ_c‖ / (n_c · log(n_c + 10)) for clusters with n_c ≥ 2 members (PCS
       ``compute_variance``; PCL's ``Z·log(Z+α)`` with α = 10). Large φ = loose cluster = softer logits.
    2. Clusters with n_c ≤ 1 have no spread to measure; they get the largest φ of the other clusters (as
       PCL does) so that a singleton does not become the sharpest prototype (PCS gives it the floor
       instead). If no cluster has 2 members, every φ is set to ``floor``.
    3. If ``normalize_to`` is not None (PCL's practice): clip φ to its 10th–90th percentiles (outlier
       clusters neither dominate nor vanish) and rescale so that mean(φ) = ``normalize_to``; this makes
       the average temperature equal to the instance temperature τ, independent of k, of the feature
       dimension and of how tight the bank is. ``None`` keeps PCS's raw scale.
    4. Floor: φ = max(φ, ``floor``) (PCS: 0.05), applied last because φ is a temperature, and a tiny one
       makes the logits explode. When the floor bites after step 3, mean(φ) is slightly above
       ``normalize_to``.

    Args:
        bank: ``[N, D]`` L2-normalised bank features v that were clustered.
        centroids: ``[K, D]`` L2-normalised prototypes μ_c.
        assignments: ``[N]`` int64 cluster of each bank row in ``[0, K)``.
        floor: smallest allowed φ, > 0.
        normalize_to: target mean of φ (τ), or ``None`` for no clipping or rescaling.

    Returns:
        ``[K]`` float32 φ on ``bank``'s device, all ≥ ``floor``; no gradient.
    """
    check_rows(bank, "bank")
    if centroids.dim() != 2 or centroids.shape[0] == 0 or centroids.shape[1] != bank.shape[1]:
        raise ValueError(
            f"centroids must be a non-empty [K, {bank.shape[1]}] tensor, got shape {tuple(centroids.shape)}"
        )
    k = centroids.shape[0]
    check_positions(assignments, "assignments", bank.shape[0], k)
    check_positive(floor, "floor")
    if normalize_to is not None:
        check_positive(normalize_to, "normalize_to")

    v = bank.detach().float()
    mu = centroids.detach().to(v.device, torch.float32)
    assignments = assignments.to(v.device)
    dist = (v - mu[assignments]).norm(dim=1)  # [N] ‖v − μ_{c(v)}‖
    dist_sum = torch.zeros(k, device=v.device).index_add_(0, assignments, dist)  # [K]
    counts = torch.bincount(assignments, minlength=k).float()  # [K] n_c

    measurable = counts >= 2  # [K]
    phi = dist_sum / (counts * torch.log(counts + _CONCENTRATION_ALPHA)).clamp_min(1e-12)  # [K]
    fill = phi[measurable].max() if bool(measurable.any()) else torch.tensor(float(floor), device=v.device)
    phi = torch.where(measurable, phi, fill)

    if normalize_to is not None:
        low, high = torch.quantile(phi, 0.1), torch.quantile(phi, 0.9)
        phi = phi.clamp(low, high)
        # All-zero φ (every cluster collapsed onto its centroid) cannot be rescaled: leave it to the floor.
        mean = phi.mean()
        if float(mean) > 0:
            phi = phi * (normalize_to / mean)

    return phi.clamp_min(floor)


def cross_domain_prototype_entropy(
    features: Tensor, other_prototypes: Tensor, temperature: float = 0.1, *, check: bool = True
) -> Tensor:
    """PCS §3.3 cross-domain instance–prototype self-supervision (entropy of instance→prototype softmax).

    p_i = softmax(f_i·μ'ᵀ/τ) over the prototypes μ' of the OTHER domain; L = (1/B) Σ_i H(p_i). Low
    entropy = each sample sits close to one cross-domain prototype, aligning the domains' clusters.

    Args:
        features: ``[B, D]`` L2-normalised embeddings from domain d (gradient flows).
        other_prototypes: ``[K, D]`` L2-normalised centroids of another domain d' (detached).
        temperature: τ > 0 (PCS: 0.1).
        check: validate the arguments (False: trust the caller).

    Returns:
        Scalar loss, mean entropy over the batch (nats).
    """
    if check:
        check_features_against(features, other_prototypes, "other_prototypes")
    # Same computation as CDS's cross-domain entropy with prototypes in place of bank rows.
    return cross_domain_entropy_loss(features, other_prototypes, temperature=temperature, topk=None, check=check)


__all__ = [
    "cluster_concentration",
    "cross_domain_prototype_entropy",
    "multi_prototypical_loss",
    "prototypical_loss",
]
