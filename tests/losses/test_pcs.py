"""PCS prototype losses and cluster concentration against hand / loop references."""

from __future__ import annotations

import math

import pytest
import torch

from cdretrieval.clustering import ClusterResult
from cdretrieval.losses.pcs import (
    cluster_concentration,
    cross_domain_prototype_entropy,
    multi_prototypical_loss,
    prototypical_loss,
)

FEATURES = [[0.6, 0.8, 0.0], [0.0, 0.6, 0.8], [0.8, 0.0, 0.6]]
PROTOTYPES = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]


def _dot(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True))


def _log_softmax_at(logits: list[float], target: int) -> float:
    top = max(logits)
    return logits[target] - top - math.log(sum(math.exp(v - top) for v in logits))


def _reference_proto_loss(features, prototypes, assignments, phi) -> float:
    total = 0.0
    for f, c in zip(features, assignments, strict=True):
        logits = [_dot(f, mu) / p for mu, p in zip(prototypes, phi, strict=True)]
        total -= _log_softmax_at(logits, c)
    return total / len(features)


def test_prototypical_loss_matches_loop_reference_with_per_cluster_concentration() -> None:
    assignments = [0, 1, 0]
    phi = [0.1, 0.3]
    expected = _reference_proto_loss(FEATURES, PROTOTYPES, assignments, phi)
    loss = prototypical_loss(
        torch.tensor(FEATURES), torch.tensor(PROTOTYPES), torch.tensor(assignments), torch.tensor(phi)
    )
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    # Per-cluster φ matters: a single shared temperature gives another value.
    shared = prototypical_loss(
        torch.tensor(FEATURES), torch.tensor(PROTOTYPES), torch.tensor(assignments), torch.tensor([0.1, 0.1])
    )
    assert abs(shared.item() - loss.item()) > 1e-3


def test_prototypical_loss_by_hand_single_sample() -> None:
    # f = μ_0 = [1, 0], μ_1 = [0, 1], φ = [0.5, 1]: logits [2, 0] → loss = log(1 + e^-2).
    loss = prototypical_loss(torch.tensor([[1.0, 0.0]]), torch.eye(2), torch.tensor([0]), torch.tensor([0.5, 1.0]))
    assert loss.item() == pytest.approx(math.log(1.0 + math.exp(-2.0)), rel=1e-6)


def test_prototypical_loss_gradient_reaches_features_only() -> None:
    features = torch.tensor(FEATURES, requires_grad=True)
    prototypes = torch.tensor(PROTOTYPES, requires_grad=True)
    phi = torch.tensor([0.1, 0.2], requires_grad=True)
    prototypical_loss(features, prototypes, torch.tensor([0, 1, 1]), phi).backward()
    assert features.grad is not None and features.grad.abs().sum() > 0
    assert prototypes.grad is None
    assert phi.grad is None


def test_multi_prototypical_loss_averages_clusterings_and_gathers_by_bank_index() -> None:
    features = torch.tensor(FEATURES)
    indices = torch.tensor([3, 0, 1])  # positions of the batch in a 4-row bank
    first = ClusterResult(
        centroids=torch.tensor(PROTOTYPES),
        assignments=torch.tensor([1, 0, 0, 0]),
        concentration=torch.tensor([0.1, 0.2]),
    )
    second = ClusterResult(
        centroids=torch.eye(3),
        assignments=torch.tensor([1, 2, 0, 0]),
        concentration=torch.tensor([0.1, 0.2, 0.3]),
    )
    expected = 0.5 * (
        _reference_proto_loss(FEATURES, PROTOTYPES, [0, 1, 0], [0.1, 0.2])
        + _reference_proto_loss(FEATURES, torch.eye(3).tolist(), [0, 1, 2], [0.1, 0.2, 0.3])
    )
    loss = multi_prototypical_loss(features, indices, [first, second])
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_multi_prototypical_loss_requires_concentration_and_clusterings() -> None:
    clustering = ClusterResult(centroids=torch.eye(2), assignments=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="concentration is None"):
        multi_prototypical_loss(torch.ones(1, 2), torch.tensor([0]), [clustering])
    with pytest.raises(ValueError, match="empty"):
        multi_prototypical_loss(torch.ones(1, 2), torch.tensor([0]), [])
    clustering.concentration = torch.ones(2)
    with pytest.raises(ValueError, match="indices"):
        multi_prototypical_loss(torch.ones(1, 2), torch.tensor([2]), [clustering])


def _two_cluster_bank() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # Cluster 0: three points at distance 0.3, 0.4, 0.5 from μ_0; cluster 1: two points at 0.1 and 0.3;
    # cluster 2: a singleton. Exact distances make φ computable by hand.
    centroids = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    bank = torch.tensor(
        [
            [1.0, 0.3, 0.0],
            [1.0, 0.0, 0.4],
            [1.0, 0.5, 0.0],
            [0.1, 1.0, 0.0],
            [0.0, 1.0, 0.3],
            [0.0, 0.0, 1.0],
        ]
    )
    assignments = torch.tensor([0, 0, 0, 1, 1, 2])
    return bank, centroids, assignments


def test_cluster_concentration_raw_formula_singleton_gets_max() -> None:
    bank, centroids, assignments = _two_cluster_bank()
    phi = cluster_concentration(bank, centroids, assignments, floor=1e-6, normalize_to=None)
    phi0 = (0.3 + 0.4 + 0.5) / (3 * math.log(3 + 10))
    phi1 = (0.1 + 0.3) / (2 * math.log(2 + 10))
    assert phi.tolist() == pytest.approx([phi0, phi1, max(phi0, phi1)], rel=1e-5)


def test_cluster_concentration_floor() -> None:
    bank, centroids, assignments = _two_cluster_bank()
    phi = cluster_concentration(bank, centroids, assignments, floor=0.05, normalize_to=None)
    phi1 = (0.1 + 0.3) / (2 * math.log(2 + 10))  # ≈ 0.080, above the floor
    assert phi[1].item() == pytest.approx(phi1, rel=1e-5)
    phi_high_floor = cluster_concentration(bank, centroids, assignments, floor=0.09, normalize_to=None)
    assert phi_high_floor[1].item() == pytest.approx(0.09)
    assert bool((phi_high_floor >= 0.09).all())


def test_cluster_concentration_clips_percentiles_and_normalises_mean() -> None:
    generator = torch.Generator().manual_seed(0)
    k, per_cluster = 10, 8
    centroids = torch.nn.functional.normalize(torch.randn(k, 16, generator=generator), dim=1)
    spreads = torch.linspace(0.05, 1.0, k)  # very different cluster tightness
    bank = torch.cat(
        [centroids[c] + spreads[c] * torch.randn(per_cluster, 16, generator=generator) / 4 for c in range(k)]
    )
    assignments = torch.arange(k).repeat_interleave(per_cluster)
    raw = cluster_concentration(bank, centroids, assignments, floor=1e-6, normalize_to=None)
    phi = cluster_concentration(bank, centroids, assignments, floor=1e-6, normalize_to=0.1)
    assert phi.mean().item() == pytest.approx(0.1, rel=1e-5)
    clipped = raw.clamp(torch.quantile(raw, 0.1), torch.quantile(raw, 0.9))
    assert phi.tolist() == pytest.approx((clipped * 0.1 / clipped.mean()).tolist(), rel=1e-5)
    # The most extreme clusters were clipped: max/min ratio shrinks.
    assert (phi.max() / phi.min()).item() < (raw.max() / raw.min()).item()


def test_cluster_concentration_all_singletons_falls_back_to_floor() -> None:
    phi = cluster_concentration(torch.eye(3), torch.eye(3), torch.tensor([0, 1, 2]), normalize_to=None)
    assert phi.tolist() == pytest.approx([0.05, 0.05, 0.05])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"floor": 0.0}, "floor"),
        ({"normalize_to": -0.1}, "normalize_to"),
        ({"assignments": torch.tensor([0, 0, 0, 1, 1, 3])}, r"\[0, 3\)"),
        ({"assignments": torch.tensor([0, 1])}, "shape"),
        ({"centroids": torch.eye(2)}, "centroids"),
    ],
)
def test_cluster_concentration_rejects_bad_input(kwargs, match) -> None:
    bank, centroids, assignments = _two_cluster_bank()
    args = {"bank": bank, "centroids": centroids, "assignments": assignments} | kwargs
    with pytest.raises(ValueError, match=match):
        cluster_concentration(**args)


def test_cross_domain_prototype_entropy_matches_reference_and_bounds() -> None:
    tau = 0.1
    expected = 0.0
    for f in FEATURES:
        logits = [_dot(f, mu) / tau for mu in PROTOTYPES]
        top = max(logits)
        z = sum(math.exp(v - top) for v in logits)
        p = [math.exp(v - top) / z for v in logits]
        expected -= sum(q * math.log(q) for q in p)
    expected /= len(FEATURES)
    loss = cross_domain_prototype_entropy(torch.tensor(FEATURES), torch.tensor(PROTOTYPES), tau)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    # Equidistant prototypes: the entropy is log K, its maximum.
    uniform = cross_domain_prototype_entropy(torch.tensor([[0.0, 0.0, 1.0]]), torch.tensor(PROTOTYPES))
    assert uniform.item() == pytest.approx(math.log(2), rel=1e-6)


def test_cross_domain_prototype_entropy_gradient_reaches_features_only() -> None:
    features = torch.tensor(FEATURES, requires_grad=True)
    prototypes = torch.tensor(PROTOTYPES, requires_grad=True)
    cross_domain_prototype_entropy(features, prototypes).backward()
    assert features.grad is not None and features.grad.abs().sum() > 0
    assert prototypes.grad is None


@pytest.mark.parametrize(
    ("assignments", "phi", "match"),
    [
        (torch.tensor([0, 2, 0]), torch.tensor([0.1, 0.1]), r"\[0, 2\)"),
        (torch.tensor([0, 1, 0]), torch.tensor([0.1, 0.0]), "concentration"),
        (torch.tensor([0, 1, 0]), torch.tensor([0.1]), "shape"),
        (torch.tensor([0, 1]), torch.tensor([0.1, 0.1]), "shape"),
    ],
)
def test_prototypical_loss_rejects_bad_input(assignments, phi, match) -> None:
    with pytest.raises(ValueError, match=match):
        prototypical_loss(torch.tensor(FEATURES), torch.tensor(PROTOTYPES), assignments, phi)


def test_prototype_dimension_mismatch_is_rejected() -> None:
    with pytest.raises(ValueError, match="dimension mismatch"):
        cross_domain_prototype_entropy(torch.ones(2, 3), torch.ones(4, 2))
