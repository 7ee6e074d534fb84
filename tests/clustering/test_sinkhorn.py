"""Sinkhorn–Knopp marginals, numerical safety, and balanced clustering."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cdretrieval.clustering.kmeans import spherical_kmeans
from cdretrieval.clustering.sinkhorn import balanced_kmeans, sinkhorn

pytestmark = pytest.mark.usefixtures("one_thread")


def _cosine_scores(n: int, k: int, dim: int = 16, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    x = F.normalize(torch.randn(n, dim, generator=generator), dim=1)
    c = F.normalize(torch.randn(k, dim, generator=generator), dim=1)
    return x @ c.T  # [n, k]


def test_rows_sum_to_one_after_default_iterations() -> None:
    q = sinkhorn(_cosine_scores(50, 7))
    assert q.shape == (50, 7)
    assert torch.allclose(q.sum(dim=1), torch.ones(50), atol=1e-5)
    assert bool((q >= 0).all())


def test_uniform_column_marginals_hold_after_convergence() -> None:
    n, k = 60, 6
    q = sinkhorn(_cosine_scores(n, k), epsilon=0.05, n_iters=200)
    assert torch.allclose(q.sum(dim=1), torch.ones(n), atol=1e-3)
    assert torch.allclose(q.sum(dim=0) / n, torch.full((k,), 1 / k), atol=1e-3)


def test_non_uniform_column_marginals_hold_after_convergence() -> None:
    n = 80
    marginal = torch.tensor([0.5, 0.25, 0.125, 0.125])
    q = sinkhorn(_cosine_scores(n, 4, seed=1), epsilon=0.05, n_iters=200, prototype_marginal=marginal)
    assert torch.allclose(q.sum(dim=1), torch.ones(n), atol=1e-3)
    assert torch.allclose(q.sum(dim=0) / n, marginal, atol=1e-3)


def test_three_iterations_already_move_columns_towards_the_marginal() -> None:
    scores = _cosine_scores(100, 5, seed=2)
    scores[:, 0] += 0.5  # every sample prefers prototype 0
    plain = torch.softmax(scores / 0.05, dim=1).mean(dim=0)
    q = sinkhorn(scores).mean(dim=0)
    target = torch.full((5,), 0.2)
    assert (q - target).abs().max() < 0.5 * (plain - target).abs().max()


def test_zero_marginal_prototype_receives_nothing() -> None:
    q = sinkhorn(_cosine_scores(20, 3), n_iters=50, prototype_marginal=torch.tensor([0.5, 0.5, 0.0]))
    assert q[:, 2].abs().max().item() == 0.0
    assert torch.allclose(q.sum(dim=0) / 20, torch.tensor([0.5, 0.5, 0.0]), atol=1e-3)


def test_equal_scores_give_uniform_assignment() -> None:
    q = sinkhorn(torch.zeros(4, 2))
    assert torch.allclose(q, torch.full((4, 2), 0.5))


def test_no_gradient() -> None:
    scores = _cosine_scores(10, 3).requires_grad_(True)
    q = sinkhorn(scores)
    assert not q.requires_grad
    assert q.grad_fn is None


def test_no_overflow_on_normalised_or_large_scores() -> None:
    for scale in (1.0, 100.0):  # 100× cosine / ε=0.05 = 2000: plain exp() would overflow float32
        q = sinkhorn(_cosine_scores(30, 4) * scale, epsilon=0.05)
        assert bool(torch.isfinite(q).all())
        assert torch.allclose(q.sum(dim=1), torch.ones(30), atol=1e-4)


def test_float64_input_returns_float64_matching_float32() -> None:
    scores = _cosine_scores(25, 5)
    q64 = sinkhorn(scores.double())
    assert q64.dtype == torch.float64
    assert torch.allclose(q64.float(), sinkhorn(scores), atol=1e-6)


@pytest.mark.parametrize(
    ("scores", "kwargs", "match"),
    [
        (torch.zeros(4), {}, "2-D"),
        (torch.zeros(4, 3), {"epsilon": 0.0}, "epsilon"),
        (torch.zeros(4, 3), {"n_iters": 0}, "n_iters"),
        (torch.zeros(4, 3), {"prototype_marginal": torch.tensor([0.5, 0.5])}, "shape"),
        (torch.zeros(4, 3), {"prototype_marginal": torch.tensor([0.7, 0.7, -0.4])}, "non-negative"),
        (torch.zeros(4, 3), {"prototype_marginal": torch.tensor([0.5, 0.3, 0.1])}, "sum to 1"),
        (torch.tensor([[float("inf"), 0.0]]), {}, "NaN or infinite"),
    ],
)
def test_sinkhorn_rejects_bad_input(scores, kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        sinkhorn(scores, **kwargs)


def _elongated_blob(n: int = 400, seed: int = 0) -> torch.Tensor:
    """One anisotropic blob: k-means cuts it into very unequal pieces."""
    generator = torch.Generator().manual_seed(seed)
    scale = torch.tensor([3.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    shift = torch.tensor([4.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0])
    return F.normalize(torch.randn(n, 8, generator=generator) * scale + shift, dim=1)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_balanced_kmeans_equalises_sizes_where_kmeans_does_not(seed: int) -> None:
    x = _elongated_blob(seed=seed)
    k = 4
    kmeans_sizes = spherical_kmeans(x, k, backend="torch").sizes().float()
    balanced = balanced_kmeans(x, k)
    sizes = balanced.sizes().float()
    assert int(sizes.sum()) == 400
    assert (kmeans_sizes.max() / kmeans_sizes.min()).item() > 3.0  # k-means is imbalanced here
    assert (sizes.max() / sizes.min()).item() < 1.5  # near-equal: ideal is 100 each
    assert torch.allclose(balanced.centroids.norm(dim=1), torch.ones(k), atol=1e-5)


def test_balanced_kmeans_kmeans_marginal_keeps_natural_proportions() -> None:
    x = _elongated_blob(seed=0)
    sizes = balanced_kmeans(x, 4, marginal="kmeans").sizes().float()
    # Prototype masses follow the k-means proportions, so the clusters stay unequal.
    assert (sizes.max() / sizes.min()).item() > 2.0


def test_balanced_kmeans_rejects_bad_input() -> None:
    x = _elongated_blob(n=20)
    with pytest.raises(ValueError, match="marginal"):
        balanced_kmeans(x, 2, marginal="random")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="larger than the number of points"):
        balanced_kmeans(x, 21)
    with pytest.raises(ValueError, match="n_iter"):
        balanced_kmeans(x, 2, n_iter=0)
