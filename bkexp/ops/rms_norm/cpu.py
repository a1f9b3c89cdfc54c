"""Compiled CPU RMSNorm (numba): one pass over the rows forward, one backward.

Rows are independent, so threads take whole rows and every row is computed by the same code whatever the
batch: a token's output does not depend on the other tokens (the causality check's requirement). The forward
keeps ``rstd = 1 / sqrt(mean(x^2) + eps)`` per row for the backward; the backward gives

    dx = rstd * (g * w) - x * rstd^3 * <g * w, x> / d,        dw = sum over rows of g * x * rstd,

the weight gradient summed per work item of ``ROWS_PER_ITEM`` rows and the items summed afterwards, so no two
threads write the same element and the sum's order depends only on the shape. Both kernels run from numba's
cache in every process (``bkexp.ops.numba_cache``), so results do not depend on whether the cache was warm.
"""

from __future__ import annotations

import numpy as np
import torch
from numba import njit, prange
from torch import Tensor
from torch.autograd.function import once_differentiable

from bkexp.ops.numba_cache import from_cache
from bkexp.ops.selective_scan.cpu import _FASTMATH

ROWS_PER_ITEM = 128  # rows per backward work item (each keeps its own weight-gradient row)


@from_cache
@njit(parallel=True, fastmath=_FASTMATH, error_model="numpy", cache=True)
def _rms_norm_forward(x, weight, consts, out, rstd):
    """x, out: (rows, d); weight: (d,); consts: (1 / d, eps) in x's dtype; rstd: (rows,)."""
    rows, nd = x.shape
    inv_d, eps = consts[0], consts[1]
    one = inv_d / inv_d
    for r in prange(rows):
        x_r = x[r]
        total = x_r[0] * x_r[0]
        for c in range(1, nd):
            total += x_r[c] * x_r[c]
        scale = one / np.sqrt(total * inv_d + eps)
        rstd[r] = scale
        out_r = out[r]
        for c in range(nd):
            out_r[c] = x_r[c] * scale * weight[c]


@from_cache
@njit(parallel=True, fastmath=_FASTMATH, error_model="numpy", cache=True)
def _rms_norm_backward(x, weight, rstd, consts, grad, dx, dw_part, rows_per_item):
    """dx (rows, d); dw_part (items, d): each work item's sum of ``grad * x * rstd`` over its rows."""
    rows, nd = x.shape
    inv_d = consts[0]
    for item in prange(dw_part.shape[0]):
        dw = dw_part[item]
        for r in range(item * rows_per_item, min(rows, (item + 1) * rows_per_item)):
            x_r, g_r, scale = x[r], grad[r], rstd[r]
            dot = g_r[0] * weight[0] * x_r[0]
            for c in range(1, nd):
                dot += g_r[c] * weight[c] * x_r[c]
            k = dot * scale * scale * scale * inv_d
            dx_r = dx[r]
            for c in range(nd):
                dx_r[c] = scale * (g_r[c] * weight[c]) - k * x_r[c]
                dw[c] += g_r[c] * x_r[c] * scale


class _RMSNormFunction(torch.autograd.Function):
    """RMSNorm of CPU (rows, d) float32/float64 tensors, the weight in the same dtype."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, eps: float) -> Tensor:
        x_c = x.detach().contiguous()
        w_c = weight.detach().contiguous()
        consts = np.array([1.0 / x_c.shape[1], eps], dtype=x_c.numpy().dtype)
        out = torch.empty_like(x_c)
        rstd = x_c.new_empty(x_c.shape[0])
        _rms_norm_forward(x_c.numpy(), w_c.numpy(), consts, out.numpy(), rstd.numpy())
        ctx.save_for_backward(x_c, w_c, rstd)
        ctx.consts = consts
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        x_c, w_c, rstd = ctx.saved_tensors
        grad_c = grad.to(x_c.dtype).contiguous()
        items = (x_c.shape[0] + ROWS_PER_ITEM - 1) // ROWS_PER_ITEM
        dx = torch.empty_like(x_c)
        dw_part = x_c.new_zeros((items, x_c.shape[1]))
        _rms_norm_backward(x_c.numpy(), w_c.numpy(), rstd.numpy(), ctx.consts, grad_c.numpy(), dx.numpy(),
                           dw_part.numpy(), ROWS_PER_ITEM)
        return dx, dw_part.sum(0) if ctx.needs_input_grad[1] else None, None


def rms_norm_cpu(x: Tensor, weight: Tensor | None, eps: float) -> Tensor:
    """``rms_norm`` on validated float32/float64 CPU tensors (weight None: ones, not differentiated)."""
    w = weight if weight is not None else x.new_ones(x.shape[-1])
    out = _RMSNormFunction.apply(x.reshape(-1, x.shape[-1]), w, eps)
    return out.view(x.shape)
