"""Spherical k-means: recovers blobs with both backends, reports empty clusters, validates input."""

from __future__ import annotations

import importlib.util
import warnings

import pytest
import torch
import torch.nn.functional as F

from cdretrieval.clustering.kmeans import Backend, ClusterResult, reseed_empty_clusters, spherical_kmeans

HAS_FAISS = importlib.util.find_spec("faiss") is not None
BACKENDS = ["torch", pytest.param("faiss", marks=pytest.mark.skipif(not HAS_FAISS, reason="faiss not installed"))]


pytestmark = pytest.mark.usefixtures("one_thread")


def _blobs(sizes: list[int], dim: int = 8, noise: float = 0.05, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Blob c around the basis vector e_c; returns (unit points [N, dim], labels [N])."""
    generator = torch.Generator().manual_seed(seed)
    points, labels = [], []
    for c, size in enumerate(sizes):
        center = torch.zeros(dim)
        center[c] = 1.0
        points.append(center + noise * torch.randn(size, dim, generator=generator))
        labels.append(torch.full((size,), c, dtype=torch.long))
    return F.normalize(torch.cat(points), dim=1), torch.cat(labels)


def _same_partition(a: torch.Tensor, b: torch.Tensor) -> bool:
    """True when the two labelings are equal up to renaming the clusters."""
    pairs = {(int(x), int(y)) for x, y in zip(a, b, strict=True)}
    return len(pairs) == len(set(a.tolist())) == len(set(b.tolist()))


@pytest.mark.parametrize("backend", BACKENDS)
def test_recovers_well_separated_blobs(backend: Backend) -> None:
    x, labels = _blobs([30, 30, 30, 30])
    result = spherical_kmeans(x, 4, seed=0, backend=backend)
    assert result.centroids.shape == (4, 8)
    assert result.assignments.shape == (120,)
    assert torch.allclose(result.centroids.norm(dim=1), torch.ones(4), atol=1e-5)
    assert _same_partition(result.assignments, labels)
    # Every centroid sits on its blob's axis.
    assert bool((result.centroids.max(dim=1).values > 0.99).all())
    assert result.sizes().tolist() == [30, 30, 30, 30]


@pytest.mark.skipif(not HAS_FAISS, reason="faiss not installed")
def test_backends_agree() -> None:
    x, _ = _blobs([20, 35, 25], dim=6, noise=0.1, seed=3)
    a = spherical_kmeans(x, 3, backend="torch")
    b = spherical_kmeans(x, 3, backend="faiss")
    assert _same_partition(a.assignments, b.assignments)
    # Same clusters → same centroids up to order.
    match = (a.centroids @ b.centroids.T).max(dim=1).values
    assert bool((match > 1 - 1e-4).all())


def test_torch_backend_is_deterministic_per_seed() -> None:
    x, _ = _blobs([15, 15, 15], noise=0.4, seed=1)
    first = spherical_kmeans(x, 3, seed=7, backend="torch")
    second = spherical_kmeans(x, 3, seed=7, backend="torch")
    assert torch.equal(first.assignments, second.assignments)
    assert torch.equal(first.centroids, second.centroids)


def test_input_is_normalised_and_detached() -> None:
    x, labels = _blobs([10, 10])
    scaled = (x * torch.linspace(1, 5, 20)[:, None]).requires_grad_(True)
    result = spherical_kmeans(scaled, 2, backend="torch")
    assert not result.centroids.requires_grad
    assert _same_partition(result.assignments, labels)


@pytest.mark.parametrize(("dtype", "expected"), [(torch.bfloat16, torch.float32), (torch.float64, torch.float64)])
def test_low_and_double_precision_inputs(dtype: torch.dtype, expected: torch.dtype) -> None:
    x, labels = _blobs([12, 12, 12])
    result = spherical_kmeans(x.to(dtype), 3, backend="torch")
    assert result.centroids.dtype == expected
    assert _same_partition(result.assignments, labels)


@pytest.mark.parametrize("backend", BACKENDS)
def test_more_clusters_than_distinct_points_warns_and_leaves_none_empty(backend: Backend) -> None:
    distinct = F.normalize(torch.randn(3, 5, generator=torch.Generator().manual_seed(0)), dim=1)
    x = distinct.repeat(4, 1)  # 12 points, 3 distinct
    with pytest.warns(UserWarning, match=r"empty cluster\(s\) reseeded"):
        result = spherical_kmeans(x, 5, backend=backend)
    sizes = result.sizes()
    assert bool((sizes > 0).all())
    assert int(sizes.sum()) == 12


def test_no_warning_on_clean_data() -> None:
    x, _ = _blobs([10, 10, 10])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        spherical_kmeans(x, 3, backend="torch")


def test_reseed_empty_clusters_takes_farthest_point() -> None:
    x = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0]])
    centroids = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])
    assignments = torch.tensor([0, 0, 0])
    similarity = x @ centroids[0]  # [1.0, 0.8, 0.0]: point 2 is the farthest
    new_centroids, new_assignments, n = reseed_empty_clusters(x, centroids, assignments, similarity)
    assert n == 1
    assert new_assignments.tolist() == [0, 0, 1]
    assert new_centroids[1].tolist() == [0.0, 1.0]
    assert assignments.tolist() == [0, 0, 0]  # inputs untouched


@pytest.mark.parametrize(
    ("x", "k", "kwargs", "match"),
    [
        (torch.randn(5, 3), 0, {}, "k must be"),
        (torch.randn(5, 3), 6, {}, "larger than the number of points"),
        (torch.randn(5, 3), True, {}, "k must be"),
        (torch.randn(5), 2, {}, "2-D"),
        (torch.tensor([[float("nan"), 1.0], [1.0, 0.0]]), 1, {}, "NaN"),
        (torch.randn(5, 3), 2, {"backend": "sklearn"}, "backend"),
        (torch.randn(5, 3), 2, {"n_iter": 0}, "n_iter"),
        (torch.ones(5, 3, dtype=torch.long), 2, {}, "floating point"),
    ],
)
def test_rejects_bad_input(x, k, kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        spherical_kmeans(x, k, **kwargs)


def test_cluster_result_validates_shapes() -> None:
    with pytest.raises(ValueError, match="assignments"):
        ClusterResult(centroids=torch.eye(2), assignments=torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="concentration"):
        ClusterResult(centroids=torch.eye(2), assignments=torch.tensor([0, 1]), concentration=torch.ones(3))
