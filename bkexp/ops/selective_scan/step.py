"""Single-step selective scan: ``mamba_ssm``'s ``selective_state_update``.

A Mamba decoder carries the SSM state ``h`` of shape (batch, d, n) per layer. One step (position t)::

    delta' = softplus(delta + delta_bias)            (bias and softplus optional)
    h      = exp(delta' A) * h + delta' * x * B      updated **in place**, as mamba_ssm does
    y      = <h, C> + D * x,   out = y * silu(z)     (D and z optional)

``selective_state_update(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus)`` has mamba_ssm's argument
names and shapes: ``state`` (batch, d, n); ``x``, ``dt``, ``z`` (batch, d); ``A`` (d, n); ``B``, ``C``
(batch, n) or grouped (batch, g, n) with ``d % g == 0``; ``D``, ``dt_bias`` (d,). Computation is float32
(float64 for a float64 state); the output has ``x``'s dtype.

The state a parallel scan over a prompt ends in comes from ``selective_scan(..., return_last_state=True)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _compute_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _per_channel_step(param: Tensor, dim: int) -> Tensor:
    """B or C of one step, (batch, n) or grouped (batch, g, n), as (batch, d, n) (a broadcast where possible)."""
    if param.dim() == 2:
        return param.unsqueeze(1)
    return param.repeat_interleave(dim // param.shape[1], dim=1)


def _check_step(state: Tensor, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None,
                z: Tensor | None, dt_bias: Tensor | None) -> None:
    if not isinstance(state, Tensor) or state.dim() != 3 or not state.is_floating_point():
        raise ValueError(f"state must be a real (batch, d, n) tensor, got "
                         f"{tuple(state.shape) if isinstance(state, Tensor) else type(state).__name__}")
    batch, dim, n = state.shape
    for name, t in (("x", x), ("dt", dt), ("z", z)):
        if t is not None and tuple(t.shape) != (batch, dim):
            raise ValueError(f"{name} must be (batch, d) = ({batch}, {dim}), got {tuple(t.shape)}")
    if tuple(A.shape) != (dim, n):
        raise ValueError(f"A must be (d, n) = ({dim}, {n}), got {tuple(A.shape)}")
    for name, t in (("B", B), ("C", C)):
        ok = (t.dim() == 2 and tuple(t.shape) == (batch, n)) or (
            t.dim() == 3 and t.shape[0] == batch and t.shape[2] == n and t.shape[1] >= 1 and dim % t.shape[1] == 0)
        if not ok:
            raise ValueError(f"{name} of shape {tuple(t.shape)} is invalid; valid: (batch, n) = ({batch}, {n}) or "
                             "(batch, g, n) with d % g == 0")
    for name, t in (("D", D), ("dt_bias", dt_bias)):
        if t is not None and tuple(t.shape) != (dim,):
            raise ValueError(f"{name} must be None or a ({dim},) tensor, got {tuple(t.shape)}")


def selective_state_update(state: Tensor, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor,
                           D: Tensor | None = None, z: Tensor | None = None, dt_bias: Tensor | None = None,
                           dt_softplus: bool = False) -> Tensor:
    """One step of the scan: updates ``state`` in place and returns ``out`` (batch, d); see the module doc."""
    _check_step(state, x, dt, A, B, C, D, z, dt_bias)
    compute = _compute_dtype(state)
    dim = state.shape[1]
    delta = dt.to(compute)
    if dt_bias is not None:
        delta = delta + dt_bias.to(compute)
    if dt_softplus:
        delta = F.softplus(delta)
    u = x.to(compute)
    decay = torch.exp(delta.unsqueeze(-1) * A.to(compute))
    drive = (delta * u).unsqueeze(-1) * _per_channel_step(B.to(compute), dim)
    new = decay * state.to(compute) + drive
    state.copy_(new)
    y = (new * _per_channel_step(C.to(compute), dim)).sum(-1)
    out = y if D is None else y + u * D.to(compute)
    if z is not None:
        out = out * F.silu(z.to(compute))
    return out.to(x.dtype)


__all__ = ["selective_state_update"]
