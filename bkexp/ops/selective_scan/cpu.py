"""Compiled CPU selective scan (numba): forward kernel and exact adjoint backward with checkpointed states.

The kernels compute only the scan ``y_t = <h_t, C_t>``, ``h_t = exp(delta_t A) h_{t-1} + delta_t u_t B_t``;
the O(b·d·l) elementwise parts (``delta_bias``, softplus, the ``D`` skip and the ``silu(z)`` gate) stay in
PyTorch, whose autograd differentiates them.

Layout and parallelism: channels are cut into blocks of up to ``CHANNEL_BLOCK`` channels that share one
B/C group; each thread steps whole blocks through time. Per-position vectors (``u``, ``delta``, gradients)
are passed position-major ``(batch, l, d)`` and the block's state is ``(n, channels)``, so every inner loop
runs over contiguous channels and vectorises, including the decays ``exp(delta A)``, which use a
vectorisable exp (``_exp_into``; scalar libm exp would cost most of the time otherwise).

Memory stays O(b·d·l): the forward stores the state only every ``CHECKPOINT`` positions; the backward
walks each block from the last chunk to the first, recomputes that chunk's states and decays into a small
scratch buffer from its checkpoint, then runs the adjoint recurrence
``lam_t = C_t g_t + exp(delta_{t+1} A) lam_{t+1}`` through it. Gradients that sum over channels (B, C)
are accumulated per block and reduced afterwards, so no two threads write the same element.

``B`` and ``C`` reach the kernels as ``(batch or 1, groups, l or 1, n)`` (channel ``c`` reads group
``c // group_size``); that covers shared ``(b, n, l)``, grouped ``(b, g, n, l)`` and time-invariant
``(d, n)`` inputs (the last as d groups of one channel: correct, but it does not vectorise).
Hot loops avoid numeric literals so float32 stays float32 (numba promotes ``float32 op literal`` to
float64); float64 inputs get their own specialisation with libm exp. ``cache=True`` keeps the compiled
code in ``__pycache__`` so only the first use compiles.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from numba import njit, prange, types
from numba.extending import overload
from torch import Tensor
from torch.autograd.function import once_differentiable

CHECKPOINT = 32  # positions between stored states; backward scratch is CHECKPOINT x n x CHANNEL_BLOCK
CHANNEL_BLOCK = 32  # channels stepped together by one thread (the vectorised inner dimension)
# Fast-math flags without nnan/ninf, so NaN and inf inputs still propagate instead of being assumed away.
_FASTMATH = {"nsz", "arcp", "contract", "afn", "reassoc"}

# float32 exp(x) = 2^k * e^r, k = round(x / ln 2), r = x - k ln 2 (Cody-Waite split, so r is exact),
# e^r by its degree-7 Taylor polynomial (|r| <= ln2 / 2: truncation error < 1e-8 relative), 2^k built
# from its exponent bits. Measured max relative error 8e-8, below numpy's float32 exp (2e-7).
_F32 = np.float32
_LOG2E = _F32(1.4426950408889634)
_LN2_HI = _F32(0.693359375)  # exactly representable high part of ln 2
_LN2_LO = _F32(-2.12194440e-4)  # ln 2 - _LN2_HI
_ONE = _F32(1.0)
_HALF = _F32(0.5)
_ZERO = _F32(0.0)
_INF = _F32(np.inf)
_P2, _P3, _P4, _P5, _P6, _P7 = (_F32(1.0 / math.factorial(i)) for i in range(2, 8))
_MIN_EXP2 = _F32(-126.0)  # below: the result is subnormal, returned as 0 (flush to zero)
_MAX_EXP2 = _F32(127.0)  # above: returned as inf (x > 88.03, where float32 exp is within 2x of overflow)
_EXP_BIAS = np.int32(127)
_MANTISSA_BITS = np.int32(23)


def _exp_into(x, out, bits):
    """``out[i] = exp(x[i])`` for 1-d arrays; ``bits`` is int32 scratch of the same size (numba only)."""
    raise NotImplementedError("_exp_into is compiled by numba; call it from a jitted function")


@overload(_exp_into, jit_options={"fastmath": {"nsz", "arcp", "contract", "afn"}})
def _exp_into_impl(x, out, bits):
    if x.dtype == types.float32:
        def exp_float32(x, out, bits):
            scale = bits.view(np.float32)
            for i in range(x.size):
                exponent = np.floor(min(max(x[i] * _LOG2E, _MIN_EXP2), _MAX_EXP2) + _HALF)
                r = x[i] - exponent * _LN2_HI
                r = r - exponent * _LN2_LO
                out[i] = _ONE + r * (_ONE + r * (_P2 + r * (_P3 + r * (_P4 + r * (_P5 + r * (_P6 + r * _P7))))))
                bits[i] = (np.int32(exponent) + _EXP_BIAS) << _MANTISSA_BITS
            for i in range(x.size):
                s = x[i] * _LOG2E
                value = out[i] * scale[i]
                value = _ZERO if s < _MIN_EXP2 else value
                value = _INF if s > _MAX_EXP2 else value
                out[i] = x[i] if x[i] != x[i] else value  # NaN in, NaN out
        return exp_float32

    def exp_libm(x, out, bits):
        for i in range(x.size):
            out[i] = math.exp(x[i])
    return exp_libm


@njit(cache=True)
def _block_span(block, nd, group_size, per_group, width):
    """(batch index, group, first channel, channel count) of ``block``; blocks never straddle groups."""
    per_batch = (nd // group_size) * per_group
    ib = block // per_batch
    rest = block % per_batch
    group = rest // per_group
    c0 = group * group_size + (rest % per_group) * width
    return ib, group, c0, min(width, (group + 1) * group_size - c0)


@njit(parallel=True, fastmath=_FASTMATH, cache=True)
def _scan_forward(u, delta, A_t, Bk, Ck, group_size, width, y, checkpoints, save, every, last, keep_last):
    """u, delta, y: (b, l, d); A_t: (n, d); Bk, Ck: (b|1, g, l|1, n); checkpoints: (b, l/every, n, d);
    last: (b, n, d), the state after the last position when ``keep_last`` (decoding continues from it)."""
    nb, nl, nd = u.shape
    ns = A_t.shape[0]
    per_group = (group_size + width - 1) // width
    bsB, tsB = int(Bk.shape[0] > 1), int(Bk.shape[2] > 1)
    bsC, tsC = int(Ck.shape[0] > 1), int(Ck.shape[2] > 1)
    n_blocks = nb * (nd // group_size) * per_group
    for block in prange(n_blocks):
        ib, group, c0, nc = _block_span(block, nd, group_size, per_group, width)
        c1 = c0 + nc
        # Inner loops index block-local slices with the loop counter only: an offset index (c0 + c)
        # makes numba emit a negative-index check per element, which stops vectorisation.
        A_blk = np.empty(ns * nc, u.dtype)
        for k in range(ns):
            A_blk[k * nc:(k + 1) * nc] = A_t[k, c0:c1]
        h = np.zeros(ns * nc, u.dtype)
        exponent = np.empty(ns * nc, u.dtype)
        decay = np.empty(ns * nc, u.dtype)
        bits = np.empty(ns * nc, np.int32)
        acc = np.empty(nc, u.dtype)
        drive = np.empty(nc, u.dtype)
        zero = h[0]
        for t in range(nl):
            if save and t % every == 0:
                for k in range(ns):
                    checkpoints[ib, t // every, k, c0:c1] = h[k * nc:(k + 1) * nc]
            dt = delta[ib, t, c0:c1]
            x = u[ib, t, c0:c1]
            for c in range(nc):
                drive[c] = dt[c] * x[c]
                acc[c] = zero
            for k in range(ns):
                base = k * nc
                for c in range(nc):
                    exponent[base + c] = dt[c] * A_blk[base + c]
            _exp_into(exponent, decay, bits)
            for k in range(ns):
                b_tk = Bk[ib * bsB, group, t * tsB, k]
                c_tk = Ck[ib * bsC, group, t * tsC, k]
                base = k * nc
                for c in range(nc):
                    value = decay[base + c] * h[base + c] + drive[c] * b_tk
                    h[base + c] = value
                    acc[c] += value * c_tk
            y[ib, t, c0:c1] = acc
        if keep_last:
            for k in range(ns):
                last[ib, k, c0:c1] = h[k * nc:(k + 1) * nc]


@njit(parallel=True, fastmath=_FASTMATH, cache=True)
def _scan_backward(u, delta, A_t, Bk, Ck, group_size, width, checkpoints, every, dy,
                   du, ddelta, dA_t, dB_part, dC_part):
    """Adjoint of ``_scan_forward``. dA_t: (b, n, d); dB_part/dC_part: (blocks, l|1, n), summed by the caller."""
    nb, nl, nd = u.shape
    ns = A_t.shape[0]
    per_group = (group_size + width - 1) // width
    bsB, tsB = int(Bk.shape[0] > 1), int(Bk.shape[2] > 1)
    bsC, tsC = int(Ck.shape[0] > 1), int(Ck.shape[2] > 1)
    n_blocks = nb * (nd // group_size) * per_group
    n_ck = (nl + every - 1) // every
    for block in prange(n_blocks):
        ib, group, c0, nc = _block_span(block, nd, group_size, per_group, width)
        c1 = c0 + nc
        A_blk = np.empty(ns * nc, u.dtype)
        for k in range(ns):
            A_blk[k * nc:(k + 1) * nc] = A_t[k, c0:c1]
        states = np.empty((every + 1, ns * nc), u.dtype)  # states[r] = h_{t0 + r - 1}, flattened (n, nc)
        decays = np.empty((every, ns * nc), u.dtype)  # decays[r] = exp(delta_{t0 + r} A)
        exponent = np.empty(ns * nc, u.dtype)
        bits = np.empty(ns * nc, np.int32)
        lam = np.zeros(ns * nc, u.dtype)  # dL/dh_t carried backwards through the decay
        dA_blk = np.zeros(ns * nc, u.dtype)
        drive = np.empty(nc, u.dtype)
        sum_du = np.empty(nc, u.dtype)
        sum_ddelta = np.empty(nc, u.dtype)
        zero = lam[0]
        for j in range(n_ck - 1, -1, -1):
            t0 = j * every
            t1 = min(t0 + every, nl)
            for k in range(ns):
                states[0, k * nc:(k + 1) * nc] = checkpoints[ib, j, k, c0:c1]
            for t in range(t0, t1):  # recompute this chunk's decays and states from its checkpoint
                dt = delta[ib, t, c0:c1]
                x = u[ib, t, c0:c1]
                old = states[t - t0]
                new = states[t - t0 + 1]
                decay = decays[t - t0]
                for c in range(nc):
                    drive[c] = dt[c] * x[c]
                for k in range(ns):
                    base = k * nc
                    for c in range(nc):
                        exponent[base + c] = dt[c] * A_blk[base + c]
                _exp_into(exponent, decay, bits)
                for k in range(ns):
                    b_tk = Bk[ib * bsB, group, t * tsB, k]
                    base = k * nc
                    for c in range(nc):
                        new[base + c] = decay[base + c] * old[base + c] + drive[c] * b_tk
            for t in range(t1 - 1, t0 - 1, -1):  # adjoint recurrence, newest position first
                dt = delta[ib, t, c0:c1]
                x = u[ib, t, c0:c1]
                g = dy[ib, t, c0:c1]
                old = states[t - t0]
                new = states[t - t0 + 1]
                decay = decays[t - t0]
                for c in range(nc):
                    drive[c] = dt[c] * x[c]
                    sum_du[c] = zero
                    sum_ddelta[c] = zero
                for k in range(ns):
                    b_tk = Bk[ib * bsB, group, t * tsB, k]
                    c_tk = Ck[ib * bsC, group, t * tsC, k]
                    base = k * nc
                    grad_b = zero
                    grad_c = zero
                    for c in range(nc):
                        lam_k = lam[base + c] + c_tk * g[c]  # dL/dh_t
                        grad_c += new[base + c] * g[c]
                        grad_b += lam_k * drive[c]
                        sum_du[c] += lam_k * b_tk
                        through_decay = lam_k * decay[base + c] * old[base + c]  # dL/d(delta_t A)
                        sum_ddelta[c] += through_decay * A_blk[base + c] + lam_k * b_tk * x[c]
                        dA_blk[base + c] += through_decay * dt[c]
                        lam[base + c] = lam_k * decay[base + c]  # carried to position t - 1
                    dB_part[block, t * tsB, k] += grad_b
                    dC_part[block, t * tsC, k] += grad_c
                for c in range(nc):
                    sum_du[c] *= dt[c]
                du[ib, t, c0:c1] = sum_du
                ddelta[ib, t, c0:c1] = sum_ddelta
        for k in range(ns):
            dA_t[ib, k, c0:c1] = dA_blk[k * nc:(k + 1) * nc]


def _kernel_layout(param: Tensor, dim: int) -> tuple[Tensor, int]:
    """B or C as (batch or 1, groups, l or 1, n) plus the number of channels that share one group."""
    if param.dim() == 2:  # (d, n): one time-invariant row per channel
        return param.reshape(1, dim, 1, param.shape[1]), 1
    if param.dim() == 3:  # (b, n, l): one row shared by every channel
        return param.transpose(1, 2).unsqueeze(1), dim
    return param.transpose(2, 3), dim // param.shape[1]  # (b, g, n, l)


def _reduce_blocks(part: Tensor, kernel_shape: torch.Size, batch: int, groups: int) -> Tensor:
    """Sum per-block partial gradients (blocks, l|1, n) into ``kernel_shape`` = (b|1, g, l|1, n)."""
    per_batch = part.reshape(batch, groups, -1, *part.shape[1:]).sum(2)  # (b, g, l|1, n)
    return per_batch.sum(0, keepdim=True) if kernel_shape[0] == 1 else per_batch


class _ScanFunction(torch.autograd.Function):
    """``y = scan(u, delta, A, Bk, Ck)`` on CPU tensors ((b, d, l) in and out), with the exact adjoint backward."""

    @staticmethod
    def forward(ctx, u: Tensor, delta: Tensor, A: Tensor, Bk: Tensor, Ck: Tensor, group_size: int,
                last: Tensor | None) -> Tensor:
        """``last`` (b, n, d), when given, receives the state after the last position (not differentiable)."""
        u_t = u.detach().transpose(1, 2).contiguous()  # (b, l, d): channels innermost
        delta_t = delta.detach().transpose(1, 2).contiguous()
        A_t = A.detach().t().contiguous()
        Bk, Ck = Bk.detach().contiguous(), Ck.detach().contiguous()
        nb, nl, nd = u_t.shape
        ns = A_t.shape[0]
        width = min(CHANNEL_BLOCK, group_size)
        save = any(ctx.needs_input_grad[:5])
        n_ck = (nl + CHECKPOINT - 1) // CHECKPOINT
        checkpoints = u_t.new_empty((nb, n_ck, ns, nd) if save else (1, 1, ns, 1))
        y_t = torch.empty_like(u_t)
        keep_last = last is not None
        last_np = last.numpy() if keep_last else np.empty((1, 1, 1), u_t.numpy().dtype)
        _scan_forward(u_t.numpy(), delta_t.numpy(), A_t.numpy(), Bk.numpy(), Ck.numpy(), group_size, width,
                      y_t.numpy(), checkpoints.numpy(), save, CHECKPOINT, last_np, keep_last)
        if save:
            ctx.save_for_backward(u_t, delta_t, A_t, Bk, Ck, checkpoints)
            ctx.group_size = group_size
        return y_t.transpose(1, 2)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy: Tensor):
        u_t, delta_t, A_t, Bk, Ck, checkpoints = ctx.saved_tensors
        group_size = ctx.group_size
        nb, _, nd = u_t.shape
        groups = nd // group_size
        width = min(CHANNEL_BLOCK, group_size)
        n_blocks = nb * groups * ((group_size + width - 1) // width)
        dy_t = dy.to(u_t.dtype).transpose(1, 2).contiguous()
        du_t = torch.empty_like(u_t)
        ddelta_t = torch.empty_like(u_t)
        dA_t = u_t.new_empty((nb, *A_t.shape))
        dB_part = u_t.new_zeros((n_blocks, Bk.shape[2], Bk.shape[3]))
        dC_part = u_t.new_zeros((n_blocks, Ck.shape[2], Ck.shape[3]))
        _scan_backward(u_t.numpy(), delta_t.numpy(), A_t.numpy(), Bk.numpy(), Ck.numpy(), group_size, width,
                       checkpoints.numpy(), CHECKPOINT, dy_t.numpy(), du_t.numpy(), ddelta_t.numpy(),
                       dA_t.numpy(), dB_part.numpy(), dC_part.numpy())
        dB = _reduce_blocks(dB_part, Bk.shape, nb, groups)
        dC = _reduce_blocks(dC_part, Ck.shape, nb, groups)
        return du_t.transpose(1, 2), ddelta_t.transpose(1, 2), dA_t.sum(0).t(), dB, dC, None, None


def selective_scan_cpu(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None = None,
                       z: Tensor | None = None, delta_bias: Tensor | None = None,
                       delta_softplus: bool = False, return_last_state: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """Same contract as ``selective_scan_reference``; inputs already validated, CPU tensors, real ``A``."""
    dtype_in = u.dtype
    compute = torch.float64 if u.dtype == torch.float64 else torch.float32
    dim = u.shape[1]
    u_c = u.to(compute)
    delta_c = delta.to(compute)
    if delta_bias is not None:
        delta_c = delta_c + delta_bias.to(compute)[:, None]
    if delta_softplus:
        delta_c = F.softplus(delta_c)
    Bk, group_size = _kernel_layout(B.to(compute), dim)
    Ck, group_size_c = _kernel_layout(C.to(compute), dim)
    if group_size != group_size_c:
        # The kernel walks blocks of channels that share one B row and one C row; mixed group layouts
        # (e.g. shared B with time-invariant C) are expanded to a common finer grouping, which is exact.
        finer = math.gcd(group_size, group_size_c)
        Bk = Bk.repeat_interleave(group_size // finer, dim=1)
        Ck = Ck.repeat_interleave(group_size_c // finer, dim=1)
        group_size = finer
    last = u_c.new_empty(u_c.shape[0], A.shape[1], dim) if return_last_state else None
    y = _ScanFunction.apply(u_c, delta_c, A.to(compute), Bk, Ck, group_size, last)
    out = y if D is None else y + u_c * D.to(compute)[:, None]
    if z is not None:
        out = out * F.silu(z.to(compute))
    if return_last_state:
        return out.to(dtype_in), last.transpose(1, 2)
    return out.to(dtype_in)
