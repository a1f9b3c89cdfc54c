"""Compiled CPU causal depthwise conv1d (numba): forward and backward, the SiLU fused into each.

Layout: ``x`` and the gradients are position-major ``(b, l, d)``, so every inner loop runs over contiguous
channels and vectorises; the taps are ``(w, d)``. Work items are (sequence, chunk of ``CHUNK`` positions),
taken by threads in parallel, so a batch of one long sequence keeps every core busy as well as many short
ones. The backward recomputes the pre-activation of its chunk plus the ``w - 1`` positions after it (whose
gradients reach the chunk's inputs) rather than storing it, and accumulates the tap and bias gradients per
work item; the caller sums them, so no two threads write the same element. The SiLU and its derivative
use the selective scan's vectorisable exp.
"""

from __future__ import annotations

import numpy as np
import torch
from numba import njit, prange
from torch import Tensor
from torch.autograd.function import once_differentiable

from bkexp.ops.selective_scan.cpu import _FASTMATH, _exp_into  # the shared vectorisable exp

CHUNK = 64  # positions per work item


@njit(fastmath=_FASTMATH, error_model="numpy", cache=True)
def _pre_activation(xb, w_t, bias, has_bias, t0, t1, out):
    """out[t - t0] = the conv (plus bias) at positions t0 .. t1 - 1 of one sequence ``xb`` (l, d), in the one
    summation order the forward and the backward's recomputation share (so both round alike)."""
    nd = xb.shape[1]
    nk = w_t.shape[0]
    for t in range(t0, t1):
        r = t - t0
        for c in range(nd):
            out[r, c] = xb[t, c] * w_t[nk - 1, c]
        for tap in range(nk - 1):
            s = t - (nk - 1) + tap
            if s >= 0:
                for c in range(nd):
                    out[r, c] += xb[s, c] * w_t[tap, c]
        if has_bias:
            for c in range(nd):
                out[r, c] += bias[c]


@njit(parallel=True, fastmath=_FASTMATH, error_model="numpy", cache=True)
def _conv_forward(x, w_t, bias, has_bias, silu, chunk, out):
    """x, out: (b, l, d); w_t: (w, d), tap j multiplies x[t - (w - 1) + j]; bias: (d,) (dummy unless has_bias)."""
    nb, nl, nd = x.shape
    nk = w_t.shape[0]
    n_chunks = (nl + chunk - 1) // chunk
    for item in prange(nb * n_chunks):
        ib = item // n_chunks
        t0 = (item % n_chunks) * chunk
        t1 = min(t0 + chunk, nl)
        m = (t1 - t0) * nd
        acc = np.empty((chunk, nd), x.dtype)
        neg = np.empty(chunk * nd, x.dtype)
        e = np.empty(chunk * nd, x.dtype)
        bits = np.empty(chunk * nd, np.int32)
        one = np.ones(1, x.dtype)[0]
        xb = x[ib]
        _pre_activation(xb, w_t, bias, has_bias, t0, t1, acc)
        flat = acc.reshape(chunk * nd)
        if silu:  # silu(s) = s / (1 + exp(-s))
            for i in range(m):
                neg[i] = -flat[i]
            _exp_into(neg[:m], e[:m], bits[:m])
            for i in range(m):
                flat[i] = flat[i] / (one + e[i])
        for t in range(t0, t1):
            r = t - t0
            for c in range(nd):
                out[ib, t, c] = acc[r, c]


@njit(parallel=True, fastmath=_FASTMATH, error_model="numpy", cache=True)
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
        span = chunk + nk - 1
        m = (t2 - t0) * nd
        grad = np.empty((span, nd), x.dtype)  # dL/d pre-activation at t0 .. t2 - 1
        neg = np.empty(span * nd, x.dtype)
        e = np.empty(span * nd, x.dtype)
        bits = np.empty(span * nd, np.int32)
        one = np.ones(1, x.dtype)[0]
        xb = x[ib]
        gb = dout[ib]
        if silu:
            pre = np.empty((span, nd), x.dtype)
            _pre_activation(xb, w_t, bias, has_bias, t0, t2, pre)  # recomputed, not stored
            flat_pre = pre.reshape(span * nd)
            for i in range(m):
                neg[i] = -flat_pre[i]
            _exp_into(neg[:m], e[:m], bits[:m])
            for t in range(t0, t2):  # d silu(s)/ds = sigmoid(s) (1 + s (1 - sigmoid(s)))
                r = t - t0
                for c in range(nd):
                    sig = one / (one + e[r * nd + c])
                    grad[r, c] = gb[t, c] * sig * (one + pre[r, c] * (one - sig))
        else:
            for t in range(t0, t2):
                for c in range(nd):
                    grad[t - t0, c] = gb[t, c]
        for t in range(t0, t1):
            r = t - t0
            for c in range(nd):
                dx[ib, t, c] = grad[r, c] * w_t[nk - 1, c]
            for tap in range(nk - 1):
                q = t + (nk - 1) - tap  # the output that x[t] reaches through tap
                if q < t2:
                    for c in range(nd):
                        dx[ib, t, c] += grad[q - t0, c] * w_t[tap, c]
            for tap in range(nk):
                s = t - (nk - 1) + tap
                if s >= 0:
                    for c in range(nd):
                        dw_part[item, tap, c] += grad[r, c] * xb[s, c]
            if has_bias:
                for c in range(nd):
                    dbias_part[item, c] += grad[r, c]


def _position_major(t: Tensor) -> Tensor:
    """A (b, d, l) tensor as a (b, l, d) view with unit channel stride (a copy only when it has none)."""
    t = t.detach().transpose(1, 2)
    return t if t.stride(2) == 1 else t.contiguous()


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
