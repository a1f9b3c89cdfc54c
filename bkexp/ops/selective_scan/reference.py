"""Sequential selective scan mirroring ``mamba_ssm``'s ``selective_scan_ref``: the float64-capable test oracle.

One Python step per position, differentiated by plain autograd. It is slow (O(L) small ops) and exists to
check the fast paths, to serve as the benchmark's "sequential PyTorch loop" baseline and as the fallback
when no faster path can run. Semantics (real ``A`` only):

    delta' = softplus(delta + delta_bias)        (bias / softplus optional)
    h_t    = exp(delta'_t * A) * h_{t-1} + delta'_t * B_t * u_t       h_{-1} = 0, state (batch, d, n)
    y_t    = <h_t, C_t>  (+ D * u_t)             then  out = y * silu(z)  when z is given

Computes in float32, or float64 when ``u`` is float64 (``selective_scan_ref`` always uses float32); the
output has ``u``'s dtype. Per-position slices come from ``unbind`` (whose backward is one ``stack``) rather
than from indexing a precomputed (b, d, l, n) tensor, whose backward would scatter into a full-size zero
tensor at every step and make the loop quadratic in L.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _per_channel(param: Tensor, dim: int) -> Tensor:
    """B or C as (batch or 1, dim, n, l or 1): constant (d, n), shared (b, n, l) or grouped (b, g, n, l)."""
    if param.dim() == 2:  # (d, n): time-invariant, one row per channel
        return param[None, :, :, None]
    if param.dim() == 3:  # (b, n, l): shared by every channel
        return param[:, None, :, :]
    groups = param.shape[1]
    return param.repeat_interleave(dim // groups, dim=1)  # (b, g, n, l) -> (b, d, n, l)


def selective_scan_reference(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None = None,
                             z: Tensor | None = None, delta_bias: Tensor | None = None,
                             delta_softplus: bool = False, return_last_state: bool = False
                             ) -> Tensor | tuple[Tensor, Tensor]:
    """``out`` of shape (batch, d, l) in ``u``'s dtype; inputs as in ``bkexp.ops.selective_scan``. With
    ``return_last_state`` also the state after the last position, (batch, d, n) in the compute dtype."""
    dtype_in = u.dtype
    compute = torch.float64 if u.dtype == torch.float64 else torch.float32
    u = u.to(compute)
    delta = delta.to(compute)
    if delta_bias is not None:
        delta = delta + delta_bias.to(compute)[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    batch, dim, length = u.shape
    Bc = _per_channel(B.to(compute), dim)
    Cc = _per_channel(C.to(compute), dim)
    A = A.to(compute)

    # Per-step factors, position-major so that unbind hands out one (batch, d, n) slice per step.
    decay = torch.exp(delta.permute(2, 0, 1)[..., None] * A)  # (l, b, d, n)
    drive = (delta * u).permute(2, 0, 1)[..., None] * Bc.permute(3, 0, 1, 2)  # (l or 1 -> l, b, d, n)
    drive = drive.expand(length, batch, dim, A.shape[1])
    readout = Cc.permute(3, 0, 1, 2).expand(length, -1, dim, -1)  # (l, b or 1, d, n)

    state = u.new_zeros(batch, dim, A.shape[1])
    outputs = []
    for decay_t, drive_t, readout_t in zip(decay.unbind(0), drive.unbind(0), readout.unbind(0)):
        state = decay_t * state + drive_t
        outputs.append((state * readout_t).sum(-1))
    y = torch.stack(outputs, dim=-1)  # (b, d, l)
    out = y if D is None else y + u * D.to(compute)[:, None]
    if z is not None:
        out = out * F.silu(z.to(compute))
    if return_last_state:
        return out.to(dtype_in), state
    return out.to(dtype_in)
