"""Energy-conservation regulariser over the BK layers (the ``physics_weight`` / ``physics_informed`` flag)."""

from __future__ import annotations

import torch
from torch import Tensor

from bkexp.models.auxloss import AuxLossModule


class EnergyConservation(AuxLossModule):
    """``aux_loss = weight * mean_l (E_{l+1} - E_l)^2`` over consecutive BK layers, in layer order.

    ``E_l`` is each BK mixer's ``energy`` from its last forward (``BKMixer.record_energy``): the expectation
    of the layer's Hamiltonian in the uniform state, ``mean_rows (sum_t d_t + 2 sum_t sqrt(k_t)) / N``
    (diagonal ``d = base_diag + v``, couplings ``k``). It is a per-batch scalar, so it never feeds the
    logits and does not affect causality. Needs at least two BK layers (checked by the backbone).
    """

    def __init__(self, weight: float) -> None:
        super().__init__()
        if weight <= 0:
            raise ValueError(f"physics_weight must be > 0 to build the regulariser, got {weight}")
        self.weight = weight
        self.aux_loss: Tensor | None = None
        self.energy_drift: float | None = None  # unweighted mean squared step, detached, last forward
        self.energies: list[float] = []

    def update(self, energies: list[Tensor]) -> Tensor:
        stacked = torch.stack(energies)
        drift = (stacked[1:] - stacked[:-1]).pow(2).mean()
        self.energies = [float(e) for e in stacked.detach()]
        self.energy_drift = float(drift.detach())
        self.aux_loss = self.weight * drift
        return self.aux_loss


    def extra_repr(self) -> str:
        return f"weight={self.weight}"
