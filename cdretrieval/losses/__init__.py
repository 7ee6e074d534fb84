"""Training losses, one family per module: pure functions on tensors (plus a tiny MIM module).

- :mod:`~cdretrieval.losses.cds`: CDS in-domain instance discrimination and cross-domain entropy.
- :mod:`~cdretrieval.losses.pcs`: PCS prototypical contrastive loss, concentration, cross-domain
  instance–prototype entropy.
- :mod:`~cdretrieval.losses.mim`: PCS mutual information maximisation.
- :mod:`~cdretrieval.losses.classifier`: optional few-shot adaptive prototype classifier.
"""

from cdretrieval.losses.cds import cross_domain_entropy_loss, instance_discrimination_loss, softmax_entropy
from cdretrieval.losses.classifier import class_prototypes, prototype_logits
from cdretrieval.losses.mim import MutualInformation, mutual_information_loss
from cdretrieval.losses.pcs import (
    cluster_concentration,
    cross_domain_prototype_entropy,
    multi_prototypical_loss,
    prototypical_loss,
)

__all__ = [
    "MutualInformation",
    "class_prototypes",
    "cluster_concentration",
    "cross_domain_entropy_loss",
    "cross_domain_prototype_entropy",
    "instance_discrimination_loss",
    "multi_prototypical_loss",
    "mutual_information_loss",
    "prototype_logits",
    "prototypical_loss",
    "softmax_entropy",
]
