"""BK-Core: diagonal of the inverse of a complex-shifted tridiagonal matrix in O(N), behind one function.

``bk_core(v, k, z, causal=True, backend="auto")`` returns the real and imaginary parts of ``y`` as defined
in ``docs/bk_core.md`` (the BK-Core contract):

- causal (language models): ``y_i = [(A[:i+1,:i+1])^-1]_{ii}``, depends on positions 0..i only;
- bidirectional (``causal=False``, encoders only): ``y_i = [A^-1]_{ii}``, depends on every position;

with ``A = tridiag(k; v - z; 1)``. Shapes: ``v`` real ``(..., N)``; ``k`` real, broadcastable to
``(..., N-1)`` (a Python number, a per-row ``(..., 1)`` tensor or the full tensor; ``k >= 0`` keeps the
operator stable); ``z`` a complex Python number or a complex tensor broadcastable to ``v.shape[:-1]``
(one shift per row) with ``Im(z) > 0``. Gradients flow to ``v``, ``k`` and ``z`` (PyTorch's complex
convention: ``z.grad = dL/dRe(z) + i dL/dIm(z)``). Computation is float32 (float64 for float64 ``v``; the
reference always uses float64); outputs have ``v``'s dtype, so bfloat16/float16 inputs under autocast
come back in that dtype. Bounds: ``|y_i| <= 1/Im(z)`` in both modes when ``k >= 0``.

Backends (``BACKENDS``):

- ``reference``: dense float64 inverse, O(N^3); tests and small N only.
- ``torch``: pure PyTorch O(N) recurrence with the exact O(N) adjoint backward.
- ``torch_autograd``: the same recurrence differentiated by plain autograd (no custom backward). It exists
  for the ablation "exact adjoint vs autograd"; select it by name, ``auto`` never picks it.
- ``cpu``: numba kernels (forward and exact adjoint), CPU tensors.
- ``triton``: chunked Triton kernels, CUDA tensors (CPU tensors only under ``TRITON_INTERPRET=1``).

``backend="auto"`` resolves to triton on CUDA, cpu on CPU, otherwise torch, and logs when it has to fall
back because a fast path is missing; ``resolve_backend`` tells which one would run.

Layout: the cpu and triton kernels work on position-major planes (B, N, H). A mixer should pass
``v = proj(x).transpose(-1, -2)`` for ``x`` of shape (B, N, D) (and ``k`` laid out the same way): then no
copy is made and ``y`` comes back as the same kind of transposed view, so ``y.transpose(-1, -2)`` is a
contiguous (B, N, H) tensor. Other layouts work too: the causal cpu kernels read contiguous (B, H, N) rows
(and any strides) in place and return outputs and gradients as transposed planes; the other kernels pay one
gather of the rows.

Decoding: ``bk_core_step`` advances one position from the state ``bk_core_state`` reads off a causal
output (the last pivot, see ``step.py``).

Exact adjoint vs autograd (ablation): ``backend="torch"`` (or cpu/triton) differentiates with the exact
O(N) adjoint; ``backend="torch_autograd"`` runs the identical recurrence through plain autograd.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from numbers import Number

import torch
from torch import Tensor

from bkexp.ops import backends
from bkexp.ops.backends import OpBackends, numba_cpu_unavailable

from .layout import is_plane_view
from .step import bk_core_state, bk_core_step

BACKENDS: tuple[str, ...] = ("reference", "torch", "torch_autograd", "cpu", "triton")
TRITON_HINT = "the triton backend needs a CUDA GPU and triton: pip install triton (with a CUDA build of torch)"


def _triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _unavailable_reason(backend: str, device: torch.device) -> str | None:
    """Why ``backend`` cannot run on ``device`` (None when it can)."""
    if backend == "cpu":
        return numba_cpu_unavailable(device)
    if backend == "triton":
        if not backends.module_available("triton"):
            return TRITON_HINT
        if device.type == "cpu" and not _triton_interpreted():
            return f"{TRITON_HINT}; got a CPU tensor (CPU runs only under TRITON_INTERPRET=1)"
        if device.type not in ("cpu", "cuda"):
            return f"the triton backend runs on CUDA tensors, got device {device}"
    return None


_BACKENDS = OpBackends("bk_core", BACKENDS, {"cuda": "triton", "cpu": "cpu"}, "torch", _unavailable_reason)
available_backends = _BACKENDS.available  # backends that can run on a device here
resolve_backend = _BACKENDS.resolve  # the backend bk_core(..., backend=...) runs on a device; raises if it cannot


_POSITION_MAJOR = ("cpu", "triton")  # kernels that take rows (B, H, N) and work on (B, N, H) planes
_ROWS_PER_BATCH = 64  # rows per batch from which contiguous rows are not merged into one batch (cpu ROW_BLOCK)


def _implementation(name: str) -> Callable[..., tuple[Tensor, Tensor]]:
    if name == "reference":
        from .reference import bk_core_reference

        return bk_core_reference
    if name == "torch":
        from .torch_impl import bk_core_torch

        return bk_core_torch
    if name == "torch_autograd":
        from .torch_impl import bk_core_torch_autograd

        return bk_core_torch_autograd
    if name == "cpu":
        from .cpu import bk_core_cpu

        return bk_core_cpu
    from .triton_impl import bk_core_triton

    return bk_core_triton


def _run_position_major(fn: Callable[..., tuple[Tensor, Tensor]], v: Tensor, k: Tensor, z: Tensor,
                        causal: bool) -> tuple[Tensor, Tensor]:
    """Run a plane kernel (rows (B, H, N) in and out, (B, N, H) planes inside) on v (..., N), k, z (...).

    When ``v`` is the transpose of a position-major tensor (a mixer's ``proj(x).transpose(-1, -2)`` for
    x of shape (B, N, D)) the kernel reads it in place and the outputs come back as the same kind of
    transposed view. Otherwise all rows go to one batch, (1, rows, N), so the kernel steps them together
    after one gather. No reshape is made that changes nothing: each is an autograd node, and at small N
    their cost is of the order of the kernel's.
    """
    shape, n = v.shape, v.shape[-1]
    # Contiguous (B, H, N) rows with a full row block per batch also go in as they are: the causal cpu kernels
    # read rows in place, and a gradient in another layout then needs no reshape copy.
    if is_plane_view(v) or (v.dim() == 3 and v.is_contiguous() and shape[1] >= _ROWS_PER_BATCH):
        return fn(v, k, z, causal)
    rows = v.numel() // n
    h = shape[-2] if v.dim() >= 2 else 1
    v3 = v.reshape(rows // h, h, n)
    if not is_plane_view(v3):
        h, v3 = rows, v.reshape(1, rows, n)
    out = fn(v3, k.reshape(rows // h, h, n - 1), z.reshape(rows // h, h), causal)
    return out[0].reshape(shape), out[1].reshape(shape)


def _broadcasts_to(shape: torch.Size, target: torch.Size) -> bool:
    """Whether a tensor of ``shape`` broadcasts to exactly ``target`` (without growing it).

    Plain Python: ``torch.broadcast_shapes`` costs tens of microseconds, a sizeable part of a small call.
    """
    return len(shape) <= len(target) and all(s in (1, t) for s, t in zip(reversed(shape), reversed(target)))


def _as(t: Tensor, shape: torch.Size, device: torch.device, dtype: torch.dtype) -> Tensor:
    """``t`` converted and expanded to ``shape``; no autograd node where nothing changes."""
    if t.dtype != dtype or t.device != device:
        t = t.to(device=device, dtype=dtype)
    return t if t.shape == shape else t.expand(shape)


def _shift_tensor(z: complex | Tensor, batch_shape: torch.Size, device: torch.device,
                  complex_dtype: torch.dtype) -> Tensor:
    """Validated ``z`` expanded to ``batch_shape`` as a complex tensor (differentiable when ``z`` is one)."""
    if isinstance(z, Tensor):
        if not z.is_complex():
            raise TypeError(f"z must be complex (E + i*eps with eps > 0), got a real tensor of dtype {z.dtype}")
        if z.numel() > 0:
            eps_min = float(z.detach().imag.min())
            if not eps_min > 0:
                raise ValueError(f"bk_core needs eps = Im(z) > 0 for every row, got min Im(z) = {eps_min}")
        if not _broadcasts_to(z.shape, batch_shape):
            raise ValueError(f"z of shape {tuple(z.shape)} does not broadcast to v.shape[:-1] = {tuple(batch_shape)}")
        return _as(z, batch_shape, device, complex_dtype)
    if not isinstance(z, Number):
        raise TypeError(f"z must be a complex number or a complex tensor, got {type(z).__name__}")
    z = complex(z)
    if not z.imag > 0:
        raise ValueError(f"bk_core needs eps = Im(z) > 0, got z = {z} (eps = {z.imag})")
    return torch.full(batch_shape, z, dtype=complex_dtype, device=device)


# A torch.compile'd model runs the op eagerly: dynamo cannot trace its numba and Triton kernels (it failed inside
# numba's dispatcher) and would unroll the PyTorch recurrences position by position.
@torch.compiler.disable
def bk_core(v: Tensor, k: float | Tensor, z: complex | Tensor, *, causal: bool = True,
            backend: str = "auto") -> tuple[Tensor, Tensor]:
    """Real and imaginary parts of ``y`` (each shaped like ``v``, in ``v``'s dtype); see the module doc."""
    if not isinstance(v, Tensor) or not v.is_floating_point():
        raise TypeError(f"v must be a real floating tensor (..., N), got {getattr(v, 'dtype', type(v).__name__)}")
    if v.dim() < 1 or v.shape[-1] < 1:
        raise ValueError(f"v must have shape (..., N) with N >= 1, got {tuple(v.shape)}")
    name = resolve_backend(backend, v.device)
    batch_shape, n = v.shape[:-1], v.shape[-1]
    compute = torch.float64 if (v.dtype == torch.float64 or name == "reference") else torch.float32
    complex_dtype = torch.complex128 if compute == torch.float64 else torch.complex64

    k_t = k if isinstance(k, Tensor) else torch.tensor(float(k), device=v.device)
    if k_t.is_complex() or not (k_t.is_floating_point() or k_t.dtype in (torch.int32, torch.int64)):
        raise TypeError(f"k must be real, got dtype {k_t.dtype}")
    k_shape = batch_shape + (n - 1,)
    if not _broadcasts_to(k_t.shape, k_shape):
        raise ValueError(f"k of shape {tuple(k_t.shape)} does not broadcast to (..., N-1) = {tuple(k_shape)}")

    z_batch = _shift_tensor(z, batch_shape, v.device, complex_dtype)
    v_c = v.to(compute)
    k_c = _as(k_t, k_shape, v.device, compute)
    fn = _implementation(name)
    if torch.is_autocast_enabled(v.device.type):  # the recurrences must run in `compute`, not autocast's dtype
        with torch.autocast(device_type=v.device.type, enabled=False):
            re, im = _dispatch(fn, name, v_c, k_c, z_batch, causal)
    else:
        re, im = _dispatch(fn, name, v_c, k_c, z_batch, causal)
    if re.dtype == v.dtype:
        return re, im
    return re.to(v.dtype), im.to(v.dtype)


def _dispatch(fn: Callable[..., tuple[Tensor, Tensor]], name: str, v: Tensor, k: Tensor, z: Tensor,
              causal: bool) -> tuple[Tensor, Tensor]:
    """Call backend ``name`` on v (..., N), k (..., N-1), z (...) in the layout it wants."""
    n = v.shape[-1]
    rows = v.numel() // n
    if rows == 0:  # empty batch: nothing to compute, keep the graph connected to v
        return v * 0, v * 0
    if name in _POSITION_MAJOR:
        return _run_position_major(fn, v, k, z, causal)
    re, im = fn(v.reshape(rows, n), k.reshape(rows, n - 1), z.reshape(rows), causal)
    return re.reshape(v.shape), im.reshape(v.shape)


__all__ = ["BACKENDS", "available_backends", "bk_core", "bk_core_state", "bk_core_step", "resolve_backend"]
