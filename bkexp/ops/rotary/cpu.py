"""Compiled CPU rotary embedding on the joint projection (numba): one pass forward, one backward.

The forward reads each position's row of ``qkv`` (3, heads, head_dim) once and writes ``q`` and ``k`` rotated and
``v`` as it is into contiguous (batch, heads, n, head_dim) tensors; the backward applies the inverse rotation
to the gradients of ``q`` and ``k`` and copies ``v``'s, into one (batch, n, 3 * d_model) gradient. Each
position is computed alone (threads take whole positions), so a token's result does not depend on the others.
"""

from __future__ import annotations

import torch
from numba import njit, prange
from torch import Tensor
from torch.autograd.function import once_differentiable

from bkexp.ops.numba_cache import from_cache
from bkexp.ops.selective_scan.cpu import _FASTMATH

# No reassociation or contraction: each output is one rotation, x1 * cos - x2 * sin, rounded as PyTorch rounds it.
_ROTARY_FASTMATH = _FASTMATH - {"reassoc", "contract"}


@from_cache
@njit(parallel=True, fastmath=_ROTARY_FASTMATH, error_model="numpy", cache=True)
def _rotary_forward(qkv, cos, sin, q, k, v):
    """qkv: (b, n, 3, h, hd); cos, sin: (n, hd // 2); q, k, v: (b, h, n, hd)."""
    nb, nl, _, nh, hd = qkv.shape
    half = hd // 2
    for item in prange(nb * nl):
        ib = item // nl
        t = item % nl
        c_t, s_t = cos[t], sin[t]
        for head in range(nh):
            for which in range(2):
                x = qkv[ib, t, which, head]
                out = q[ib, head, t] if which == 0 else k[ib, head, t]
                for i in range(half):
                    out[i] = x[i] * c_t[i] - x[half + i] * s_t[i]
                    out[half + i] = x[i] * s_t[i] + x[half + i] * c_t[i]
                for i in range(2 * half, hd):
                    out[i] = x[i]
            v[ib, head, t] = qkv[ib, t, 2, head]


@from_cache
@njit(parallel=True, fastmath=_ROTARY_FASTMATH, error_model="numpy", cache=True)
def _rotary_backward(dq, dk, dv, cos, sin, dqkv):
    """The transposed rotation: dqkv (b, n, 3, h, hd) from dq, dk, dv (b, h, n, hd)."""
    nb, nl, _, nh, hd = dqkv.shape
    half = hd // 2
    for item in prange(nb * nl):
        ib = item // nl
        t = item % nl
        c_t, s_t = cos[t], sin[t]
        for head in range(nh):
            for which in range(2):
                g = dq[ib, head, t] if which == 0 else dk[ib, head, t]
                out = dqkv[ib, t, which, head]
                for i in range(half):
                    out[i] = g[i] * c_t[i] + g[half + i] * s_t[i]
                    out[half + i] = g[half + i] * c_t[i] - g[i] * s_t[i]
                for i in range(2 * half, hd):
                    out[i] = g[i]
            dqkv[ib, t, 2, head] = dv[ib, head, t]


class _QKVHeads(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qkv: Tensor, n_heads: int, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        b, n, width = qkv.shape
        qkv5 = qkv.detach().contiguous().view(b, n, 3, n_heads, width // (3 * n_heads))
        q, k, v = (qkv5.new_empty((b, n_heads, n, qkv5.shape[-1])) for _ in range(3))
        _rotary_forward(qkv5.numpy(), cos.numpy(), sin.numpy(), q.numpy(), k.numpy(), v.numpy())
        ctx.save_for_backward(cos, sin)
        ctx.shape = qkv5.shape
        return q, k, v

    @staticmethod
    @once_differentiable
    def backward(ctx, dq: Tensor | None, dk: Tensor | None, dv: Tensor | None):
        cos, sin = ctx.saved_tensors
        b, n, _, heads, hd = ctx.shape
        grads = [g.contiguous() if g is not None else cos.new_zeros((b, heads, n, hd)) for g in (dq, dk, dv)]
        dqkv = cos.new_empty(ctx.shape)
        _rotary_backward(*(g.numpy() for g in grads), cos.numpy(), sin.numpy(), dqkv.numpy())
        return dqkv.view(b, n, -1), None, None, None


def qkv_heads_cpu(qkv: Tensor, n_heads: int, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``qkv_heads`` on validated float32/float64 CPU tensors, ``cos``/``sin`` in qkv's dtype."""
    return _QKVHeads.apply(qkv, n_heads, cos.contiguous(), sin.contiguous())
