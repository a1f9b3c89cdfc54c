"""Compiled CPU row moves of a mixture-of-experts layer (numba): dispatch to the experts' buffers and combine back.

``bkexp.models.moe.MoEFeedForward`` gathers each expert's (token, choice) assignments into a zero-padded buffer
of its own, runs the expert on it, and combines the results per token with the gates. In PyTorch ops that is,
per expert and direction, a gather, a zero fill of the padding, a scatter, a gating multiply, a batched dot for
the gate gradient and a sum over the choices: ~30 short passes per forward+backward, each a parallel region
(a thread wake-up under ``OMP_WAIT_POLICY=PASSIVE``) and several a fresh ``(tokens, d)`` temporary. Here each
direction is one parallel pass over rows that touches every element once:

- ``dispatch``: buffer row ``r`` of expert slot ``s`` = the token row of its assignment, or zeros (padding);
- ``combine``: ``out[t] = sum_j gate[t, j] * y_{e(t,j)}[row(t,j)]``, the products and sums in the order
  ``j = 0..k-1`` (as ``(y * gate)`` then ``y_0 + y_1 + ...`` in PyTorch);
- ``combine_backward``: the gate-scaled token gradient gathered onto each buffer row (zeros on padding) and the
  gate gradient ``<grad[t], y[row]>``, accumulated element by element from zero in the buffer's dtype (the
  order of ``torch.bmm``'s CPU kernel for a ``(1, d) x (d, 1)`` product);
- ``dispatch_backward``: ``grad_x[t] = sum_j g_{e(t,j)}[row(t,j)]`` in the order ``j = 0..k-1``.

No fast-math (not even FMA contraction): every product and sum is rounded as PyTorch's ops round it, so the
results are bit-identical to the PyTorch formulation (``tests/models/test_moe.py`` compares them), and each
token's row depends on that token alone. Buffers of all experts are passed as one tuple, so the work is split
into ``BLOCK``-row jobs across experts. Float32 and float64 only (the caller falls back to PyTorch ops for
other dtypes and devices).
"""

from __future__ import annotations

import types

import numba
import numpy as np
import torch
from numba import njit, prange
from torch import Tensor

from bkexp.ops.backends import compiled_cpu_path_applies

BLOCK = 32  # buffer rows per parallel job (8 KB of float32 at d=64; 32 KB at d=256)
PARALLEL_MIN_ELEMENTS = 1 << 16  # rows * d below which the serial variants run (a decoding step, tiny tests)
SLOT_QUANTUM = 8  # the kernels take the experts' buffers as a tuple of a multiple of this many arrays (see _slots)


def _dispatch(src, bufs, assign, starts, counts, job_slot, job_row, top_k):
    """bufs[s][r] = src[assign[starts[s] + r] // top_k] for r < counts[s], else zeros."""
    d = src.shape[1]
    for job in prange(job_slot.shape[0]):
        s = job_slot[job]
        buf = bufs[s]
        r1 = min(job_row[job] + BLOCK, buf.shape[0])
        for r in range(job_row[job], r1):
            if r < counts[s]:
                t = assign[starts[s] + r] // top_k
                for c in range(d):
                    buf[r, c] = src[t, c]
            else:
                for c in range(d):
                    buf[r, c] = 0


def _combine(ys, gate, assign_slot, assign_row, top_k, out):
    """out[t] = gate[t*k] * y[..] + gate[t*k + 1] * y[..] + ... (j = 0..k-1, each product rounded first)."""
    d = out.shape[1]
    for t in prange(out.shape[0]):
        a = t * top_k
        y = ys[assign_slot[a]]
        r = assign_row[a]
        g = gate[a]
        for c in range(d):
            out[t, c] = y[r, c] * g
        for j in range(1, top_k):
            y = ys[assign_slot[a + j]]
            r = assign_row[a + j]
            g = gate[a + j]
            for c in range(d):
                out[t, c] = out[t, c] + y[r, c] * g


def _combine_backward(grad, ys, gate, assign, starts, counts, job_slot, job_row, top_k, need_gate, gs, grad_gate):
    """gs[s][r] = gate[a] * grad[a // k] for the assignment a of buffer row r (zeros on padding rows);
    grad_gate[a] = sum_c grad[a // k, c] * ys[s][r, c] from zero in order c = 0..d-1 (grad_gate zero on entry).

    The gate gradients of four rows are accumulated side by side: each is a chain of dependent adds (the
    order is fixed, so no vectorising along c), and four independent chains hide the add latency.
    """
    d = grad.shape[1]
    for job in prange(job_slot.shape[0]):
        s = job_slot[job]
        y = ys[s]
        g_out = gs[s]
        r0 = job_row[job]
        r1 = min(r0 + BLOCK, g_out.shape[0])
        valid = min(r1, counts[s])
        r = r0
        if need_gate:
            while r + 4 <= valid:
                a0 = assign[starts[s] + r]
                a1 = assign[starts[s] + r + 1]
                a2 = assign[starts[s] + r + 2]
                a3 = assign[starts[s] + r + 3]
                t0 = a0 // top_k
                t1 = a1 // top_k
                t2 = a2 // top_k
                t3 = a3 // top_k
                acc0 = grad_gate[a0]
                acc1 = grad_gate[a1]
                acc2 = grad_gate[a2]
                acc3 = grad_gate[a3]
                for c in range(d):
                    acc0 += grad[t0, c] * y[r, c]
                    acc1 += grad[t1, c] * y[r + 1, c]
                    acc2 += grad[t2, c] * y[r + 2, c]
                    acc3 += grad[t3, c] * y[r + 3, c]
                grad_gate[a0] = acc0
                grad_gate[a1] = acc1
                grad_gate[a2] = acc2
                grad_gate[a3] = acc3
                r += 4
            while r < valid:
                a = assign[starts[s] + r]
                t = a // top_k
                acc = grad_gate[a]
                for c in range(d):
                    acc += grad[t, c] * y[r, c]
                grad_gate[a] = acc
                r += 1
        for r in range(r0, r1):
            if r < valid:
                a = assign[starts[s] + r]
                t = a // top_k
                g = gate[a]
                for c in range(d):
                    g_out[r, c] = grad[t, c] * g
            else:
                for c in range(d):
                    g_out[r, c] = 0


@njit(inline="always", error_model="numpy")
def _sum_choices(gs, assign_slot, assign_row, top_k, t, out):
    """out[t] = g[row(t*k)] + g[row(t*k + 1)] + ... (j = 0..k-1), in choice order."""
    d = out.shape[1]
    a = t * top_k
    g = gs[assign_slot[a]]
    r = assign_row[a]
    for c in range(d):
        out[t, c] = g[r, c]
    for j in range(1, top_k):
        g = gs[assign_slot[a + j]]
        r = assign_row[a + j]
        for c in range(d):
            out[t, c] = out[t, c] + g[r, c]


def _dispatch_backward(gs, assign_slot, assign_row, top_k, out):
    """out[t] = g[row(t*k)] + g[row(t*k + 1)] + ... (j = 0..k-1)."""
    for t in prange(out.shape[0]):
        _sum_choices(gs, assign_slot, assign_row, top_k, t, out)


def _dispatch_backward_router(gs, assign_slot, assign_row, top_k, grad_logits, weight, out):
    """out[t] = (g[row(t*k)] + ... + g[row(t*k + k-1)]) + grad_logits[t] @ weight: the dispatch's and the
    router's input gradients in one pass. The router term is the chain ``a_0 w_0``, then a fused multiply-add
    per further expert, in expert order (what MKL's ``mm`` gives for this shape; ``router_fusion_exact``
    checks it on the running machine before the fused pass is used). It is built in a row of scratch per job,
    expert by expert, so the loops over channels vectorise."""
    n_t, d = out.shape
    n_e = weight.shape[0]
    for job in prange((n_t + BLOCK - 1) // BLOCK):
        acc = np.empty(d, out.dtype)
        for t in range(job * BLOCK, min(job * BLOCK + BLOCK, n_t)):
            _sum_choices(gs, assign_slot, assign_row, top_k, t, out)
            a0 = grad_logits[t, 0]
            for c in range(d):
                acc[c] = a0 * weight[0, c]
            for e in range(1, n_e):
                ae = grad_logits[t, e]
                for c in range(d):
                    acc[c] = acc[c] + ae * weight[e, c]
            for c in range(d):
                out[t, c] = out[t, c] + acc[c]


@njit(cache=True)
def _layout(expert, n_experts, block_rows):
    """Stable counting sort of the assignments by expert: ``order`` (what a stable argsort gives), ``counts``,
    the slot (index among experts with work) and buffer row of every assignment, and each slot's rows."""
    n = expert.shape[0]
    counts = np.zeros(n_experts, np.int64)
    for a in range(n):
        counts[expert[a]] += 1
    starts = np.zeros(n_experts, np.int64)
    slot_of = np.full(n_experts, -1, np.int64)
    n_slots = 0
    total = 0
    for e in range(n_experts):
        starts[e] = total
        total += counts[e]
        if counts[e] > 0:
            slot_of[e] = n_slots
            n_slots += 1
    order = np.empty(n, np.int64)
    assign_slot = np.empty(n, np.int64)
    assign_row = np.empty(n, np.int64)
    fill = starts.copy()
    for a in range(n):
        e = expert[a]
        order[fill[e]] = a
        assign_slot[a] = slot_of[e]
        assign_row[a] = fill[e] - starts[e]
        fill[e] += 1
    slot_count = np.empty(n_slots, np.int64)
    slot_start = np.empty(n_slots, np.int64)
    slot_rows = np.empty(n_slots, np.int64)
    for e in range(n_experts):
        s = slot_of[e]
        if s >= 0:
            slot_count[s] = counts[e]
            slot_start[s] = starts[e]
            slot_rows[s] = counts[e] if block_rows <= 0 else -(-counts[e] // block_rows) * block_rows
    return order, counts, assign_slot, assign_row, slot_count, slot_start, slot_rows


def _compile(fn, parallel, fastmath=False):
    # Each kernel twice, threaded and serial, under their own names: numba's on-disk cache is keyed by name.
    variant = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
    variant.__qualname__ = f"{fn.__qualname__}_{'parallel' if parallel else 'serial'}"
    return njit(parallel=parallel, cache=True, error_model="numpy", fastmath=fastmath)(variant)


KERNELS = {fn.__name__: {p: _compile(fn, p) for p in (False, True)}
           for fn in (_dispatch, _combine, _combine_backward, _dispatch_backward)}
# FMA contraction for the router term's multiply-adds (the kernel's other sums have no products to contract).
KERNELS["_dispatch_backward_router"] = {p: _compile(_dispatch_backward_router, p, {"contract"}) for p in (False, True)}
_ROUTER_EXACT: dict[tuple[int, int, torch.dtype], bool] = {}


def router_fusion_exact(n_experts: int, d: int, dtype: torch.dtype) -> bool:
    """Whether the fused pass's router term equals ``grad_logits.mm(weight)`` bit for bit here (checked once per
    shape and dtype, serial and threaded kernels, on 1024 random rows): otherwise the router's input gradient
    stays a separate ``mm`` and add."""
    key = (n_experts, d, dtype)
    if key not in _ROUTER_EXACT:
        gen = torch.Generator().manual_seed(0)
        grad_logits = torch.randn(1024, n_experts, generator=gen, dtype=dtype)
        weight = torch.randn(n_experts, d, generator=gen, dtype=dtype)
        ref = grad_logits.mm(weight)
        zeros = _padded((np.zeros((1024, d), ref.numpy().dtype),), n_experts)
        rows = np.arange(1024, dtype=np.int64)
        exact = True
        threads = torch.get_num_threads()
        try:
            # numba's OpenMP layer shares torch's pool: launch the threaded kernel at torch's thread count
            numba.set_num_threads(max(1, min(threads, numba.config.NUMBA_NUM_THREADS)))
            for kernel in KERNELS["_dispatch_backward_router"].values():
                out = torch.empty_like(ref)
                kernel(zeros, np.zeros(1024, np.int64), rows, 1, _np(grad_logits), _np(weight), _np(out))
                exact &= torch.equal(out, ref)
        finally:
            torch.set_num_threads(threads)
        _ROUTER_EXACT[key] = exact
    return _ROUTER_EXACT[key]


def _kernel(name: str, elements: int):
    threads = max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))
    parallel = threads > 1 and elements >= PARALLEL_MIN_ELEMENTS
    if parallel:
        numba.set_num_threads(threads)  # follow torch's thread setting so the two agree
    return KERNELS[name][parallel]


class Layout:
    """Where every (token, choice) assignment goes: built once per forward from the top-k expert ids.

    ``order``: assignment indices ``t*k + j`` sorted by expert, stable; ``counts``: per expert (all experts);
    ``expert_ids``: the experts with work, one *slot* each; ``rows``: each slot's buffer rows (its count rounded
    up to whole ``block_rows`` blocks, or the count itself when ``block_rows`` is None); ``assign_slot``,
    ``assign_row``: each assignment's slot and row in that slot's buffer.
    """

    def __init__(self, expert_idx: Tensor, n_experts: int, block_rows: int | None) -> None:
        self.top_k = expert_idx.shape[1]
        self.n_experts = n_experts
        flat = expert_idx.reshape(-1).cpu().numpy()
        order, counts, self.assign_slot, self.assign_row, self.slot_count, self.slot_start, slot_rows = _layout(
            flat, n_experts, 0 if block_rows is None else block_rows)
        self.order = torch.from_numpy(order)
        self.counts = torch.from_numpy(counts)
        self.expert_ids = [e for e in range(n_experts) if counts[e]]
        self.rows = slot_rows.tolist()
        jobs = [(s, r) for s, rows in enumerate(self.rows) for r in range(0, rows, BLOCK)]
        self.job_slot = np.array([s for s, _ in jobs], np.int64)
        self.job_row = np.array([r for _, r in jobs], np.int64)


def _np(t: Tensor) -> np.ndarray:
    return t.detach().numpy()


def _padded(arrays: tuple[np.ndarray, ...], n_experts: int) -> tuple[np.ndarray, ...]:
    """``arrays`` padded with empty arrays to ``n_experts`` rounded up to whole ``SLOT_QUANTUM``s.

    numba compiles a kernel once per tuple length, and a parallel kernel takes a few seconds to compile. Padding
    to the expert count alone would still compile once per expert count (a sweep over ``n_experts`` 2..8 paid
    it seven times per kernel and dtype); up to eight experts now share one signature. The padding costs the
    unboxing of the empty arrays (0.3 µs per call for four of them, measured), and the kernels never index past
    the slots with work.
    """
    pad = np.empty((0, arrays[0].shape[1]), arrays[0].dtype)
    return arrays + (pad,) * (-(-n_experts // SLOT_QUANTUM) * SLOT_QUANTUM - len(arrays))


def _slots(tensors, lay: Layout) -> tuple[np.ndarray, ...]:
    """The slots' arrays, padded (``_padded``) so the signature depends neither on the number of experts with work
    nor on the expert count."""
    return _padded(tuple(_np(t) for t in tensors), lay.n_experts)


class Dispatch(torch.autograd.Function):
    """Token rows -> one zero-padded buffer per expert slot; backward: each token's k buffer-row gradients summed.

    With a ``RouterJoin`` (``join`` given), the autograd input is the join's ``token`` (``src`` is read as
    data) and the backward leaves the buffers' gradients with the join, which adds the router's term in the
    same pass.
    """

    @staticmethod
    def forward(ctx, src: Tensor, lay: Layout, data: Tensor | None = None, join: RouterJoinState | None = None
                ) -> tuple[Tensor, ...]:
        rows_src = (src if data is None else data).contiguous()
        bufs = tuple(rows_src.new_empty(r, rows_src.shape[1]) for r in lay.rows)
        _kernel("_dispatch", sum(lay.rows) * rows_src.shape[1])(
            _np(rows_src), _slots(bufs, lay), _np(lay.order), lay.slot_start, lay.slot_count,
            lay.job_slot, lay.job_row, lay.top_k)
        ctx.lay = lay
        ctx.shape = rows_src.shape
        ctx.join = join
        return bufs

    @staticmethod
    def backward(ctx, *grads: Tensor):
        lay = ctx.lay
        gs = tuple(g.contiguous() for g in grads)
        if ctx.join is not None:
            ctx.join.grads, ctx.join.lay = gs, lay
            return gs[0].new_zeros(0), None, None, None
        out = gs[0].new_empty(ctx.shape)
        _kernel("_dispatch_backward", out.numel())(_slots(gs, lay), lay.assign_slot, lay.assign_row,
                                                   lay.top_k, _np(out))
        return out, None, None, None


class RouterJoinState:
    """What a ``Dispatch`` backward hands to its ``RouterJoin``: the buffers' gradients and the layout."""

    def __init__(self) -> None:
        self.grads: tuple[Tensor, ...] | None = None
        self.lay: Layout | None = None


class RouterJoin(torch.autograd.Function):
    """``logits = src @ weight.T`` (the router, as ``nn.Linear`` computes it) plus an empty ``token`` that the
    ``Dispatch`` takes as its autograd input. The backward, which runs after both the router's and the
    dispatch's gradients are in, writes ``grad_src`` in one pass: the dispatch's sum over choices plus
    ``grad_logits @ weight`` (no separate router-gradient buffer and add). ``grad_weight`` is
    ``grad_logits.T @ src``, as autograd's ``mm`` backward computes it."""

    @staticmethod
    def forward(ctx, src: Tensor, weight: Tensor, state: RouterJoinState) -> tuple[Tensor, Tensor]:
        ctx.save_for_backward(src, weight)
        ctx.state = state
        return torch.nn.functional.linear(src, weight), src.new_empty(0)

    @staticmethod
    def backward(ctx, grad_logits: Tensor, _grad_token: Tensor):
        src, weight = ctx.saved_tensors
        state = ctx.state
        grads, lay = state.grads, state.lay
        state.grads = state.lay = None
        grad_src = grad_weight = None
        if ctx.needs_input_grad[1]:
            grad_weight = grad_logits.t().mm(src)
        if ctx.needs_input_grad[0]:
            if grads is None:  # the dispatch had no gradient (e.g. only the auxiliary loss was differentiated)
                grad_src = grad_logits.mm(weight)
            else:
                grad_src = grads[0].new_empty(src.shape)
                _kernel("_dispatch_backward_router", grad_src.numel())(
                    _slots(grads, lay), lay.assign_slot, lay.assign_row, lay.top_k,
                    _np(grad_logits.contiguous()), _np(weight.contiguous()), _np(grad_src))
        return grad_src, grad_weight, None


class Combine(torch.autograd.Function):
    """Expert outputs -> token rows, ``out[t] = sum_j gate[t, j] * y_{e(t,j)}[row(t, j)]``; backward: the gated
    token gradient on every buffer row (zeros on padding) and the gate gradient, in one pass."""

    @staticmethod
    def forward(ctx, gate: Tensor, lay: Layout, *ys: Tensor) -> Tensor:
        ys = tuple(y.contiguous() for y in ys)
        gate = gate.contiguous()
        out = ys[0].new_empty(gate.shape[0], ys[0].shape[1])
        _kernel("_combine", out.numel())(_slots(ys, lay), _np(gate).reshape(-1), lay.assign_slot,
                                         lay.assign_row, lay.top_k, _np(out))
        ctx.save_for_backward(gate, *ys)
        ctx.lay = lay
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        gate, *ys = ctx.saved_tensors
        lay = ctx.lay
        grad = grad.contiguous()
        need_gate = ctx.needs_input_grad[0]
        grad_gate = gate.new_zeros(gate.numel())
        gs = tuple(y.new_empty(y.shape) for y in ys)
        _kernel("_combine_backward", sum(lay.rows) * grad.shape[1])(
            _np(grad), _slots(ys, lay), _np(gate).reshape(-1), _np(lay.order), lay.slot_start,
            lay.slot_count, lay.job_slot, lay.job_row, lay.top_k, need_gate, _slots(gs, lay),
            _np(grad_gate))
        return (grad_gate.view_as(gate) if need_gate else None), None, *gs


def supported(x: Tensor) -> bool:
    """Whether these kernels take ``x`` (``compiled_cpu_path_applies``): a plain CPU float32/float64 tensor, not
    under autocast, no dispatch mode active (and not traced by ``torch.compile``, which runs the layer eagerly).

    Under a ``TorchDispatchMode`` (FLOP counting, fake or meta tensors, tracing) the caller runs the PyTorch
    ops, so the mode sees every op: ``FlopCounterMode`` then counts the gate gradient's ``bmm`` and the
    router's input-gradient ``mm`` as before, and fake tensors have no data for numba to read.
    """
    return compiled_cpu_path_applies(x)


__all__ = ["Combine", "Dispatch", "Layout", "RouterJoin", "RouterJoinState", "router_fusion_exact", "supported"]
