"""Compiled CPU causal depthwise conv1d (numba): forward and backward, the SiLU fused into each.

Layout: ``x`` and the gradients are position-major ``(b, l, d)``, so every inner loop runs over contiguous
channels and vectorises; the taps are ``(w, d)``. (That takes C-contiguous ``(b, l, d)`` arrays: a view with
a longer row, such as one half of a joint projection's output, would compile to numba's any-layout code, which
does not vectorise and ran 3x slower, so such inputs are copied into contiguous order first, as the scan's are;
each dtype then compiles one signature.) Each position's row of channels is done in one go: the taps, then
the SiLU or its derivative with the exp in registers. Work items are (sequence, chunk of ``CHUNK`` positions),
taken by threads in parallel, so a batch of one long sequence keeps every core busy as well as many short
ones. The backward recomputes the pre-activation of its chunk plus the ``w - 1`` positions after it (whose
gradients reach the chunk's inputs) rather than storing it, and accumulates the tap and bias gradients per
work item; the caller sums them, so no two threads write the same element. The SiLU and its derivative
use the selective scan's vectorisable exp (``_exp``). Like the scan's, both kernels are compiled for 512-bit
vectors where the CPU has them (``bkexp.ops.vector_width``); the results are the same at either width.
"""

from __future__ import annotations

import numpy as np
import torch
from numba import njit, prange
from torch import Tensor
from torch.autograd.function import once_differentiable

from bkexp.ops.selective_scan.cpu import _FASTMATH, _exp, _position_major  # the shared exp and layout
from bkexp.ops.vector_width import wide_vectors

CHUNK = 64  # positions per work item


# No reassociation: the kernels have no reductions to vectorise, and the inlined exp keeps its designed
# accuracy (the Cody-Waite split and the polynomial are evaluated as written).
_CONV_FASTMATH = _FASTMATH - {"reassoc"}


@njit(fastmath=_CONV_FASTMATH, error_model="numpy", cache=True, inline="always")
def _pre_activation(xb, w_t, bias, has_bias, t, out):
    """out = the conv (plus bias) at position t of one sequence ``xb`` (l, d), in the one summation order the
    forward and the backward's recomputation share (so both round alike)."""
    nd = xb.shape[1]
    nk = w_t.shape[0]
    x_t = xb[t]
    w_last = w_t[nk - 1]
    for c in range(nd):
        out[c] = x_t[c] * w_last[c]
    for tap in range(nk - 1):
        s = t - (nk - 1) + tap
        if s >= 0:
            x_s = xb[s]
            w_tap = w_t[tap]
            for c in range(nd):
                out[c] += x_s[c] * w_tap[c]
    if has_bias:
        for c in range(nd):
            out[c] += bias[c]


@wide_vectors
@njit(parallel=True, fastmath=_CONV_FASTMATH, error_model="numpy", cache=True)
def _conv_forward(x, w_t, bias, has_bias, silu, chunk, out):
    """x, out: (b, l, d); w_t: (w, d), tap j multiplies x[t - (w - 1) + j]; bias: (d,) (dummy unless has_bias).
    Position by position, one row of channels at a time: the taps, then the SiLU with the exp in registers."""
    nb, nl, nd = x.shape
    n_chunks = (nl + chunk - 1) // chunk
    for item in prange(nb * n_chunks):
        ib = item // n_chunks
        t0 = (item % n_chunks) * chunk
        t1 = min(t0 + chunk, nl)
        pre = np.empty(nd, x.dtype)
        one = np.ones(1, x.dtype)[0]
        xb = x[ib]
        for t in range(t0, t1):
            row = out[ib, t]
            _pre_activation(xb, w_t, bias, has_bias, t, pre)
            if silu:  # silu(s) = s / (1 + exp(-s))
                for c in range(nd):
                    row[c] = pre[c] / (one + _exp(-pre[c]))
            else:
                row[:] = pre


@wide_vectors
@njit(parallel=True, fastmath=_CONV_FASTMATH, error_model="numpy", cache=True)
def _conv_backward(x, w_t, bias, has_bias, silu, chunk, dout, dx, dw_part, dbias_part):
    """Gradients of ``_conv_forward``: dx (b, l, d); dw_part (items, w, d), dbias_part (items, d) per work item."""
    nb, nl, nd = x.shape
    nk = w_t.shape[0]
    n_chunks = (nl + chunk - 1) // chunk
    for item in prange(nb * n_chunks):
        ib = item // n_chunks
        t0 = (item % n_chunks) * chunk
        t1 = min(t0 + chunk, nl)
        t2 = min(t1 + nk - 1, nl)  # the chunk's inputs reach outputs up to t1 + w - 2
        grad = np.empty((chunk + nk - 1, nd), x.dtype)  # dL/d pre-activation at t0 .. t2 - 1
        pre = np.empty(nd, x.dtype)
        one = np.ones(1, x.dtype)[0]
        xb = x[ib]
        gb = dout[ib]
        for t in range(t0, t2):
            g_t = gb[t]
            row = grad[t - t0]
            if silu:  # d silu(s)/ds = sigmoid(s) (1 + s (1 - sigmoid(s))); s recomputed, not stored
                _pre_activation(xb, w_t, bias, has_bias, t, pre)
                for c in range(nd):
                    sig = one / (one + _exp(-pre[c]))
                    row[c] = g_t[c] * sig * (one + pre[c] * (one - sig))
            else:
                row[:] = g_t
        dw = dw_part[item]
        db = dbias_part[np.int64(item) if has_bias else np.int64(0)]  # a (1, 1) dummy without a bias
        w_last = w_t[nk - 1]
        for t in range(t0, t1):
            g_t = grad[t - t0]
            dx_t = dx[ib, t]
            for c in range(nd):
                dx_t[c] = g_t[c] * w_last[c]
            for tap in range(nk - 1):
                q = t + (nk - 1) - tap  # the output that x[t] reaches through tap
                if q < t2:
                    g_q = grad[q - t0]
                    w_tap = w_t[tap]
                    for c in range(nd):
                        dx_t[c] += g_q[c] * w_tap[c]
            for tap in range(nk):
                s = t - (nk - 1) + tap
                if s >= 0:
                    x_s = xb[s]
                    dw_tap = dw[tap]
                    for c in range(nd):
                        dw_tap[c] += g_t[c] * x_s[c]
            if has_bias:
                for c in range(nd):
                    db[c] += g_t[c]


class _ConvFunction(torch.autograd.Function):
    """The conv on CPU tensors in the compute dtype ((b, d, l) views in and out)."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, silu: bool) -> Tensor:
        x_t = _position_major(x)
        w_t = weight.detach().t().contiguous()
        bias_c = bias.detach().contiguous() if bias is not None else w_t.new_zeros(1)
        nb, nl, nd = x_t.shape
        out = x_t.new_empty((nb, nl, nd))
        _conv_forward(x_t.numpy(), w_t.numpy(), bias_c.numpy(), bias is not None, silu, CHUNK, out.numpy())
        ctx.save_for_backward(x_t, w_t, bias_c)
        ctx.has_bias, ctx.silu = bias is not None, silu
        return out.transpose(1, 2)

    @staticmethod
    @once_differentiable
    def backward(ctx, dout: Tensor):
        x_t, w_t, bias_c = ctx.saved_tensors
        nb, nl, nd = x_t.shape
        items = nb * ((nl + CHUNK - 1) // CHUNK)
        dout_t = _position_major(dout.to(x_t.dtype))
        dx = torch.empty_like(x_t, memory_format=torch.contiguous_format)
        dw_part = x_t.new_zeros((items, *w_t.shape))
        dbias_part = x_t.new_zeros((items, nd) if ctx.has_bias else (1, 1))
        _conv_backward(x_t.numpy(), w_t.numpy(), bias_c.numpy(), ctx.has_bias, ctx.silu, CHUNK, dout_t.numpy(),
                       dx.numpy(), dw_part.numpy(), dbias_part.numpy())
        dbias = dbias_part.sum(0) if ctx.has_bias else None
        return dx.transpose(1, 2), dw_part.sum(0).t(), dbias, None


def causal_conv1d_cpu(x: Tensor, weight: Tensor, bias: Tensor | None, silu: bool) -> Tensor:
    """Same contract as ``causal_conv1d_reference``; inputs validated, CPU tensors."""
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    bias_c = bias.to(compute) if bias is not None else None
    return _ConvFunction.apply(x.to(compute), weight.to(compute), bias_c, bool(silu)).to(x.dtype)
