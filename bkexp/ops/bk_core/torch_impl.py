"""Pure-PyTorch O(N) BK-Core: pivot recurrences with the exact adjoint backward (and a plain-autograd twin).

Every sweep walks the sequence with ``unbind``/``stack`` so that each step is a few whole-column ops and
autograd (for the ``torch_autograd`` variant) stays O(N); indexing ``x[:, i]`` inside the loop would make
the autograd graph O(N^2). Only reciprocals of pivots are kept (``y = 1/L``): the backward needs
``1/L_i^2`` and ``1/L_{i-1}``, both of which are powers of stored values.

Shapes (all backends share them): v (rows, N) real, k (rows, N-1) real, z (rows,) complex of the matching
precision; returns (Re y, Im y), each (rows, N).
"""

from __future__ import annotations

import torch
from torch import Tensor


def _left_inverse_pivots(a: Tensor, k: Tensor) -> Tensor:
    """``1/L_i`` with ``L_0 = a_0``, ``L_i = a_i - k_{i-1}/L_{i-1}`` (differentiable, O(N) graph)."""
    a_cols = a.unbind(-1)
    k_cols = k.to(a.dtype).unbind(-1)
    y = a_cols[0].reciprocal()
    out = [y]
    for a_i, k_prev in zip(a_cols[1:], k_cols):
        y = (a_i - k_prev * y).reciprocal()
        out.append(y)
    return torch.stack(out, dim=-1)


def _right_inverse_pivots(a: Tensor, k: Tensor) -> Tensor:
    """``1/R_i`` with ``R_{N-1} = a_{N-1}``, ``R_i = a_i - k_i/R_{i+1}`` (differentiable, O(N) graph)."""
    a_cols = a.unbind(-1)
    k_cols = k.to(a.dtype).unbind(-1)
    y = a_cols[-1].reciprocal()
    out = [y]
    for a_i, k_i in zip(reversed(a_cols[:-1]), reversed(k_cols)):
        y = (a_i - k_i * y).reciprocal()
        out.append(y)
    return torch.stack(out[::-1], dim=-1)


def _bidirectional_from_pivots(a: Tensor, k: Tensor, inv_left: Tensor, inv_right: Tensor) -> Tensor:
    """``y_i = 1/(L_i + R_i - a_i)`` written as ``1/(L_i - k_i/R_{i+1})`` (no cancellation against a_i)."""
    coupling = torch.cat([k.to(a.dtype) * inv_right[..., 1:], torch.zeros_like(a[..., :1])], dim=-1)
    return (inv_left.reciprocal() - coupling).reciprocal()


def _shifted_diagonal(v: Tensor, z: Tensor) -> Tensor:
    complex_dtype = torch.complex128 if v.dtype == torch.float64 else torch.complex64
    return v.to(complex_dtype) - z.to(complex_dtype).unsqueeze(-1)


def _backward_sweep(first: Tensor, coeff: Tensor, reverse: bool) -> Tensor:
    """Linear recurrence ``x_i = first_i + coeff_i * x_{i -/+ 1}`` along the last dim (coeff has N-1 cols)."""
    f_cols = first.unbind(-1)
    c_cols = coeff.unbind(-1)
    if reverse:  # x_{N-1} = f_{N-1}; x_i = f_i + c_i x_{i+1}
        x = f_cols[-1]
        out = [x]
        for f_i, c_i in zip(reversed(f_cols[:-1]), reversed(c_cols)):
            x = torch.addcmul(f_i, c_i, x)
            out.append(x)
        return torch.stack(out[::-1], dim=-1)
    x = f_cols[0]  # x_0 = f_0; x_i = f_i + c_{i-1} x_{i-1}
    out = [x]
    for f_i, c_prev in zip(f_cols[1:], c_cols):
        x = torch.addcmul(f_i, c_prev, x)
        out.append(x)
    return torch.stack(out, dim=-1)


class _CausalBKCore(torch.autograd.Function):
    @staticmethod
    def forward(ctx, v: Tensor, k: Tensor, z: Tensor) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        y = _left_inverse_pivots(_shifted_diagonal(v, z), k)
        ctx.save_for_backward(k, y)
        ctx.z_dtype = z.dtype
        return y.real.contiguous(), y.imag.contiguous()

    @staticmethod
    def backward(ctx, grad_re: Tensor, grad_im: Tensor):  # type: ignore[override]
        k, y = ctx.saved_tensors
        g = torch.complex(grad_re, -grad_im).to(y.dtype)  # dLoss = Re(sum g dy)
        y_sq = y * y
        # lam_i = -g_i/L_i^2 + lam_{i+1} k_i/L_i^2
        lam = _backward_sweep(-g * y_sq, k.to(y.dtype) * y_sq[..., :-1], reverse=True)
        grad_v = lam.real
        grad_k = (-lam[..., 1:] * y[..., :-1]).real
        grad_z = (-lam.sum(-1)).conj_physical().to(ctx.z_dtype)
        return grad_v, grad_k, grad_z


class _BidirectionalBKCore(torch.autograd.Function):
    @staticmethod
    def forward(ctx, v: Tensor, k: Tensor, z: Tensor) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        a = _shifted_diagonal(v, z)
        inv_left = _left_inverse_pivots(a, k)
        inv_right = _right_inverse_pivots(a, k)
        y = _bidirectional_from_pivots(a, k, inv_left, inv_right)
        ctx.save_for_backward(k, y, inv_left, inv_right)
        ctx.z_dtype = z.dtype
        return y.real.contiguous(), y.imag.contiguous()

    @staticmethod
    def backward(ctx, grad_re: Tensor, grad_im: Tensor):  # type: ignore[override]
        k, y, inv_left, inv_right = ctx.saved_tensors
        kc = k.to(y.dtype)
        g = torch.complex(grad_re, -grad_im).to(y.dtype)
        mu = -g * y * y  # adjoint of D_i = L_i + R_i - a_i
        lam_left = _backward_sweep(mu, kc * (inv_left * inv_left)[..., :-1], reverse=True)
        lam_right = _backward_sweep(mu, kc * (inv_right * inv_right)[..., 1:], reverse=False)
        lam_a = lam_left + lam_right - mu
        grad_v = lam_a.real
        grad_k = (-lam_left[..., 1:] * inv_left[..., :-1] - lam_right[..., :-1] * inv_right[..., 1:]).real
        grad_z = (-lam_a.sum(-1)).conj_physical().to(ctx.z_dtype)
        return grad_v, grad_k, grad_z


def bk_core_torch(v: Tensor, k: Tensor, z: Tensor, causal: bool = True) -> tuple[Tensor, Tensor]:
    """O(N) recurrence with the exact O(N) adjoint backward (custom autograd.Function)."""
    if causal:
        return _CausalBKCore.apply(v, k, z)
    return _BidirectionalBKCore.apply(v, k, z)


def bk_core_torch_autograd(v: Tensor, k: Tensor, z: Tensor, causal: bool = True) -> tuple[Tensor, Tensor]:
    """The same O(N) recurrence differentiated by plain autograd (no custom backward), for ablations."""
    a = _shifted_diagonal(v, z)
    inv_left = _left_inverse_pivots(a, k)
    y = inv_left if causal else _bidirectional_from_pivots(a, k, inv_left, _right_inverse_pivots(a, k))
    return y.real, y.imag
