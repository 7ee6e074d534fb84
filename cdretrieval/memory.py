"""Per-domain memory banks of L2-normalised embeddings (CDS / PCS).

One row per training image of each domain, filled by a full forward pass before training and then
updated after every step with a momentum average (Wu et al. 2018; CDS; PCS, m = 0.5):
V_d[i] ← normalise(m·V_d[i] + (1−m)·f_i).

The banks are buffers, so they travel with ``.to(device)`` and are saved in ``state_dict`` (and so in
checkpoints). Domain names are free text ("Real World", "a.b"), which is not a valid buffer name, so
buffers are named ``bank_0``, ``bank_1``, ... in the order of ``sizes`` and the name list is stored as
extra state: loading a state dict saved for other domains fails loudly.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cdretrieval.validation import check_int, check_positions


def last_occurrences(indices: Tensor, size: int) -> Tensor:
    """``[B]`` bool mask of the last occurrence of each value of ``indices`` (values in ``[0, size)``).

    ``bank[idx] = rows`` with a repeated index lets an unspecified write win: on several CPU threads
    (or a GPU) the winner changes from run to run, and so did the banks (a frozen-mode epoch ends with a
    wrapped-around permutation whose batch repeats samples). Keeping one write per row makes the update
    deterministic; the max of the positions is the same whatever order the threads reduce in.
    """
    positions = torch.arange(indices.shape[0], device=indices.device)  # [B]
    last = torch.full((size,), -1, dtype=torch.long, device=indices.device)
    last.scatter_reduce_(0, indices, positions, reduce="amax")  # [size] last position of each row
    return last[indices] == positions


class MemoryBank(nn.Module):
    """Per-domain banks ``V_d [N_d, D]`` of L2-normalised rows, registered as buffers.

    Args:
        sizes: domain name → number of images N_d (order defines the buffer names).
        dim: embedding dimension D.
        seed: seed of the random unit rows the banks start with (call :meth:`fill` before training).

    Buffers per domain (``i`` = position of the domain in ``sizes``):
        ``bank_i`` ``[N_d, D]`` the rows; ``filled_i`` ``[N_d]`` bool, True once a row was written.
    """

    def __init__(self, sizes: Mapping[str, int], dim: int, seed: int = 0) -> None:
        super().__init__()
        if len(sizes) == 0:
            raise ValueError("sizes is empty: a memory bank needs at least one domain")
        check_int(dim, "dim")
        for name, size in sizes.items():
            if not isinstance(name, str) or not name:
                raise ValueError(f"domain names must be non-empty strings, got {name!r}")
            check_int(size, f"size of domain {name!r}")
        self.dim = dim
        self._domains: list[str] = list(sizes)
        self._slot: dict[str, int] = {name: i for i, name in enumerate(self._domains)}
        generator = torch.Generator().manual_seed(seed)
        for i, name in enumerate(self._domains):
            rows = F.normalize(torch.randn(sizes[name], dim, generator=generator), dim=1)  # [N_d, D]
            self.register_buffer(f"bank_{i}", rows)
            self.register_buffer(f"filled_{i}", torch.zeros(sizes[name], dtype=torch.bool))

    @property
    def domains(self) -> list[str]:
        """Domain names, in construction order (a copy)."""
        return list(self._domains)

    def _index(self, domain: str) -> int:
        if domain not in self._slot:
            raise ValueError(f"unknown domain {domain!r}; this memory bank holds {self._domains}")
        return self._slot[domain]

    def bank(self, domain: str) -> Tensor:
        """``[N_d, D]`` bank of ``domain``: the live buffer (not a copy); treat it as read-only."""
        bank: Tensor = getattr(self, f"bank_{self._index(domain)}")
        return bank

    def filled(self, domain: str) -> Tensor:
        """``[N_d]`` bool mask of the rows of ``domain`` written at least once by fill/update."""
        mask: Tensor = getattr(self, f"filled_{self._index(domain)}")
        return mask

    def is_full(self, domain: str) -> bool:
        """Whether every row of ``domain`` has been written (e.g. after the initial forward pass)."""
        return bool(self.filled(domain).all())

    def _check_batch(self, domain: str, indices: Tensor, features: Tensor) -> None:
        if indices.dim() != 1 or indices.dtype != torch.long:
            raise ValueError(
                f"indices must be a 1-D int64 tensor, got shape {tuple(indices.shape)} and dtype {indices.dtype}"
            )
        if features.dim() != 2 or features.shape != (indices.shape[0], self.dim):
            raise ValueError(
                f"features must have shape ({indices.shape[0]}, {self.dim}) to match indices and the bank "
                f"dimension, got {tuple(features.shape)}"
            )
        check_positions(indices, f"indices for domain {domain!r}", indices.shape[0], self.bank(domain).shape[0])

    def _rows(self, domain: str, indices: Tensor, features: Tensor) -> tuple[Tensor, Tensor]:
        """``(indices, normalise(features))`` on the bank's device and dtype."""
        bank = self.bank(domain)
        # Normalise first: f_i in V[i] ← normalise(m·V[i] + (1−m)·f_i) is the L2-normalised embedding.
        rows = F.normalize(features.detach().to(bank.device, bank.dtype), dim=1)  # [B, D]
        return indices.to(bank.device), rows

    @torch.no_grad()
    def fill(self, domain: str, indices: Tensor, features: Tensor) -> None:
        """Write rows directly: ``V_d[indices] = normalise(features)`` (initial full forward pass).

        Args:
            domain: domain name.
            indices: ``[B]`` int64 row positions in ``[0, N_d)``.
            features: ``[B, D]`` embeddings (detached and L2-normalised here).
        """
        self._check_batch(domain, indices, features)
        idx, rows = self._rows(domain, indices, features)
        self.bank(domain)[idx] = rows
        self.filled(domain)[idx] = True

    @torch.no_grad()
    def update(
        self, domain: str, indices: Tensor, features: Tensor, momentum: float = 0.5, *, check: bool = True
    ) -> None:
        """Momentum update ``V_d[i] ← normalise(m·V_d[i] + (1−m)·normalise(f_i))`` (CDS/PCS, m = 0.5).

        No gradient reaches ``features`` (detached). A row repeated in one batch is updated once, from its
        last occurrence (see :func:`last_occurrences`).

        Args:
            domain: domain name.
            indices: ``[B]`` int64 row positions in ``[0, N_d)``.
            features: ``[B, D]`` embeddings of those rows from the current step.
            momentum: m in ``[0, 1]``: weight of the old row (0 = overwrite, 1 = keep).
            check: validate the arguments (False: trust the caller, as the trainer does every step; the
                range check reads the indices back, a device sync).
        """
        if check:
            if not (isinstance(momentum, int | float) and 0.0 <= momentum <= 1.0):
                raise ValueError(f"momentum must be a number in [0, 1], got {momentum!r}")
            self._check_batch(domain, indices, features)
        idx, rows = self._rows(domain, indices, features)
        bank = self.bank(domain)
        keep = last_occurrences(idx, bank.shape[0])
        idx, rows = idx[keep], rows[keep]
        mixed = momentum * bank[idx] + (1.0 - momentum) * rows  # [B, D]
        bank[idx] = F.normalize(mixed, dim=1)
        self.filled(domain)[idx] = True

    def get_extra_state(self) -> dict[str, Any]:
        """Domain names (buffer ``bank_i`` belongs to ``domains[i]``) and D, checked on load."""
        return {"domains": list(self._domains), "dim": self.dim}

    def set_extra_state(self, state: Any) -> None:
        """Refuse a state dict saved for other domains (or another order, or another D)."""
        if not isinstance(state, dict) or state.get("domains") != self._domains or state.get("dim") != self.dim:
            raise ValueError(
                f"memory bank state was saved for domains {state.get('domains') if isinstance(state, dict) else '?'}"
                f" with dim {state.get('dim') if isinstance(state, dict) else '?'}; this bank has domains "
                f"{self._domains} with dim {self.dim}"
            )

    def extra_repr(self) -> str:
        sizes = {name: int(self.bank(name).shape[0]) for name in self._domains}
        return f"sizes={sizes}, dim={self.dim}"


__all__ = ["MemoryBank", "last_occurrences"]
