"""Koopman operator across layers (the ``koopman`` flag): lift, advance linearly, project back, with a prediction loss."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from bkexp.models.auxloss import AuxLossModule


class KoopmanOperator(AuxLossModule):
    """Treats depth as time: ``g_l = phi(h_l)`` evolves linearly, ``g_{l+1} ~= K g_l``.

    ``correction(h_l) = psi(K phi(h_l))`` is added to the next stage's output as a residual correction (``psi``
    is a residual-out projection, so it starts small). The auxiliary loss is the relative one-step
    prediction error over consecutive layer outputs,

        aux = weight * mean_l  mean_tokens ||phi(h_{l+1}) - K phi(h_l)||^2 / mean_tokens ||phi(h_{l+1})||^2,

    normalised by the target's energy because the plain squared error is minimised trivially by ``phi -> 0``
    (the relative error is invariant to the scale of ``phi``). ``K`` starts at the identity (depth-wise
    persistence). Everything is per token, so the flag keeps the model causal.
    """

    def __init__(self, d_model: int, koopman_dim: int = 64, weight: float = 0.1) -> None:
        super().__init__()
        if koopman_dim < 1:
            raise ValueError(f"koopman_dim must be >= 1, got {koopman_dim}")
        if weight < 0:
            raise ValueError(f"koopman_weight must be >= 0, got {weight}")
        self.koopman_dim = koopman_dim
        self.weight = weight
        self.phi = nn.Linear(d_model, koopman_dim, bias=False)
        self.K = nn.Parameter(torch.eye(koopman_dim))
        self.psi = nn.Linear(koopman_dim, d_model, bias=False)
        self.psi.weight._residual_out = True  # type: ignore[attr-defined]
        self.aux_loss: Tensor | None = None
        self.prediction_error: float | None = None  # unweighted, detached, from the last forward

    def lift(self, h: Tensor) -> Tensor:
        return self.phi(h)

    def advance(self, g: Tensor) -> Tensor:
        return g @ self.K.T

    def correction(self, g: Tensor) -> Tensor:
        """Residual correction for the next layer from the lifted state ``g_l`` of this one."""
        return self.psi(self.advance(g))

    def prediction_loss(self, lifted: list[Tensor]) -> Tensor:
        """Sets ``aux_loss`` from the lifted states of consecutive layers ``[g_0, g_1, ...]`` and returns it."""
        if len(lifted) < 2:
            error = lifted[0].new_zeros(())
        else:
            errors = []
            for g_prev, g_next in zip(lifted[:-1], lifted[1:]):
                residual = (g_next - self.advance(g_prev)).pow(2).sum(-1).mean()
                errors.append(residual / g_next.pow(2).sum(-1).mean())
            error = torch.stack(errors).mean()
        self.prediction_error = float(error.detach())
        self.aux_loss = self.weight * error
        return self.aux_loss


    def extra_repr(self) -> str:
        return f"koopman_dim={self.koopman_dim}, weight={self.weight}"
