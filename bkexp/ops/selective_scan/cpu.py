"""Compiled CPU selective scan (numba): one fused forward kernel and its exact adjoint, checkpointed states.

The whole op runs in two kernels: the forward computes ``delta' = softplus(delta + delta_bias)``, the scan
``h_t = exp(delta'_t A) h_{t-1} + delta'_t u_t B_t``, ``y_t = <h_t, C_t>``, the ``D`` skip and the
``silu(z)`` gate in one pass over the positions; the backward returns the gradients of every input
(``u``, ``delta``, ``A``, ``B``, ``C``, ``D``, ``z``, ``delta_bias``) from one reverse pass. Nothing
O(b·d·l) is left to PyTorch but the layout bookkeeping, so a Mamba layer pays for no elementwise passes
and no intermediate activations between its projections and its output gate.

Layout and parallelism: channels are cut into blocks of up to ``CHANNEL_BLOCK`` channels that share one
B/C group; each thread steps whole blocks through time. Per-position vectors (``u``, ``delta``, ``z``,
gradients) are passed position-major ``(batch, l, d)`` and contiguous -- which is how the Mamba mixer holds them,
so its ``(b, d, l)`` views reach the kernel without a copy; any other layout (e.g. ``z`` as a strided half of a
quantized projection's output) is copied into it once, so each dtype compiles one signature of each kernel
(~13 s each, child start-up included, on a 2-core VM) -- and the block's state is ``(n, channels)``, so every
inner loop runs over contiguous channels and vectorises, including the decays ``exp(delta A)`` (``_exp``,
computed in registers inside the scan's loops), the gate ``sigmoid(z)`` and ``softplus``, which use a
vectorisable exp and log (``_exp_into``, ``_softplus_into``; scalar libm calls would cost most of the time
otherwise).

Memory stays O(b·d·l): the forward stores the state only every ``CHECKPOINT`` positions (plus ``delta'``
when it differs from ``delta`` and the pre-gate output when there is a gate); the backward walks each block from the last chunk to the first,
recomputes that chunk's states and decays into a small scratch buffer from its checkpoint, then runs the
adjoint recurrence ``lam_t = C_t g_t + exp(delta'_{t+1} A) lam_{t+1}`` through it (the gate's gradient
reads the pre-gate output, which the forward stores). Gradients that sum over channels (B, C) or positions (A, D,
delta_bias) are accumulated per block and reduced afterwards, so no two threads write the same element.

``B`` and ``C`` reach the kernels as ``(batch or 1, groups, l or 1, n)`` (channel ``c`` reads group
``c // group_size``); that covers shared ``(b, n, l)``, grouped ``(b, g, n, l)`` and time-invariant
``(d, n)`` inputs (the last as d groups of one channel: correct, but it does not vectorise).
Hot loops avoid numeric literals so float32 stays float32 (numba promotes ``float32 op literal`` to
float64); float64 inputs get their own specialisation with libm exp and log1p. ``cache=True`` keeps the
compiled code in ``__pycache__`` so only the first use compiles. Both kernels are compiled for 512-bit vectors
where the CPU has them (``bkexp.ops.vector_width``: 0.86-0.94x the op's time at 1 thread).
"""

from __future__ import annotations

import math
import warnings

import numba
import numpy as np
import torch
from numba import njit, prange, types
from numba.core.errors import NumbaIRAssumptionWarning
from numba.extending import overload
from torch import Tensor
from torch.autograd.function import once_differentiable

from bkexp.ops.numba_cache import from_cache
from bkexp.ops.vector_width import wide_vectors

CHECKPOINT = 32  # positions between stored states; backward scratch is 2 x CHECKPOINT x n x block width
CHANNEL_BLOCK = 512  # most channels stepped together by one thread (the vectorised inner dimension): each
# position costs a fixed overhead per block (views, B/C loads), so wider is faster -- measured at d=480, n=16,
# 1 thread, fwd+bwd: 32 channels 1.4x the time of 128, 128 1.2x the time of 480 (one block per sequence).
# Blocks are narrowed only to give every thread one (_block_width).
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


@overload(_exp_into, jit_options={"fastmath": {"nsz", "arcp", "contract", "afn"}, "error_model": "numpy"})
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


def _exp(x):
    """``exp(x)`` of one float (numba only): ``_exp_into``'s float32 function for one element (inlined, it takes
    the caller's fast-math flags: in the scan kernels, with reassociation, its error is below 4e-7)."""
    raise NotImplementedError("_exp is compiled by numba; call it from a jitted function")


_EXP_BIAS_F = _F32(127.0)
_TWO_23 = _F32(2.0 ** 23)


# The scan computes its decays in the loops that use them, all in registers: the power of two is built as
# the float (k + 127) * 2^23 (exact: k + 127 is an integer in [1, 254]), converted to int32 and reinterpreted
# as a float (a scalar view is a register bitcast), so no pass writes exponents or decays to memory and
# reads them back. float64 takes libm exp.
@overload(_exp, inline="always", jit_options={"fastmath": {"nsz", "arcp", "contract", "afn"}})
def _exp_impl(x):
    if x == types.float32:
        def exp_float32(x):
            s = x * _LOG2E
            exponent = np.floor(min(max(s, _MIN_EXP2), _MAX_EXP2) + _HALF)
            r = x - exponent * _LN2_HI
            r = r - exponent * _LN2_LO
            poly = _ONE + r * (_ONE + r * (_P2 + r * (_P3 + r * (_P4 + r * (_P5 + r * (_P6 + r * _P7))))))
            scale = np.int32((exponent + _EXP_BIAS_F) * _TWO_23).view(np.float32)
            value = poly * scale
            value = _ZERO if s < _MIN_EXP2 else value
            # NaN in, NaN out without a test: r, the polynomial and value are NaN, and both tests are false.
            return _INF if s > _MAX_EXP2 else value
        return exp_float32

    def exp_libm(x):
        return math.exp(x)
    return exp_libm


# softplus(x) = log1p(exp(x)) = x for x > 20 (PyTorch's threshold). log1p(y) = log(u) * y / (u - 1) with
# u = fl(1 + y) (exact to a few ulps because u - 1 is exact), log(u) = e ln 2 + log(m) for u = m 2^e,
# m in [sqrt(1/2), sqrt(2)), log(m) = 2 atanh(s), s = (m - 1) / (m + 1), |s| < 0.172, by its series to s^9
# (truncation < 1e-9 relative).
_SOFTPLUS_THRESHOLD = _F32(20.0)
_SQRT2 = _F32(math.sqrt(2.0))
_T3, _T5, _T7, _T9 = (_F32(1.0 / k) for k in (3, 5, 7, 9))
_MANTISSA_MASK = np.int32((1 << 23) - 1)
_ONE_BITS = np.int32(127 << 23)


def _softplus_into(x, out, y, bits, mantissa):
    """``out[i] = softplus(x[i])`` for 1-d arrays; ``y``, ``bits``, ``mantissa`` are scratch of x's size
    (``y`` of x's dtype, the others int32) (numba only)."""
    raise NotImplementedError("_softplus_into is compiled by numba; call it from a jitted function")


@overload(_softplus_into, jit_options={"fastmath": {"nsz", "arcp", "contract", "afn"}})
def _softplus_into_impl(x, out, y, bits, mantissa):
    if x.dtype == types.float32:
        def softplus_float32(x, out, y, bits, mantissa):
            _exp_into(x, y, bits)
            for i in range(x.size):
                out[i] = _ONE + y[i]  # u, read back as bits below
            u_bits = out.view(np.int32)
            for i in range(x.size):
                bits[i] = (u_bits[i] >> _MANTISSA_BITS) - _EXP_BIAS
                mantissa[i] = (u_bits[i] & _MANTISSA_MASK) | _ONE_BITS
            m_float = mantissa.view(np.float32)
            for i in range(x.size):
                u = out[i]
                m = m_float[i]
                e = np.float32(bits[i])
                big = m > _SQRT2
                m = m * _HALF if big else m
                e = e + _ONE if big else e
                s = (m - _ONE) / (m + _ONE)
                s2 = s * s
                log_m = (s + s) * (_ONE + s2 * (_T3 + s2 * (_T5 + s2 * (_T7 + s2 * _T9))))
                log_u = e * _LN2_HI + (e * _LN2_LO + log_m)
                value = y[i] if u == _ONE else log_u * (y[i] / (u - _ONE))
                value = x[i] if x[i] > _SOFTPLUS_THRESHOLD else value
                out[i] = x[i] if x[i] != x[i] else value  # NaN in, NaN out
        return softplus_float32

    def softplus_libm(x, out, y, bits, mantissa):
        for i in range(x.size):
            out[i] = x[i] if x[i] > _SOFTPLUS_THRESHOLD else math.log1p(math.exp(x[i]))
    return softplus_libm


@njit(fastmath=_FASTMATH, error_model="numpy", cache=True)
def _biased_delta(delta, ib, t0, t1, c0, c1, bias_blk, has_bias, out):
    """out = delta[ib, t0:t1, c0:c1] (+ bias_blk), flattened position by position: softplus' input for a chunk."""
    nc = c1 - c0
    for t in range(t0, t1):
        d_in = delta[ib, t, c0:c1]
        row = out[(t - t0) * nc:(t - t0 + 1) * nc]
        if has_bias:
            for c in range(nc):
                row[c] = d_in[c] + bias_blk[c]
        else:
            row[:] = d_in


# Row helpers for the elementwise parts: one vectorised loop each, the exp in registers, inlined into the
# kernels (as calls, they made the forward 10% slower). numba's pedantic SSA check warns once per compile
# about the exp inlined in them ("variable '_exp_impl__locals__...' is not in scope"); the code is right
# (tests against the float64 reference), so that one message is silenced.
_ROW_FASTMATH = _FASTMATH - {"reassoc"}
warnings.filterwarnings("ignore", message=r".*variable '_exp_impl__locals__", category=NumbaIRAssumptionWarning)


@njit(fastmath=_ROW_FASTMATH, error_model="numpy", cache=True, inline="always")
def _gate_row(y, z, out):
    """out = y * silu(z) = y * z / (1 + exp(-z))."""
    one = np.ones(1, y.dtype)[0]
    for c in range(y.size):
        out[c] = y[c] * (z[c] / (one + _exp(-z[c])))


@njit(fastmath=_ROW_FASTMATH, error_model="numpy", cache=True, inline="always")
def _gate_grad_row(go, z, pre, dz, g):
    """dz = go * pre * d silu(z)/dz (= sigmoid(z) (1 + z (1 - sigmoid(z)))); g = go * silu(z) (dL/dy)."""
    one = np.ones(1, go.dtype)[0]
    for c in range(go.size):
        sig = one / (one + _exp(-z[c]))
        dz[c] = go[c] * pre[c] * sig * (one + z[c] * (one - sig))
        g[c] = go[c] * (z[c] * sig)


@njit(fastmath=_ROW_FASTMATH, error_model="numpy", cache=True, inline="always")
def _softplus_grad_into(x, g):
    """g *= d softplus(x)/dx = sigmoid(x) = e / (1 + e), e = exp(x); 1 above the threshold."""
    one = np.ones(1, g.dtype)[0]
    for i in range(g.size):
        e = _exp(x[i])
        slope = e / (one + e)
        slope = one if x[i] > _SOFTPLUS_THRESHOLD else slope
        g[i] = g[i] * slope


@from_cache  # compiled in a child, run from the cache: the same code whether the cache was warm or not
@wide_vectors
@njit(parallel=True, fastmath=_FASTMATH, error_model="numpy", cache=True)
def _scan_forward(u, delta, z, A_t, Bk, Ck, D, bias, flags, group_size, width, out, dt_out, pre_out, checkpoints,
                  every, last):
    """u, delta, z, out, dt_out, pre_out: (b, l, d); A_t: (n, d); Bk, Ck: (b|1, g, l|1, n); D, bias: (d,);
    checkpoints: (b, l/every, n, d); last: (b, n, d). ``flags`` (int64): has_D, has_z, has_bias, softplus,
    save (write checkpoints; ``dt_out`` = delta' when bias or softplus transform delta; ``pre_out`` = the
    output before the gate when there is one), keep_last (write the state after the last position into
    ``last``, for decoding). Absent inputs are dummies.

    Each block walks its positions in chunks of ``every``: delta' for the whole chunk first, then the scan,
    then the gate for the whole chunk, so the elementwise parts run as long vectorised loops."""
    nb, nl, nd = u.shape
    ns = A_t.shape[0]
    has_D, has_z, has_bias, softplus, save, keep_last = (flags[0] != 0, flags[1] != 0, flags[2] != 0,
                                                          flags[3] != 0, flags[4] != 0, flags[5] != 0)
    store_dt = save and (has_bias or softplus)
    per_group = (group_size + width - 1) // width
    bsB, tsB = int(Bk.shape[0] > 1), int(Bk.shape[2] > 1)
    bsC, tsC = int(Ck.shape[0] > 1), int(Ck.shape[2] > 1)
    n_blocks = nb * (nd // group_size) * per_group
    n_ck = (nl + every - 1) // every
    for block in prange(n_blocks):
        ib, group, c0, nc = _block_span(block, nd, group_size, per_group, width)
        c1 = c0 + nc
        # Inner loops index block-local arrays with loop counters only ([k, c], not [c0 + c] or [k * nc + c]):
        # numba emits a negative-index check for any index it cannot prove non-negative, which costs a
        # select per element in the hottest loops.
        A_blk = np.empty((ns, nc), u.dtype)
        for k in range(ns):
            A_blk[k] = A_t[k, c0:c1]
        D_blk = D[c0:c1] if has_D else A_blk[0]
        bias_blk = bias[c0:c1] if has_bias else A_blk[0]
        h = np.zeros((ns, nc), u.dtype)
        bits = np.empty(every * nc, np.int32)  # scratch of _exp_into / _softplus_into
        drive = np.empty(nc, u.dtype)
        raw = np.empty(every * nc, u.dtype)  # chunk buffers, (positions, channels) flattened
        dts = np.empty(every * nc, u.dtype)
        ys = np.empty(every * nc, u.dtype)
        scratch = np.empty(every * nc, u.dtype)
        mantissa = np.empty(every * nc, np.int32)
        zero = h[0, 0]
        one = zero + _ONE
        for j in range(n_ck):
            t0 = j * every
            t1 = min(t0 + every, nl)
            m = (t1 - t0) * nc
            if save:
                for k in range(ns):
                    checkpoints[ib, j, k, c0:c1] = h[k]
            _biased_delta(delta, ib, t0, t1, c0, c1, bias_blk, has_bias, raw)
            if softplus:
                _softplus_into(raw[:m], dts[:m], scratch[:m], bits[:m], mantissa[:m])
            else:
                dts[:m] = raw[:m]
            for t in range(t0, t1):
                dt = dts[(t - t0) * nc:(t - t0 + 1) * nc]
                acc = ys[(t - t0) * nc:(t - t0 + 1) * nc]
                if store_dt:
                    dt_out[ib, t, c0:c1] = dt
                x = u[ib, t, c0:c1]
                for c in range(nc):
                    drive[c] = dt[c] * x[c]
                    acc[c] = zero
                for k in range(ns):
                    b_tk = Bk[ib * bsB, group, t * tsB, k]
                    c_tk = Ck[ib * bsC, group, t * tsC, k]
                    for c in range(nc):
                        factor = _exp(dt[c] * A_blk[k, c])
                        value = factor * h[k, c] + drive[c] * b_tk
                        h[k, c] = value
                        acc[c] += value * c_tk
                if has_D:
                    for c in range(nc):
                        acc[c] += D_blk[c] * x[c]
            for t in range(t0, t1):
                y_t = ys[(t - t0) * nc:(t - t0 + 1) * nc]
                out_t = out[ib, t, c0:c1]
                if has_z:  # out = y * silu(z) = y * z / (1 + exp(-z))
                    if save:
                        pre_out[ib, t, c0:c1] = y_t
                    _gate_row(y_t, z[ib, t, c0:c1], out_t)
                else:
                    out_t[:] = y_t
        if keep_last:
            for k in range(ns):
                last[ib, k, c0:c1] = h[k]


@from_cache  # compiled in a child, run from the cache: the same code whether the cache was warm or not
@wide_vectors
@njit(parallel=True, fastmath=_FASTMATH, error_model="numpy", cache=True)
def _scan_backward(u, delta, dt_in, z, pre, A_t, Bk, Ck, D, bias, flags, group_size, width, checkpoints, every,
                   dout, du, ddelta, dz, dA_t, dB_part, dC_part, dD_part, dbias_part):
    """Adjoint of ``_scan_forward`` (same flags; ``dt_in`` is delta' or delta itself, ``pre`` the forward's
    ``pre_out``). dA_t: (b, n, d); dB_part/dC_part: (blocks, l|1, n); dD_part, dbias_part: (b, d); all summed
    by the caller. The gate's and softplus' factors are computed per chunk, as in the forward."""
    nb, nl, nd = u.shape
    ns = A_t.shape[0]
    has_D, has_z, has_bias, softplus = flags[0] != 0, flags[1] != 0, flags[2] != 0, flags[3] != 0
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
        D_blk = D[c0:c1] if has_D else A_blk[:nc]
        bias_blk = bias[c0:c1] if has_bias else A_blk[:nc]
        states = np.empty((every + 1, ns * nc), u.dtype)  # states[r] = h_{t0 + r - 1}, flattened (n, nc)
        decays = np.empty((every, ns * nc), u.dtype)  # decays[r] = exp(delta'_{t0 + r} A)
        lam = np.zeros(ns * nc, u.dtype)  # dL/dh_t carried backwards through the decay
        dA_blk = np.zeros(ns * nc, u.dtype)
        drive = np.empty(nc, u.dtype)
        sum_du = np.empty(nc, u.dtype)
        gs = np.empty(every * nc, u.dtype)  # chunk buffers, (positions, channels) flattened: dL/dy
        zs = np.empty(every * nc, u.dtype)  # delta + bias
        dds = np.empty(every * nc, u.dtype)  # dL/d delta'
        dD_blk = np.zeros(nc, u.dtype)
        dbias_blk = np.zeros(nc, u.dtype)
        zero = lam[0]
        one = zero + _ONE
        for j in range(n_ck - 1, -1, -1):
            t0 = j * every
            t1 = min(t0 + every, nl)
            m = (t1 - t0) * nc
            for k in range(ns):
                states[0, k * nc:(k + 1) * nc] = checkpoints[ib, j, k, c0:c1]
            for t in range(t0, t1):  # recompute this chunk's decays and states from its checkpoint
                dt = dt_in[ib, t, c0:c1]
                x = u[ib, t, c0:c1]
                old = states[t - t0]
                new = states[t - t0 + 1]
                decay = decays[t - t0]
                for c in range(nc):
                    drive[c] = dt[c] * x[c]
                for k in range(ns):
                    b_tk = Bk[ib * bsB, group, t * tsB, k]
                    base = k * nc
                    for c in range(nc):
                        factor = _exp(dt[c] * A_blk[base + c])
                        decay[base + c] = factor
                        new[base + c] = factor * old[base + c] + drive[c] * b_tk
            for t in range(t0, t1):  # dL/dy = dL/dout * silu(z); the gate's own gradient
                go = dout[ib, t, c0:c1]
                row = gs[(t - t0) * nc:(t - t0 + 1) * nc]
                if has_z:
                    _gate_grad_row(go, z[ib, t, c0:c1], pre[ib, t, c0:c1], dz[ib, t, c0:c1], row)
                else:
                    row[:] = go
            for t in range(t1 - 1, t0 - 1, -1):  # adjoint recurrence, newest position first
                dt = dt_in[ib, t, c0:c1]
                x = u[ib, t, c0:c1]
                g = gs[(t - t0) * nc:(t - t0 + 1) * nc]
                sum_ddelta = dds[(t - t0) * nc:(t - t0 + 1) * nc]
                old = states[t - t0]
                new = states[t - t0 + 1]
                decay = decays[t - t0]
                for c in range(nc):
                    drive[c] = dt[c] * x[c]
                    sum_du[c] = zero
                    sum_ddelta[c] = zero
                # State pairs (k, k + 1) share one pass over the channels, so the per-channel vectors (g,
                # drive, dt and the two sums) are loaded and stored half as often; same operations, same order.
                for pair in range(ns // 2):
                    k0 = 2 * pair
                    b0 = Bk[ib * bsB, group, t * tsB, k0]
                    b1 = Bk[ib * bsB, group, t * tsB, k0 + 1]
                    c0_tk = Ck[ib * bsC, group, t * tsC, k0]
                    c1_tk = Ck[ib * bsC, group, t * tsC, k0 + 1]
                    base0 = k0 * nc
                    base1 = base0 + nc
                    grad_b0 = zero
                    grad_c0 = zero
                    grad_b1 = zero
                    grad_c1 = zero
                    for c in range(nc):
                        g_c = g[c]
                        drive_c = drive[c]
                        lam0 = lam[base0 + c] + c0_tk * g_c  # dL/dh_t
                        grad_c0 += new[base0 + c] * g_c
                        grad_b0 += lam0 * drive_c
                        du_c = sum_du[c] + lam0 * b0
                        carried0 = lam0 * decay[base0 + c]
                        through0 = carried0 * old[base0 + c]
                        dd_c = sum_ddelta[c] + through0 * A_blk[base0 + c]
                        dA_blk[base0 + c] += through0 * dt[c]
                        lam[base0 + c] = carried0
                        lam1 = lam[base1 + c] + c1_tk * g_c
                        grad_c1 += new[base1 + c] * g_c
                        grad_b1 += lam1 * drive_c
                        sum_du[c] = du_c + lam1 * b1
                        carried1 = lam1 * decay[base1 + c]
                        through1 = carried1 * old[base1 + c]
                        sum_ddelta[c] = dd_c + through1 * A_blk[base1 + c]
                        dA_blk[base1 + c] += through1 * dt[c]
                        lam[base1 + c] = carried1
                    dB_part[block, t * tsB, k0] += grad_b0
                    dC_part[block, t * tsC, k0] += grad_c0
                    dB_part[block, t * tsB, k0 + 1] += grad_b1
                    dC_part[block, t * tsC, k0 + 1] += grad_c1
                for k in range(ns - ns % 2, ns):  # the last state when n is odd
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
                        carried = lam_k * decay[base + c]  # lam_{t-1}'s share, carried to position t - 1
                        through_decay = carried * old[base + c]  # dL/d(delta'_t A)
                        sum_ddelta[c] += through_decay * A_blk[base + c]
                        dA_blk[base + c] += through_decay * dt[c]
                        lam[base + c] = carried
                    dB_part[block, t * tsB, k] += grad_b
                    dC_part[block, t * tsC, k] += grad_c
                for c in range(nc):  # the drive's share of dL/d delta': sum_k lam_k B_k u = u sum_du
                    sum_ddelta[c] += sum_du[c] * x[c]
                    sum_du[c] *= dt[c]
                if has_D:
                    for c in range(nc):
                        sum_du[c] += g[c] * D_blk[c]
                        dD_blk[c] += g[c] * x[c]
                du[ib, t, c0:c1] = sum_du
            if softplus:
                _biased_delta(delta, ib, t0, t1, c0, c1, bias_blk, has_bias, zs)  # softplus' input again
                _softplus_grad_into(zs[:m], dds[:m])
            for t in range(t0, t1):
                row = dds[(t - t0) * nc:(t - t0 + 1) * nc]
                if has_bias:
                    for c in range(nc):
                        dbias_blk[c] += row[c]
                ddelta[ib, t, c0:c1] = row
        for k in range(ns):
            dA_t[ib, k, c0:c1] = dA_blk[k * nc:(k + 1) * nc]
        if has_D:
            dD_part[ib, c0:c1] += dD_blk
        if has_bias:
            dbias_part[ib, c0:c1] += dbias_blk


def _block_width(batch: int, dim: int, group_size: int) -> int:
    """Channels per block: up to ``CHANNEL_BLOCK`` (never across a group), narrower only where the blocks
    would otherwise be fewer than numba's threads (e.g. one long sequence)."""
    groups = batch * (dim // group_size)
    per_group = max(1, -(-numba.get_num_threads() // groups))  # blocks per group for one per thread
    return max(1, min(CHANNEL_BLOCK, group_size, -(-group_size // per_group)))


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


def _position_major(t: Tensor) -> Tensor:
    """A (b, d, l) tensor as a contiguous (b, l, d) tensor: a view of a position-major tensor, a copy otherwise
    (the kernels are compiled for contiguous arrays only, see the module docstring)."""
    return t.detach().transpose(1, 2).contiguous()


def _numpy(t: Tensor | None, like: np.ndarray) -> np.ndarray:
    """``t`` as a numpy array, or a 1-element dummy of ``like``'s dtype and rank for an absent input."""
    return t.numpy() if t is not None else np.zeros((1,) * like.ndim, like.dtype)


class _ScanFunction(torch.autograd.Function):
    """The fused op on CPU tensors in the compute dtype ((b, d, l) in and out), with the exact adjoint backward."""

    @staticmethod
    def forward(ctx, u: Tensor, delta: Tensor, z: Tensor | None, A: Tensor, Bk: Tensor, Ck: Tensor,
                D: Tensor | None, delta_bias: Tensor | None, delta_softplus: bool, group_size: int,
                last: Tensor | None) -> Tensor:
        """``last`` (b, n, d), when given, receives the state after the last position (not differentiable)."""
        u_t, delta_t = _position_major(u), _position_major(delta)
        z_t = _position_major(z) if z is not None else None
        A_t = A.detach().t().contiguous()
        Bk, Ck = Bk.detach().contiguous(), Ck.detach().contiguous()
        D_c = D.detach().contiguous() if D is not None else None
        bias_c = delta_bias.detach().contiguous() if delta_bias is not None else None
        nb, nl, nd = u_t.shape
        ns = A_t.shape[0]
        width = _block_width(nb, nd, group_size)
        save = any(ctx.needs_input_grad[:8])
        transformed = delta_bias is not None or delta_softplus
        flags = np.array([D is not None, z is not None, delta_bias is not None, delta_softplus, save,
                          last is not None], dtype=np.int64)
        n_ck = (nl + CHECKPOINT - 1) // CHECKPOINT
        checkpoints = u_t.new_empty((nb, n_ck, ns, nd) if save else (1, 1, 1, 1))
        dt_t = u_t.new_empty((nb, nl, nd)) if save and transformed else None
        pre_t = u_t.new_empty((nb, nl, nd)) if save and z is not None else None
        out_t = u_t.new_empty((nb, nl, nd))
        u_np = u_t.numpy()
        _scan_forward(u_np, delta_t.numpy(), _numpy(z_t, u_np), A_t.numpy(), Bk.numpy(), Ck.numpy(),
                      _numpy(D_c, A_t.numpy()[0]), _numpy(bias_c, A_t.numpy()[0]), flags, group_size, width,
                      out_t.numpy(), _numpy(dt_t, u_np), _numpy(pre_t, u_np), checkpoints.numpy(), CHECKPOINT,
                      _numpy(last, u_np))
        if save:
            ctx.save_for_backward(u_t, delta_t, dt_t, z_t, pre_t, A_t, Bk, Ck, D_c, bias_c, checkpoints)
            ctx.flags = flags
            ctx.group_size = group_size
            ctx.width = width  # the backward walks the same blocks (the thread count may change in between)
        return out_t.transpose(1, 2)

    @staticmethod
    @once_differentiable
    def backward(ctx, dout: Tensor):
        u_t, delta_t, dt_t, z_t, pre_t, A_t, Bk, Ck, D_c, bias_c, checkpoints = ctx.saved_tensors
        group_size = ctx.group_size
        nb, nl, nd = u_t.shape
        groups = nd // group_size
        width = ctx.width
        n_blocks = nb * groups * ((group_size + width - 1) // width)
        dout_t = _position_major(dout.to(u_t.dtype))
        du_t = torch.empty_like(u_t)
        ddelta_t = torch.empty_like(u_t)
        dz_t = torch.empty_like(u_t) if z_t is not None else None
        dA_t = u_t.new_empty((nb, *A_t.shape))
        dB_part = u_t.new_zeros((n_blocks, Bk.shape[2], Bk.shape[3]))
        dC_part = u_t.new_zeros((n_blocks, Ck.shape[2], Ck.shape[3]))
        dD_part = u_t.new_zeros((nb, nd) if D_c is not None else (1, 1))
        dbias_part = u_t.new_zeros((nb, nd) if bias_c is not None else (1, 1))
        u_np = u_t.numpy()
        vector = A_t.numpy()[0]
        _scan_backward(u_np, delta_t.numpy(), (dt_t if dt_t is not None else delta_t).numpy(), _numpy(z_t, u_np),
                       _numpy(pre_t, u_np), A_t.numpy(), Bk.numpy(), Ck.numpy(), _numpy(D_c, vector), _numpy(bias_c, vector), ctx.flags,
                       group_size, width, checkpoints.numpy(), CHECKPOINT, dout_t.numpy(), du_t.numpy(),
                       ddelta_t.numpy(), _numpy(dz_t, u_np), dA_t.numpy(), dB_part.numpy(), dC_part.numpy(),
                       dD_part.numpy(), dbias_part.numpy())
        dB = _reduce_blocks(dB_part, Bk.shape, nb, groups)
        dC = _reduce_blocks(dC_part, Ck.shape, nb, groups)
        dD = dD_part.sum(0) if D_c is not None else None
        dbias = dbias_part.sum(0) if bias_c is not None else None
        dz = dz_t.transpose(1, 2) if dz_t is not None else None
        return (du_t.transpose(1, 2), ddelta_t.transpose(1, 2), dz, dA_t.sum(0).t(), dB, dC, dD, dbias,
                None, None, None)


def selective_scan_cpu(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None = None,
                       z: Tensor | None = None, delta_bias: Tensor | None = None,
                       delta_softplus: bool = False, return_last_state: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """Same contract as ``selective_scan_reference``; inputs already validated, CPU tensors, real ``A``."""
    dtype_in = u.dtype
    compute = torch.float64 if u.dtype == torch.float64 else torch.float32

    def cast(t: Tensor | None) -> Tensor | None:
        return t if t is None else t.to(compute)

    dim = u.shape[1]
    Bk, group_size = _kernel_layout(B.to(compute), dim)
    Ck, group_size_c = _kernel_layout(C.to(compute), dim)
    if group_size != group_size_c:
        # The kernel walks blocks of channels that share one B row and one C row; mixed group layouts
        # (e.g. shared B with time-invariant C) are expanded to a common finer grouping, which is exact.
        finer = math.gcd(group_size, group_size_c)
        Bk = Bk.repeat_interleave(group_size // finer, dim=1)
        Ck = Ck.repeat_interleave(group_size_c // finer, dim=1)
        group_size = finer
    last = u.new_empty(u.shape[0], A.shape[1], dim, dtype=compute) if return_last_state else None
    out = _ScanFunction.apply(cast(u), cast(delta), cast(z), cast(A), Bk, Ck, cast(D), cast(delta_bias),
                              bool(delta_softplus), group_size, last)
    if return_last_state:
        return out.to(dtype_in), last.transpose(1, 2)
    return out.to(dtype_in)
