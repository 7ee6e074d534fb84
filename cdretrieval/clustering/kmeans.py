"""Spherical k-means on L2-normalised features: FAISS when available, pure torch otherwise.

PCS (Yue et al., CVPR 2021) clusters each domain's memory bank with spherical k-means (cosine similarity,
centroids re-normalised to the unit sphere) several times per epoch; the prototypes and hard
assignments feed the prototypical losses in :mod:`cdretrieval.losses.pcs`.

Both backends guarantee that no returned cluster is empty without a warning: an empty cluster is reseeded
with the point farthest from its own centroid (lowest cosine similarity) and a ``UserWarning`` says how
many were reseeded.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

Backend = Literal["auto", "faiss", "torch"]

# Rows of the N×K similarity matrix computed at once (bounds peak memory to about 64k×K floats).
_ASSIGN_CHUNK = 65536


@dataclass
class ClusterResult:
    """One clustering of N points into K clusters.

    Attributes:
        centroids: ``[K, D]`` L2-normalised prototypes μ_c.
        assignments: ``[N]`` int64 cluster index of every point, in ``[0, K)``.
        concentration: ``[K]`` per-cluster concentration φ_c (see
            :func:`cdretrieval.losses.pcs.cluster_concentration`), or ``None`` until computed.
    """

    centroids: Tensor
    assignments: Tensor
    concentration: Tensor | None = None

    def __post_init__(self) -> None:
        if self.centroids.dim() != 2:
            raise ValueError(f"centroids must be [K, D], got shape {tuple(self.centroids.shape)}")
        if self.assignments.dim() != 1 or self.assignments.dtype != torch.long:
            raise ValueError(
                f"assignments must be a 1-D int64 tensor, got shape {tuple(self.assignments.shape)} "
                f"and dtype {self.assignments.dtype}"
            )
        if self.concentration is not None and self.concentration.shape != (self.k,):
            raise ValueError(f"concentration must have shape ({self.k},), got {tuple(self.concentration.shape)}")

    @property
    def k(self) -> int:
        """Number of clusters K."""
        return int(self.centroids.shape[0])

    def sizes(self) -> Tensor:
        """``[K]`` int64 number of points in each cluster."""
        return torch.bincount(self.assignments, minlength=self.k)


def _validate_points(x: Tensor, k: int) -> None:
    if x.dim() != 2:
        raise ValueError(f"x must be a 2-D [N, D] tensor, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"x must be floating point, got dtype {x.dtype}")
    n = x.shape[0]
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be an integer >= 1, got {k!r}")
    if k > n:
        raise ValueError(f"k={k} is larger than the number of points N={n}")
    if not bool(torch.isfinite(x).all()):
        raise ValueError("x contains NaN or infinite values")


def working_points(x: Tensor) -> Tensor:
    """``x`` detached and L2-normalised, in float64 if it was float64, else float32 (bf16/fp16 banks
    would make the similarity argmax and the centroid sums too coarse)."""
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    return F.normalize(x.detach().to(dtype), dim=1)


def assign_to_centroids(x: Tensor, centroids: Tensor) -> tuple[Tensor, Tensor]:
    """Nearest centroid by cosine similarity (both inputs assumed L2-normalised).

    Args:
        x: ``[N, D]`` points.
        centroids: ``[K, D]`` centroids.

    Returns:
        ``(assignments [N] int64, similarity [N])``: the argmax over centroids and its similarity.
    """
    assignments = torch.empty(x.shape[0], dtype=torch.long, device=x.device)
    best = torch.empty(x.shape[0], dtype=x.dtype, device=x.device)
    for start in range(0, x.shape[0], _ASSIGN_CHUNK):
        sims = x[start : start + _ASSIGN_CHUNK] @ centroids.T  # [chunk, K]
        best[start : start + _ASSIGN_CHUNK], assignments[start : start + _ASSIGN_CHUNK] = sims.max(dim=1)
    return assignments, best


def reseed_empty_clusters(
    x: Tensor, centroids: Tensor, assignments: Tensor, similarity: Tensor
) -> tuple[Tensor, Tensor, int]:
    """Give every empty cluster one point: the point farthest from its own centroid.

    Points are taken, farthest first, only from clusters that keep at least one member, so after the
    call no cluster is empty (requires N >= K). The moved point becomes the new centroid; it stays a
    valid nearest-centroid assignment because its similarity to itself (1) is maximal.

    Args:
        x: ``[N, D]`` L2-normalised points.
        centroids: ``[K, D]`` L2-normalised centroids.
        assignments: ``[N]`` int64 current assignments.
        similarity: ``[N]`` cosine similarity of each point to its assigned centroid.

    Returns:
        ``(centroids [K, D], assignments [N], n_reseeded)`` (new tensors; inputs are not modified).
    """
    k = centroids.shape[0]
    sizes = torch.bincount(assignments, minlength=k)
    empty = (sizes == 0).nonzero().flatten().tolist()
    if not empty:
        return centroids, assignments, 0
    assert x.shape[0] >= k, "caller must validate k <= N"
    centroids = centroids.clone()
    assignments = assignments.clone()
    order = torch.argsort(similarity).tolist()  # farthest (lowest cosine) first
    cursor = 0
    for cluster in empty:
        # Skip points whose cluster would become empty if they left it.
        while sizes[assignments[order[cursor]]] <= 1:
            cursor += 1
        point = order[cursor]
        cursor += 1
        sizes[assignments[point]] -= 1
        sizes[cluster] += 1
        assignments[point] = cluster
        centroids[cluster] = x[point]
    return centroids, assignments, len(empty)


def _kmeans_plus_plus(x: Tensor, k: int, generator: torch.Generator) -> Tensor:
    """k-means++ seeding with cosine distance 1 − x·c; returns ``[K, D]`` initial centroids."""
    n = x.shape[0]
    first = int(torch.randint(n, (1,), generator=generator).item())
    chosen = [first]
    # [N] distance of each point to its nearest chosen centroid so far.
    dist = (1.0 - x @ x[first]).clamp_min(0.0)
    for _ in range(1, k):
        weights = (dist**2).double().cpu()
        if float(weights.sum()) <= 0.0:
            # All remaining points coincide with chosen centroids (duplicates): pick uniformly.
            nxt = int(torch.randint(n, (1,), generator=generator).item())
        else:
            nxt = int(torch.multinomial(weights, 1, generator=generator).item())
        chosen.append(nxt)
        dist = torch.minimum(dist, (1.0 - x @ x[nxt]).clamp_min(0.0))
    return x[chosen].clone()


def _torch_kmeans(x: Tensor, k: int, n_iter: int, seed: int) -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(seed)  # CPU generator: same seeding on every device
    centroids = _kmeans_plus_plus(x, k, generator)  # [K, D]
    assignments, similarity = assign_to_centroids(x, centroids)
    for _ in range(n_iter):
        # Transient empty clusters are part of Lloyd's algorithm (FAISS splits them silently too);
        # only emptiness in the final result is reported, by the caller.
        centroids, assignments, _ = reseed_empty_clusters(x, centroids, assignments, similarity)
        sums = torch.zeros_like(centroids).index_add_(0, assignments, x)  # [K, D]
        # Spherical k-means: the centroid is the direction of the member sum.
        new_centroids = F.normalize(sums, dim=1)
        new_assignments, similarity = assign_to_centroids(x, new_centroids)
        converged = torch.equal(new_assignments, assignments)
        centroids, assignments = new_centroids, new_assignments
        if converged:
            break
    return centroids, assignments


def _faiss_available() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def _faiss_kmeans(x: Tensor, k: int, n_iter: int, seed: int) -> tuple[Tensor, Tensor]:
    import faiss

    data = x.detach().to("cpu", torch.float32).contiguous().numpy()
    n, d = data.shape
    kmeans = faiss.Kmeans(
        d,
        k,
        niter=n_iter,
        seed=seed,
        spherical=True,
        verbose=False,
        # No subsampling and no "too few points per centroid" warning: banks are small enough.
        min_points_per_centroid=1,
        max_points_per_centroid=max(1, (n + k - 1) // k),
        gpu=faiss.get_num_gpus() > 0,
    )
    # Same k-means++ seeding as the torch backend: FAISS's default (k random points) falls into
    # "two centroids in one blob" optima even on well-separated data, and shared seeding keeps the
    # backends in agreement.
    init = _kmeans_plus_plus(x, k, torch.Generator().manual_seed(seed))  # [K, D]
    kmeans.train(data, init_centroids=init.to("cpu", torch.float32).contiguous().numpy())
    trained = kmeans.centroids  # numpy [K, D]
    assert trained is not None, "faiss.Kmeans.train sets centroids"
    centroids = F.normalize(torch.from_numpy(trained.copy()).to(x.device, x.dtype), dim=1)
    assignments, _ = assign_to_centroids(x, centroids)
    return centroids, assignments


def spherical_kmeans(x: Tensor, k: int, n_iter: int = 20, seed: int = 0, backend: Backend = "auto") -> ClusterResult:
    """Spherical k-means: cosine-similarity assignment, centroids re-normalised to the unit sphere.

    Args:
        x: ``[N, D]`` features; they are detached and L2-normalised here (a no-op for
            already-normalised rows), and clustered in float32 (float64 if ``x`` is float64).
        k: number of clusters, ``1 <= k <= N``.
        n_iter: Lloyd iterations (FAISS ``niter``; the torch backend stops early once stable).
        seed: seed of the initialisation (FAISS seed / torch k-means++ generator).
        backend: ``"faiss"`` (``faiss.Kmeans(spherical=True)`` iterations from the same k-means++ seeding,
            on GPU when FAISS sees one),
            ``"torch"`` (k-means++ seeding + Lloyd iterations on ``x``'s device), or ``"auto"``
            (FAISS if importable, else torch).

    Returns:
        :class:`ClusterResult` with ``centroids [K, D]`` (unit rows, on ``x``'s device, float32 or
        float64) and
        ``assignments [N]``; ``concentration`` is left ``None``.

    Warns:
        UserWarning: when the final clustering had empty clusters, which were then reseeded with the
        farthest points (typically because the data has fewer than ``k`` distinct points).
    """
    _validate_points(x, k)
    if isinstance(n_iter, bool) or not isinstance(n_iter, int) or n_iter < 1:
        raise ValueError(f"n_iter must be an integer >= 1, got {n_iter!r}")
    if backend not in ("auto", "faiss", "torch"):
        raise ValueError(f"backend must be 'auto', 'faiss' or 'torch', got {backend!r}")
    use_faiss = backend == "faiss" or (backend == "auto" and _faiss_available())
    if backend == "faiss" and not _faiss_available():
        raise ImportError("backend='faiss' was asked for but faiss is not installed; use backend='torch'")

    points = working_points(x)  # [N, D]
    if use_faiss:
        centroids, assignments = _faiss_kmeans(points, k, n_iter, seed)
    else:
        centroids, assignments = _torch_kmeans(points, k, n_iter, seed)

    assignments, similarity = assign_to_centroids(points, centroids)
    centroids, assignments, n_reseeded = reseed_empty_clusters(points, centroids, assignments, similarity)
    if n_reseeded:
        warnings.warn(
            f"spherical_kmeans(k={k}, N={points.shape[0]}): {n_reseeded} empty cluster(s) reseeded from the "
            "farthest points; the data may have fewer than k distinct points",
            UserWarning,
            stacklevel=2,
        )
    return ClusterResult(centroids=centroids, assignments=assignments)


__all__ = ["ClusterResult", "assign_to_centroids", "reseed_empty_clusters", "spherical_kmeans", "working_points"]
