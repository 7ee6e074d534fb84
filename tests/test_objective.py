"""The training objective: which terms are active, and one step's losses computed without per-step checks."""

from __future__ import annotations

from collections.abc import Iterator
from types import ModuleType
from unittest import mock

import pytest
import torch
import torch.nn.functional as F

from cdretrieval import memory
from cdretrieval.config import RunConfig
from cdretrieval.losses import cds, mim, pcs
from cdretrieval.losses.mim import MutualInformation
from cdretrieval.losses.objective import active_terms, compute_losses
from cdretrieval.memory import MemoryBank
from cdretrieval.prototypes import cluster_banks


def test_active_terms_follow_start_epochs() -> None:
    cfg = RunConfig()
    assert set(active_terms(cfg, 0)) == {"instance"}
    assert set(active_terms(cfg, 1)) == {"instance", "cross_instance", "proto", "cross_proto", "mim"}
    cfg.losses.terms["proto"].weight = 0
    assert "proto" not in active_terms(cfg, 5)


def _check_functions(module: ModuleType) -> Iterator[str]:
    """Names of the argument checks a module calls (the shared helpers it imports and its own)."""
    return (name for name in vars(module) if name.startswith(("check_", "_check")) and callable(vars(module)[name]))


def test_a_training_step_runs_no_argument_checks(monkeypatch: pytest.MonkeyPatch) -> None:
    """compute_losses and the bank update call the losses with check=False: no check function runs (they
    would read values back, a device sync per step), while a direct public call still checks."""
    cfg = RunConfig()
    cfg.losses.num_clusters = [3, 6]
    sizes = {"photo": 24, "sketch": 20}
    banks = MemoryBank(sizes, dim=8, seed=0)
    protos = cluster_banks(banks, cfg, epoch=1, need_joint=True)
    info = MutualInformation(3, momentum=None)
    g = torch.Generator().manual_seed(0)
    feats = {d: F.normalize(torch.randn(5, 8, generator=g), dim=1).requires_grad_() for d in sizes}
    idx = {d: torch.randint(n, (5,), generator=g) for d, n in sizes.items()}
    checks = []
    for module in (cds, pcs, mim, memory):
        for name in list(_check_functions(module)):
            spy = mock.MagicMock(side_effect=getattr(module, name))
            monkeypatch.setattr(module, name, spy)
            checks.append(spy)
    assert len(checks) >= 6
    losses = compute_losses(feats, idx, banks, protos, info, cfg, active_terms(cfg, 1))
    for d in sizes:
        banks.update(d, idx[d], feats[d].detach(), check=False)
    assert set(losses) == {"instance", "cross_instance", "proto", "cross_proto", "mim"}
    assert all(torch.isfinite(v) for v in losses.values())
    assert not any(spy.called for spy in checks)
    cds.instance_discrimination_loss(feats["photo"], banks.bank("photo"), idx["photo"])
    assert any(spy.called for spy in checks)
