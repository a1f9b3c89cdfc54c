"""Compiled CPU BK-Core (numba): forward and exact adjoint backward, both modes, O(N) per row.

Layout: the kernels index ``(B, N, H)`` planes (real and imaginary parts in separate arrays). Each parallel job
owns a block of rows of one batch (causal: up to ``ROW_BLOCK_MAX``, a whole batch where that leaves no thread
idle, ``_row_block``; bidirectional: ``ROW_BLOCK``) and walks the sequence, stepping all its rows at once per
position; the inner loop over rows is contiguous and vectorised by LLVM. The causal kernels read inputs and
output gradients of any layout in place (``bkexp bench bk-core --layouts``): chunks of ``CHUNK`` positions are
staged into (position, row) scratch tiles (``_stage_*``) in the order the array's memory runs. Plain contiguous
``(B, H, N)`` rows (adjacent positions, ``_rows_unit``) are copied 16 rows x 16 positions at a time (whole
cache lines), as 8 x 8 blocks transposed in registers by shuffles (``_transpose8``: the scalar transposing copy
it replaced cost about as much as the recurrence); other strides element by element. With such rows every row's
run is a memory stream of its own, hundreds per job, which the hardware prefetchers do not follow: the next
chunk of every row is prefetched (``_prefetch_rows``) while the current one is computed. Outputs and gradients
are always written as planes and returned as their (B, H, N) transposes, as for a mixer (writing rows as well
measured 1.2-1.6x slower than reading them alone). Contiguous planes keep the direct code (``_left_sweep_planes``,
``_stage_*_reversed_planes``: the generic copies measured 1.5-2x slower there), chosen per numba type by the
``overload``s, so a mixer's results are bit-identical to the planes-only kernels. The bidirectional kernels
index contiguous planes directly. That needs
``error_model="numpy"`` (Python's error model puts a zero-division branch in every division) and a
``h0 >= 0`` check at the top of every kernel that indexes ``h0 + h``: without it numba's negative-index
wraparound turns each access into a select that LLVM will not vectorise (measured 4.7x slower forward,
3x slower backward on this machine).
Every recurrence loop is kept free of side computations (dk, the z-gradient sum) for the same reason.

Only reciprocals of pivots are stored (``y = 1/L``): the backward needs ``1/L_i^2`` and ``1/L_{i-1}``.
The kernels avoid numeric literals in the hot loops so float32 inputs are computed in float32
(numba promotes ``float32 op literal`` to float64); float64 inputs get a float64 specialisation.
``cache=True`` keeps the compiled code in ``__pycache__`` so only the first use compiles.
"""

from __future__ import annotations

import types

import numba
import numpy as np
import torch
from numba import njit, prange
from llvmlite import ir
from numba.extending import intrinsic, overload
from torch import Tensor

from .. import workspace
from .layout import to_planes

# FMA contraction only: no reassociation or finite-math assumptions, so results stay deterministic per
# position (the causality test compares bit for bit) and NaN/inf propagate.
_FASTMATH = {"contract"}
_JIT = {"cache": True, "error_model": "numpy", "fastmath": _FASTMATH}
CHUNK = 64  # positions staged per step of a backwards sweep; also the span of working-precision z sums
ROWS_CHUNK = 256  # positions per chunk of a forward sweep over rows inputs: each row read in runs of 1 KB
LINE = 16  # positions per block of a tile copy in the rows layout: one 64-byte line of float32
ROW_BLOCK = 64  # rows (within one batch) per job of the bidirectional kernels; the fewest per causal job
# Most rows per causal job: up to a whole batch's rows (the mixer's planes: a position's row of H values lies
# together), so a job reads whole 1 KB runs per position instead of a 4 KB page's quarter at a time, which the
# hardware prefetchers followed badly (2048 rows x N=8192: forward 3.3 -> 1.0 ns per element, backward 6.1 -> 3.2)
ROW_BLOCK_MAX = 256


# shufflevector masks of an 8 x 8 transpose (the unpack / shuffle / 128-bit-lane permute sequence)
_UNPACK_LO = (0, 8, 1, 9, 4, 12, 5, 13)
_UNPACK_HI = (2, 10, 3, 11, 6, 14, 7, 15)
_PAIRS_LO = (0, 1, 8, 9, 4, 5, 12, 13)
_PAIRS_HI = (2, 3, 10, 11, 6, 7, 14, 15)
_LANES_LO = (0, 1, 2, 3, 8, 9, 10, 11)
_LANES_HI = (4, 5, 6, 7, 12, 13, 14, 15)


@intrinsic
def _transpose8(typingctx, src, src_stride, dst, dst_stride, like):
    """Copy an 8 x 8 block transposed: vector i = 8 elements at address src + i * src_stride (bytes) becomes
    element i of the 8 vectors stored at dst + j * dst_stride (strides may be negative); ``like`` is an array
    of the elements' dtype. LLVM has no pattern for this in a scalar loop (a scalar transposing copy cost about
    as much as the recurrence); as 24 shuffles of whole vectors it is a few times cheaper. Values are copied
    unchanged."""
    sig = numba.types.void(numba.types.intp, numba.types.intp, numba.types.intp, numba.types.intp, like)

    def codegen(context, builder, signature, args):
        s, ss, d, ds, _ = args
        item = signature.args[4].dtype.bitwidth // 8
        vptr = ir.VectorType(context.get_value_type(signature.args[4].dtype), 8).as_pointer()

        def at(base, stride, i):
            return builder.inttoptr(builder.add(base, builder.mul(stride, ir.Constant(stride.type, i))), vptr)

        def shuffle(a, c, mask):
            return builder.shuffle_vector(a, c, ir.Constant(ir.VectorType(ir.IntType(32), 8), list(mask)))

        r = [builder.load(at(s, ss, i), align=item) for i in range(8)]
        t = [shuffle(r[i & ~1], r[i | 1], _UNPACK_HI if i & 1 else _UNPACK_LO) for i in range(8)]
        u = [shuffle(t[i], t[i + 2], m) for i in (0, 1, 4, 5) for m in (_PAIRS_LO, _PAIRS_HI)]
        for i in range(8):
            builder.store(shuffle(u[i % 4], u[i % 4 + 4], _LANES_HI if i >= 4 else _LANES_LO), at(d, ds, i),
                          align=item)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def _prefetch(typingctx, address):
    """Ask for the cache line at ``address`` in L2 ahead of use (x86 ``prefetcht1``); values are untouched."""
    sig = numba.types.void(numba.types.intp)

    def codegen(context, builder, signature, args):
        byte_ptr = ir.IntType(8).as_pointer()
        i32 = ir.IntType(32)
        fn = builder.module.declare_intrinsic("llvm.prefetch", [byte_ptr],
                                              ir.FunctionType(ir.VoidType(), [byte_ptr, i32, i32, i32]))
        # read, locality 2 (L2 and outwards), data cache
        builder.call(fn, [builder.inttoptr(args[0], byte_ptr), ir.Constant(i32, 0), ir.Constant(i32, 2),
                          ir.Constant(i32, 1)])
        return context.get_dummy_value()

    return sig, codegen


@njit(cache=True)
def _prefetch_rows(src, b, p0, p1, h0, nh):
    """Prefetch positions p0..p1-1 of rows h0..h0+nh of batch b when ``src`` has adjacent positions
    (``_rows_unit``): each row's run is a stream of its own, hundreds at a time, which the hardware prefetchers
    do not follow, so the next chunk of every row is asked for while the current one is computed."""
    if not _rows_unit(src) or p1 <= p0:
        return
    isz = np.intp(src.itemsize)
    row = np.intp(src.ctypes.data) + np.intp(b) * np.intp(src.strides[0]) + np.intp(p0) * isz
    run = np.intp(p1 - p0) * isz
    for h in range(h0, h0 + nh):
        start = row + np.intp(h) * np.intp(src.strides[2])
        for line in range(start - start % 64, start + run, 64):
            _prefetch(line)


@njit(cache=True, error_model="numpy", fastmath=_FASTMATH)
def _flush(part_r, part_i, acc_r, acc_i, nh):
    """Add the working-precision chunk sums into the float64 z-gradient accumulators and reset them."""
    for h in range(nh):
        acc_r[h] += part_r[h]
        acc_i[h] += part_i[h]
        part_r[h] = 0
        part_i[h] = 0


@njit(cache=True, error_model="numpy", fastmath=_FASTMATH)
def _left_sweep_planes(v, k, z, out_r, out_i, b, h0, nh, store_pivot):
    """``_left_sweep`` on contiguous planes, indexing them directly (the code before any-layout staging: same speed and bits)."""
    if h0 < 0 or nh < 0:  # never true; lets LLVM vectorise h0 + h (see the module docstring)
        raise ValueError("negative row offset")
    n = v.shape[1]
    dt = v.dtype
    prev_r = np.empty(nh, dt)  # 1/L_{i-1}
    prev_i = np.empty(nh, dt)
    shift_r = np.empty(nh, dt)
    shift_i = np.empty(nh, dt)
    for h in range(nh):
        shift_r[h] = z[b, h0 + h, 0]
        shift_i[h] = -z[b, h0 + h, 1]
        lr = v[b, 0, h0 + h] - shift_r[h]
        li = shift_i[h]
        d = lr * lr + li * li
        prev_r[h] = lr / d
        prev_i[h] = -li / d
        out_r[b, 0, h0 + h] = lr if store_pivot else prev_r[h]
        out_i[b, 0, h0 + h] = li if store_pivot else prev_i[h]
    for i in range(1, n):
        for h in range(nh):
            kk = k[b, i - 1, h0 + h]
            lr = v[b, i, h0 + h] - shift_r[h] - kk * prev_r[h]
            li = shift_i[h] - kk * prev_i[h]
            d = lr * lr + li * li
            yr = lr / d
            yi = -li / d
            prev_r[h] = yr
            prev_i[h] = yi
            if store_pivot:
                out_r[b, i, h0 + h] = lr
                out_i[b, i, h0 + h] = li
            else:
                out_r[b, i, h0 + h] = yr
                out_i[b, i, h0 + h] = yi


@njit(cache=True, error_model="numpy", fastmath=_FASTMATH)
def _left_sweep_staged(v, k, z, out_r, out_i, b, h0, nh, store_pivot):
    """``_left_sweep`` for inputs of any layout: walks chunks of CHUNK positions (ROWS_CHUNK for rows v: longer
    runs per row read faster from DRAM, 0.87-0.96x the time); each chunk of v and k is staged into (position,
    row) scratch, so the recurrence runs on contiguous rows whatever their layout, and writes the outputs
    (planes, allocated by ``_CpuBKCore``) in place: staging them out as well cost a third of the forward.
    """
    if h0 < 0 or nh < 0:  # never true; lets LLVM vectorise h0 + h (see the module docstring)
        raise ValueError("negative row offset")
    n = v.shape[1]
    dt = v.dtype
    ch = ROWS_CHUNK if _rows_unit(v) else CHUNK
    s_v = np.empty((ch, nh), dt)
    s_k = np.empty((ch, nh), dt)  # slot j holds k at position c0 - 1 + j
    prev_r = np.empty(nh, dt)  # 1/L_{i-1}
    prev_i = np.empty(nh, dt)
    shift_r = np.empty(nh, dt)
    shift_i = np.empty(nh, dt)
    for h in range(nh):  # position 0 in the loop that sets the shift, as before staging (same FMA contraction)
        shift_r[h] = z[b, h0 + h, 0]
        shift_i[h] = -z[b, h0 + h, 1]
        lr = v[b, 0, h0 + h] - shift_r[h]
        li = shift_i[h]
        d = lr * lr + li * li
        prev_r[h] = lr / d
        prev_i[h] = -li / d
        out_r[b, 0, h0 + h] = lr if store_pivot else prev_r[h]
        out_i[b, 0, h0 + h] = li if store_pivot else prev_i[h]
    for c0 in range(0, n, ch):
        c1 = min(c0 + ch, n)
        m = c1 - c0
        _stage_in(v, b, c0, c1, h0, nh, s_v, 0)
        j0 = 0
        if c0 == 0:
            j0 = 1
            _stage_in(k, b, 0, c1 - 1, h0, nh, s_k, 1)
        else:
            _stage_in(k, b, c0 - 1, c1 - 1, h0, nh, s_k, 0)
        _prefetch_rows(v, b, c1, min(c1 + ch, n), h0, nh)  # the next chunk, while this one is computed
        _prefetch_rows(k, b, c1 - 1, min(c1 - 1 + ch, n - 1), h0, nh)
        for j in range(j0, m):
            for h in range(nh):
                kk = s_k[j, h]
                lr = s_v[j, h] - shift_r[h] - kk * prev_r[h]
                li = shift_i[h] - kk * prev_i[h]
                d = lr * lr + li * li
                yr = lr / d
                yi = -li / d
                prev_r[h] = yr
                prev_i[h] = yi
                if store_pivot:
                    out_r[b, c0 + j, h0 + h] = lr
                    out_i[b, c0 + j, h0 + h] = li
                else:
                    out_r[b, c0 + j, h0 + h] = yr
                    out_i[b, c0 + j, h0 + h] = yi


@njit(cache=True, error_model="numpy", fastmath=_FASTMATH)
def _stage_in(src, b, p0, p1, h0, nh, dst, q0):
    """dst[q0 + j, h] = src[b, p0 + j, h0 + h] for positions p0..p1-1, reading memory in its own order."""
    if h0 < 0 or nh < 0 or p0 < 0 or q0 < 0:  # never true; no wraparound selects (see the module docstring)
        raise ValueError("negative offset")
    if _rows_unit(src):
        _stage_in_rows(src, b, p0, p1, h0, nh, dst, q0, 1)
    elif _rows_contiguous(src):
        for jb in range(0, p1 - p0, LINE):
            je = min(jb + LINE, p1 - p0)
            for h in range(nh):
                for j in range(jb, je):
                    dst[q0 + j, h] = src[b, p0 + j, h0 + h]
    else:
        for j in range(p1 - p0):
            for h in range(nh):
                dst[q0 + j, h] = src[b, p0 + j, h0 + h]


@njit(cache=True, error_model="numpy", fastmath=_FASTMATH)
def _stage_in_rows(src, b, p0, p1, h0, nh, dst, q0, step):
    """dst[q0 + step * j, h] = src[b, p0 + j, h0 + h] for positions p0..p1-1 (step 1 or -1), for ``src`` whose
    positions are adjacent in memory (``_rows_unit``): 16 rows x 16 positions at a time, as four blocks of 8 x 8
    transposed in registers (``_transpose8``); the edges that do not fill a block element by element."""
    m = p1 - p0
    m8 = m - m % 8
    n8 = nh - nh % 8
    isz = np.intp(src.itemsize)
    sh = np.intp(src.strides[2])
    ds = np.intp(step) * np.intp(dst.strides[0])
    sbase = np.intp(src.ctypes.data) + np.intp(b) * np.intp(src.strides[0]) + np.intp(p0) * isz + np.intp(h0) * sh
    dbase = np.intp(dst.ctypes.data) + np.intp(q0) * np.intp(dst.strides[0])
    m16 = m - m % 16
    n16 = nh - nh % 16
    # 16 x 16 blocks as four 8 x 8 transposes, ordered so that each 64-byte line of src and of dst is used whole
    # while it is in L1: dst rows 1 KB apart (256 rows) fall into only 4 of L1's 64 sets, so in 8-row strips a
    # line of dst was evicted between its two half writes (2048 rows x N=8192, 1 thread, rows/rows fwd+bwd
    # 0.85x the time; 256 rows staged from L2: 0.33 -> 0.14 ns per element)
    for hh in range(0, n16, 16):  # a block of rows at a time: its lines of src are read through in one go
        for j in range(0, m16, 16):
            _transpose8(sbase + j * isz + hh * sh, sh, dbase + j * ds + hh * isz, ds, dst)
            _transpose8(sbase + (j + 8) * isz + hh * sh, sh, dbase + (j + 8) * ds + hh * isz, ds, dst)
            _transpose8(sbase + j * isz + (hh + 8) * sh, sh, dbase + j * ds + (hh + 8) * isz, ds, dst)
            _transpose8(sbase + (j + 8) * isz + (hh + 8) * sh, sh, dbase + (j + 8) * ds + (hh + 8) * isz, ds, dst)
        for j in range(m16, m8, 8):
            _transpose8(sbase + j * isz + hh * sh, sh, dbase + j * ds + hh * isz, ds, dst)
            _transpose8(sbase + j * isz + (hh + 8) * sh, sh, dbase + j * ds + (hh + 8) * isz, ds, dst)
    for hh in range(n16, n8, 8):
        for j in range(0, m8, 8):
            _transpose8(sbase + j * isz + hh * sh, sh, dbase + j * ds + hh * isz, ds, dst)
    for j in range(m8):
        for h in range(n8, nh):
            dst[q0 + step * j, h] = src[b, p0 + j, h0 + h]
    for j in range(m8, m):
        for h in range(nh):
            dst[q0 + step * j, h] = src[b, p0 + j, h0 + h]


@njit(cache=True)
def _rows_unit(a):
    """Whether the (B, N, H) array ``a`` has adjacent positions (contiguous rows, or any row stride): then
    ``_stage_in_rows`` reads 8 positions of a row as one vector."""
    return a.strides[1] == a.itemsize and a.strides[2] >= 8 * a.itemsize


@njit(cache=True)
def _rows_contiguous(a):
    """Whether the (B, N, H) array ``a`` steps positions faster than rows: a row's positions lie together, so
    a tile is best copied row by row (a transposed view of contiguous (B, H, N) rows)."""
    return a.strides[1] < a.strides[2]


@njit(cache=True, error_model="numpy", fastmath=_FASTMATH)
def _stage_in_reversed_planes(src, b, p0, p1, h0, nh, dst, q0):
    """dst[q0 - j, h] = src[b, p0 + j, h0 + h] for positions p0..p1-1: ascending reads, reversed slots."""
    if h0 < 0 or nh < 0:  # never true; lets LLVM vectorise h0 + h (see the module docstring)
        raise ValueError("negative row offset")
    for j in range(p1 - p0):
        for h in range(nh):
            dst[q0 - j, h] = src[b, p0 + j, h0 + h]


@njit(cache=True, error_model="numpy", fastmath=_FASTMATH)
def _stage_in_reversed_any(src, b, p0, p1, h0, nh, dst, q0):
    """dst[q0 - j, h] = src[b, p0 + j, h0 + h] for positions p0..p1-1: ascending reads, reversed slots."""
    if h0 < 0 or nh < 0 or p0 < 0 or q0 - (p1 - p0) + 1 < 0:  # never true; no wraparound selects
        raise ValueError("negative offset")
    if _rows_unit(src):
        _stage_in_rows(src, b, p0, p1, h0, nh, dst, q0, -1)
    elif _rows_contiguous(src):
        m = p1 - p0
        for qb in range(q0 - m + 1, q0 + 1, LINE):
            qe = min(qb + LINE, q0 + 1)
            for h in range(nh):
                for q in range(qb, qe):
                    dst[q, h] = src[b, p0 + q0 - q, h0 + h]
    else:
        for j in range(p1 - p0):
            for h in range(nh):
                dst[q0 - j, h] = src[b, p0 + j, h0 + h]


@njit(cache=True, error_model="numpy", fastmath=_FASTMATH)
def _stage_out_reversed_planes(src, q0, dst, b, p0, p1, h0, nh):
    """dst[b, p0 + j, h0 + h] = src[q0 - j, h] for positions p0..p1-1 (ascending writes)."""
    if h0 < 0 or nh < 0:  # never true; lets LLVM vectorise h0 + h (see the module docstring)
        raise ValueError("negative row offset")
    for j in range(p1 - p0):
        for h in range(nh):
            dst[b, p0 + j, h0 + h] = src[q0 - j, h]


@njit(cache=True, error_model="numpy", fastmath=_FASTMATH)
def _stage_out_reversed_any(src, q0, dst, b, p0, p1, h0, nh):
    """dst[b, p0 + j, h0 + h] = src[q0 - j, h] for positions p0..p1-1 (ascending writes)."""
    if h0 < 0 or nh < 0 or p0 < 0 or q0 - (p1 - p0) + 1 < 0:  # never true; no wraparound selects
        raise ValueError("negative offset")
    if _rows_contiguous(dst):
        m = p1 - p0
        for qb in range(q0 - m + 1, q0 + 1, LINE):
            qe = min(qb + LINE, q0 + 1)
            for h in range(nh):
                for q in range(qb, qe):
                    dst[b, p0 + q0 - q, h0 + h] = src[q, h]
    else:
        for j in range(p1 - p0):
            for h in range(nh):
                dst[b, p0 + j, h0 + h] = src[q0 - j, h]


def _left_sweep(v, k, z, out_r, out_i, b, h0, nh, store_pivot):
    """Left pivots L_i = a_i - k_{i-1}/L_{i-1} of rows h0..h0+nh of batch b; writes 1/L or L itself.

    Chosen when numba compiles the caller: ``_left_sweep_planes`` when every array is C-contiguous planes,
    else ``_left_sweep_staged``.
    """
    raise NotImplementedError("a numba overload: call it from compiled code")


def _stage_in_reversed(src, b, p0, p1, h0, nh, dst, q0):
    """dst[q0 - j, h] = src[b, p0 + j, h0 + h] for positions p0..p1-1 (``_planes`` or ``_any`` by src's layout)."""
    raise NotImplementedError("a numba overload: call it from compiled code")


def _stage_out_reversed(src, q0, dst, b, p0, p1, h0, nh):
    """dst[b, p0 + j, h0 + h] = src[q0 - j, h] for positions p0..p1-1 (``_planes`` or ``_any`` by dst's layout)."""
    raise NotImplementedError("a numba overload: call it from compiled code")


# C-contiguous planes (a mixer's layout) keep the direct code; other layouts get the staged copies. Decided by
# the arrays' numba types, so each compiled specialisation contains only one of them.
@overload(_left_sweep, jit_options=_JIT)
def _left_sweep_for(v, k, z, out_r, out_i, b, h0, nh, store_pivot):
    planes = all(a.layout == "C" for a in (v, k, out_r, out_i))
    return (_left_sweep_planes if planes else _left_sweep_staged).py_func


@overload(_stage_in_reversed, jit_options=_JIT)
def _stage_in_reversed_for(src, b, p0, p1, h0, nh, dst, q0):
    return (_stage_in_reversed_planes if src.layout == "C" else _stage_in_reversed_any).py_func


@overload(_stage_out_reversed, jit_options=_JIT)
def _stage_out_reversed_for(src, q0, dst, b, p0, p1, h0, nh):
    return (_stage_out_reversed_planes if dst.layout == "C" else _stage_out_reversed_any).py_func


@njit(cache=True, error_model="numpy", fastmath=_FASTMATH)
def _causal_adjoint(k, yr, yi, gyr, gyi, dv, dk, dz, b, h0, nh):
    """Right-to-left adjoint lam_i = (k_i lam_{i+1} - g_i) / L_i^2 with g = gyr - i*gyi (1/L_i = y_i).

    Written as a loop over descending positions, the same compiled code measured 4-5x slower on this
    machine than when run over ascending positions, even with all data in L1. So the sweep walks chunks
    of CHUNK positions from the end, copies each chunk into scratch in reversed order (reading memory
    ascending), runs the recurrence over ascending scratch slots and writes results back ascending.
    The recurrence loop only updates lam; dk and the z-gradient sum are separate loops so that each
    stays simple enough for LLVM to vectorise across rows.
    """
    if h0 < 0 or nh < 0:  # never true; lets LLVM vectorise h0 + h (see the module docstring)
        raise ValueError("negative row offset")
    n = yr.shape[1]
    dt = yr.dtype
    # Slot q of a chunk [c0, c1) holds position c1 - 1 - q (y also has slot m = c1 - c0 for c0 - 1).
    # Rows output gradients or k: chunks of ROWS_CHUNK positions (longer runs per row) where the seven tiles
    # still fit in L2 (up to ROW_BLOCK rows)
    ch = ROWS_CHUNK if nh <= ROW_BLOCK and (_rows_unit(gyr) or _rows_unit(k)) else CHUNK
    s_yr = np.empty((ch + 1, nh), dt)
    s_yi = np.empty((ch + 1, nh), dt)
    s_gr = np.empty((ch, nh), dt)
    s_gi = np.empty((ch, nh), dt)
    s_k = np.empty((ch, nh), dt)
    s_dv = np.empty((ch, nh), dt)
    s_dk = np.empty((ch, nh), dt)  # slot q holds dk at position c1 - 2 - q
    lam_r = np.zeros(nh, dt)  # lam_{i+1}, 0 past the end
    lam_i = np.zeros(nh, dt)
    part_r = np.zeros(nh, dt)  # sum of lam over the current chunk, in working precision
    part_i = np.zeros(nh, dt)
    acc_r = np.zeros(nh, np.float64)
    acc_i = np.zeros(nh, np.float64)
    for c0 in range(((n - 1) // ch) * ch, -1, -ch):
        c1 = min(c0 + ch, n)
        m = c1 - c0
        lo = max(c0 - 1, 0)
        _stage_in_reversed(yr, b, lo, c1, h0, nh, s_yr, c1 - 1 - lo)
        _stage_in_reversed(yi, b, lo, c1, h0, nh, s_yi, c1 - 1 - lo)
        _stage_in_reversed(gyr, b, c0, c1, h0, nh, s_gr, m - 1)
        _stage_in_reversed(gyi, b, c0, c1, h0, nh, s_gi, m - 1)
        _stage_in_reversed(k, b, c0, min(c1, n - 1), h0, nh, s_k, m - 1)
        nxt = max(c0 - ch, 0)  # the next chunk (towards position 0), while this one is computed
        _prefetch_rows(gyr, b, nxt, c0, h0, nh)
        _prefetch_rows(gyi, b, nxt, c0, h0, nh)
        _prefetch_rows(k, b, nxt, min(c0, n - 1), h0, nh)
        for q in range(m):
            if c1 - 1 - q == n - 1:  # no k_{n-1}: lam_{n-1} = -g_{n-1} y_{n-1}^2
                for h in range(nh):
                    a = s_yr[q, h]
                    c = s_yi[q, h]
                    sq_r = a * a - c * c
                    sq_i = a * c + a * c
                    cr = -s_gr[q, h]
                    ci = s_gi[q, h]
                    lam_r[h] = cr * sq_r - ci * sq_i
                    lam_i[h] = cr * sq_i + ci * sq_r
            else:
                for h in range(nh):
                    a = s_yr[q, h]
                    c = s_yi[q, h]
                    sq_r = a * a - c * c
                    sq_i = a * c + a * c
                    kk = s_k[q, h]
                    cr = kk * lam_r[h] - s_gr[q, h]  # k_i lam_{i+1} - g_i
                    ci = kk * lam_i[h] + s_gi[q, h]
                    lam_r[h] = cr * sq_r - ci * sq_i
                    lam_i[h] = cr * sq_i + ci * sq_r
            for h in range(nh):  # dk_{i-1} = Re(-lam_i / L_{i-1}) = Re(-lam_i * y_{i-1})
                s_dv[q, h] = lam_r[h]
                s_dk[q, h] = lam_i[h] * s_yi[q + 1, h] - lam_r[h] * s_yr[q + 1, h]
                part_r[h] += lam_r[h]
                part_i[h] += lam_i[h]
            if ch != CHUNK and (c1 - 1 - q) % CHUNK == 0:  # long chunks: sums over the same CHUNK positions
                _flush(part_r, part_i, acc_r, acc_i, nh)
        if ch == CHUNK:
            _flush(part_r, part_i, acc_r, acc_i, nh)
        _stage_out_reversed(s_dv, m - 1, dv, b, c0, c1, h0, nh)
        _stage_out_reversed(s_dk, c1 - 2 - lo, dk, b, lo, c1 - 1, h0, nh)
    for h in range(nh):
        dz[b, h0 + h, 0] = -acc_r[h]  # grad_z = -conj(sum lam)
        dz[b, h0 + h, 1] = acc_i[h]


@njit(cache=True, error_model="numpy", fastmath=_FASTMATH)
def _right_sweep(v, k, z, pl_r, pl_i, yr, yi, yRr, yRi, b, h0, nh):
    """Right pivots R_i = a_i - k_i/R_{i+1}, then y_i = 1/(L_i - k_i/R_{i+1}); turns stored L into 1/L."""
    if h0 < 0 or nh < 0:  # never true; lets LLVM vectorise h0 + h (see the module docstring)
        raise ValueError("negative row offset")
    n = v.shape[1]
    dt = v.dtype
    nxt_r = np.zeros(ROW_BLOCK, dt)  # k_i / R_{i+1}, 0 past the end
    nxt_i = np.zeros(ROW_BLOCK, dt)
    shift_r = np.empty(ROW_BLOCK, dt)
    shift_i = np.empty(ROW_BLOCK, dt)
    for h in range(nh):
        shift_r[h] = z[b, h0 + h, 0]
        shift_i[h] = -z[b, h0 + h, 1]
    for i in range(n - 1, -1, -1):
        for h in range(nh):  # y_i = 1/(L_i - k_i/R_{i+1}) and 1/L_i, from the stored L_i
            cr = nxt_r[h]
            ci = nxt_i[h]
            lr = pl_r[b, i, h0 + h]
            li = pl_i[b, i, h0 + h]
            dr = lr - cr
            di = li - ci
            d = dr * dr + di * di
            yr[b, i, h0 + h] = dr / d
            yi[b, i, h0 + h] = -di / d
            d = lr * lr + li * li
            pl_r[b, i, h0 + h] = lr / d
            pl_i[b, i, h0 + h] = -li / d
        for h in range(nh):  # R_i = a_i - k_i/R_{i+1}
            rr = v[b, i, h0 + h] - shift_r[h] - nxt_r[h]
            ri = shift_i[h] - nxt_i[h]
            d = rr * rr + ri * ri
            a = rr / d
            c = -ri / d
            yRr[b, i, h0 + h] = a
            yRi[b, i, h0 + h] = c
            nxt_r[h] = a
            nxt_i[h] = c
        if i > 0:
            for h in range(nh):
                kk = k[b, i - 1, h0 + h]
                nxt_r[h] = kk * nxt_r[h]
                nxt_i[h] = kk * nxt_i[h]


@njit(cache=True, error_model="numpy", fastmath=_FASTMATH)
def _adjoint_seed(yr, yi, gyr, gyi, b, i, h0, nh, mu_r, mu_i):
    """mu = -g y^2 at position i: the adjoint of D_i = L_i + R_i - a_i, with g = gyr - i*gyi."""
    if h0 < 0 or nh < 0:  # never true; lets LLVM vectorise h0 + h (see the module docstring)
        raise ValueError("negative row offset")
    for h in range(nh):
        a = yr[b, i, h0 + h]
        c = yi[b, i, h0 + h]
        sq_r = a * a - c * c
        sq_i = a * c + a * c
        gr = gyr[b, i, h0 + h]
        gi = -gyi[b, i, h0 + h]
        mu_r[h] = gi * sq_i - gr * sq_r
        mu_i[h] = -(gr * sq_i + gi * sq_r)


@njit(cache=True, error_model="numpy", fastmath=_FASTMATH)
def _bidir_right_adjoint(k, yr, yi, yRr, yRi, gyr, gyi, lamRr, lamRi, b, h0, nh):
    """Left to right: lamR_i = mu_i + k_{i-1}/R_i^2 lamR_{i-1}; writes lamR."""
    if h0 < 0 or nh < 0:  # never true; lets LLVM vectorise h0 + h (see the module docstring)
        raise ValueError("negative row offset")
    n = yr.shape[1]
    dt = yr.dtype
    mu_r = np.empty(ROW_BLOCK, dt)
    mu_i = np.empty(ROW_BLOCK, dt)
    lam_r = np.zeros(ROW_BLOCK, dt)  # lamR_{i-1}
    lam_i = np.zeros(ROW_BLOCK, dt)
    for i in range(n):
        _adjoint_seed(yr, yi, gyr, gyi, b, i, h0, nh, mu_r, mu_i)
        if i == 0:
            for h in range(nh):
                lam_r[h] = mu_r[h]
                lam_i[h] = mu_i[h]
        else:
            for h in range(nh):
                a = yRr[b, i, h0 + h]
                c = yRi[b, i, h0 + h]
                kk = k[b, i - 1, h0 + h]
                cr = kk * (a * a - c * c)
                ci = kk * (a * c + a * c)
                pr = lam_r[h]
                pi = lam_i[h]
                lam_r[h] = mu_r[h] + cr * pr - ci * pi
                lam_i[h] = mu_i[h] + cr * pi + ci * pr
        for h in range(nh):
            lamRr[b, i, h0 + h] = lam_r[h]
            lamRi[b, i, h0 + h] = lam_i[h]


@njit(cache=True, error_model="numpy", fastmath=_FASTMATH)
def _bidir_left_adjoint(k, yr, yi, yLr, yLi, yRr, yRi, gyr, gyi, lamRr, lamRi, dv, dk, dz, b, h0, nh):
    """Right to left: lamL_i = mu_i + k_i/L_i^2 lamL_{i+1}; da_i = lamL_i + lamR_i - mu_i;
    dk_i = Re(-lamL_{i+1}/L_i - lamR_i/R_{i+1})."""
    if h0 < 0 or nh < 0:  # never true; lets LLVM vectorise h0 + h (see the module docstring)
        raise ValueError("negative row offset")
    n = yr.shape[1]
    dt = yr.dtype
    mu_r = np.empty(ROW_BLOCK, dt)
    mu_i = np.empty(ROW_BLOCK, dt)
    lam_r = np.zeros(ROW_BLOCK, dt)  # lamL_{i+1}
    lam_i = np.zeros(ROW_BLOCK, dt)
    part_r = np.zeros(ROW_BLOCK, dt)
    part_i = np.zeros(ROW_BLOCK, dt)
    acc_r = np.zeros(ROW_BLOCK, np.float64)
    acc_i = np.zeros(ROW_BLOCK, np.float64)
    for i in range(n - 1, -1, -1):
        _adjoint_seed(yr, yi, gyr, gyi, b, i, h0, nh, mu_r, mu_i)
        if i == n - 1:
            for h in range(nh):
                lam_r[h] = mu_r[h]
                lam_i[h] = mu_i[h]
        else:
            for h in range(nh):  # dk_i uses lamL_{i+1}, still in lam before the update below
                pr = lam_r[h]
                pi = lam_i[h]
                a = yLr[b, i, h0 + h]
                c = yLi[b, i, h0 + h]
                mr = lamRr[b, i, h0 + h]
                mi = lamRi[b, i, h0 + h]
                dk[b, i, h0 + h] = (pi * c - pr * a) + (mi * yRi[b, i + 1, h0 + h] - mr * yRr[b, i + 1, h0 + h])
            for h in range(nh):
                a = yLr[b, i, h0 + h]
                c = yLi[b, i, h0 + h]
                kk = k[b, i, h0 + h]
                cr = kk * (a * a - c * c)
                ci = kk * (a * c + a * c)
                pr = lam_r[h]
                pi = lam_i[h]
                lam_r[h] = mu_r[h] + cr * pr - ci * pi
                lam_i[h] = mu_i[h] + cr * pi + ci * pr
        for h in range(nh):
            dar = lam_r[h] + lamRr[b, i, h0 + h] - mu_r[h]
            dai = lam_i[h] + lamRi[b, i, h0 + h] - mu_i[h]
            dv[b, i, h0 + h] = dar
            part_r[h] += dar
            part_i[h] += dai
        if (n - i) % CHUNK == 0 or i == 0:
            _flush(part_r, part_i, acc_r, acc_i, nh)
    for h in range(nh):
        dz[b, h0 + h, 0] = -acc_r[h]
        dz[b, h0 + h, 1] = acc_i[h]


def _causal_forward(v, k, z, yr, yi, rb):
    """v, yr, yi: (B, N, H); k: (B, N-1, H), any strides; z: (B, H, 2) real and imaginary parts (C-contiguous). One dtype.
    ``rb``: rows per job (``_row_block``)."""
    nb, _, nh = v.shape
    blocks = (nh + rb - 1) // rb
    for job in prange(nb * blocks):
        b = job // blocks
        h0 = (job % blocks) * rb
        _left_sweep(v, k, z, yr, yi, b, h0, min(rb, nh - h0), False)


def _causal_backward(k, yr, yi, gyr, gyi, dv, dk, dz, rb):
    nb, _, nh = yr.shape
    blocks = (nh + rb - 1) // rb
    for job in prange(nb * blocks):
        b = job // blocks
        h0 = (job % blocks) * rb
        _causal_adjoint(k, yr, yi, gyr, gyi, dv, dk, dz, b, h0, min(rb, nh - h0))


def _bidirectional_forward(v, k, z, yr, yi, yLr, yLi, yRr, yRi):
    nb, _, nh = v.shape
    blocks = (nh + ROW_BLOCK - 1) // ROW_BLOCK
    for job in prange(nb * blocks):
        b = job // blocks
        h0 = (job % blocks) * ROW_BLOCK
        nr = min(ROW_BLOCK, nh - h0)
        _left_sweep(v, k, z, yLr, yLi, b, h0, nr, True)
        _right_sweep(v, k, z, yLr, yLi, yr, yi, yRr, yRi, b, h0, nr)


def _bidirectional_backward(k, yr, yi, yLr, yLi, yRr, yRi, gyr, gyi, lamRr, lamRi, dv, dk, dz):
    nb, _, nh = yr.shape
    blocks = (nh + ROW_BLOCK - 1) // ROW_BLOCK
    for job in prange(nb * blocks):
        b = job // blocks
        h0 = (job % blocks) * ROW_BLOCK
        nr = min(ROW_BLOCK, nh - h0)
        _bidir_right_adjoint(k, yr, yi, yRr, yRi, gyr, gyi, lamRr, lamRi, b, h0, nr)
        _bidir_left_adjoint(k, yr, yi, yLr, yLi, yRr, yRi, gyr, gyi, lamRr, lamRi, dv, dk, dz, b, h0, nr)


def _compile(fn, parallel):
    # A copy with its own qualified name: numba's on-disk cache is keyed by name and source line, not
    # by the ``parallel`` flag, so the two variants must not share a name.
    variant = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
    variant.__qualname__ = f"{fn.__qualname__}_{'parallel' if parallel else 'serial'}"
    return njit(parallel=parallel, cache=True, error_model="numpy", fastmath=_FASTMATH)(variant)


# Each driver exists twice: threaded (prange over row blocks) for large inputs, serial for small ones,
# where waking the thread pool costs more than it saves (and much more on an oversubscribed machine).
KERNELS = {
    name: {parallel: _compile(fn, parallel) for parallel in (False, True)}
    for name, fn in (("causal_forward", _causal_forward), ("causal_backward", _causal_backward),
                     ("bidirectional_forward", _bidirectional_forward),
                     ("bidirectional_backward", _bidirectional_backward))
}
PARALLEL_MIN_ELEMENTS = 1 << 19  # rows * N below which the serial driver runs (measured crossover, 2 cores: 256 rows, N 1024-2048)


def _row_block(batches: int, rows: int, threads: int) -> int:
    """Rows per job of the causal kernels: a batch's rows in as few jobs of at most ROW_BLOCK_MAX as balance
    them, split further (down to ROW_BLOCK) while the jobs would leave one of ``threads`` idle."""
    jobs = -(-rows // ROW_BLOCK_MAX)
    while threads > 1 and batches * jobs < 2 * threads and -(-rows // (jobs + 1)) >= ROW_BLOCK:
        jobs += 1
    rb = -(-rows // jobs)
    return max(1, min(rows, -(-rb // 8) * 8))  # whole vectors per job where the rows allow


def _kernel(name: str, v: Tensor):
    """The threaded or serial driver for ``v``, rows (B, H, N) or planes (B, N, H) (``name`` says which), and
    the rows per job it takes (causal kernels; None for the bidirectional ones, which use ROW_BLOCK)."""
    threads = max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))
    causal = name.startswith("causal")
    rows = v.shape[1] if causal else v.shape[2]
    big = v.numel() >= PARALLEL_MIN_ELEMENTS and threads > 1
    rb = _row_block(v.shape[0], rows, threads if big else 1) if causal else ROW_BLOCK
    parallel = big and v.shape[0] * -(-rows // max(rb, 1)) > 1
    if parallel:
        numba.set_num_threads(threads)  # follow torch's thread setting so the two agree
    return KERNELS[name][parallel], (rb if causal else None)


def _np(t: Tensor) -> np.ndarray:
    return t.detach().numpy()


def _planes(rows: Tensor) -> np.ndarray:
    """The (B, N, H) plane view of (B, H, N) rows, any strides: the causal kernels stage tiles through cache."""
    return _np(rows.transpose(1, 2))


def _empty_planes(b: int, h: int, n: int, dtype: torch.dtype) -> Tensor:
    """Empty (B, H, n) rows that are the transpose of contiguous (B, n, H) planes, in reusable memory
    (``bkexp.ops.workspace``: numpy's huge pages, large ones pooled once nothing holds them)."""
    np_dtype = np.float64 if dtype == torch.float64 else np.float32
    return torch.from_numpy(workspace.empty((b, n, h), np_dtype)).transpose(1, 2)


class _CpuBKCore(torch.autograd.Function):
    """Rows (B, H, N) in and out. Causal mode reads inputs and output gradients of any layout in place (the
    kernels copy tiles through cache) and returns outputs and gradients as transposed planes; bidirectional mode works on
    position-major planes (B, N, H) (a free transpose for a mixer's projections, one gather otherwise).
    Layout changes happen in here, where they make no autograd nodes."""

    @staticmethod
    def forward(ctx, v: Tensor, k: Tensor, z: Tensor, causal: bool):  # type: ignore[override]
        z2 = torch.view_as_real(z.resolve_conj()).contiguous()  # (B, H, 2): no copy for a contiguous z
        ctx.causal = causal
        ctx.z_dtype = z.dtype
        if causal:
            b, h, n = v.shape
            # Outputs and gradients are planes whatever the inputs' layout (as for a mixer): a tile of rows costs
            # a scalar transposing copy, so writing rows too measured 1.2-1.6x slower than reading them alone.
            yr = _empty_planes(b, h, n, v.dtype)
            yi = _empty_planes(b, h, n, v.dtype)
            kernel, rb = _kernel("causal_forward", v)
            kernel(_planes(v), _planes(k), _np(z2), _planes(yr), _planes(yi), rb)
            ctx.save_for_backward(k, yr, yi)
            return yr, yi
        v = to_planes(v)
        k = to_planes(k)
        yr = torch.empty_like(v)
        yi = torch.empty_like(v)
        planes = [torch.empty_like(v) for _ in range(4)]  # 1/L and 1/R, real and imaginary
        _kernel("bidirectional_forward", v)[0](_np(v), _np(k), _np(z2), _np(yr), _np(yi), *map(_np, planes))
        ctx.save_for_backward(k, yr, yi, *planes)
        return yr.transpose(1, 2), yi.transpose(1, 2)

    @staticmethod
    def backward(ctx, grad_re: Tensor, grad_im: Tensor):  # type: ignore[override]
        if ctx.causal:
            k, yr, yi = ctx.saved_tensors
            (b, h, n), dt = yr.shape, yr.dtype
            dv = _empty_planes(b, h, n, dt)
            dk = _empty_planes(b, h, n - 1, dt)
            dz = torch.empty(b, h, 2, dtype=torch.float64)
            kernel, rb = _kernel("causal_backward", yr)
            kernel(_planes(k), _planes(yr), _planes(yi), _planes(grad_re.to(dt)), _planes(grad_im.to(dt)),
                   _planes(dv), _planes(dk), _np(dz), rb)
            return dv, dk, torch.view_as_complex(dz).to(ctx.z_dtype), None
        k, yr, yi, *planes = ctx.saved_tensors
        gyr = to_planes(grad_re.to(yr.dtype))
        gyi = to_planes(grad_im.to(yr.dtype))
        dv = torch.empty_like(yr)
        dk = torch.empty_like(k)
        dz = torch.empty(yr.shape[0], yr.shape[2], 2, dtype=torch.float64)
        lam_right = [torch.empty_like(yr), torch.empty_like(yr)]
        _kernel("bidirectional_backward", yr)[0](_np(k), _np(yr), _np(yi), *map(_np, planes), _np(gyr), _np(gyi),
                                              *map(_np, lam_right), _np(dv), _np(dk), _np(dz))
        grad_z = torch.view_as_complex(dz).to(ctx.z_dtype)
        return dv.transpose(1, 2), dk.transpose(1, 2), grad_z, None


def bk_core_cpu(v: Tensor, k: Tensor, z: Tensor, causal: bool = True) -> tuple[Tensor, Tensor]:
    """Numba kernels on rows v (B, H, N), k (B, H, N-1) float32/float64 and complex z (B, H); see ``to_planes``."""
    return _CpuBKCore.apply(v, k, z, causal)
