"""Single-step selective scan (``mamba_ssm``'s ``selective_state_update``) and the state a parallel scan leaves.

A Mamba decoder carries the SSM state ``h`` of shape (batch, d, n) per layer. One step (position t)::

    delta' = softplus(delta + delta_bias)            (bias and softplus optional)
    h      = exp(delta' A) * h + delta' * x * B      updated **in place**, as mamba_ssm does
    y      = <h, C> + D * x,   out = y * silu(z)     (D and z optional)

``selective_state_update(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus)`` has mamba_ssm's argument
names and shapes: ``state`` (batch, d, n); ``x``, ``dt``, ``z`` (batch, d); ``A`` (d, n); ``B``, ``C``
(batch, n) or grouped (batch, g, n) with ``d % g == 0``; ``D``, ``dt_bias`` (d,). Computation is float32
(float64 for a float64 state); the output has ``x``'s dtype.

``selective_scan_last_state(u, delta, A, B, delta_bias, delta_softplus)`` is the state after the last
position of a parallel ``selective_scan`` over (batch, d, l) inputs (mamba_ssm's ``return_last_state``), so
that decoding continues from a prompt scanned in parallel. It is computed chunk by chunk in closed form,

    h_end = exp(A * sum_chunk delta') h_start + sum_t exp(A * R_t) delta'_t u_t B_t,

with ``R_t`` the sum of ``delta'`` over the chunk's positions after ``t`` (a reverse cumulative sum, so the
recent terms that dominate are exact; ``A < 0`` keeps every factor <= 1). Memory is O(batch * d * n * chunk).
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


def selective_scan_last_state(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, delta_bias: Tensor | None = None,
                              delta_softplus: bool = False, chunk: int = 128) -> Tensor:
    """The state ``h_{l-1}`` (batch, d, n) after scanning u, delta (batch, d, l) with B (batch, n, l) or grouped
    (batch, g, n, l); float32 (float64 for float64 ``u``). ``C``, ``D`` and ``z`` do not enter the state."""
    if u.dim() != 3 or delta.shape != u.shape:
        raise ValueError(f"u and delta must share a (batch, d, l) shape, got {tuple(u.shape)} and {tuple(delta.shape)}")
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    compute = _compute_dtype(u)
    batch, dim, length = u.shape
    if B.dim() == 3 and tuple(B.shape) == (batch, A.shape[1], length):
        Bc = B.unsqueeze(1)  # (b, 1, n, l): shared by every channel
    elif B.dim() == 4 and B.shape[0] == batch and dim % B.shape[1] == 0:
        Bc = B.repeat_interleave(dim // B.shape[1], dim=1)
    else:
        raise ValueError(f"B of shape {tuple(B.shape)} is invalid; valid: (batch, n, l) or (batch, g, n, l)")
    delta = delta.to(compute)
    if delta_bias is not None:
        delta = delta + delta_bias.to(compute)[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    A = A.to(compute)
    drive_in = delta * u.to(compute)  # (b, d, l)
    state = u.new_zeros(batch, dim, A.shape[1], dtype=compute)
    for start in range(0, length, chunk):
        d_c = delta[..., start:start + chunk]
        after = d_c.flip(-1).cumsum(-1).flip(-1) - d_c  # R_t: delta' summed over the chunk's later positions
        weights = torch.exp(after.unsqueeze(2) * A[None, :, :, None])  # (b, d, n, c)
        local = (weights * drive_in[:, :, None, start:start + chunk]
                 * Bc[..., start:start + chunk].to(compute)).sum(-1)
        state = torch.exp(A * d_c.sum(-1, keepdim=True)) * state + local
    return state


__all__ = ["selective_scan_last_state", "selective_state_update"]
