"""Few-shot adaptive prototype classifier: prototypes by hand, logits, validation."""

from __future__ import annotations

import math

import pytest
import torch

from cdretrieval.losses.classifier import class_prototypes, prototype_logits


def test_class_prototypes_are_normalised_means_of_labelled_rows() -> None:
    bank = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [-1.0, 0.0]])
    labels = torch.tensor([0, 0, 1, -1])  # the last row is unlabelled and must be ignored
    prototypes = class_prototypes(bank, labels, num_classes=2)
    s = 1 / math.sqrt(2)
    assert prototypes.tolist()[0] == pytest.approx([s, s])
    assert prototypes.tolist()[1] == pytest.approx([1.0, 0.0])


def test_missing_class_gets_zero_row_and_warning() -> None:
    bank = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    with pytest.warns(UserWarning, match=r"1 of 3 classes .*\[2\]"):
        prototypes = class_prototypes(bank, torch.tensor([0, 1]), num_classes=3)
    assert prototypes[2].tolist() == [0.0, 0.0]
    with pytest.warns(UserWarning, match="fewer than 2"):
        prototypes = class_prototypes(bank, torch.tensor([0, 1]), num_classes=2, min_count=2)
    assert prototypes.abs().sum().item() == 0.0


def test_prototype_logits_by_hand() -> None:
    logits = prototype_logits(torch.tensor([[0.6, 0.8]]), torch.tensor([[1.0, 0.0], [0.0, 1.0]]), 0.05)
    assert logits.tolist()[0] == pytest.approx([12.0, 16.0])


def test_prototype_logits_gradient_follows_caller_choice() -> None:
    features = torch.tensor([[0.6, 0.8]], requires_grad=True)
    weights = torch.eye(2, requires_grad=True)
    prototype_logits(features, weights.detach()).sum().backward()
    assert features.grad is not None and weights.grad is None


@pytest.mark.parametrize(
    ("labels", "num_classes", "match"),
    [
        (torch.tensor([0, 2]), 2, r"\[0, 2\)"),
        (torch.tensor([0, -2]), 2, r"\[0, 2\)"),
        (torch.tensor([0.0, 1.0]), 2, "int64"),
        (torch.tensor([0, 1]), 0, "num_classes"),
    ],
)
def test_class_prototypes_rejects_bad_input(labels, num_classes, match) -> None:
    with pytest.raises(ValueError, match=match):
        class_prototypes(torch.eye(2), labels, num_classes)


def test_prototype_logits_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="share D"):
        prototype_logits(torch.ones(1, 3), torch.ones(2, 2))
    with pytest.raises(ValueError, match="temperature"):
        prototype_logits(torch.ones(1, 2), torch.ones(2, 2), temperature=0.0)
