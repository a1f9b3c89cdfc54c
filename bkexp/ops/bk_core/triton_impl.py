"""Triton BK-Core: chunked (two-level) pivot and adjoint scans on position-major (B, N, H) planes.

A single sequential sweep per row would occupy only B*H GPU lanes, so every sweep is split into chunks of
``CHUNK`` positions, each chunk handled by its own program (for a block of ``BLOCK_H`` rows):

1. ``chunk``: each chunk composes its steps into one map - for the pivots a Moebius map
   ``x -> a - k/x`` kept as a 2x2 complex matrix renormalised after every step (only the ratio matters, so
   this never overflows; the continuant form would), for the adjoints an affine map ``s -> b + c s``;
2. ``carry``: one program per row block walks the chunk maps to get the state entering every chunk
   (N/CHUNK steps);
3. ``apply``: each chunk reruns its steps from the carried state and writes every position.

Causality holds exactly: the state entering a chunk depends only on earlier chunks. The pivot sweeps
write ``1/P`` (P = L or R); everything else (the bidirectional combination, dv/dk/dz from the adjoints)
is elementwise complex arithmetic done with torch on the GPU.

Sweeps run "forward" (P_i = a_i - k_{i-1}/P_{i-1}) or "reverse" (P_i = a_i - k_i/P_{i+1}); step t visits
position t or N-1-t, and the coupling of step t >= 1 is k[t-1] or k[N-1-t] respectively.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from .layout import to_planes

# Under TRITON_INTERPRET (CPU tests) small chunks keep the interpreter fast and make tiny test sequences
# span several chunks, so the carry between chunks is exercised.
CHUNK = 8 if os.environ.get("TRITON_INTERPRET", "0") == "1" else 64
BLOCK_H = 32


@triton.jit
def _position(t, n, REVERSE: tl.constexpr):
    if REVERSE:
        return n - 1 - t
    return t


@triton.jit
def _coupling_index(t, n, REVERSE: tl.constexpr):
    if REVERSE:
        return n - 1 - t
    return t - 1


@triton.jit
def _pivot_step(v_ptr, k_ptr, zr, b, t, n, h, hm, h_size, REVERSE: tl.constexpr):
    """Step ``t`` of a pivot sweep, shared by the chunk and apply kernels: its mask, the offset of its position,
    ``Re(a) = v - Re z`` there and its coupling ``k`` (0 at step 0)."""
    tv = tl.zeros_like(h) + t  # masks must be blocks, not scalars
    lm = hm & (tv < n)
    off = (b * n + _position(t, n, REVERSE)) * h_size + h
    ki = _coupling_index(t, n, REVERSE)
    kk = tl.load(k_ptr + (b * (n - 1) + ki) * h_size + h, mask=lm & (tv >= 1), other=0.0).to(tl.float32)
    ar = tl.load(v_ptr + off, mask=lm, other=0.0).to(tl.float32) - zr
    return lm, off, ar, kk


@triton.jit
def _affine_step(br_ptr, bi_ptr, pr_ptr, pi_ptr, k_ptr, b, t, n, h, hm, h_size, REVERSE: tl.constexpr):
    """Step ``t`` of an adjoint sweep ``s_t = b_t + c_t s_{t-1}``, shared by the chunk and apply kernels: its
    mask, the offset of its position, ``c_t = k p_t^2`` (0 at step 0) and ``b_t``."""
    tv = tl.zeros_like(h) + t  # masks must be blocks, not scalars
    lm = hm & (tv < n)
    off = (b * n + _position(t, n, REVERSE)) * h_size + h
    ki = _coupling_index(t, n, REVERSE)
    kk = tl.load(k_ptr + (b * (n - 1) + ki) * h_size + h, mask=lm & (tv >= 1), other=0.0)
    p_r = tl.load(pr_ptr + off, mask=lm, other=0.0)
    p_i = tl.load(pi_ptr + off, mask=lm, other=0.0)
    cr = kk * (p_r * p_r - p_i * p_i)
    ci = kk * (2.0 * p_r * p_i)
    b_r = tl.load(br_ptr + off, mask=lm, other=0.0)
    b_i = tl.load(bi_ptr + off, mask=lm, other=0.0)
    return lm, off, cr, ci, b_r, b_i


@triton.jit
def _pivot_chunk_kernel(v_ptr, k_ptr, zr_ptr, zi_ptr, t_ptr, n, h_size, n_chunks,
                        CHUNK: tl.constexpr, BLOCK_H: tl.constexpr, REVERSE: tl.constexpr):
    """Normalised product of the chunk's Moebius matrices [[a, -k], [1, 0]]; 8 planes (B, chunks, 8, H)."""
    pid_h = tl.program_id(0)
    c = tl.program_id(1)
    b = tl.program_id(2)
    h = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    hm = h < h_size
    zr = tl.load(zr_ptr + b * h_size + h, mask=hm, other=0.0)
    zi = tl.load(zi_ptr + b * h_size + h, mask=hm, other=1.0)
    one = tl.full([BLOCK_H], 1.0, tl.float32)
    zero = tl.zeros([BLOCK_H], tl.float32)
    m00r, m00i, m01r, m01i = one, zero, zero, zero
    m10r, m10i, m11r, m11i = zero, zero, one, zero
    for j in range(CHUNK):
        lm, off, ar, kk = _pivot_step(v_ptr, k_ptr, zr, b, c * CHUNK + j, n, h, hm, h_size, REVERSE)
        ai = -zi
        # row0 <- a*row0 - k*row1 ; row1 <- row0
        n00r = ar * m00r - ai * m00i - kk * m10r
        n00i = ar * m00i + ai * m00r - kk * m10i
        n01r = ar * m01r - ai * m01i - kk * m11r
        n01i = ar * m01i + ai * m01r - kk * m11i
        s = tl.abs(n00r) + tl.abs(n00i) + tl.abs(n01r) + tl.abs(n01i)
        inv = 1.0 / s
        keep = lm  # past the end (or masked rows): leave the matrix unchanged
        m10r = tl.where(keep, m00r * inv, m10r)
        m10i = tl.where(keep, m00i * inv, m10i)
        m11r = tl.where(keep, m01r * inv, m11r)
        m11i = tl.where(keep, m01i * inv, m11i)
        m00r = tl.where(keep, n00r * inv, m00r)
        m00i = tl.where(keep, n00i * inv, m00i)
        m01r = tl.where(keep, n01r * inv, m01r)
        m01i = tl.where(keep, n01i * inv, m01i)
    base = t_ptr + ((b * n_chunks + c) * 8) * h_size + h
    tl.store(base + 0 * h_size, m00r, mask=hm)
    tl.store(base + 1 * h_size, m00i, mask=hm)
    tl.store(base + 2 * h_size, m01r, mask=hm)
    tl.store(base + 3 * h_size, m01i, mask=hm)
    tl.store(base + 4 * h_size, m10r, mask=hm)
    tl.store(base + 5 * h_size, m10i, mask=hm)
    tl.store(base + 6 * h_size, m11r, mask=hm)
    tl.store(base + 7 * h_size, m11i, mask=hm)


@triton.jit
def _pivot_carry_kernel(t_ptr, carry_ptr, h_size, n_chunks, BLOCK_H: tl.constexpr):
    """Pivot entering every chunk: x_{c+1} = (m00 x_c + m01) / (m10 x_c + m11); planes (B, chunks, 2, H)."""
    pid_h = tl.program_id(0)
    b = tl.program_id(1)
    h = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    hm = h < h_size
    xr = tl.full([BLOCK_H], 1.0, tl.float32)  # any nonzero value: step 0 has no coupling
    xi = tl.zeros([BLOCK_H], tl.float32)
    for c in range(n_chunks):
        out = carry_ptr + ((b * n_chunks + c) * 2) * h_size + h
        tl.store(out, xr, mask=hm)
        tl.store(out + h_size, xi, mask=hm)
        base = t_ptr + ((b * n_chunks + c) * 8) * h_size + h
        m00r = tl.load(base + 0 * h_size, mask=hm, other=1.0)
        m00i = tl.load(base + 1 * h_size, mask=hm, other=0.0)
        m01r = tl.load(base + 2 * h_size, mask=hm, other=0.0)
        m01i = tl.load(base + 3 * h_size, mask=hm, other=0.0)
        m10r = tl.load(base + 4 * h_size, mask=hm, other=0.0)
        m10i = tl.load(base + 5 * h_size, mask=hm, other=0.0)
        m11r = tl.load(base + 6 * h_size, mask=hm, other=1.0)
        m11i = tl.load(base + 7 * h_size, mask=hm, other=0.0)
        pr = m00r * xr - m00i * xi + m01r
        pi = m00r * xi + m00i * xr + m01i
        qr = m10r * xr - m10i * xi + m11r
        qi = m10r * xi + m10i * xr + m11i
        d = qr * qr + qi * qi
        xr, xi = (pr * qr + pi * qi) / d, (pi * qr - pr * qi) / d


@triton.jit
def _pivot_apply_kernel(v_ptr, k_ptr, zr_ptr, zi_ptr, carry_ptr, yr_ptr, yi_ptr, n, h_size, n_chunks,
                        CHUNK: tl.constexpr, BLOCK_H: tl.constexpr, REVERSE: tl.constexpr):
    """Rerun the chunk from its carried pivot: P = a - k * (1/P_prev); writes 1/P at every position."""
    pid_h = tl.program_id(0)
    c = tl.program_id(1)
    b = tl.program_id(2)
    h = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    hm = h < h_size
    zr = tl.load(zr_ptr + b * h_size + h, mask=hm, other=0.0)
    zi = tl.load(zi_ptr + b * h_size + h, mask=hm, other=1.0)
    cin = carry_ptr + ((b * n_chunks + c) * 2) * h_size + h
    xr = tl.load(cin, mask=hm, other=1.0)
    xi = tl.load(cin + h_size, mask=hm, other=0.0)
    d = xr * xr + xi * xi
    yr = xr / d  # 1/P_prev
    yi = -xi / d
    for j in range(CHUNK):
        lm, off, ar, kk = _pivot_step(v_ptr, k_ptr, zr, b, c * CHUNK + j, n, h, hm, h_size, REVERSE)
        pr = ar - kk * yr
        pi = -zi - kk * yi
        d = pr * pr + pi * pi
        yr = pr / d
        yi = -pi / d
        tl.store(yr_ptr + off, yr, mask=lm)
        tl.store(yi_ptr + off, yi, mask=lm)


@triton.jit
def _affine_chunk_kernel(br_ptr, bi_ptr, pr_ptr, pi_ptr, k_ptr, m_ptr, n, h_size, n_chunks,
                         CHUNK: tl.constexpr, BLOCK_H: tl.constexpr, REVERSE: tl.constexpr):
    """Compose s_t = b_t + c_t s_{t-1} (c_t = k * p_t^2, c_0 = 0) over the chunk: s_out = C s_in + B."""
    pid_h = tl.program_id(0)
    c = tl.program_id(1)
    b = tl.program_id(2)
    h = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    hm = h < h_size
    mr = tl.full([BLOCK_H], 1.0, tl.float32)
    mi = tl.zeros([BLOCK_H], tl.float32)
    sr = tl.zeros([BLOCK_H], tl.float32)
    si = tl.zeros([BLOCK_H], tl.float32)
    for j in range(CHUNK):
        lm, off, cr, ci, b_r, b_i = _affine_step(br_ptr, bi_ptr, pr_ptr, pi_ptr, k_ptr, b, c * CHUNK + j, n, h,
                                                 hm, h_size, REVERSE)
        nsr = b_r + cr * sr - ci * si
        nsi = b_i + cr * si + ci * sr
        nmr = cr * mr - ci * mi
        nmi = cr * mi + ci * mr
        sr = tl.where(lm, nsr, sr)
        si = tl.where(lm, nsi, si)
        mr = tl.where(lm, nmr, mr)
        mi = tl.where(lm, nmi, mi)
    base = m_ptr + ((b * n_chunks + c) * 4) * h_size + h
    tl.store(base, mr, mask=hm)
    tl.store(base + h_size, mi, mask=hm)
    tl.store(base + 2 * h_size, sr, mask=hm)
    tl.store(base + 3 * h_size, si, mask=hm)


@triton.jit
def _affine_carry_kernel(m_ptr, carry_ptr, h_size, n_chunks, BLOCK_H: tl.constexpr):
    pid_h = tl.program_id(0)
    b = tl.program_id(1)
    h = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    hm = h < h_size
    sr = tl.zeros([BLOCK_H], tl.float32)
    si = tl.zeros([BLOCK_H], tl.float32)
    for c in range(n_chunks):
        out = carry_ptr + ((b * n_chunks + c) * 2) * h_size + h
        tl.store(out, sr, mask=hm)
        tl.store(out + h_size, si, mask=hm)
        base = m_ptr + ((b * n_chunks + c) * 4) * h_size + h
        mr = tl.load(base, mask=hm, other=0.0)
        mi = tl.load(base + h_size, mask=hm, other=0.0)
        b_r = tl.load(base + 2 * h_size, mask=hm, other=0.0)
        b_i = tl.load(base + 3 * h_size, mask=hm, other=0.0)
        sr, si = b_r + mr * sr - mi * si, b_i + mr * si + mi * sr


@triton.jit
def _affine_apply_kernel(br_ptr, bi_ptr, pr_ptr, pi_ptr, k_ptr, carry_ptr, sr_ptr, si_ptr, n, h_size,
                         n_chunks, CHUNK: tl.constexpr, BLOCK_H: tl.constexpr, REVERSE: tl.constexpr):
    pid_h = tl.program_id(0)
    c = tl.program_id(1)
    b = tl.program_id(2)
    h = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    hm = h < h_size
    cin = carry_ptr + ((b * n_chunks + c) * 2) * h_size + h
    sr = tl.load(cin, mask=hm, other=0.0)
    si = tl.load(cin + h_size, mask=hm, other=0.0)
    for j in range(CHUNK):
        lm, off, cr, ci, b_r, b_i = _affine_step(br_ptr, bi_ptr, pr_ptr, pi_ptr, k_ptr, b, c * CHUNK + j, n, h,
                                                 hm, h_size, REVERSE)
        sr, si = b_r + cr * sr - ci * si, b_i + cr * si + ci * sr
        tl.store(sr_ptr + off, sr, mask=lm)
        tl.store(si_ptr + off, si, mask=lm)


def _grid(bsz: int, h_size: int, n_chunks: int) -> tuple[int, int, int]:
    return (triton.cdiv(h_size, BLOCK_H), n_chunks, bsz)


def _pivot_sweep(v: Tensor, k: Tensor, zr: Tensor, zi: Tensor, reverse: bool) -> Tensor:
    """1/P for every position, complex64 (B, N, H); P the left (forward) or right (reverse) pivots."""
    bsz, n, h_size = v.shape
    n_chunks = triton.cdiv(n, CHUNK)
    mats = torch.empty(bsz, n_chunks, 8, h_size, device=v.device, dtype=torch.float32)
    carry = torch.empty(bsz, n_chunks, 2, h_size, device=v.device, dtype=torch.float32)
    yr = torch.empty_like(v)
    yi = torch.empty_like(v)
    grid = _grid(bsz, h_size, n_chunks)
    _pivot_chunk_kernel[grid](v, k, zr, zi, mats, n, h_size, n_chunks, CHUNK=CHUNK, BLOCK_H=BLOCK_H,
                              REVERSE=reverse)
    _pivot_carry_kernel[(triton.cdiv(h_size, BLOCK_H), bsz)](mats, carry, h_size, n_chunks, BLOCK_H=BLOCK_H)
    _pivot_apply_kernel[grid](v, k, zr, zi, carry, yr, yi, n, h_size, n_chunks, CHUNK=CHUNK, BLOCK_H=BLOCK_H,
                              REVERSE=reverse)
    return torch.complex(yr, yi)


def _affine_sweep(seed: Tensor, pivots_inv: Tensor, k: Tensor, reverse: bool) -> Tensor:
    """s_t = seed_t + k_c * (1/P_t)^2 * s_{t-1} along the sweep direction, complex64 (B, N, H)."""
    bsz, n, h_size = seed.shape
    n_chunks = triton.cdiv(n, CHUNK)
    br, bi = seed.real.contiguous(), seed.imag.contiguous()
    pr, pi = pivots_inv.real.contiguous(), pivots_inv.imag.contiguous()
    maps = torch.empty(bsz, n_chunks, 4, h_size, device=seed.device, dtype=torch.float32)
    carry = torch.empty(bsz, n_chunks, 2, h_size, device=seed.device, dtype=torch.float32)
    sr = torch.empty_like(br)
    si = torch.empty_like(br)
    grid = _grid(bsz, h_size, n_chunks)
    _affine_chunk_kernel[grid](br, bi, pr, pi, k, maps, n, h_size, n_chunks, CHUNK=CHUNK, BLOCK_H=BLOCK_H,
                               REVERSE=reverse)
    _affine_carry_kernel[(triton.cdiv(h_size, BLOCK_H), bsz)](maps, carry, h_size, n_chunks, BLOCK_H=BLOCK_H)
    _affine_apply_kernel[grid](br, bi, pr, pi, k, carry, sr, si, n, h_size, n_chunks, CHUNK=CHUNK,
                               BLOCK_H=BLOCK_H, REVERSE=reverse)
    return torch.complex(sr, si)


def _next(x: Tensor) -> Tensor:
    """x shifted one position left along N (x_{i+1}), zero past the end."""
    return torch.cat([x[:, 1:], torch.zeros_like(x[:, :1])], dim=1)


def _coupled(k: Tensor, x_next: Tensor) -> Tensor:
    """k_i * x_{i+1} for i < N-1 and 0 at N-1, from k (B, N-1, H) and x_next (B, N, H)."""
    return torch.cat([k * x_next[:, :-1], torch.zeros_like(x_next[:, :1])], dim=1)


class _TritonBKCore(torch.autograd.Function):
    @staticmethod
    def forward(ctx, v: Tensor, k: Tensor, z: Tensor, causal: bool):  # type: ignore[override]
        v = to_planes(v)
        k = to_planes(k)
        zr, zi = z.real.contiguous(), z.imag.contiguous()
        inv_left = _pivot_sweep(v, k, zr, zi, reverse=False)
        if causal:
            y = inv_left
            ctx.save_for_backward(k, y)
        else:
            inv_right = _pivot_sweep(v, k, zr, zi, reverse=True)
            y = (inv_left.reciprocal() - _coupled(k, _next(inv_right))).reciprocal()
            ctx.save_for_backward(k, y, inv_left, inv_right)
        ctx.causal = causal
        ctx.z_dtype = z.dtype
        return y.real.contiguous().transpose(1, 2), y.imag.contiguous().transpose(1, 2)

    @staticmethod
    def backward(ctx, grad_re: Tensor, grad_im: Tensor):  # type: ignore[override]
        g = torch.complex(to_planes(grad_re.float()), -to_planes(grad_im.float()))
        if ctx.causal:
            k, y = ctx.saved_tensors
            # lam_i = -g_i y_i^2 + k_i y_i^2 lam_{i+1}
            lam = _affine_sweep(-g * y * y, y, k, reverse=True)
            grad_v = lam.real
            grad_k = (-lam[:, 1:] * y[:, :-1]).real
            total = lam.sum(dim=1)
        else:
            k, y, inv_left, inv_right = ctx.saved_tensors
            mu = -g * y * y
            lam_left = _affine_sweep(mu, inv_left, k, reverse=True)
            lam_right = _affine_sweep(mu, inv_right, k, reverse=False)
            lam_a = lam_left + lam_right - mu
            grad_v = lam_a.real
            grad_k = (-lam_left[:, 1:] * inv_left[:, :-1] - lam_right[:, :-1] * inv_right[:, 1:]).real
            total = lam_a.sum(dim=1)
        grad_z = (-total).conj_physical().to(ctx.z_dtype)
        return grad_v.contiguous().transpose(1, 2), grad_k.contiguous().transpose(1, 2), grad_z, None


def bk_core_triton(v: Tensor, k: Tensor, z: Tensor, causal: bool = True) -> tuple[Tensor, Tensor]:
    """Triton kernels on rows v (B, H, N), k (B, H, N-1) and complex z (B, H); see ``to_planes``."""
    if v.dtype != torch.float32:
        # the kernels are float32; float64 inputs (tests, gradcheck) run the same kernels in float32
        re, im = _TritonBKCore.apply(v.float(), k.float(), z.to(torch.complex64), causal)
        return re.to(v.dtype), im.to(v.dtype)
    return _TritonBKCore.apply(v, k, z, causal)
